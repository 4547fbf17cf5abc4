"""Summarise a py-spy ``--format raw --threads`` profile (collapsed stacks).

    python -m bench.profsummary bench/out/profiles/storm-r1.txt [--top 25] [--rate 250]

Prints, per thread, its busy share of the recording and the functions with the most
samples inclusive (anywhere on the stack) and self (on top of the stack), so the
question "where does the reactor thread spend its time" has a direct answer.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        i = path.find(marker)
        if i >= 0:
            path = path[i + len(marker):]
            break
    return f"{m.group('func')} ({path})"


def load(path: str) -> dict[str, list[tuple[list[str], int]]]:
    threads: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():  # a frame name that contained a line break: not a sample line
                continue
            frames = stack.split(";")
            thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else "all"
            if thread != "all":
                frames = frames[1:]
            if frames and frames[0].startswith("process"):
                frames = frames[1:]
            if frames and frames[0].startswith("thread"):
                thread, frames = frames[0], frames[1:]
            threads[thread].append(([short(f) for f in frames], int(count)))
    return threads


def summarise(path: str, top: int = 25, duration: float | None = None, rate: float = 250.0) -> str:
    threads = load(path)
    out = []
    for thread, stacks in sorted(threads.items(), key=lambda kv: -sum(c for _, c in kv[1])):
        total = sum(c for _, c in stacks)
        incl: Counter = Counter()
        selfc: Counter = Counter()
        for frames, count in stacks:
            for f in set(frames):
                incl[f] += count
            if frames:
                selfc[frames[-1]] += count
        busy = f", {total / (duration * rate) * 100:.0f} % busy" if duration else ""
        out.append(f"== {thread}: {total} samples{busy}")
        out.append("   inclusive:")
        for f, c in incl.most_common(top):
            out.append(f"   {c / total * 100:5.1f} %  {f}")
        out.append("   self:")
        for f, c in selfc.most_common(top // 2):
            out.append(f"   {c / total * 100:5.1f} %  {f}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.profsummary")
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--duration", type=float, help="seconds recorded, to print the busy share")
    ap.add_argument("--rate", type=float, default=250.0)
    a = ap.parse_args()
    print(summarise(a.profile, a.top, a.duration, a.rate))


if __name__ == "__main__":
    main()
