"""ICMP echo for the ping collector: one socket per address family, shared by every run.

Linux lets an unprivileged process send echoes through an ICMP *datagram* socket when
its group is in `net.ipv4.ping_group_range`; otherwise a raw socket is needed (root or
CAP_NET_RAW, which the packaged unit grants and nothing else). Both are tried in that
order. A raw IPv4 socket hands us the IP header too, a datagram one (and every ICMPv6
socket) does not; the kernel rewrites a datagram socket's echo id, so replies are
matched by (sequence number, a token in the payload), never by id alone.

The socket is non-blocking and read by the reactor (`addReader`): nothing here blocks.
"""
from __future__ import annotations

import itertools
import os
import socket
import struct
from typing import Any, Callable

from twisted.internet.abstract import FileDescriptor
from twisted.logger import Logger

ECHO_REQUEST = {socket.AF_INET: 8, socket.AF_INET6: 128}
ECHO_REPLY = {socket.AF_INET: 0, socket.AF_INET6: 129}
PROTOCOL = {socket.AF_INET: socket.IPPROTO_ICMP, socket.AF_INET6: socket.IPPROTO_ICMPV6}

log = Logger(namespace="taskd.agent.icmp")


class NoIcmp(OSError):
    """Neither an ICMP datagram socket nor a raw one may be opened here."""


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(family: int, ident: int, seq: int, payload: bytes) -> bytes:
    header = struct.pack("!BBHHH", ECHO_REQUEST[family], 0, 0, ident, seq)
    if family == socket.AF_INET6:  # the kernel fills ICMPv6 checksums in
        return header + payload
    return struct.pack("!BBHHH", ECHO_REQUEST[family], 0, checksum(header + payload), ident, seq) + payload


def open_socket(family: int) -> tuple[socket.socket, bool]:
    """(the socket, whether it is raw): a datagram ICMP socket if allowed, else raw."""
    errors = []
    for kind in (socket.SOCK_DGRAM, socket.SOCK_RAW):
        try:
            sock = socket.socket(family, kind, PROTOCOL[family])
        except OSError as exc:
            errors.append(f"{'datagram' if kind == socket.SOCK_DGRAM else 'raw'}: {exc.strerror or exc}")
            continue
        sock.setblocking(False)
        return sock, kind == socket.SOCK_RAW
    raise NoIcmp(f"cannot open an ICMP socket ({'; '.join(errors)}): add the agent's group to"
                 " net.ipv4.ping_group_range, or give it CAP_NET_RAW")


class _Reader(FileDescriptor):
    def __init__(self, sock: socket.socket, on_packet: Callable[[bytes], None], reactor: Any) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.on_packet = on_packet

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        for _ in range(256):  # drain what is there, a bounded amount per turn
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warn("ICMP socket read failed: {err}", err=exc.strerror or str(exc))
                return
            self.on_packet(data)

    def logPrefix(self) -> str:
        return "icmp"


class Pinger:
    """Sends echo requests and hands each matching reply's arrival time to its waiter."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._sockets: dict[int, tuple[socket.socket, bool, _Reader]] = {}
        self._waiting: dict[tuple[int, int, bytes], Callable[[float], None]] = {}
        self._seq = itertools.count(1)
        self.ident = os.getpid() & 0xFFFF

    def _socket(self, family: int) -> tuple[socket.socket, bool]:
        found = self._sockets.get(family)
        if found is None:
            sock, raw = open_socket(family)
            reader = _Reader(sock, lambda data: self._received(family, raw, data), self.reactor)
            self.reactor.addReader(reader)
            found = self._sockets[family] = (sock, raw, reader)
        return found[0], found[1]

    def send(self, family: int, address: str, token: bytes, on_reply: Callable[[float], None]) -> Callable[[], None]:
        """Send one echo request to `address`; `on_reply(arrival)` on its reply. Returns
        a function forgetting the request (when it timed out)."""
        sock, _ = self._socket(family)
        seq = next(self._seq) & 0xFFFF
        key = (family, seq, token)
        sock.sendto(echo_request(family, self.ident, seq, token), (address, 0))  # raises: nothing to forget
        self._waiting[key] = on_reply
        return lambda: self._waiting.pop(key, None)

    def _received(self, family: int, raw: bool, data: bytes) -> None:
        arrival = self.reactor.seconds()
        if raw and family == socket.AF_INET:
            data = data[(data[0] & 0x0F) * 4:] if data else b""  # skip the IP header
        if len(data) < 8 or data[0] != ECHO_REPLY[family]:
            return
        _, _, _, _, seq = struct.unpack("!BBHHH", data[:8])
        waiter = self._waiting.pop((family, seq, data[8:]), None)
        if waiter is not None:
            waiter(arrival)

    def close(self) -> None:
        for sock, _, reader in self._sockets.values():
            self.reactor.removeReader(reader)
            sock.close()
        self._sockets.clear()
