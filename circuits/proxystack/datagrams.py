"""UDP through datagram circuits: one record in the ring is one UDP datagram.

Egress: the guest's datagram circuit is joined to one host UDP socket
connected to the guest's destination (so only that peer's datagrams come
back, and the guest's recvfrom shows that peer).  Ingress: a published UDP
port is one host socket shared by every outside peer; each new peer becomes a
circuit to the guest's datagram listener, and its datagrams go to that
circuit.  UDP keeps its semantics: when a guest's ring is full, datagrams for
it are dropped (as by a full socket buffer), never queued here.  A flow with
no datagram either way for the idle timeout is closed.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from typing import Callable

from circuits.proxystack.splice import CIRCUIT, DONE, SOCK_READ, SOCK_WRITE, Splice
from circuits.ring import Circuit

log = logging.getLogger("circuits.proxystack")
MAX_UDP = 65507  # the largest UDP payload over IPv4
# Errors a UDP socket reports for earlier datagrams (ICMP); UDP goes on after them.
SOFT_ERRORS = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EMSGSIZE,
               errno.ENOBUFS)


def room(circuit: Circuit) -> int:
    """The size to reserve for one incoming datagram."""
    return min(MAX_UDP, circuit.max_datagram)


class DatagramSplice(Splice):
    """A datagram circuit and a connected UDP socket (egress)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, circuit: Circuit,
                 idle: float, on_end: Callable[[Splice], None] = lambda s: None):
        super().__init__(loop, sock, circuit, on_end)
        self.idle, self.last = idle, time.monotonic()
        self.idle_timer = loop.call_later(idle, self._check_idle)

    def _check_idle(self) -> None:
        if self.closed:
            return
        left = self.last + self.idle - time.monotonic()
        if left <= 0:
            log.debug("udp flow idle for %.0f s: closed", self.idle)
            self.close()
        else:
            self.idle_timer = self.loop.call_later(left, self._check_idle)

    def _out(self) -> str:
        c = self.circuit
        for _ in range(64):
            try:
                view = c.read_view()
            except BlockingIOError:
                return CIRCUIT
            if view is None:  # the guest closed: UDP has no half-close
                self.in_wait = DONE
                return DONE
            try:
                sent = self._send(view)
            except OSError as e:
                if e.errno not in SOFT_ERRORS:
                    c.consume(0)
                    raise
                sent = True  # lost, as UDP loses it
            if not sent:
                c.consume(0)
                return SOCK_WRITE
            self.bytes_out += len(view)
            c.consume()
            self.last = time.monotonic()
        return ""

    def _send(self, view: memoryview) -> bool:
        """One datagram out; False: the socket is full, wait for it."""
        try:
            self.sock.send(view)
        except BlockingIOError:
            return False
        return True

    def _in(self) -> str:
        c = self.circuit
        for _ in range(64):
            try:
                view = c.write_view(room(c))
            except BlockingIOError:
                return CIRCUIT
            try:
                n = self.sock.recv_into(view)
            except BlockingIOError:
                c.cancel_write()
                return SOCK_READ
            except OSError as e:
                c.cancel_write()
                if e.errno in SOFT_ERRORS:
                    continue
                raise
            c.commit(n)
            self.bytes_in += n
            self.last = time.monotonic()
        return ""

    def close(self) -> None:
        self.idle_timer.cancel()
        super().close()


class Flow(DatagramSplice):
    """One outside peer of a published UDP port, and its circuit to the guest.

    The published socket is shared: its reader hands this flow its datagrams
    (deliver), and this flow sends the guest's with sendto.  A full socket
    buffer or a full ring drops a datagram, as UDP does; nothing waits."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, circuit: Circuit,
                 peer: tuple, idle: float, on_end: Callable[[Splice], None] = lambda s: None):
        super().__init__(loop, sock, circuit, idle, on_end)
        self.peer, self.owns_sock = peer, False
        self.in_wait = DONE  # the published socket's reader delivers instead
        self.dropped = 0

    def _send(self, view: memoryview) -> bool:
        """To the peer from the shared socket; a full one drops the datagram
        (waiting would stall every peer of the port)."""
        try:
            self.sock.sendto(view, self.peer)
        except BlockingIOError:
            self.dropped += 1
        return True

    def deliver(self, first: bytes | None = None) -> None:
        """The next datagram of the shared socket is this peer's: into the ring
        in place (or `first`, one taken off before the circuit existed)."""
        c = self.circuit
        try:
            view = c.write_view(room(c))
        except (BlockingIOError, OSError):
            self.dropped += 1
            if first is None:
                _discard(self.sock)
            return
        if first is not None:
            view[: len(first)] = first
            c.commit(len(first))
        else:
            try:
                n = self.sock.recv_into(view)
            except OSError:
                c.cancel_write()
                return
            c.commit(n)
        self.bytes_in += len(first) if first is not None else n
        self.last = time.monotonic()


def _discard(sock: socket.socket) -> None:
    try:
        sock.recv(1)
    except OSError:
        pass
