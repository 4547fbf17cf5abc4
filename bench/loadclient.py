"""A light agent-load process: many raw websocket connections speaking taskd's framing.

Not the agent daemon and not Autobahn: a minimal RFC 6455 client on asyncio protocols,
so one process on the load core can hold thousands of connections, answer the server's
pings, and time every frame with ``time.monotonic()`` (CLOCK_MONOTONIC is the same
clock in every process of the machine, so the coordinator can compare times).

It is driven by JSON lines on stdin and answers with JSON lines on stdout (one reply
per command, plus an ``expect`` notice when a watched event count is reached):

    {"cmd": "connect", "port": P, "names": [...], "path": "/api/v1/socket/{name}/1",
     "key": K, "wait": "taskList" | "open", "concurrency": 64, "timeout": 60}
    {"cmd": "expect", "tag": T, "event": "taskAdd", "name": TASKNAME, "count": N, "timeout": S}
    {"cmd": "hb_reset"}            start a heartbeat-lateness window
    {"cmd": "hb_report"}           gaps between heartbeats since hb_reset
    {"cmd": "storm", "port": P, "lists": {agent: [task ids] | null}, "timeout": S}
                                   reconnect every agent at once; time the correct taskLists
                                   (null: just the open socket); a failed attempt retries
                                   with the real agent's backoff (~1 s, 2 s, 4 s ... x0.5-1.0)
    {"cmd": "drop"}                close every connection (normal close)
    {"cmd": "count"}               open connections
    {"cmd": "quit"}
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import struct
import sys
import threading
import time
from typing import Any

now = time.monotonic

HB_EVENT = b"heartbeat"


class Conn(asyncio.Protocol):
    __slots__ = ("client", "name", "transport", "buf", "state", "opened", "first_list", "list_ids",
                 "last_hb", "max_gap", "hb_count", "late", "closed", "frag", "status", "waiter", "list_at")

    def __init__(self, client: "LoadClient", name: str) -> None:
        self.client = client
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = "handshake"
        self.opened: float | None = None
        self.first_list: float | None = None  # monotonic time of the first taskList
        self.list_ids: list[int] | None = None
        self.list_at: float | None = None
        self.last_hb: float | None = None
        self.max_gap = 0.0
        self.hb_count = 0
        self.late = 0
        self.closed = False
        self.frag: bytearray | None = None
        self.status: int | None = None
        self.waiter: asyncio.Future | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        c = self.client
        key = base64.b64encode(os.urandom(16)).decode()
        path = c.path.format(name=self.name)
        req = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{c.port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
               f"Authorization: Bearer {c.key}\r\n\r\n")
        transport.write(req.encode())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.state == "handshake":
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            del self.buf[: end + 4]
            try:
                self.status = int(head.split(" ", 2)[1])
            except (IndexError, ValueError):
                self.status = 0
            if self.status != 101:
                self.state = "refused"
                self._resolve(False)
                self.transport.close()
                return
            self.state = "open"
            self.opened = now()
            if self.client.wait == "open":
                self._resolve(True)
                self.client.storm_done(self, self.opened, True)
        self._frames()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state = "closed"
        self._resolve(False)
        self.client.lost(self)

    # -- frames --------------------------------------------------------------------------

    def _frames(self) -> None:
        buf = self.buf
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            n = b1 & 0x7F
            off = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n = struct.unpack_from("!H", buf, 2)[0]
                off = 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n = struct.unpack_from("!Q", buf, 2)[0]
                off = 10
            if b1 & 0x80:  # a server never masks; tolerate it anyway
                off += 4
            if len(buf) < off + n:
                return
            payload = bytes(buf[off: off + n])
            del buf[: off + n]
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            if opcode == 0x9:  # ping -> pong
                self.send(0xA, payload)
            elif opcode == 0x8:  # close -> echo the code, then drop
                self.send(0x8, payload[:2])
                self.transport.close()
                return
            elif opcode in (0x1, 0x2, 0x0):
                if not fin:
                    self.frag = (self.frag or bytearray()) + payload
                    continue
                if opcode == 0x0 and self.frag is not None:
                    payload = bytes(self.frag + payload)
                    self.frag = None
                if opcode != 0x1:
                    self.event(payload)

    def event(self, frame: bytes) -> None:
        t = now()
        if len(frame) < 2:
            return
        n = frame[1]
        name = frame[2: 2 + n]
        if name == HB_EVENT:
            if self.last_hb is not None:
                gap = t - self.last_hb
                if gap > self.max_gap:
                    self.max_gap = gap
                if gap > self.client.late_after:
                    self.late += 1
            self.last_hb = t
            self.hb_count += 1
            return
        c = self.client
        if name == b"taskList":
            try:
                ids = sorted(task["id"] for task in json.loads(frame[2 + n:]))
            except Exception:
                ids = None
            self.list_ids = ids
            self.list_at = t
            if self.first_list is None:
                self.first_list = t
            if c.wait == "taskList":
                self._resolve(True)
            c.list_received(self)
        elif name == b"taskAdd":
            try:
                task_name = json.loads(frame[2 + n:]).get("name")
            except Exception:
                task_name = None
            c.task_added(task_name, t)

    def send(self, opcode: int, payload: bytes) -> None:
        """A masked frame (clients must mask); an all-zero key keeps it cheap."""
        if self.transport is None or self.transport.is_closing():
            return
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        self.transport.write(head + b"\x00\x00\x00\x00" + payload)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self.state == "open":
                self.send(0x8, struct.pack("!H", 1000))
            self.transport.close()

    def _resolve(self, ok: bool) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(ok)


class LoadClient:
    def __init__(self, out: Any) -> None:
        self.out = out
        self.conns: dict[str, Conn] = {}
        self.port = 0
        self.path = "/api/v1/socket/{name}/1"
        self.key = ""
        self.wait = "taskList"
        self.late_after = 4.0
        self.expects: dict[str, dict] = {}  # task name -> expectation
        self.added: dict[str, list[float]] = {}  # task name -> receive times (until expected)
        self.storm_lists: dict[str, list[int]] | None = None
        self.storm_state: dict | None = None

    def reply(self, obj: dict) -> None:
        self.out.write(json.dumps(obj) + "\n")
        self.out.flush()

    # -- callbacks from connections -------------------------------------------------------

    def lost(self, conn: Conn) -> None:
        """In a storm, an agent whose connection fails before its taskList reconnects
        after the real agent's backoff (~1 s, 2 s, 4 s ... each scaled by 0.5-1.0)."""
        s = self.storm_state
        if s is None or conn.name not in s["pending"] or self.conns.get(conn.name) is not conn:
            return
        attempt = s["attempts"].get(conn.name, 1)
        s["attempts"][conn.name] = attempt + 1
        s["retries"] += 1
        delay = min(30.0, 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        asyncio.get_running_loop().call_later(delay, lambda: asyncio.ensure_future(s["connect"](conn.name)))

    def task_added(self, task_name: str | None, t: float) -> None:
        if task_name is None:
            return
        times = self.added.setdefault(task_name, [])
        times.append(t)
        exp = self.expects.get(task_name)
        if exp is not None and len(times) >= exp["count"]:
            self._finish_expect(task_name, timed_out=False)

    def _finish_expect(self, task_name: str, timed_out: bool) -> None:
        exp = self.expects.pop(task_name, None)
        if exp is None:
            return
        if exp["timer"] is not None:
            exp["timer"].cancel()
        times = self.added.pop(task_name, [])
        self.reply({"ev": "expect", "tag": exp["tag"], "count": len(times), "wanted": exp["count"],
                    "first": min(times) if times else None, "last": max(times) if times else None,
                    "timed_out": timed_out})

    def list_received(self, conn: Conn) -> None:
        if self.wait == "taskList" and self.storm_state is not None:
            self.storm_done(conn, conn.list_at, conn.list_ids == self.storm_lists.get(conn.name))

    def storm_done(self, conn: Conn, t: float, good: bool) -> None:
        """A storming agent is done: open (bare server) or with its first taskList (taskd)."""
        s = self.storm_state
        if s is None or conn.name not in s["pending"] or self.conns.get(conn.name) is not conn:
            return
        s["pending"].discard(conn.name)
        if good:
            s["ok"] += 1
            s["last_ok"] = max(s["last_ok"] or 0.0, t)
            s["done_at"].append(t)
        else:
            s["bad"].append((conn.name, conn.list_ids, self.storm_lists.get(conn.name)))
        if not s["pending"] and not s["future"].done():
            s["future"].set_result(None)

    # -- commands -------------------------------------------------------------------------

    async def connect(self, names: list[str], concurrency: int, timeout: float) -> dict:
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(concurrency)
        start = now()
        errors: dict[str, int] = {}
        ok = 0

        async def one(name: str) -> None:
            nonlocal ok
            async with sem:
                old = self.conns.get(name)
                if old is not None and not old.closed:
                    old.close()
                conn = Conn(self, name)
                conn.waiter = loop.create_future()
                self.conns[name] = conn
                try:
                    await asyncio.wait_for(
                        loop.create_connection(lambda: conn, "127.0.0.1", self.port), timeout)
                    good = await asyncio.wait_for(conn.waiter, max(0.1, timeout - (now() - start)))
                except Exception as exc:  # timeout, refused
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    conn.close()
                    return
                if good:
                    ok += 1
                else:
                    key = f"http {conn.status}" if conn.status else "closed"
                    errors[key] = errors.get(key, 0) + 1

        await asyncio.gather(*(one(n) for n in names))
        return {"ok": ok, "failed": len(names) - ok, "errors": errors, "elapsed": now() - start}

    async def storm(self, lists: dict[str, list[int]], timeout: float) -> dict:
        """Reconnect every agent named in `lists` at once; wait for its first taskList."""
        loop = asyncio.get_running_loop()
        self.storm_lists = lists
        fut = loop.create_future()
        t0 = now()
        errors: dict[str, int] = {}

        async def one(name: str) -> None:
            if self.storm_state is not s or name not in s["pending"]:
                return
            conn = Conn(self, name)
            self.conns[name] = conn
            try:
                await loop.create_connection(lambda: conn, "127.0.0.1", self.port)
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                self.lost(conn)

        self.storm_state = s = {"pending": set(lists), "ok": 0, "bad": [], "last_ok": None, "future": fut,
                                "done_at": [], "attempts": {}, "retries": 0, "connect": one}

        await asyncio.gather(*(one(n) for n in lists))
        connected_at = now()
        try:
            await asyncio.wait_for(fut, max(0.1, timeout - (now() - t0)))
        except asyncio.TimeoutError:
            pass
        self.storm_state = None
        refused = [c.status for c in self.conns.values() if c.state == "refused"]
        return {"t0": t0, "connects_issued": connected_at - t0, "ok": s["ok"], "bad": len(s["bad"]),
                "done_at": sorted(round(t, 4) for t in s["done_at"]),
                "bad_examples": s["bad"][:3], "missing": len(s["pending"]), "last_ok": s["last_ok"],
                "errors": errors, "refused": len(refused), "retries": s["retries"]}

    def hb_reset(self) -> dict:
        t = now()
        for c in self.conns.values():
            c.max_gap = 0.0
            c.late = 0
            c.hb_count = 0
            c.last_hb = t if not c.closed else None
        self.hb_since = t
        return {"t": t}

    def hb_report(self) -> dict:
        t = now()
        gaps = []
        late = 0
        beats = 0
        open_ = 0
        for c in self.conns.values():
            if c.closed:
                continue
            open_ += 1
            gap = c.max_gap
            if c.last_hb is not None:
                tail = t - c.last_hb  # a heartbeat that is overdue right now counts too
                gap = max(gap, tail)
                if tail > self.late_after:
                    late += 1
            gaps.append(gap)
            late += c.late
            beats += c.hb_count
        gaps.sort()
        return {"open": open_, "beats": beats, "late": late, "max_gap": gaps[-1] if gaps else None,
                "p99_gap": gaps[int(0.99 * (len(gaps) - 1))] if gaps else None, "window": t - self.hb_since}

    def drop(self) -> dict:
        n = 0
        for c in self.conns.values():
            if not c.closed:
                c.close()
                n += 1
        return {"closed": n}

    def count(self) -> dict:
        return {"open": sum(1 for c in self.conns.values() if not c.closed and c.state == "open")}

    async def handle(self, msg: dict) -> dict | None:
        cmd = msg["cmd"]
        if "port" in msg:
            self.port = msg["port"]
        for k in ("path", "key", "wait"):
            if k in msg:
                setattr(self, k, msg[k])
        if "late_after" in msg:
            self.late_after = msg["late_after"]
        if cmd == "connect":
            return await self.connect(msg["names"], msg.get("concurrency", 64), msg.get("timeout", 60.0))
        if cmd == "expect":
            loop = asyncio.get_running_loop()
            name = msg["name"]
            exp = {"tag": msg["tag"], "count": msg["count"], "timer": None}
            self.expects[name] = exp
            exp["timer"] = loop.call_later(msg.get("timeout", 30.0), self._finish_expect, name, True)
            if len(self.added.get(name, ())) >= msg["count"]:
                self._finish_expect(name, timed_out=False)
            return {"armed": name}
        if cmd == "hb_reset":
            return self.hb_reset()
        if cmd == "hb_report":
            return self.hb_report()
        if cmd == "storm":
            return await self.storm(msg["lists"], msg.get("timeout", 30.0))
        if cmd == "drop":
            return self.drop()
        if cmd == "count":
            return self.count()
        if cmd == "forget":
            self.added.clear()
            return {}
        if cmd == "quit":
            self.drop()
            return None
        return {"error": f"unknown command {cmd}"}


async def main() -> None:
    loop = asyncio.get_running_loop()
    client = LoadClient(sys.stdout)
    queue: asyncio.Queue = asyncio.Queue()

    def reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=reader, daemon=True).start()
    client.reply({"ev": "ready", "pid": os.getpid()})

    async def run(msg: dict) -> None:
        try:
            result = await client.handle(msg)
        except Exception as exc:  # report, never die silently
            result = {"error": f"{type(exc).__name__}: {exc}"}
        if result is not None:
            client.reply({"ev": "reply", "id": msg.get("id"), **result})

    tasks = set()
    while True:
        line = await queue.get()
        if line is None:
            break
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            client.drop()
            await asyncio.sleep(0.2)
            break
        t = asyncio.ensure_future(run(msg))  # commands may overlap (expect while posting)
        tasks.add(t)
        t.add_done_callback(tasks.discard)


if __name__ == "__main__":
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
    asyncio.run(main())
