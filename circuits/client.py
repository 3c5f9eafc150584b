"""The client API: circuits for applications in a guest.

The guest's control socket comes from an argument or from CIRCUITS_CONTROL
(set by ``circuits run --guest NAME``).  ``connect`` and ``listen`` take the
addresses applications already use; what they return are circuit endpoints
with the methods of a socket.
"""
from __future__ import annotations

import errno
import itertools
import os
import socket
import threading
import time

from circuits import protocol as p
from circuits.ring import Circuit, CircuitSpec

Address = tuple[str, int]
# The operator went away (killed, restarted).  Not ConnectionRefusedError: that
# is also the operator's answer to a CONNECT nobody listens for.
GONE = (EOFError, BrokenPipeError, ConnectionResetError)
REREGISTER_FOR = 60.0  # seconds a listener waits for an operator to come back


class Connection(Circuit):
    """A circuit endpoint that knows its addresses, as a connected socket does."""

    local: p.Endpoint
    remote: p.Endpoint
    circuit_id: int  # the operator's name for it (`circuits ctl circuits` shows it)

    def getsockname(self) -> Address:
        return (str(self.local.address), self.local.port)

    def getpeername(self) -> Address:
        return (str(self.remote.address), self.remote.port)

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Address]:
        """A datagram (or bytes) and who sent it: the peer, as on a connected socket."""
        return self.recv(bufsize, flags), self.getpeername()

    def sendto(self, data, address: Address) -> int:
        """Send to the peer; a circuit has one peer, so any other address is EISCONN."""
        host, port = address
        if p.Endpoint.parse(host, port, self.remote.proto) != self.remote:
            raise OSError(errno.EISCONN,
                          f"this circuit goes to {self.getpeername()}, not {address}")
        return self.send(data)


def _connection(msg: p.Circuit, fds: list[int]) -> Connection:
    kind = "stream" if msg.kind == p.STREAM else "dgram"
    conn = Connection(*fds, CircuitSpec(kind, msg.side, (msg.size0, msg.size1)))
    conn.local, conn.remote, conn.circuit_id = msg.local, msg.remote, msg.circuit_id
    return conn


class Control:
    """One connection to the guest's control socket; requests are serialised."""

    def __init__(self, path: str | None = None):
        path = path or os.environ.get("CIRCUITS_CONTROL")
        self.path = path
        if not path:
            raise OSError(2, "no control socket: pass control= or set CIRCUITS_CONTROL"
                             " (circuits run --guest NAME does)")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise OSError(e.errno, f"cannot reach the operator at {path}: {e.strerror}") from None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        welcome, _ = self.request(p.Hello())
        self.guest: str = welcome.guest

    def request(self, msg: p.Message) -> tuple[p.Message, list[int]]:
        """Send a request, wait for its reply; an ERROR reply raises OSError.

        A request cut short (a signal handler raising, say) leaves its reply
        unread: the connection is then closed, and the next request raises
        EOFError, which callers treat as the operator gone (they reconnect)."""
        with self._lock:
            return self.answer(self.ask(msg))

    def try_request(self, msg: p.Message) -> tuple[p.Message, list[int]] | None:
        """request(), unless another thread's request is waiting here: None."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self.answer(self.ask(msg))
        finally:
            self._lock.release()

    def ask(self, msg: p.Message) -> int:
        """Send a request without waiting; its number, for answer().  Callers
        that split a request so hold their own lock (a Listener does)."""
        if self.sock.fileno() < 0:
            raise EOFError("the control connection was closed")
        request = next(self._ids)
        try:
            p.send(self.sock, msg, request=request)
        except BaseException:
            self.close()
            raise
        return request

    def answer(self, request: int) -> tuple[p.Message, list[int]]:
        """Wait for the reply to `request` (the next message: replies come in
        order); an ERROR reply raises OSError."""
        try:
            reply, fds = _receive_soon(self.sock)
        except BaseException:
            self.close()
            raise
        if isinstance(reply, p.Error):
            p.close_all(fds)
            raise OSError(reply.code, f"{os.strerror(reply.code)}: {reply.reason}")
        if reply.request != request:
            p.close_all(fds)
            raise p.ProtocolError(f"reply to request {reply.request}, expected {request}")
        return reply, fds

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in a request
        except OSError:
            pass
        self.sock.close()


# The local operator answers most requests within tens of microseconds: a
# requester that spins that long (yielding its CPU) saves a sleep and a
# wake-up, as the ring's waits do.  Never with one CPU, where it would only
# delay the operator it waits for.
REPLY_SPIN = 50e-6 if len(os.sched_getaffinity(0)) > 1 else 0.0


def _receive_soon(sock: socket.socket) -> tuple[p.Message, list[int]]:
    """The reply: looked for for REPLY_SPIN seconds, then waited for."""
    if REPLY_SPIN:
        stop = time.perf_counter() + REPLY_SPIN
        while True:
            try:
                return p.receive(sock, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() >= stop:
                    break
                os.sched_yield()
    return p.receive(sock)


_shared: dict[str, Control] = {}
_shared_lock = threading.Lock()


def _control(path: str | None) -> Control:
    """The process's shared control connection for connects (one per path)."""
    key = path or os.environ.get("CIRCUITS_CONTROL", "")
    with _shared_lock:
        if key not in _shared or _shared[key].sock.fileno() < 0:
            _shared[key] = Control(path)
        return _shared[key]


