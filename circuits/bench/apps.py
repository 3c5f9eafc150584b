"""`circuits bench apps`: unmodified programs over circuits and over loopback
TCP, in one run.

iperf3 (throughput), redis-benchmark (SET and GET, 50 clients) and wrk
against nginx (two workers, 50 connections).  Over circuits, each server
runs as guest "server" and each client as guest "client" under `circuits
run` (the preload library), with a throw-away operator; over TCP, the same
programs run as they are on 127.0.0.1.  Both servers of each program stay up
for the whole run; rounds interleave the two transports, and figures are
medians of rounds.  The guests are plain (not namespaced) guests: their
addresses exist on no interface, so their traffic can only be circuits.
"""
from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from circuits.bench import setup as setup_bench
from circuits.operator import child
from circuits.operator.admin import request

# `circuits bench setup`'s guests (client 10.9.0.1 may reach server 10.9.0.2), with an
# admin socket (to see the servers listen) and rings the size of the programs' buffers.
CONFIG = setup_bench.CONFIG.replace(
    'default_ring = "64 KiB"',
    'admin_socket = "{dir}/admin.sock"\ndefault_ring = "1 MiB"').replace(
    'control_dir = "{dir}"', 'control_dir = "{dir}/guests"')
assert "1 MiB" in CONFIG and "/guests" in CONFIG
CIRCUIT_ADDR, TCP_ADDR = "10.9.0.2", "127.0.0.1"
# The targets: circuits / TCP at least this much.
TARGETS = {"iperf3 Gbit/s": 3.0, "redis SET req/s": 1.5, "redis GET req/s": 1.5,
           "nginx+wrk req/s": 1.5}
PROGRAMS = ("iperf3", "redis-server", "redis-benchmark", "nginx", "wrk")

NGINX_CONF = """
daemon off;
master_process on;
worker_processes 2;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    server {{
        listen {addr}:{port};
        root {d}/www;
    }}
}}
"""


def nginx_conf(d: Path, addr: str, port: int) -> Path:
    """A minimal nginx.conf in d: two workers forked by the master after it
    listens, its pid, logs and temporary files in d, files served from d/www."""
    (d / "www").mkdir(parents=True, exist_ok=True)
    (d / "www" / "index.html").write_text("<html>circuits</html>\n")
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, addr=addr, port=port))
    return conf


@dataclass
class Durations:
    seconds: float  # of one iperf3 or wrk run
    requests: int   # of one redis-benchmark run (each of SET and GET)


DEFAULT = Durations(seconds=3, requests=100_000)
QUICK = Durations(seconds=1, requests=10_000)


@dataclass
class Figure:
    name: str
    unit: str
    circuits: list[float] = field(default_factory=list)
    tcp: list[float] = field(default_factory=list)

    def median(self, transport: str) -> float:
        values = getattr(self, transport)
        return statistics.median(values) if values else 0.0

    @property
    def ratio(self) -> float:
        tcp = self.median("tcp")
        return self.median("circuits") / tcp if tcp else 0.0


def missing() -> list[str]:
    return [p for p in PROGRAMS if not shutil.which(p)]


