"""`circuits bench ring`: a circuit against a Unix socketpair and TCP loopback.

Every transport is driven the same way from Python (sendall / recv_into
with preallocated buffers), between a parent and a forked child, in one
run; each figure is the median of several rounds, and rounds interleave the
transports so that machine noise hits them alike.
"""
from __future__ import annotations

import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

from circuits import ring

WRITE_SIZES = (64, 1024, 64 * 1024)
TRANSPORTS = ("circuit", "circuit-zerocopy", "unix", "tcp")
RING_SIZE = 1 << 20
LATENCY_MSG = 64


@dataclass
class Figure:
    """One measured figure: the median over rounds, with every round kept."""

    transport: str
    test: str  # "stream" or "rtt"
    write_size: int
    median: float  # bytes/s for stream, seconds for the rtt p50
    p99: float | None
    rounds: list[float]


# -- connected pairs, one per transport ------------------------------------

def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def make_pair(transport: str):
    """Two connected ends of a transport: (parent's, child's)."""
    if transport.startswith("circuit"):
        return ring.pair("stream", RING_SIZE)
    if transport == "unix":
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if transport == "tcp":
        return _tcp_pair()
    raise ValueError(transport)


def _drop(end) -> None:
    """Give up this process's copy of an end after fork, leaving the other's."""
    if isinstance(end, ring.Circuit):
        end.detach()  # close() would end the circuit for both processes
    else:
        end.close()


def _in_child(mine, theirs, job: Callable[[object], None]) -> int:
    """Fork; the child runs job on its end and exits.  Returns the child pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _drop(mine)
            job(theirs)
            theirs.close()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    _drop(theirs)
    return pid


def _reap(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"benchmark peer {pid} failed")


# -- stream throughput ----------------------------------------------------

def _send_copying(end, size: int, total: int) -> None:
    buf = b"\xa5" * size
    for _ in range(total // size):
        end.sendall(buf)


def _send_zerocopy(end, size: int, total: int) -> None:
    src = memoryview(b"\xa5" * size)
    for _ in range(total // size):
        view = end.write_view(size)
        view[:size] = src
        end.commit(size)


def _recv_copying(end, size: int, total: int) -> None:
    buf = bytearray(max(size, 64 * 1024))
    got = 0
    while got < total:
        n = end.recv_into(buf)
        if not n:
            raise EOFError("peer ended early")
        got += n


def _recv_zerocopy(end, size: int, total: int) -> None:
    got = 0
    while got < total:
        view = end.read_view()
        if view is None:
            raise EOFError("peer ended early")
        got += len(view)
        end.consume()


def stream_once(transport: str, size: int, total: int) -> float:
    """Bytes per second for `total` bytes in writes of `size`, child -> parent."""
    zc = transport == "circuit-zerocopy"
    parent, child = make_pair(transport)
    send = _send_zerocopy if zc else _send_copying
    recv = _recv_zerocopy if zc else _recv_copying
    go = os.pipe()
    pid = _in_child(parent, child, lambda end: (os.read(go[0], 1), send(end, size, total)))
    t0 = time.perf_counter()
    os.write(go[1], b"g")
    recv(parent, size, total)
    elapsed = time.perf_counter() - t0
    parent.close()
    _reap(pid)
    for fd in go:
        os.close(fd)
    return total / elapsed


# -- round-trip latency ---------------------------------------------------

def _recv_exact(end, buf: bytearray, n: int) -> None:
    view = memoryview(buf)
    got = 0
    while got < n:
        k = end.recv_into(view[got:n])
        if not k:
            raise EOFError("peer ended early")
        got += k


def _echo(end, count: int) -> None:
    buf = bytearray(LATENCY_MSG)
    for _ in range(count):
        _recv_exact(end, buf, LATENCY_MSG)
        end.sendall(buf)


def rtt_once(transport: str, count: int) -> list[float]:
    """Round-trip times in seconds of `count` 64-byte ping-pongs."""
    parent, child = make_pair(transport)
    warm = max(count // 10, 10)
    pid = _in_child(parent, child, lambda end: _echo(end, warm + count))
    msg = b"\x5a" * LATENCY_MSG
    buf = bytearray(LATENCY_MSG)
    samples = []
    clock = time.perf_counter_ns
    for i in range(warm + count):
        t0 = clock()
        parent.sendall(msg)
        _recv_exact(parent, buf, LATENCY_MSG)
        if i >= warm:
            samples.append((clock() - t0) / 1e9)
    parent.close()
    _reap(pid)
    return samples


# -- the whole run ----------------------------------------------------------

def _total_for(size: int, quick: bool) -> int:
    """Bytes per stream round: enough to last a fraction of a second."""
    base = {64: 4 << 20, 1024: 64 << 20}.get(size, 1 << 30)
    return base // 8 if quick else base


def run(rounds: int = 5, quick: bool = False, sizes=WRITE_SIZES,
        transports=TRANSPORTS, rtt_count: int = 20000,
        progress: Callable[[str], None] | None = None) -> list[Figure]:
    """Measure every transport, interleaved round by round; return figures."""
    stream: dict[tuple[str, int], list[float]] = {}
    rtts: dict[str, list[float]] = {}
    rtt_p99: dict[str, list[float]] = {}
    count = rtt_count // 10 if quick else rtt_count
    for r in range(rounds):
        for size in sizes:
            for t in transports:
                if progress:
                    progress(f"round {r + 1}/{rounds}: {t} stream {size} B")
                stream.setdefault((t, size), []).append(stream_once(t, size, _total_for(size, quick)))
        for t in transports:
            if t == "circuit-zerocopy":
                continue
            if progress:
                progress(f"round {r + 1}/{rounds}: {t} round trip")
            samples = sorted(rtt_once(t, count))
            rtts.setdefault(t, []).append(samples[len(samples) // 2])
            rtt_p99.setdefault(t, []).append(samples[int(len(samples) * 0.99)])
    figures = [Figure(t, "stream", size, statistics.median(v), None, v)
               for (t, size), v in stream.items()]
    figures += [Figure(t, "rtt", LATENCY_MSG, statistics.median(v),
                       statistics.median(rtt_p99[t]), v) for t, v in rtts.items()]
    return figures


def ratios(figures: list[Figure]) -> dict[str, float]:
    """The ratios the targets are stated in (see the issue and the design brief)."""
    get = {(f.transport, f.test, f.write_size): f.median for f in figures}
    out = {}
    big = 64 * 1024
    if ("circuit", "stream", big) in get:
        c = get[("circuit", "stream", big)]
        if ("tcp", "stream", big) in get:
            out["64KiB stream: circuit / tcp (target >= 3)"] = c / get[("tcp", "stream", big)]
        if ("unix", "stream", big) in get:
            out["64KiB stream: circuit / unix (target >= 1.3)"] = c / get[("unix", "stream", big)]
        if ("circuit-zerocopy", "stream", big) in get:
            out["64KiB stream: zero-copy / copying (target > 1)"] = (
                get[("circuit-zerocopy", "stream", big)] / c)
    if ("circuit", "rtt", LATENCY_MSG) in get and ("unix", "rtt", LATENCY_MSG) in get:
        out["64B rtt p50: circuit / unix (target <= 0.33)"] = (
            get[("circuit", "rtt", LATENCY_MSG)] / get[("unix", "rtt", LATENCY_MSG)])
    return out


def as_json(figures: list[Figure]) -> dict:
    return {"figures": [asdict(f) for f in figures], "ratios": ratios(figures)}
