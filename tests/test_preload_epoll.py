"""Sockets in an epoll set before they connect or listen (epoll.c, connect.c).

Event loops (nginx's upstreams, above all) add a socket to their epoll set
first and connect it after; the registration must follow the socket from its
placeholder to the circuit's doorbell, with the program's events and data.
tests/epoll_connect.c does exactly nginx's sequence, under `circuits run`;
its peers are other guests (a plain-socket echo server, the client API), so
whatever comes back crossed a circuit.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import circuits
from circuits.operator.admin import request
from datagram_echo import Echo
import preload_app

HERE = Path(__file__).parent
SOURCE = HERE / "epoll_connect.c"
APP = HERE / "preload_app.py"
DB = "10.0.0.2"


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> str:
    if not shutil.which("cc"):
        pytest.skip("no C compiler (cc) to build tests/epoll_connect.c")
    exe = tmp_path_factory.mktemp("epoll") / "epoll_connect"
    subprocess.run(["cc", "-O1", "-Wall", "-Werror", "-o", str(exe), str(SOURCE)], check=True)
    return str(exe)


def run(operator, guest: str, argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "circuits", "run", "--guest", guest,
                             "--config", str(operator.config), "--", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def admin(operator, cmd: str):
    answer = request(str(Path(operator("web")).parent / "admin.sock"), cmd)
    assert answer["ok"], answer
    return answer["result"]


def finish(proc: subprocess.Popen, timeout: float = 30) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s: {out} {err}")
    assert proc.returncode == 0, out + err
    return out


def test_nginx_upstream_sequence_between_guests(operator, program):
    server = run(operator, "db", [sys.executable, str(APP), "echo-server", DB, "7001", "2"])
    assert server.stdout.readline().split()[0] == "listening", server.communicate()
    client = run(operator, "web", [program, "nginx", DB, "7001"],
                 env={**os.environ, "CIRCUITS_LOG": "debug"})
    out = finish(client)
    assert out.strip() == "ok nginx"
    finish(server)
    metrics = admin(operator, "metrics")
    assert 'circuits_setups_total{guest="web"} 2' in metrics  # both connects were circuits
    assert 'circuits_bytes_sent_total{guest="web"} 26' in metrics  # both lines crossed them


def test_nginx_upstream_sequence_to_a_bypass_address(operator, program):
    """connect() hands the socket to the kernel (CIRCUITS_BYPASS): the
    registration made before it becomes the kernel's own."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(2)

        def serve() -> None:
            for _ in range(2):
                conn, _ = srv.accept()
                threading.Thread(target=preload_app.echo, args=(conn,), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        env = {**os.environ, "CIRCUITS_BYPASS": "127.0.0.0/8", "CIRCUITS_LOG": "debug"}
        client = run(operator, "web", [program, "nginx", "127.0.0.1", str(srv.getsockname()[1])],
                     env=env)
        out, err = client.communicate(timeout=30)
    assert client.returncode == 0 and out.strip() == "ok nginx", out + err
    assert "handed to the kernel (connect to a CIRCUITS_BYPASS address)" in err


@pytest.mark.parametrize("port,expect", [("7009", "ECONNREFUSED"),  # nobody listens
                                         ("22", "EACCES")])  # the policy says no
def test_nginx_upstream_sequence_refused(operator, program, port, expect):
    assert finish(run(operator, "web", [program, "refused", DB, port])).strip() == f"ok {expect}"


def test_listen_after_epoll_ctl_add(operator, program):
    server = run(operator, "db", [program, "listen", DB, "7002"])
    assert server.stdout.readline().strip() == "listening", server.communicate()
    with circuits.connect((DB, 7002), control=operator("web")) as conn:
        conn.settimeout(10)
        conn.sendall(b"through the listener\n")
        got = b""
        while not got.endswith(b"\n"):
            more = conn.recv(100)
            assert more, "the listener closed before echoing"
            got += more
    assert got == b"through the listener\n"
    assert finish(server).split()[-2:] == ["ok", "listen"]


def test_udp_socket_in_epoll_before_connect_and_across_reconnect(operator, program):
    echoes = [Echo(operator, port) for port in (7003, 7004)]  # echo with "|peer" appended
    try:
        out = finish(run(operator, "batch", [program, "udp", DB, "7003", "7004"]))
    finally:
        for e in echoes:
            e.close()
    assert out.strip() == "ok udp"


@pytest.mark.parametrize("role", [
    "again",   # connect() called again until it settles, with no poll between
    "thread",  # by a thread asleep in epoll_wait since before the ADD (no circuit in its set)
    "add",     # epoll_ctl ADD from another thread wakes a sleeper (a fresh socket: EPOLLOUT)
    "mod",     # so does a MOD of a connected socket to EPOLLOUT
    "fork",    # a child forked while another thread loops in epoll_wait can close its socket
    "oneshot", # an EPOLLONESHOT registration MODded on again wakes a thread asleep on the set
])
def test_connect_and_epoll_ctl_seen_by_other_calls_and_threads(operator, program, role):
    server = run(operator, "db", [sys.executable, str(APP), "echo-server", DB, "7005", "1"])
    assert server.stdout.readline().split()[0] == "listening", server.communicate()
    try:
        assert finish(run(operator, "web", [program, role, DB, "7005"])).strip() == f"ok {role}"
    finally:
        server.kill()
        server.communicate()


def test_connect_again_reports_a_refusal_once(operator, program):
    out = finish(run(operator, "web", [program, "again", DB, "7009"]))  # nobody listens
    assert out.strip() == "ok again ECONNREFUSED"
