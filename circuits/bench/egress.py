"""`circuits bench egress`: guest -> proxy stack -> TCP server, in both of the
proxy stack's placements, against the same client talking TCP directly, in one run.

Three transports: "tcp" (the client connects to the server itself), "worker"
(a circuit through an operator whose proxy stack is a worker process) and
"operator" (a circuit through an operator running the same proxy stack in its
own loop).  Each has its own throw-away operator; all share one forked
loopback server, which per connection either sinks what it gets (upload: the
client writes 64 KiB at a time, then SHUT_WR, and waits for a one-byte
answer) or sends a given number of bytes (download).  Rounds interleave the
transports and directions; figures are medians.  Setup latency: connects to
the same listener, closed at once, in interleaved batches, p50/p99 over all;
then through each placement again while another guest process downloads
through it without pause (what moving data costs the control plane).
CPU seconds per GB (utime + stime from /proc/PID/stat over the throughput
rounds) for the operator and the proxy stack (the same process when in the
operator).  Only 127.0.0.1 is ever used.
"""
from __future__ import annotations

import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import circuits
from circuits.operator import child
from circuits.operator.admin import request
from circuits.operator.proxy import stop_worker

CONFIG = """
[operator]
control_dir = "{dir}/guests"
admin_socket = "{dir}/admin.sock"
default_ring = "{ring}"
[proxystack]
placement = "{placement}"
[[guests]]
name = "client"
addresses = ["10.9.0.1"]
[guests.limits]
ring_size = "{ring}"
setups_per_second = 1000000
[[rules]]
from = "client"
to = "127.0.0.1/32"
proto = "tcp"
action = "allow"
"""
WRITE = 64 * 1024
REQUEST = struct.Struct("<cQ")  # b"U" upload / b"D" download, then the byte count
TICK = os.sysconf("SC_CLK_TCK")
PLACEMENTS = ("worker", "operator")
BATCHES = 10  # setup latency: each transport's connects in this many interleaved batches


@dataclass
class EgressFigure:
    transport: str  # "tcp", "worker" or "operator"
    direction: str  # "upload" (guest writes) or "download" (guest reads)
    gbytes_per_s: float  # median over rounds
    rounds: list[float]


@dataclass
class LatencyFigure:
    transport: str
    p50_us: float
    p99_us: float
    connects: int


