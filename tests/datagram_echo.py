"""A datagram listener of guest db for the preload tests (tests/test_preload_udp.py,
tests/test_preload_epoll.py), made with the client API in the test process."""
from __future__ import annotations

import contextlib
import threading

import circuits

DB = "10.0.0.2"


class Echo:
    """A datagram listener of guest db: each circuit accepted is echoed, with
    "|host:port" of the peer appended, until the circuit ends."""

    def __init__(self, operator, port: int, ring_size: int = 0):
        self.listener = circuits.listen((DB, port), kind="dgram", ring_size=ring_size,
                                        control=operator("db"))
        self.bytes_in = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn, peer), daemon=True).start()

    def _echo(self, conn, peer) -> None:
        suffix = f"|{peer[0]}:{peer[1]}".encode()
        with conn:
            while data := conn.recv(1 << 17):
                self.bytes_in += len(data)
                with contextlib.suppress(OSError):  # too big with the suffix: dropped, as UDP would
                    conn.send(data + suffix)

    def close(self) -> None:
        self.listener.close()
