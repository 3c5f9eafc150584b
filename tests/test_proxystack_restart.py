"""Proxied connections outlive the operator (design decision 8): the proxy stack
worker keeps carrying them across an operator's kill -9 or stop, and the
next operator adopts it.  Real processes, the test-made namespaces only."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import circuits
from circuits.operator import child
from outside import pattern_sha256
from proxystack_fixtures import (  # noqa: F401 - fixtures
    HOST_IP, OUTSIDE_IP, PUBLISHED, both_placements, requires_netns, world, world_short_grace)

pytestmark = requires_netns
BIG = 200 << 20


def workers(world) -> list[int]:
    """Every proxy stack process serving this world's configuration."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"circuits.proxystack" in argv and str(world.config).encode() in argv:
            found.append(int(pid))
    return found


def take_operator_away(world, how: int) -> None:
    world.proc.send_signal(how)
    world.proc.wait(10)


def bring_operator_back(world) -> float:
    """A new operator; seconds from its control sockets answering to a working egress."""
    world.proc = child.start(str(world.config))
    start = time.monotonic()
    while True:
        try:
            conn = circuits.connect((OUTSIDE_IP, 84), control=world.control("web"))
            break
        except OSError:  # ENETUNREACH until the worker said HELLO to this operator
            assert time.monotonic() - start < 10, "egress did not come back"
            time.sleep(0.01)
    ready = time.monotonic() - start
    conn.settimeout(10)
    conn.sendall(b"after the restart")
    assert conn.recv(100) == b"after the restart"
    conn.close()
    return ready


def read_some(conn, h, until: int, got: int) -> int:
    buf = bytearray(1 << 20)
    while got < until:
        n = conn.recv_into(buf, min(len(buf), until - got))
        assert n, f"the download ended after {got} bytes"
        h.update(memoryview(buf)[:n])
        got += n
    return got


