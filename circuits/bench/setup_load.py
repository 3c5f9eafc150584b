"""The load program of `circuits bench setup`: one server or one client.

    python -m circuits.bench.setup_load server API HOST PORT COUNT
    python -m circuits.bench.setup_load client API HOST PORT COUNT

API is ``socket`` (plain sockets: TCP, or circuits when the preload library
is in LD_PRELOAD) or ``circuits`` (the client API, circuits.connect and
circuits.listen, with CIRCUITS_CONTROL).  A setup is: connect, send one
byte, read its echo, close.  The server accepts and echoes COUNT
connections, one after another.  A client says "ready", waits for a line on
stdin (so that every client starts at once, whatever its start-up took),
makes COUNT setups back to back and prints one JSON line: when it started
and ended (time.perf_counter: CLOCK_MONOTONIC, the same clock in every
process), each setup's latency and the CPU time it took, in nanoseconds.
The server prints its CPU time from "ready" to its last close.
"""
from __future__ import annotations

import json
import socket
import sys
import time


def cpu_ns(pid: int | str = "self") -> int:
    """Time the process has run on a CPU, spinning included (/proc/PID/schedstat)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def _server(api: str, host: str, port: int, count: int) -> None:
    if api == "circuits":
        import circuits

        srv = circuits.listen((host, port), backlog=1024)
    else:
        srv = socket.create_server((host, port), backlog=1024)
    print("ready", flush=True)
    cpu = cpu_ns()
    for _ in range(count):
        conn, _ = srv.accept()
        with conn:
            data = conn.recv(1)
            if data:
                conn.sendall(data)
    srv.close()
    print(json.dumps({"cpu": cpu_ns() - cpu}), flush=True)


def _client(api: str, host: str, port: int, count: int) -> None:
    if api == "circuits":
        import circuits

        def connect():
            return circuits.connect((host, port))
    else:
        def connect():
            return socket.create_connection((host, port))
    print("ready", flush=True)
    sys.stdin.readline()
    latencies = []
    clock = time.perf_counter_ns
    cpu, start = cpu_ns(), clock()
    for _ in range(count):
        t = clock()
        conn = connect()
        conn.sendall(b"x")
        if conn.recv(1) != b"x":
            raise SystemExit("no echo")
        conn.close()
        latencies.append(clock() - t)
    end = clock()
    print(json.dumps({"start": start, "end": end, "latencies": latencies,
                      "cpu": cpu_ns() - cpu}), flush=True)


def main(argv: list[str]) -> None:
    role, api, host, port, count = argv
    if api not in ("socket", "circuits"):
        raise SystemExit(f"unknown API {api!r}")
    {"server": _server, "client": _client}[role](api, host, int(port), int(count))


if __name__ == "__main__":
    main(sys.argv[1:])
