"""A minimal HTTP/1.1 keep-alive client on asyncio protocols, and a closed-loop load generator.

Minimal on purpose: the load generator must outrun a one-core Twisted server from the
other core, so it parses only the status line, Content-Length and chunked bodies.

    python -m bench.httpc --port P --method GET --path /api/v1/agents/1 \
        --header "Authorization: Bearer K" --conc 8 --duration 3 --warmup 0.5

prints one JSON line: {"requests", "rate", "p50_ms", "p99_ms", "errors", "statuses"}.
A body may contain ``{n}``, replaced by a per-request counter (unique task names).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

now = time.monotonic


class HttpConn(asyncio.Protocol):
    """One keep-alive connection; `request` sends one request and awaits its response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed before the response"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None or self.waiter.done():
            return
        parsed = parse_response(self.buf)
        if parsed is not None:
            status, body, used = parsed
            del self.buf[:used]
            self.waiter.set_result((status, body))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


def dechunk(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """A chunked body starting at ``pos``: (body, end position), or None if incomplete."""
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        if len(buf) < eol + 2 + size + 2:
            return None
        body += buf[eol + 2: eol + 2 + size]
        pos = eol + 2 + size + 2
        if size == 0:
            return bytes(body), pos


def parse_response(buf: bytearray) -> tuple[int, bytes, int] | None:
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).decode("latin-1").lower()
    status = int(head[9:12])
    start = end + 4
    if "transfer-encoding: chunked" in head:
        got = dechunk(buf, start)
        return None if got is None else (status, got[0], got[1])
    length = 0
    i = head.find("\r\ncontent-length:")
    if i >= 0:
        j = head.find("\r\n", i + 2)
        length = int(head[i + 17: j if j >= 0 else None])
    if len(buf) < start + length:
        return None
    return status, bytes(buf[start: start + length]), start + length


def build(method: str, path: str, port: int, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Http:
    """A single keep-alive connection for the coordinator's own calls."""

    def __init__(self, port: int, key: str | None = None) -> None:
        self.port = port
        self.key = key
        self.conn: HttpConn | None = None

    async def request(self, method: str, path: str, body: object = None, timeout: float = 30.0) -> tuple[int, object]:
        raw_body = b"" if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        if self.conn is None or self.conn.closed:
            loop = asyncio.get_running_loop()
            _, self.conn = await loop.create_connection(HttpConn, "127.0.0.1", self.port)
        status, data = await asyncio.wait_for(self.conn.request(build(method, path, self.port, headers, raw_body)),
                                              timeout)
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, data

    def close(self) -> None:
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.close()
        self.conn = None


async def load(port: int, method: str, path: str, headers: dict[str, str], body: str, conc: int,
               duration: float, warmup: float) -> dict:
    """`conc` connections, each sending its next request when the last one is answered."""
    loop = asyncio.get_running_loop()
    counter = [0]
    prefix = f"{os.getpid()}-{int(time.time() * 1000) % 10_000_000}"
    lat: list[float] = []
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    t_start = now()
    t_measure = t_start + warmup
    t_end = t_measure + duration
    measured = [0]

    def next_raw() -> bytes:
        counter[0] += 1
        b = body.replace("{n}", f"{prefix}-{counter[0]}").encode() if body else b""
        return build(method, path, port, headers, b)

    async def worker() -> None:
        _, conn = await loop.create_connection(HttpConn, "127.0.0.1", port)
        while True:
            t0 = now()
            if t0 >= t_end:
                break
            try:
                status, _ = await asyncio.wait_for(conn.request(next_raw()), 30)
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                conn.transport.close()
                _, conn = await loop.create_connection(HttpConn, "127.0.0.1", port)
                continue
            t1 = now()
            if t0 >= t_measure and t1 <= t_end:
                lat.append(t1 - t0)
                statuses[status] = statuses.get(status, 0) + 1
                measured[0] += 1
        conn.transport.close()

    await asyncio.gather(*(worker() for _ in range(conc)))
    lat.sort()

    def pct(p: float) -> float | None:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else None

    ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
    return {"requests": measured[0], "ok": ok, "rate": ok / duration, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "errors": errors, "statuses": {str(k): v for k, v in statuses.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.httpc")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--method", default="GET")
    ap.add_argument("--path", default="/")
    ap.add_argument("--header", action="append", default=[])
    ap.add_argument("--body", default="")
    ap.add_argument("--conc", type=int, default=8)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    a = ap.parse_args()
    headers = dict(h.split(": ", 1) for h in a.header)
    if a.body:
        headers.setdefault("Content-Type", "application/json")
    result = asyncio.run(load(a.port, a.method, a.path, headers, a.body, a.conc, a.duration, a.warmup))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
