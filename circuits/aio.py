"""asyncio streams over circuits, on uvloop and on the default loop.

``open_connection`` and ``start_server`` mirror ``asyncio.open_connection``
and ``asyncio.start_server``: they give StreamReader/StreamWriter pairs.
Underneath, a CircuitTransport moves bytes between the protocol and a
non-blocking circuit endpoint, woken by the endpoint's fileno() (readable on
data, an end, room for a refused send, or the peer's death).  The endpoint
itself is ``writer.get_extra_info("circuit")``, for ``read_view`` below.
"""
from __future__ import annotations

import asyncio
import logging
import threading

import circuits
from circuits.client import Connection

READ_SIZE = 256 * 1024
READS_PER_WAKE = 16  # then let other callbacks run

# Open transports, held strongly: one that is not watching its fd (reading
# paused, nothing to write) is otherwise reachable only from a task the loop
# holds weakly, and garbage collection would close its circuit under it.
_open: set[CircuitTransport] = set()


class CircuitTransport(asyncio.Transport):
    """An asyncio transport over one circuit endpoint."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: Connection,
                 protocol: asyncio.BaseProtocol):
        super().__init__()
        self._loop, self._conn, self._protocol = loop, conn, protocol
        conn.setblocking(False)
        self._fd = conn.fileno()
        self._buffer = bytearray()
        self._high, self._low = 256 * 1024, 64 * 1024
        self._paused_reading = self._closing = self._eof_pending = False
        self._writing_paused = False
        self._watching = False
        self._lost = False  # connection_lost was called (or is scheduled)
        self._retry = None  # a timer standing in for readiness (see _on_ready)
        self._watch(True)
        _open.add(self)
        loop.call_soon(protocol.connection_made, self)

    # -- readiness ---------------------------------------------------------

    def _watch(self, on: bool) -> None:
        if on and not self._watching:
            self._loop.add_reader(self._fd, self._on_ready)
        elif not on and self._watching:
            self._loop.remove_reader(self._fd)
        self._watching = on

    def _rewatch(self) -> None:
        """Watch the doorbell only while we would act on it: spare the loop a
        readable fd we ignore (reading paused and nothing to write)."""
        if self._lost:
            return
        self._watch(bool(self._buffer) or (not self._closing and not self._paused_reading))

    def _on_ready(self) -> None:
        self._retry = None
        if self._lost:
            return
        try:
            before = len(self._buffer)
            if self._buffer:
                self._flush()
            if not self._paused_reading:
                self._read()
        except (ConnectionError, OSError) as e:
            self._fatal(e)
            return
        if self._lost:
            return
        stuck = self._buffer and len(self._buffer) == before
        if stuck and (self._paused_reading or self._closing):
            # The doorbell may be readable for data we do not read now; its
            # level would spin the loop.  Look for room on a short timer instead.
            self._watch(False)
            self._retry = self._loop.call_later(0.002, self._on_ready)
        else:
            self._rewatch()

    def _read(self) -> None:
        for _ in range(READS_PER_WAKE):
            if self._paused_reading or self._closing:
                return
            try:
                data = self._conn.recv(READ_SIZE)
            except BlockingIOError:
                return
            if not data:
                self._paused_reading = True  # nothing more will come
                keep_open = self._protocol.eof_received()
                if not keep_open:
                    self.close()
                return
            self._protocol.data_received(data)

    # -- writing -----------------------------------------------------------

    def write(self, data) -> None:
        if self._eof_pending:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._lost or self._closing or not data:
            return  # as asyncio's transports: data after a loss is dropped
        if not self._buffer:
            try:
                sent = self._conn.send(data)
            except BlockingIOError:
                sent = 0
            except (ConnectionError, OSError) as e:
                self._fatal(e)
                return
            data = memoryview(data)[sent:]
        if len(data):
            self._buffer += data
            self._rewatch()
            self._maybe_pause()
            if self._retry is None:  # a partial send may have met no refusal: no ring will come
                self._retry = self._loop.call_soon(self._on_ready)

    def _flush(self) -> None:
        while self._buffer:
            try:
                sent = self._conn.send(self._buffer)
            except BlockingIOError:
                break
            del self._buffer[:sent]
        if not self._buffer:
            if self._eof_pending:
                self._conn.shutdown(1)
            if self._closing:
                self._finish(None)
                return
        self._maybe_resume()

    def _maybe_pause(self) -> None:
        if not self._writing_paused and len(self._buffer) > self._high:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _maybe_resume(self) -> None:
        if self._writing_paused and len(self._buffer) <= self._low:
            self._writing_paused = False
            self._protocol.resume_writing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_pending:
            return
        self._eof_pending = True
        if not self._buffer:
            self._conn.shutdown(1)

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        high = 256 * 1024 if high is None else high
        low = high // 4 if low is None else low
        if not 0 <= low <= high:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause()

    # -- reading control -----------------------------------------------------

    def pause_reading(self) -> None:
        self._paused_reading = True
        self._rewatch()

    def resume_reading(self) -> None:
        self._paused_reading = False
        self._rewatch()
        self._loop.call_soon(self._on_ready)

    def is_reading(self) -> bool:
        return not self._paused_reading and not self._closing

    # -- ending --------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._buffer:
            self._finish(None)
        else:
            self._watch(True)  # finish writing, then close

    def abort(self) -> None:
        self._closing = True
        if not self._conn.closed:
            self._conn.abort()
        self._finish(None)

    def _fatal(self, exc: BaseException) -> None:
        self._closing = True
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        _open.discard(self)
        if self._retry is not None:
            self._retry.cancel()
        self._watch(False)
        self._buffer.clear()
        if not self._conn.closed:
            self._conn.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)

    def get_extra_info(self, name: str, default=None):
        if name == "peername":
            return self._conn.getpeername()
        if name == "sockname":
            return self._conn.getsockname()
        if name == "circuit":
            return self._conn
        return default


def _streams(loop, conn: Connection, limit: int = 2**16):
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = CircuitTransport(loop, conn, protocol)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def open_connection(host: str, port: int, *, control: str | None = None,
                          limit: int = 2**16, **kw) -> tuple[asyncio.StreamReader,
                                                             asyncio.StreamWriter]:
    """A circuit to (host, port) as an asyncio stream pair."""
    loop = asyncio.get_running_loop()
    conn = await loop.run_in_executor(
        None, lambda: circuits.connect((host, port), control=control, **kw))
    reader, writer = _streams(loop, conn, limit)
    await asyncio.sleep(0)  # let connection_made run
    return reader, writer


class Server:
    """What start_server returns: close() stops listening."""

    def __init__(self, listener: circuits.Listener, thread: threading.Thread):
        self._listener, self._thread = listener, thread
        self.sockets = ()

    def close(self) -> None:
        self._listener.close()

    async def wait_closed(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5)

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()
        await self.wait_closed()


async def start_server(client_connected_cb, host: str, port: int, *,
                       control: str | None = None, backlog: int = 128,
                       limit: int = 2**16) -> Server:
    """Listen on (host, port); call client_connected_cb(reader, writer) per circuit.

    Accepts run in a thread (an ACCEPT waits on the control socket); each
    circuit is then served on the loop like any asyncio connection."""
    loop = asyncio.get_running_loop()
    listener = await loop.run_in_executor(
        None, lambda: circuits.listen((host, port), backlog, control=control))

    tasks: set[asyncio.Task] = set()  # the loop holds tasks weakly: we must not

    def serve(conn: Connection) -> None:
        reader, writer = _streams(loop, conn, limit)
        result = client_connected_cb(reader, writer)
        if asyncio.iscoroutine(result):
            task = loop.create_task(result)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError as e:
                if not listener._closed:
                    logging.getLogger("circuits.aio").error("accept on %s failed: %s",
                                                             listener.local, e)
                return
            loop.call_soon_threadsafe(serve, conn)

    thread = threading.Thread(target=accept_loop, name="circuits-accept", daemon=True)
    thread.start()
    return Server(listener, thread)


async def read_view(conn: Connection) -> memoryview | None:
    """The endpoint's zero-copy read view, awaited without blocking the loop
    (None at end of data); release it with conn.consume().  For a connection
    read this way, not one wrapped in a transport (both would watch its fd)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return conn.read_view()
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
            try:
                await ready
            finally:
                loop.remove_reader(conn.fileno())