class Bench:
    """The servers of both transports, and a way to run a client on each."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.config = tmp / "bench.toml"
        self.config.write_text(CONFIG.format(dir=tmp))
        self.procs: list[subprocess.Popen] = []
        self.operator = None

    def guest(self, name: str, argv: list[str]) -> list[str]:
        return [sys.executable, "-m", "circuits", "run", "--guest", name,
                "--config", str(self.config), "--", *argv]

    def start_operator(self) -> None:
        self.operator = child.start(str(self.config))

    def listeners(self) -> int:
        answer = request(str(self.tmp / "admin.sock"), "guests")
        return sum(g["listeners"] for g in answer["result"] if g["name"] == "server")

    def serve(self, argv: list[str], transport: str, port: int) -> None:
        """Start a server and wait until it listens."""
        if transport == "circuits":
            before = self.listeners()
            argv = self.guest("server", argv)
        elif _tcp_open(port):  # someone else's server would answer for ours
            raise RuntimeError(f"port {port} of {TCP_ADDR} is in use")
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        deadline = time.monotonic() + 20
        while not (self.listeners() > before if transport == "circuits" else _tcp_open(port)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[-1] if argv else ''}: the server did not start: "
                                   f"{proc.stderr.read().decode(errors='replace')[-500:]}")
            time.sleep(0.05)

    def client(self, argv: list[str], transport: str, timeout: float) -> str:
        if transport == "circuits":
            argv = self.guest("client", argv)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {out.stderr[-500:]}")
        return out.stdout

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.operator is not None:
            child.stop(self.operator)


def _tcp_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex((TCP_ADDR, port)) == 0


PORTS = {"iperf3": 7201, "redis": 7202, "nginx": 7203}


def addr_of(transport: str) -> str:
    return CIRCUIT_ADDR if transport == "circuits" else TCP_ADDR


def start_servers(b: Bench) -> None:
    for transport in ("circuits", "tcp"):
        addr = addr_of(transport)
        b.serve(["iperf3", "-s", "-B", addr, "-p", str(PORTS["iperf3"])], transport,
                PORTS["iperf3"])
        b.serve(["redis-server", "--bind", addr, "--port", str(PORTS["redis"]), "--save", "",
                 "--appendonly", "no", "--dir", str(b.tmp), "--protected-mode", "no"],
                transport, PORTS["redis"])
        d = b.tmp / f"nginx-{transport}"
        conf = nginx_conf(d, addr, PORTS["nginx"])
        b.serve(["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)],
                transport, PORTS["nginx"])


def run_iperf3(b: Bench, transport: str, dur: Durations) -> dict[str, float]:
    out = b.client(["iperf3", "-c", addr_of(transport), "-p", str(PORTS["iperf3"]),
                    "-t", str(dur.seconds), "--json"], transport, dur.seconds + 30)
    bps = json.loads(out)["end"]["sum_received"]["bits_per_second"]
    return {"iperf3 Gbit/s": bps / 1e9}


def run_redis(b: Bench, transport: str, dur: Durations) -> dict[str, float]:
    out = b.client(["redis-benchmark", "-h", addr_of(transport), "-p", str(PORTS["redis"]),
                    "-c", "50", "-n", str(dur.requests), "-P", "1", "-t", "set,get", "--csv"],
                   transport, 120)
    rates = dict(re.findall(r'^"(SET|GET)","([\d.]+)"', out, re.M))
    return {f"redis {k} req/s": float(v) for k, v in rates.items()}


def run_wrk(b: Bench, transport: str, dur: Durations) -> dict[str, float]:
    out = b.client(["wrk", "-t2", "-c50", f"-d{dur.seconds}s",
                    f"http://{addr_of(transport)}:{PORTS['nginx']}/"], transport, dur.seconds + 30)
    return {"nginx+wrk req/s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}


RUNS: list[Callable[[Bench, str, Durations], dict[str, float]]] = [run_iperf3, run_redis, run_wrk]
UNITS = {"iperf3 Gbit/s": "Gbit/s"}


def run(rounds: int = 3, quick: bool = False,
        progress: Callable[[str], None] = lambda msg: None) -> list[Figure]:
    """Measure; raises RuntimeError if a program is missing or fails."""
    if missing():
        raise RuntimeError(f"not installed (make deps): {', '.join(missing())}")
    dur = QUICK if quick else DEFAULT
    figures = {name: Figure(name, UNITS.get(name, "req/s")) for name in TARGETS}
    with tempfile.TemporaryDirectory(prefix="circuits-bench-apps-") as tmp:
        b = Bench(Path(tmp))
        try:
            b.start_operator()
            progress("starting the servers")
            start_servers(b)
            for r in range(rounds):
                for fn in RUNS:
                    for transport in ("circuits", "tcp") if r % 2 == 0 else ("tcp", "circuits"):
                        progress(f"round {r + 1}/{rounds}: {fn.__name__[4:]} over {transport}")
                        for name, value in fn(b, transport, dur).items():
                            getattr(figures[name], transport).append(value)
        finally:
            b.stop()
    return list(figures.values())


def as_json(figures: list[Figure]) -> dict:
    return {"figures": [{"name": f.name, "unit": f.unit, "circuits": f.median("circuits"),
                         "tcp": f.median("tcp"), "ratio": f.ratio, "target": TARGETS[f.name],
                         "met": f.ratio >= TARGETS[f.name],
                         "rounds": {"circuits": f.circuits, "tcp": f.tcp}} for f in figures]}


def print_apps(figures: list[Figure], console) -> None:
    from rich.table import Table

    table = Table(title="unmodified programs: circuits vs loopback TCP (median of rounds)")
    for col in ("figure", "circuits", "TCP", "ratio", "target", ""):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for f in figures:
        fmt = "{:,.2f}" if f.unit == "Gbit/s" else "{:,.0f}"
        met = f.ratio >= TARGETS[f.name]
        table.add_row(f.name, fmt.format(f.median("circuits")), fmt.format(f.median("tcp")),
                      f"{f.ratio:.2f}x", f">= {TARGETS[f.name]}x",
                      "[green]met[/green]" if met else "[red]not met[/red]")
    console.print(table)
    for f in figures:
        console.print(f"{f.name} ratio: [bold]{f.ratio:.2f}[/bold]")