def _endpoint(address: Address, proto: int) -> p.Endpoint:
    host, port = address
    return p.Endpoint.parse(host or "::", port, proto)


def connect(address: Address, *, kind: str = "stream", ring_size: int = 0,
            control: str | None = None) -> Connection:
    """A circuit to (host, port), as socket.create_connection; raises the
    operator's errno (ConnectionRefusedError, PermissionError, ...)."""
    proto = p.TCP if kind == "stream" else p.UDP
    request = p.Connect(_endpoint(address, proto), ring_size)
    try:
        reply, fds = _ask_connect(control, request)
    except GONE:  # a restarted operator: one more try on a new connection
        _forget(control)
        try:
            reply, fds = _ask_connect(control, request)
        except GONE:  # going away again: not a protocol's EOFError to the application
            _forget(control)
            raise OSError(errno.ENETUNREACH, "the operator went away during the connect"
                          " (it is stopping or restarting)") from None
    return _connection(reply, fds)


def _ask_connect(control: str | None, request: p.Connect) -> tuple[p.Message, list[int]]:
    """A CONNECT on the shared control connection or, while another thread's
    waits there (the operator answers a connect to the outside only once the
    host connection is up: seconds, for a slow destination), on one of its
    own, so that connects in threads never queue behind each other."""
    shared = _control(control)
    answered = shared.try_request(request)
    if answered is not None:
        return answered
    try:
        own = Control(control)
    except (OSError, EOFError):  # none to spare (the operator's limit per guest): wait our turn
        return shared.request(request)
    try:
        return own.request(request)
    finally:
        own.close()


def _forget(path: str | None) -> None:
    key = path or os.environ.get("CIRCUITS_CONTROL", "")
    with _shared_lock:
        if key in _shared:
            _shared.pop(key).close()


class Listener:
    """A listening endpoint: accept() returns (Connection, peer address).

    One ACCEPT is kept waiting at the operator once accept() was first
    called, as a kernel listener has its accept queue: the next circuit is
    handed over while the program sets up and serves the one it has (a
    setup then needs no round trip of its own to the operator).  Circuits
    handed over and never accepted end with the listener: their connectors
    see a reset, as a kernel listener's unaccepted connections do."""

    def __init__(self, address: Address, backlog: int = 128, *, kind: str = "stream",
                 ring_size: int = 0, control: str | None = None):
        proto = p.TCP if kind == "stream" else p.UDP
        self.local = _endpoint(address, proto)
        self._listen = p.Listen(self.local, backlog, ring_size)
        self._accept = p.Accept(self.local)
        self._closed = False
        self._waiting: int | None = None  # the ACCEPT request waiting at the operator
        self._lock = threading.Lock()  # accept() splits requests: one thread at a time
        self._control = Control(control)  # its own: an ACCEPT may wait long
        self._control.request(self._listen)

    def accept(self) -> tuple[Connection, Address]:
        """The next circuit to this endpoint.  If the operator goes away, wait
        for it to come back and listen again (circuits already set up go on)."""
        with self._lock:
            reply, fds = self._next()
            try:  # the next one is asked for before this one is set up
                self._waiting = self._control.ask(self._accept)
            except GONE:
                pass  # the next accept() finds the operator gone, and listens again
        conn = _connection(reply, fds)
        return conn, conn.getpeername()

    def _next(self) -> tuple[p.Message, list[int]]:
        while True:
            try:
                if self._waiting is None:
                    self._waiting = self._control.ask(self._accept)
                request, self._waiting = self._waiting, None
                return self._control.answer(request)
            except GONE:
                self._listen_again()

    def _listen_again(self) -> None:
        path, deadline = self._control.path, time.monotonic() + REREGISTER_FOR
        self._control.close()
        while not self._closed:
            try:
                self._control = Control(path)
                self._control.request(self._listen)
                return
            except (OSError, *GONE):
                if time.monotonic() > deadline:
                    raise OSError(f"the operator at {path} did not come back") from None
                time.sleep(0.05)
        raise OSError(9, "the listener was closed")

    def getsockname(self) -> Address:
        return (str(self.local.address), self.local.port)

    def close(self) -> None:
        """Stop listening (closing the control connection takes the listener with it)."""
        self._closed = True
        self._control.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def listen(address: Address, backlog: int = 128, **kw) -> Listener:
    """Listen on (host, port); host "" or "::" means every address of the guest."""
    return Listener(address, backlog, **kw)
