"""A circuit endpoint shaped like a socket, over the C ring core.

Python crosses into C once per call (one buffer, one view), never per byte;
every wait (spinning, then sleeping on the doorbell) happens inside C with
the GIL released.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import time
from dataclasses import dataclass
from typing import Literal

from circuits.ring._ring import ffi, lib

Kind = Literal["stream", "dgram"]
_KIND_CODE = {"stream": lib.CIRCUIT_STREAM, "dgram": lib.CIRCUIT_DGRAM}
_FOREVER = -1
# The per-call path, looked up once (an attribute of lib costs a lookup per call).
_send, _recv, _ALL = lib.circuit_send, lib.circuit_recv, lib.CIRCUIT_ALL


@dataclass(frozen=True)
class CircuitSpec:
    """What both sides of a circuit agree on; it comes from a trusted party.

    ``sizes[d]`` is the data area of direction ``d``; side ``s`` sends on
    direction ``s`` and receives on direction ``1 - s``.
    """

    kind: Kind
    side: int
    sizes: tuple[int, int]

    def params(self):
        """The C ``struct circuit_params`` for this spec."""
        p = ffi.new("struct circuit_params *")
        p.kind = _KIND_CODE[self.kind]
        p.size[0], p.size[1] = self.sizes
        return p

    def peer(self) -> CircuitSpec:
        """The spec of the other side."""
        return CircuitSpec(self.kind, 1 - self.side, self.sizes)


def _raise(code: int) -> None:
    """Turn a negative errno from C into the OSError subclass sockets raise."""
    err = -code
    if err == errno.ETIMEDOUT:
        raise TimeoutError(errno.ETIMEDOUT, "timed out")
    raise OSError(err, os.strerror(err))


class ViewError(BufferError):
    """A zero-copy view was misused (still exported, or none is open)."""


class Circuit:
    """One endpoint of a circuit, with the methods of a socket.

    Built from file descriptors: ``memfd`` (the circuit memory), ``bell``
    (the end of our doorbell we sleep on, which is :meth:`fileno`),
    ``self_bell`` (its other end, to ring ourselves) and ``peer_bell`` (the
    ringing end of the peer's doorbell).  The endpoint owns all four and
    closes them in :meth:`close`.
    """

    def __init__(self, memfd: int, bell: int, self_bell: int, peer_bell: int,
                 spec: CircuitSpec):
        fds = ffi.new("struct circuit_fds *",
                      {"bell": bell, "self_bell": self_bell, "peer_bell": peer_bell})
        out = ffi.new("struct circuit **")
        rc = lib.circuit_attach(memfd, fds, spec.params(), spec.side, out)
        if rc < 0:
            _raise(rc)
        self._c = ffi.gc(out[0], _finalizer(_pid))
        self._memfd = memfd
        self._fds = (bell, self_bell, peer_bell)
        self.spec = spec
        self._timeout: float | None = None
        self._flags = 0
        self._read_shut = False
        self._watch: select.epoll | None = None
        self._ptr = ffi.new("void **")
        self._rview: memoryview | None = None
        self._wview: memoryview | None = None
        self._areas: list | None = None  # made at the first view: setups stay cheap

    def _area(self, direction: int) -> tuple[memoryview, int]:
        """A memoryview over a mirror-mapped data area, and its base address.

        The view keeps the C endpoint alive (through the cdata's destructor
        closure), so memory stays mapped while any view or slice of it lives.
        """
        c = self._c
        size = lib.circuit_area_size(c, direction)
        base = ffi.cast("uint8_t *", lib.circuit_area_base(c, direction))
        owner = ffi.gc(base, lambda _p, _keep=c: None)
        mv = memoryview(ffi.buffer(owner, 2 * size))
        return mv, int(ffi.cast("uintptr_t", base))

    # -- identity ---------------------------------------------------------

    @property
    def type(self) -> int:
        """socket.SOCK_STREAM or socket.SOCK_DGRAM."""
        return socket.SOCK_STREAM if self.spec.kind == "stream" else socket.SOCK_DGRAM

    @property
    def memfd(self) -> int:
        """The circuit memory, for handing this endpoint to another process."""
        return self._memfd

    def fds(self) -> list[int]:
        """[memfd, bell, self_bell, peer_bell]: pass them with socket.send_fds."""
        return [self._memfd, *self._fds]

    def fileno(self) -> int:
        """A descriptor that polls readable when there is something to do:
        data, an end of data (the peer's shutdown, close, reset or death), or
        room that a refused non-blocking send waits for.  -1 once closed.

        It is an epoll set of our doorbell (rings) and the peer's doorbell
        (whose hang-up is the peer's death), made at the first call.
        """
        if lib.circuit_bell(self._c) < 0:
            return -1
        if self._watch is None:
            bell, _self_bell, peer_bell = self._fds
            watch = select.epoll()
            watch.register(bell, select.EPOLLIN)
            watch.register(peer_bell, 0)  # hang-up and errors are always reported
            lib.circuit_arm_read(self._c)  # sets the readiness rule up; it then holds
            self._watch = watch
        return self._watch.fileno()

    @property
    def max_datagram(self) -> int:
        """Largest datagram this endpoint can send."""
        return lib.circuit_max_dgram(self._c)

    @property
    def bytes_sent(self) -> int:
        return lib.circuit_bytes_sent(self._c)

    @property
    def bytes_received(self) -> int:
        return lib.circuit_bytes_received(self._c)

    # -- timeouts ---------------------------------------------------------

    def settimeout(self, value: float | None) -> None:
        """None blocks, 0 never waits, a positive number bounds each call."""
        if value is not None and value < 0:
            raise ValueError("Timeout value out of range")
        self._timeout = None if value is None else float(value)
        self._flags = lib.CIRCUIT_NONBLOCK if value == 0 else 0

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def _deadline(self) -> int:
        if not self._timeout:
            return _FOREVER
        return time.monotonic_ns() + int(self._timeout * 1e9)

    # -- copying data path ------------------------------------------------

    def _call(self, fn, *args) -> int:
        """Run a C call, retrying after signals (PEP 475), raising on errors.

        Signal handlers run between the retries; one that raises ends the call.
        """
        while True:
            rc = fn(self._c, *args)
            if rc >= 0:
                return rc
            if rc != -errno.EINTR:
                return rc

    def send(self, data, flags: int = 0) -> int:
        """Send bytes; returns how many were taken (all of a datagram)."""
        if self._wview is not None:
            self._drop_wview()
        deadline = -1 if not self._timeout else self._deadline()
        if type(data) is bytes:  # passed to C as is: no buffer export
            rc = _send(self._c, data, len(data), self._flags, deadline)
        else:
            rc = _send(self._c, ffi.from_buffer(data), _nbytes(data), self._flags, deadline)
        if rc < 0:
            return self._send_failed(rc, data, flags)
        return rc

    def _send_failed(self, rc: int, data, flags: int) -> int:
        if rc == -errno.EINTR:  # PEP 475: handlers have run, go again
            return self.send(data, flags)
        _raise(rc)

    def sendall(self, data, flags: int = 0) -> None:
        """Send every byte, waiting as needed (the timeout bounds the whole)."""
        if self._wview is not None:
            self._drop_wview()
        deadline = -1 if not self._timeout else self._deadline()
        flags_all = self._flags | _ALL
        n = _nbytes(data)
        # One call carries the whole buffer unless a signal or a timeout stops it.
        rc = _send(self._c, data if type(data) is bytes else ffi.from_buffer(data),
                   n, flags_all, deadline)
        if rc == n:
            return
        view = memoryview(data).cast("B")
        done = max(rc, 0)
        while done < n or rc < 0:
            if rc < 0 and rc != -errno.EINTR:
                _raise(rc)
            rc = lib.circuit_send(self._c, ffi.from_buffer(view[done:]), n - done,
                                  flags_all, deadline)
            done += max(rc, 0)

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        """Receive into buffer; 0 at end of data.  A datagram longer than the
        buffer is truncated (with MSG_TRUNC in flags, its full length is returned)."""
        if self._rview is not None:
            self._drop_rview()
        size = _nbytes(buffer)
        n = nbytes or size
        if n > size or n < 0:
            raise ValueError("buffer too small for requested bytes")
        if self._read_shut:
            return 0
        # A bytearray is always writable: asking cffi to check costs as much again.
        ptr = (ffi.from_buffer(buffer) if type(buffer) is bytearray
               else ffi.from_buffer(buffer, require_writable=True))
        rc = _recv(self._c, ptr, n, self._flags, -1 if not self._timeout else self._deadline())
        if rc < 0:
            return self._recv_failed(rc, buffer, nbytes, flags)
        if rc > n and not flags & socket.MSG_TRUNC:
            return n  # a datagram truncated to the buffer
        return rc

    def _recv_failed(self, rc: int, buffer, nbytes: int, flags: int) -> int:
        if rc == -errno.ESHUTDOWN:
            return 0
        if rc == -errno.EINTR:  # PEP 475: handlers have run, go again
            return self.recv_into(buffer, nbytes, flags)
        _raise(rc)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Receive up to bufsize bytes; b'' at end of data."""
        buf = bytearray(bufsize)
        n = self.recv_into(buf, bufsize)
        return bytes(memoryview(buf)[:n])

    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0):
        """Like socket.recvmsg: (data, [], msg_flags, None); MSG_TRUNC marks a
        datagram that did not fit."""
        buf = bytearray(bufsize)
        full = self.recv_into(buf, bufsize, socket.MSG_TRUNC)
        msg_flags = socket.MSG_TRUNC if full > bufsize else 0
        return bytes(memoryview(buf)[: min(full, bufsize)]), [], msg_flags, None

    # -- zero-copy data path ----------------------------------------------

    def read_view(self) -> memoryview | None:
        """A view of everything readable, read in place (a datagram: its
        payload).  None at end of data.  Valid until consume() or close()."""
        self._drop_rview()
        if self._read_shut:
            return None
        rc = self._call(lib.circuit_peek, self._flags, self._deadline(), self._ptr)
        if rc == -errno.ESHUTDOWN:
            return None
        if rc < 0:
            _raise(rc)
        self._rview = self._slice(1, rc)
        return self._rview

    def consume(self, n: int | None = None) -> None:
        """Release n bytes of the read view (default: all; a datagram: all)."""
        if self._rview is None:
            raise ViewError("no read view is open")
        size = len(self._rview)
        n = size if n is None else n
        if not 0 <= n <= size:
            raise ValueError(f"consume({n}) outside the read view of {size} bytes")
        if n != size and self.spec.kind == "dgram":
            raise ValueError(f"a datagram is consumed whole: consume({size}) or consume()")
        self._drop_rview()
        rc = lib.circuit_consume(self._c, n)
        if rc < 0:
            _raise(rc)

    def write_view(self, size: int = 1) -> memoryview:
        """A view of free space to write in place: at least ``size`` bytes
        (a datagram: room for one of ``size`` bytes).  Publish with commit()."""
        self._drop_wview()
        rc = self._call(lib.circuit_reserve, size, self._flags, self._deadline(), self._ptr)
        if rc < 0:
            if rc == -errno.EINVAL:
                raise ValueError(f"write_view({size}) larger than the ring")
            _raise(rc)
        self._wview = self._slice(0, rc)
        return self._wview

    def commit(self, n: int) -> None:
        """Publish the first n bytes written into the write view (a datagram of n bytes)."""
        if self._wview is None:
            raise ViewError("no write view is open")
        if not 0 <= n <= len(self._wview):
            raise ValueError(f"commit({n}) outside the write view of {len(self._wview)} bytes")
        self._drop_wview()
        rc = lib.circuit_commit(self._c, n)
        if rc < 0:
            _raise(rc)

    def cancel_write(self) -> None:
        """Give the write view up without publishing anything.  (For a datagram
        circuit, commit(0) publishes an empty datagram; this publishes none.)"""
        if self._wview is None:
            raise ViewError("no write view is open")
        self._drop_wview()

    def _slice(self, direction: int, n: int) -> memoryview:
        if self._areas is None:
            self._areas = [self._area(0), self._area(1)]
        mv, base = self._areas[direction]
        off = int(ffi.cast("uintptr_t", self._ptr[0])) - base
        return mv[off : off + n]

    def _drop_rview(self) -> None:
        self._rview = _release(self._rview)

    def _drop_wview(self) -> None:
        self._wview = _release(self._wview)

    # -- ending -----------------------------------------------------------

    def shutdown(self, how: int) -> None:
        """SHUT_WR: the peer reads to the end, then b''.  SHUT_RD: our reads
        return b'' (the peer is not told, as with TCP)."""
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise ValueError("invalid shutdown mode")
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            self._read_shut = True
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            rc = lib.circuit_shutdown_write(self._c)
            if rc < 0:
                _raise(rc)

    def abort(self) -> None:
        """Reset the circuit: the peer gets ConnectionResetError."""
        rc = lib.circuit_abort(self._c)
        if rc < 0:
            _raise(rc)

    def close(self) -> None:
        """End this side; the peer reads what is left, then b''.  Threads of
        ours blocked on this endpoint wake with OSError(EBADF)."""
        self._drop_rview()
        self._drop_wview()
        lib.circuit_close(self._c)
        self._close_memfd()

    def detach(self) -> None:
        """Give this endpoint up without ending the circuit: another process
        that holds the same fds carries on."""
        self._drop_rview()
        self._drop_wview()
        lib.circuit_detach(self._c)
        self._close_memfd()

    def _close_memfd(self) -> None:
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    @property
    def closed(self) -> bool:
        return lib.circuit_bell(self._c) < 0

    def __enter__(self) -> Circuit:
        return self

    def __exit__(self, *exc) -> None:
        if not self.closed:
            self.close()

    def __del__(self) -> None:
        if getattr(self, "_memfd", -1) >= 0:
            os.close(self._memfd)
            self._memfd = -1

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={lib.circuit_bell(self._c)}"
        return f"<Circuit {self.spec.kind} side={self.spec.side} {state}>"


# This process's id, kept across forks: os.getpid() is a system call, and
# a setup would make two of them.
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def _finalizer(owner_pid: int):
    """Free an endpoint that nobody closed.  In the process that made it, that
    closes the circuit, as a forgotten socket is closed; in a forked child it
    only lets go (the parent's endpoint lives on)."""
    def free(c) -> None:
        if _pid != owner_pid:
            lib.circuit_detach(c)
        lib.circuit_free(c)
    return free


def _nbytes(data) -> int:
    """Length in bytes of any buffer, cheaply for the common types."""
    kind = type(data)
    if kind is bytes or kind is bytearray:
        return len(data)
    if kind is memoryview:
        return data.nbytes
    return memoryview(data).nbytes


def _release(view: memoryview | None) -> None:
    """Release a view so that later use raises instead of reading stale memory."""
    if view is not None:
        try:
            view.release()
        except BufferError:
            raise ViewError(
                "a zero-copy view is still exported (a memoryview or array made "
                "from it is alive): release it before consume/commit/close"
            ) from None
    return None