def test_a_download_goes_on_across_an_operator_kill_and_restart(world):
    world.serve("http", 80)
    world.serve("echo", 84)
    worker = world.worker()
    assert worker is not None and workers(world) == [worker]
    conn = circuits.connect((OUTSIDE_IP, 80), control=world.control("web"), ring_size=1 << 20)
    conn.settimeout(20)
    conn.sendall(f"GET /download/{BIG} HTTP/1.1\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(4096)
    first = head.split(b"\r\n\r\n", 1)[1]
    h = hashlib.sha256(first)
    got = read_some(conn, h, BIG // 4, len(first))

    take_operator_away(world, signal.SIGKILL)
    got = read_some(conn, h, BIG // 2, got)  # it flows while no operator runs
    ready = bring_operator_back(world)
    assert ready < 1.0, f"egress worked {ready:.2f} s after the restart"
    print(f"egress through the adopted worker {ready * 1000:.0f} ms after the restart")
    assert world.status()["proxystack"] == f"connected, pid {worker}"  # adopted, not replaced
    # The new operator knows only its own circuits: the download, open all along, is not
    # listed (the echo's circuit goes once the worker has closed its side too).
    deadline = time.monotonic() + 5
    while world.status()["circuits"] != 0:
        assert time.monotonic() < deadline, world.status()
        time.sleep(0.02)
    got = read_some(conn, h, BIG, got)
    assert conn.recv(100) == b""  # the server's FIN, after exactly BIG bytes
    assert h.hexdigest() == pattern_sha256(BIG)
    conn.close()

    take_operator_away(world, signal.SIGKILL)  # a second time: still the one worker
    bring_operator_back(world)
    assert workers(world) == [worker] and world.worker() == worker


OUTSIDE_CLIENT = f"""
import socket, sys, time
s = socket.create_connection(("{HOST_IP}", {PUBLISHED}), timeout=10)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "new":  # a new connection: its reply, or how it ended
        try:
            t = socket.create_connection(("{HOST_IP}", {PUBLISHED}), timeout=10)
            t.sendall(b"new")
            print(t.recv(100).decode() or "eof", flush=True)
        except ConnectionError as e:
            print(type(e).__name__, flush=True)
    else:
        s.sendall(cmd.encode())
        print(s.recv(100).decode(), flush=True)
"""


def echo_forever(lst) -> None:
    """Accept (listening again after an operator restart) and echo, each in a thread."""
    def echo(conn):
        with conn:
            while data := conn.recv(100):
                conn.sendall(data)

    while True:
        try:
            conn, _ = lst.accept()
        except OSError:  # the listener was closed: the test is over
            return
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def test_a_published_connection_outlives_an_operator_restart(world):
    lst = circuits.listen(("0.0.0.0", 80), control=world.control("web"))
    threading.Thread(target=echo_forever, args=(lst,), daemon=True).start()
    client = subprocess.Popen(["ip", "netns", "exec", world.outside, sys.executable, "-c",
                               OUTSIDE_CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)

    def say(line: str) -> str:
        client.stdin.write(line + "\n")
        client.stdin.flush()
        return client.stdout.readline().strip()

    try:
        assert say("before") == "before"
        worker = world.worker()
        take_operator_away(world, signal.SIGTERM)  # a stop, not a crash: the same outcome
        assert say("while away") == "while away"
        assert say("new") == "ConnectionResetError"  # accepted by the kernel, reset at once
        world.start()
        assert world.worker() == worker and workers(world) == [worker]
        assert say("after") == "after"
        deadline = time.monotonic() + 10
        while (answer := say("new")) != "new":  # once the guest has listened again
            assert answer == "ConnectionResetError" and time.monotonic() < deadline, answer
            time.sleep(0.05)
    finally:
        client.kill()
        client.wait(10)
        lst.close()


def test_a_connect_in_flight_when_the_operator_dies_fails_cleanly(world):
    drop = world.in_outside(["sh", "-c", "nft add table inet t && nft add chain inet t in"
                             " '{ type filter hook input priority 0; }' && nft add rule inet t in"
                             " tcp dport 9999 drop && echo done"])
    assert drop.stdout.readline().strip() == "done"
    failed: list[BaseException] = []

    def connect() -> None:
        try:  # SYNs dropped: the worker's connect waits (db's connect_timeout is 1 s)
            circuits.connect((OUTSIDE_IP, 9999), control=world.control("db")).close()
        except OSError as e:  # ENETUNREACH if its one retry meets the dying operator too
            failed.append(e)

    worker = world.worker()
    guest = threading.Thread(target=connect)
    guest.start()
    deadline = time.monotonic() + 5
    while "SYN-SENT" not in world.in_host("ss", "-Htan", "dst", OUTSIDE_IP):
        assert time.monotonic() < deadline, "the worker never started the connect"
        time.sleep(0.01)
    take_operator_away(world, signal.SIGKILL)
    guest.join(10)
    assert not guest.is_alive() and len(failed) == 1  # an error for the guest, never a hang
    # The worker dropped the connect its operator asked for, and lives on.
    assert world.in_host("ss", "-Htan", "state", "syn-sent", "dst", OUTSIDE_IP) == ""
    assert world.worker() == worker
    world.start()
    assert world.worker() == worker


@both_placements
def test_ctl_stop_proxystack_stops_it_for_good(world):
    world.serve("echo", 84)
    conn = circuits.connect((OUTSIDE_IP, 84), control=world.control("web"))
    conn.settimeout(10)
    out = subprocess.run([sys.executable, "-m", "circuits", "ctl", "--config", str(world.config),
                          "stop-proxystack"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "stop" in out.stdout, out.stderr
    with pytest.raises((ConnectionResetError, BrokenPipeError)):  # reset, not left half-open
        for _ in range(100):
            conn.sendall(b"a" * 65536)
            conn.recv(65536)
    deadline = time.monotonic() + 10
    while world.status()["proxystack"] != "not connected, not running" or world.worker():
        assert time.monotonic() < deadline, world.status()
        time.sleep(0.05)
    time.sleep(0.5)  # and it is not started again
    assert world.status()["proxystack"] == "not connected, not running" and not workers(world)


def test_an_orphaned_worker_exits_once_its_last_connection_ends(world_short_grace):
    world = world_short_grace
    world.serve("echo", 84)
    worker = world.worker()
    conn = circuits.connect((OUTSIDE_IP, 84), control=world.control("web"))
    conn.settimeout(10)
    take_operator_away(world, signal.SIGKILL)
    time.sleep(1.5)  # past orphan_grace: it stays, for the connection it carries
    conn.sendall(b"still here")
    assert conn.recv(100) == b"still here"
    assert world.worker() == worker
    conn.close()
    deadline = time.monotonic() + 5  # orphan_grace is 1 s once the connection is gone
    while world.worker() is not None:
        assert time.monotonic() < deadline, "the orphaned worker did not exit"
        time.sleep(0.05)
    assert not workers(world)
