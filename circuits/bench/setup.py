"""`circuits bench setup`: connection setups per second through the operator,
against TCP connect/accept on loopback driven the same way, in one run.

A setup is: connect, send one byte, read its echo, close.  One server process
accepts and echoes one connection after another; client processes make
setups back to back, all at once.  The rate is what a server's connection
rate is: the setups of all clients over the wall time, with enough clients
to keep every process of the path busy (one client alone waits on each
round trip, so the single-client rows measure latency more than capacity).

The same load program (circuits/bench/setup_load.py) runs every transport:

- ``circuit``: the Python client API (circuits.connect, circuits.listen);
- ``preload``: plain sockets under the preload library (the C control
  client), the way unmodified programs set circuits up;
- ``tcp``: the same plain-socket program over 127.0.0.1, without circuits.

Transports take turns within each round; figures are medians of rounds.
"""
from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from circuits.bench.setup_load import cpu_ns
from circuits.operator import child
from circuits.preload import preload_env

CONFIG = """
[operator]
control_dir = "{dir}"
default_ring = "64 KiB"
[[guests]]
name = "client"
addresses = ["10.9.0.1"]
[guests.limits]
setups_per_second = 1000000
circuits = 65536
[[guests]]
name = "server"
addresses = ["10.9.0.2"]
[guests.limits]
circuits = 65536
[[rules]]
from = "client"
to = "server"
action = "allow"
"""
SERVER = "10.9.0.2"
FIRST_PORT = 7000
TRANSPORTS = ("circuit", "preload", "tcp")
TIMEOUT = 300.0  # seconds for one run: a hung run fails the benchmark, never hangs it


@dataclass
class SetupFigure:
    transport: str
    clients: int
    per_second: float  # median over rounds
    p50_us: float  # over every setup of every round
    p99_us: float
    rounds: list[float]
    # CPU time per setup (medians over rounds), spinning included: what a
    # loaded host runs out of first.  The operator's is 0 for tcp.
    cpu_us: dict[str, float]


@dataclass
class _Run:
    per_second: float
    latencies: list[int]  # ns
    cpu_us: dict[str, float]  # per setup, by role


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


class _Runs:
    """Starts the load program's processes for one transport."""

    def __init__(self, op: OperatorProcess):
        self.op = op
        self.port = FIRST_PORT

    def _env(self, transport: str, guest: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "CIRCUITS_CONTROL")}
        if transport == "tcp":
            return env
        env["CIRCUITS_CONTROL"] = self.op.control(guest)
        return preload_env(env) if transport == "preload" else env

    def _spawn(self, transport: str, role: str, port: int, count: int) -> subprocess.Popen:
        api = "circuits" if transport == "circuit" else "socket"
        host = "127.0.0.1" if transport == "tcp" else SERVER
        guest = "server" if role == "server" else "client"
        argv = [sys.executable, "-m", "circuits.bench.setup_load", role, api, host, str(port),
                str(count)]
        return subprocess.Popen(argv, env=self._env(transport, guest), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)

    def run(self, transport: str, clients: int, count: int) -> _Run:
        """`clients` clients making `count` setups each, all at once."""
        self.port += 1  # a port per run: nothing of an earlier run is in the way
        procs = [self._spawn(transport, "server", self.port, clients * count)]
        try:
            _ready(procs[0])
            procs += [self._spawn(transport, "client", self.port, count) for _ in range(clients)]
            for proc in procs[1:]:
                _ready(proc)
            operator_cpu = cpu_ns(self.op.proc.pid)
            for proc in procs[1:]:
                proc.stdin.write("go\n")
                proc.stdin.flush()
            results = [json.loads(_finish(proc)) for proc in procs[1:]]
            server = json.loads(_finish(procs[0]))
            operator_cpu = cpu_ns(self.op.proc.pid) - operator_cpu
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        total = clients * count
        wall = max(r["end"] for r in results) - min(r["start"] for r in results)
        cpu = {"operator": operator_cpu if transport != "tcp" else 0,
               "client": sum(r["cpu"] for r in results), "server": server["cpu"]}
        return _Run(total / (wall / 1e9), [x for r in results for x in r["latencies"]],
                    {role: ns / total / 1e3 for role, ns in cpu.items()})


def _ready(proc: subprocess.Popen) -> None:
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        raise RuntimeError(f"a load process did not start (said {line!r})")


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"a load process failed (exit {proc.returncode})")
    return out


def run(rounds: int = 5, count: int = 2000, clients: int = 4,
        transports: tuple[str, ...] = TRANSPORTS) -> list[SetupFigure]:
    """Setups per second and latency with one client and with `clients`
    clients of `count` setups each, the transports taking turns by round."""
    op = OperatorProcess()
    runs = _Runs(op)
    configs = [(t, k) for t in transports for k in dict.fromkeys((1, clients))]
    results: dict[tuple[str, int], list[_Run]] = {c: [] for c in configs}
    try:
        for _ in range(rounds):
            for transport, k in configs:
                results[(transport, k)].append(runs.run(transport, k, count))
    finally:
        op.close()
    figures = []
    for (transport, k), rs in results.items():
        lat = sorted(x for r in rs for x in r.latencies)
        cpu = {role: statistics.median(r.cpu_us[role] for r in rs) for role in rs[0].cpu_us}
        figures.append(SetupFigure(transport, k, statistics.median(r.per_second for r in rs),
                                   lat[len(lat) // 2] / 1e3, lat[int(len(lat) * 0.99)] / 1e3,
                                   [r.per_second for r in rs], cpu))
    return figures


def as_json(figures: list[SetupFigure]) -> dict:
    """The figures and the ratios the targets use (at the most clients)."""
    most = max(f.clients for f in figures)
    by = {f.transport: f for f in figures if f.clients == most}
    ratios = {}
    for name in ("circuit", "preload"):
        if name in by and "tcp" in by:
            ratios[f"setups/s, {most} clients: {name} / tcp (target >= 0.5)"] = \
                by[name].per_second / by["tcp"].per_second
    return {"figures": [asdict(f) for f in figures], "ratios": ratios}
