"""Moving bytes between a host TCP socket and a stream circuit, in place.

Out (guest -> world): ``sock.send(circuit.read_view())`` then ``consume(n)``.
In (world -> guest): ``sock.recv_into(circuit.write_view())`` then ``commit(n)``.
The kernel copies straight from and into the circuit's memory; nothing is
buffered here, so a full ring stops the socket's reader (TCP's window closes
on the outside sender) and a full socket buffer stops the ring's reader (the
ring fills and the guest's writer waits).

Readiness drives it: the socket's read/write readiness and the circuit's
fileno() (readable on data, an end, or room after a refused reserve).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from typing import Callable

from circuits.ring import Circuit

log = logging.getLogger("circuits.proxystack")
BATCH = 16  # transfers per direction per wake-up, then others get the loop
STUCK_RETRY = 0.002  # seconds: see _rewatch
CIRCUIT, SOCK_READ, SOCK_WRITE, DONE = "circuit", "sock-read", "sock-write", "done"
_LINGER_RESET = struct.pack("ii", 1, 0)  # close sends a RST


class Splice:
    """One circuit joined to one connected TCP socket until both ends finish."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, circuit: Circuit,
                 on_end: Callable[[Splice], None] = lambda s: None):
        self.loop, self.sock, self.circuit, self.on_end = loop, sock, circuit, on_end
        sock.setblocking(False)
        circuit.setblocking(False)
        self.cfd = circuit.fileno()
        self.out_wait = self.in_wait = ""  # what each direction waits for; DONE when finished
        self.watching: set[str] = set()
        self.retry: asyncio.TimerHandle | None = None
        self.closed = False
        self.owns_sock = True  # False: a shared socket (published UDP) stays open
        self.bytes_out = self.bytes_in = 0

    def start(self) -> None:
        self._step()

    def ended(self) -> bool:
        """Whether both directions are done (then both ends are closed)."""
        return self.out_wait == DONE and self.in_wait == DONE

    # -- the two directions ------------------------------------------------

    def _out(self) -> str:
        """Guest -> world, until something blocks; what it waits for."""
        c, s = self.circuit, self.sock
        for _ in range(BATCH):
            try:
                view = c.read_view()
            except BlockingIOError:
                return CIRCUIT
            if view is None:  # the guest's SHUT_WR or close: FIN out
                _shutdown(s, socket.SHUT_WR)
                return DONE
            n = _move(view, s.send, c.consume, SOCK_WRITE)
            if isinstance(n, str):
                return n
            self.bytes_out += n
        return ""

    def _in(self) -> str:
        """World -> guest, until something blocks; what it waits for."""
        c, s = self.circuit, self.sock
        for _ in range(BATCH):
            try:
                view = c.write_view(1)
            except BlockingIOError:
                return CIRCUIT
            except BrokenPipeError:
                # The guest closed: nothing more is read for it.  The socket's
                # close then does what a kernel socket's would: a FIN if nothing
                # came unread, else (or for data that comes later) a reset.
                return DONE
            n = _move(view, s.recv_into, c.commit, SOCK_READ)
            if isinstance(n, str):
                return n
            if n == 0:  # FIN from outside: EOF in the guest
                c.shutdown(socket.SHUT_WR)
                return DONE
            self.bytes_in += n
        return ""

    # -- driving -----------------------------------------------------------

    def _step(self) -> None:
        self.retry = None
        if self.closed:
            return
        before = (self.bytes_out, self.bytes_in, self.out_wait, self.in_wait)
        try:
            if self.out_wait != DONE:
                self.out_wait = self._out()
            if self.in_wait != DONE:
                self.in_wait = self._in()
        except OSError as e:  # a reset, EPIPE and the like: the peer of that side is gone
            log.debug("splice ends: %s", e)
            return self._reset()
        if self.ended():
            return self.close()
        progressed = before != (self.bytes_out, self.bytes_in, self.out_wait, self.in_wait)
        self._rewatch(progressed)

    def _rewatch(self, progressed: bool) -> None:
        want = {w for w in (self.out_wait, self.in_wait) if w not in ("", DONE)}
        if "" in (self.out_wait, self.in_wait):  # a batch ended unblocked: go on soon
            want = set()
            self.retry = self.loop.call_soon(self._step)
        elif CIRCUIT in want and not progressed:
            # Woken for nothing: the doorbell can stay readable for data that
            # waits on the socket while we wait for room.  Its level would spin
            # the loop; look again on a short timer instead.
            want.discard(CIRCUIT)
            self.retry = self.loop.call_later(STUCK_RETRY, self._step)
        self._watch(want)

    def _watch(self, want: set[str]) -> None:
        for what in self.watching - want:
            self._unwatch_one(what)
        for what in want - self.watching:
            if what == CIRCUIT:
                self.loop.add_reader(self.cfd, self._step)
            elif what == SOCK_READ:
                self.loop.add_reader(self.sock.fileno(), self._step)
            else:
                self.loop.add_writer(self.sock.fileno(), self._step)
        self.watching = want

    def _unwatch_one(self, what: str) -> None:
        if what == CIRCUIT:
            if self.cfd >= 0:
                self.loop.remove_reader(self.cfd)
        elif what == SOCK_READ:
            self.loop.remove_reader(self.sock.fileno())
        else:
            self.loop.remove_writer(self.sock.fileno())

    # -- ending ------------------------------------------------------------

    def _reset(self) -> None:
        """One side reset or vanished: reset the other (the guest gets
        ConnectionResetError, the outside a RST)."""
        try:
            self.circuit.abort()
        except OSError:
            pass  # the guest side is gone already
        if self.owns_sock:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        self.close()

    def abort(self) -> None:
        """Reset both ends (the proxy stack stops)."""
        if not self.closed:
            self._reset()

    def close(self) -> None:
        if self.closed:
            return
        self._watch(set())
        if self.retry is not None:
            self.retry.cancel()
        self.closed = True
        self.circuit.close()
        if self.owns_sock:
            self.sock.close()
        self.on_end(self)


def _move(view: memoryview, io: Callable[[memoryview], int], release: Callable[[int], None],
          blocked: str) -> int | str:
    """One kernel call between a ring view and the socket, then the view's
    release (consume or commit) by what it moved: the byte count, or `blocked`
    when the socket would block.  The view is released on every path."""
    try:
        n = io(view)
    except BlockingIOError:
        release(0)
        return blocked
    except OSError:
        release(0)
        raise
    release(n)
    return n


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
