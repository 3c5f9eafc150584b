"""`circuits bench egress`: guest -> proxy stack -> TCP server, against the same
client talking TCP to the same server directly, in one run.

The server is a forked process on loopback: per connection it either sinks
what it gets (upload: the client writes 64 KiB at a time, then SHUT_WR, and
waits for the server's one-byte answer) or sends a given number of bytes
(download).  Rounds interleave the two transports; figures are medians.  The
proxy stack's CPU time (utime + stime from /proc/PID/stat) over the proxied
rounds gives its CPU seconds per GB moved.  Only 127.0.0.1 is ever used.
"""
from __future__ import annotations

import os
import socket
import statistics
import struct
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import circuits
from circuits.operator import child
from circuits.operator.admin import request

CONFIG = """
[operator]
control_dir = "{dir}/guests"
admin_socket = "{dir}/admin.sock"
default_ring = "{ring}"
[proxystack]
[[guests]]
name = "client"
addresses = ["10.9.0.1"]
[guests.limits]
ring_size = "{ring}"
[[rules]]
from = "client"
to = "127.0.0.1/32"
proto = "tcp"
action = "allow"
"""
WRITE = 64 * 1024
REQUEST = struct.Struct("<cQ")  # b"U" upload / b"D" download, then the byte count
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class EgressFigure:
    transport: str  # "proxystack" or "tcp"
    direction: str  # "upload" (guest writes) or "download" (guest reads)
    gbytes_per_s: float  # median over rounds
    rounds: list[float]


class Setup:
    """A throw-away operator with a proxy stack, and a forked loopback server."""

    def __init__(self, ring: int) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="circuits-bench-egress-")
        cfg = Path(self.dir.name) / "policy.toml"
        cfg.write_text(CONFIG.format(dir=self.dir.name, ring=ring))
        self.admin = str(Path(self.dir.name) / "admin.sock")
        self.control = str(Path(self.dir.name) / "guests" / "client.sock")
        self.srv = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.server_pid = _fork(lambda: _serve(self.srv))
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
        raise RuntimeError("the proxy stack did not connect")

    def close(self) -> None:
        child.stop(self.proc)
        os.kill(self.server_pid, 9)
        os.waitpid(self.server_pid, 0)
        self.srv.close()
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
            kind, n = REQUEST.unpack(conn.recv(REQUEST.size, socket.MSG_WAITALL))
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


def run(rounds: int = 5, total: int = 1 << 30, ring: int = 4 << 20) -> dict:
    """Interleaved rounds of both transports and both directions."""
    setup = Setup(ring)
    rates: dict[tuple[str, str], list[float]] = {}
    cpu, moved = 0.0, 0
    addr = setup.srv.getsockname()
    try:
        for _ in range(rounds):
            for direction in ("upload", "download"):
                rates.setdefault(("tcp", direction), []).append(
                    transfer(socket.create_connection(addr), direction, total))
                before = cpu_seconds(setup.proxy_pid)
                conn = circuits.connect(addr, control=setup.control, ring_size=ring)
                rates.setdefault(("proxystack", direction), []).append(
                    transfer(conn, direction, total))
                cpu += cpu_seconds(setup.proxy_pid) - before
                moved += total
    finally:
        setup.close()
    figures = [EgressFigure(t, d, statistics.median(r), r) for (t, d), r in rates.items()]
    return {"figures": figures, "cpu_s_per_gb": cpu / (moved / 1e9), "write_size": WRITE,
            "bytes_per_round": total, "ring": ring}


def as_json(result: dict) -> dict:
    by = {(f.transport, f.direction): f for f in result["figures"]}
    ratios = {f"{d}: proxystack / tcp (target >= 0.8)":
              by[("proxystack", d)].gbytes_per_s / by[("tcp", d)].gbytes_per_s
              for d in ("upload", "download")}
    return {**result, "figures": [asdict(f) for f in result["figures"]], "ratios": ratios}
