"""`circuits bench setup`: connection setups per second through the operator,
against TCP connect/accept on loopback driven the same way, in one run.

Each setup: connect, send 1 byte, read the echo, close.  The server side runs
in a forked process (an accept loop echoing one byte per connection); the
operator runs as its own process with a throw-away configuration.
"""
from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import circuits
from circuits.operator import child

CONFIG = """
[operator]
control_dir = "{dir}"
default_ring = "64 KiB"
[[guests]]
name = "client"
addresses = ["10.9.0.1"]
[guests.limits]
setups_per_second = 1000000
[[guests]]
name = "server"
addresses = ["10.9.0.2"]
[[rules]]
from = "client"
to = "server"
action = "allow"
"""
PORT = 7000


@dataclass
class SetupFigure:
    transport: str
    per_second: float  # median over rounds
    p50_us: float
    p99_us: float
    rounds: list[float]


class OperatorProcess:
    """A throw-away operator with a client and a server guest."""

    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="circuits-bench-")
        cfg = Path(self.dir.name) / "policy.toml"
        cfg.write_text(CONFIG.format(dir=Path(self.dir.name) / "guests"))
        self.proc = child.start(str(cfg))

    def control(self, guest: str) -> str:
        return str(Path(self.dir.name) / "guests" / f"{guest}.sock")

    def close(self) -> None:
        child.stop(self.proc)
        self.dir.cleanup()


def _fork_server(serve) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            serve()
        except BaseException:
            code = 1
        os._exit(code)
    return pid


def _echo_one(conn) -> None:
    with conn:
        data = conn.recv(1)
        if data:
            conn.sendall(data)


def _circuit_server(op: OperatorProcess, count: int):
    listener = circuits.listen(("10.9.0.2", PORT), backlog=1024, control=op.control("server"))

    def serve():
        for _ in range(count):
            _echo_one(listener.accept()[0])
    return listener, serve


def _tcp_server(count: int):
    srv = socket.create_server(("127.0.0.1", 0), backlog=1024)

    def serve():
        for _ in range(count):
            _echo_one(srv.accept()[0])
    return srv, serve


def _measure(connect, count: int) -> tuple[float, list[float]]:
    lat = []
    t0 = time.perf_counter()
    for _ in range(count):
        s = time.perf_counter()
        conn = connect()
        conn.sendall(b"x")
        if conn.recv(1) != b"x":
            raise RuntimeError("no echo")
        conn.close()
        lat.append(time.perf_counter() - s)
    return count / (time.perf_counter() - t0), lat


def run(rounds: int = 5, count: int = 2000) -> list[SetupFigure]:
    """Setups per second and latency, circuits and TCP interleaved by round."""
    op = OperatorProcess()
    results: dict[str, list[tuple[float, list[float]]]] = {"circuit": [], "tcp": []}
    try:
        for _ in range(rounds):
            listener, serve = _circuit_server(op, count)
            pid = _fork_server(serve)
            client = op.control("client")
            results["circuit"].append(_measure(
                lambda: circuits.connect(("10.9.0.2", PORT), control=client), count))
            os.waitpid(pid, 0)
            listener.close()
            srv, serve = _tcp_server(count)
            pid = _fork_server(serve)
            addr = srv.getsockname()
            results["tcp"].append(_measure(lambda: socket.create_connection(addr), count))
            os.waitpid(pid, 0)
            srv.close()
    finally:
        op.close()
    figures = []
    for name, rs in results.items():
        lat = sorted(x for _, sample in rs for x in sample)
        figures.append(SetupFigure(name, statistics.median(r for r, _ in rs),
                                   lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6,
                                   [r for r, _ in rs]))
    return figures


def as_json(figures: list[SetupFigure]) -> dict:
    by = {f.transport: f for f in figures}
    return {"figures": [asdict(f) for f in figures],
            "ratios": {"setups/s: circuit / tcp (target >= 0.5)":
                       by["circuit"].per_second / by["tcp"].per_second}}
