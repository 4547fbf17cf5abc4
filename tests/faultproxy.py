"""A TCP proxy that injects faults between taskd and a real server (the shared MariaDB),
so outage tests never stop or SIGSTOP the real one.

Modes: `forward` (pass bytes both ways), `stall()` (accept and hold connections but pass
nothing, as a SIGSTOPped server does), `refuse()` (reset new connections and cut the open
ones, as a stopped server does), `resume()` (forward again; held connections carry on
with what was buffered). Plain threads, so it works while the reactor is blocked
(start-up migrations run before the reactor does).
"""
from __future__ import annotations

import select
import socket
import struct
import threading

FORWARD, STALL, REFUSE = "forward", "stall", "refuse"


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = FORWARD
        self._changed = threading.Condition()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket | None]] = []
        self._lock = threading.Lock()
        self._closed = False
        self.accepted = 0
        threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True).start()

    # -- control ------------------------------------------------------------------------

    def _set(self, mode: str) -> None:
        with self._changed:
            self.mode = mode
            self._changed.notify_all()

    def stall(self) -> None:
        self._set(STALL)

    def resume(self) -> None:
        self._set(FORWARD)

    def refuse(self) -> None:
        """New connections are reset at once; open ones are cut."""
        self._set(REFUSE)
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            _reset(client)
            if upstream is not None:
                upstream.close()

    def close(self) -> None:
        self._closed = True
        self._set(FORWARD)
        self._listener.close()
        self.refuse()

    # -- plumbing -----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.mode == REFUSE:
                _reset(client)
                continue
            threading.Thread(target=self._serve, args=(client,), name="faultproxy-conn", daemon=True).start()

    def _wait_not_stalled(self) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self.mode != STALL)

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            self._pairs.append((client, None))
        self._wait_not_stalled()  # a stalled server accepts and then says nothing
        if self.mode == REFUSE:
            return  # refuse() reset it
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        with self._lock:
            self._pairs = [(c, upstream if c is client else u) for c, u in self._pairs]
        socks = [client, upstream]
        try:
            while True:
                readable, _, _ = select.select(socks, [], [], 0.2)
                if self.mode == REFUSE or self._closed:
                    return
                if self.mode == STALL:
                    self._wait_not_stalled()  # bytes wait in the kernel buffers meanwhile
                    continue
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        except (OSError, ValueError):  # cut by refuse() or close() meanwhile
            return
        finally:
            for sock in socks:
                try:
                    sock.close()
                except OSError:
                    pass
            with self._lock:
                self._pairs = [(c, u) for c, u in self._pairs if c is not client]


def _reset(sock: socket.socket) -> None:
    """Close with RST, as a port with nothing listening answers."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