class Placement:
    """A throw-away operator whose proxy stack runs in `placement`."""

    def __init__(self, placement: str, ring: int) -> None:
        self.placement = placement
        self.dir = tempfile.TemporaryDirectory(prefix=f"circuits-bench-egress-{placement}-")
        cfg = Path(self.dir.name) / "policy.toml"
        cfg.write_text(CONFIG.format(dir=self.dir.name, ring=ring, placement=placement))
        self.admin = str(Path(self.dir.name) / "admin.sock")
        self.control = str(Path(self.dir.name) / "guests" / "client.sock")
        self.pidfile = str(Path(self.dir.name) / "guests" / "proxystack.pid")
        self.proc = child.start(str(cfg))
        self.proxy_pid = self._wait_proxystack()

    def _wait_proxystack(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = request(self.admin, "status")["result"]["proxystack"]
                if state.startswith("connected"):
                    return int(state.rsplit(" ", 1)[1])
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the proxy stack ({self.placement}) did not connect")

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far: the operator's and the proxy stack's."""
        return cpu_seconds(self.proc.pid), cpu_seconds(self.proxy_pid)

    def close(self) -> None:
        child.stop(self.proc)
        stop_worker(self.pidfile)  # the worker outlives its operator: stop it for good
        self.dir.cleanup()


def _fork(fn) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    return pid


def _serve(srv: socket.socket) -> None:
    buf = bytearray(1 << 20)
    while True:
        conn, _ = srv.accept()
        with conn:
            head = conn.recv(REQUEST.size, socket.MSG_WAITALL)
            if len(head) < REQUEST.size:
                continue  # a connect closed without a request: nothing to do
            kind, n = REQUEST.unpack(head)
            if kind == b"U":
                while conn.recv_into(buf):
                    pass
                conn.sendall(b"k")
            else:
                view = memoryview(bytes(WRITE))
                while n > 0:
                    n -= conn.send(view[: min(n, WRITE)])


def transfer(conn, direction: str, total: int) -> float:
    """One connection's transfer; GB/s, timed from the request to the last byte."""
    buf = bytearray(WRITE)
    start = time.perf_counter()
    conn.sendall(REQUEST.pack(b"U" if direction == "upload" else b"D", total))
    if direction == "upload":
        view = memoryview(buf)
        for _ in range(total // WRITE):
            conn.sendall(view)
        conn.shutdown(socket.SHUT_WR)
        if conn.recv(1) != b"k":
            raise RuntimeError("the server did not confirm the upload")
    else:
        got = 0
        while got < total:
            n = conn.recv_into(buf)
            if not n:
                raise RuntimeError(f"download ended after {got} of {total} bytes")
            got += n
    elapsed = time.perf_counter() - start
    conn.close()
    return total / elapsed / 1e9


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of stat(5)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Servers:
    """Two forked loopback servers: `data` for transfers, and `setups`, which
    accepts and closes at once (a data server busy with a transfer does not
    accept: setups to it would fill its backlog)."""

    def __init__(self) -> None:
        self.data = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.setups = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.pids = [_fork(lambda: _serve(self.data)), _fork(lambda: _close_each(self.setups))]

    def close(self) -> None:
        for pid in self.pids:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        self.data.close()
        self.setups.close()


def _close_each(srv: socket.socket) -> None:
    while True:
        srv.accept()[0].close()


def run(rounds: int = 5, total: int = 1 << 30, ring: int = 4 << 20,
        connects: int = 500) -> dict:
    """Interleaved rounds of the three transports, both directions, then setups."""
    servers = Servers()
    placements: dict[str, Placement] = {}
    try:
        for name in PLACEMENTS:
            placements[name] = Placement(name, ring)

        def open_via(transport: str, srv: socket.socket = servers.data):
            if transport == "tcp":
                return socket.create_connection(srv.getsockname())
            return circuits.connect(srv.getsockname(), control=placements[transport].control,
                                    ring_size=ring)

        rates: dict[tuple[str, str], list[float]] = {}
        cpu = {name: [0.0, 0.0] for name in PLACEMENTS}
        for _ in range(rounds):
            for direction in ("upload", "download"):
                for transport in ("tcp", *PLACEMENTS):
                    before = placements[transport].cpu() if transport != "tcp" else None
                    rates.setdefault((transport, direction), []).append(
                        transfer(open_via(transport), direction, total))
                    if before is not None:
                        after = placements[transport].cpu()
                        cpu[transport] = [c + a - b for c, a, b in zip(cpu[transport], after,
                                                                         before)]
        setups = lambda transport: open_via(transport, servers.setups)  # noqa: E731
        latency = setup_latency(setups, connects)
        latency += [loaded_setup_latency(setups, placements[t], servers.data.getsockname(), ring,
                                         max(10, connects // 5)) for t in PLACEMENTS]
    finally:
        for placement in placements.values():
            placement.close()
        servers.close()
    gb = rounds * 2 * total / 1e9  # each placement moved this much
    figures = [EgressFigure(t, d, statistics.median(r), r) for (t, d), r in rates.items()]
    return {"figures": figures, "latency": latency, "write_size": WRITE,
            "bytes_per_round": total, "ring": ring,
            "cpu_s_per_gb": {name: {"operator": round(o / gb, 3), "proxystack": round(s / gb, 3)}
                             for name, (o, s) in cpu.items()}}


def setup_latency(open_via, connects: int) -> list[LatencyFigure]:
    """Connect and close at once, `connects` times per transport, interleaved."""
    samples: dict[str, list[float]] = {t: [] for t in ("tcp", *PLACEMENTS)}
    batch = max(1, connects // BATCHES)
    while len(samples["tcp"]) < connects:
        for transport, got in samples.items():
            for _ in range(min(batch, connects - len(got))):
                start = time.perf_counter()
                conn = open_via(transport)
                got.append(time.perf_counter() - start)
                conn.close()
    return [LatencyFigure(t, percentile(s, 0.5) * 1e6, percentile(s, 0.99) * 1e6, len(s))
            for t, s in samples.items()]


LOADER = """
import sys, time, circuits
from circuits.bench.egress import transfer
host, port, control, ring, until = sys.argv[1:]
print("loading", flush=True)
while time.monotonic() < float(until):
    transfer(circuits.connect((host, int(port)), control=control, ring_size=int(ring)),
             "download", 256 << 20)
"""
LOAD_FOR = 30.0  # seconds at most that a loader runs, whatever happens to this process


def loaded_setup_latency(open_via, placement: Placement, addr: tuple, ring: int,
                         connects: int) -> LatencyFigure:
    """Setups through `placement` while another guest process downloads through
    it without pause: what data moving costs the control plane in each placement."""
    until = time.monotonic() + LOAD_FOR  # CLOCK_MONOTONIC: the same clock in the child
    loader = subprocess.Popen([sys.executable, "-c", LOADER, addr[0], str(addr[1]),
                               placement.control, str(ring), str(until)],
                              stdout=subprocess.PIPE, text=True)
    try:
        loader.stdout.readline()
        time.sleep(0.2)  # the first download under way
        samples = []
        for _ in range(connects):
            start = time.perf_counter()
            conn = open_via(placement.placement)
            samples.append(time.perf_counter() - start)
            conn.close()
    finally:
        loader.kill()
        loader.wait()
    return LatencyFigure(f"{placement.placement}, while downloading", percentile(samples, 0.5)
                         * 1e6, percentile(samples, 0.99) * 1e6, len(samples))


def as_json(result: dict) -> dict:
    by = {(f.transport, f.direction): f for f in result["figures"]}
    ratios = {f"{d}: {t} / tcp (target >= 0.8)":
              by[(t, d)].gbytes_per_s / by[("tcp", d)].gbytes_per_s
              for t in PLACEMENTS for d in ("upload", "download")}
    return {**result, "figures": [asdict(f) for f in result["figures"]],
            "latency": [asdict(f) for f in result["latency"]], "ratios": ratios}


def print_table(out: dict, title: str, console) -> None:
    """The figures of as_json() for a terminal."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("transport", "direction", "GB/s"):
        table.add_column(col)
    for f in out["figures"]:
        table.add_row(f["transport"], f["direction"], f"{f['gbytes_per_s']:.2f}")
    console.print(table)
    for name, value in out["ratios"].items():
        console.print(f"{name}: [bold]{value:.2f}[/bold]")
    for f in out["latency"]:
        console.print(f"setup {f['transport']}: p50 {f['p50_us']:.0f} us, p99 {f['p99_us']:.0f} us"
                      f" ({f['connects']} connects)")
    for name, cpu in out["cpu_s_per_gb"].items():
        where = "one process" if name == "operator" else "two processes"
        console.print(f"CPU s per GB, placement {name} ({where}): operator"
                      f" {cpu['operator']:.2f}, proxy stack {cpu['proxystack']:.2f}")
