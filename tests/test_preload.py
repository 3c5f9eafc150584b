"""Unmodified programs on circuits: the preload library, under a real operator.

Programs here know nothing of circuits: Python's http.server, curl, and
tests/preload_app.py (plain `socket`).  Each runs under `circuits run --guest
NAME`, which preloads libcircuits_preload.so.  The guests' addresses (10.0.0.x)
exist on no interface of this host, so a connection that works went through
the operator; the tests also read the live circuits from the admin API.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import preload_app
import pytest

from circuits.operator import child
from circuits.operator.admin import request
from circuits.preload import library_path

APP = Path(__file__).with_name("preload_app.py")


def app(*args: str) -> list[str]:
    return [sys.executable, str(APP), *args]


@pytest.fixture
def guests(operator):
    """Start programs as guests: guests(name, argv, env=...) -> Popen; all are
    killed at the end of the test."""
    started: list[subprocess.Popen] = []

    def start(name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "circuits", "run", "--guest", name,
               "--config", str(operator.config), "--", *argv]
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def admin(operator, cmd: str):
    answer = request(str(Path(operator("web")).parent / "admin.sock"), cmd)
    assert answer["ok"], answer
    return answer["result"]


def wait_listening(operator, guest: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not any(g["name"] == guest and g["listeners"] for g in admin(operator, "guests")):
        assert proc.poll() is None, f"the server exited: {proc.communicate()}"
        assert time.monotonic() < deadline, "the server never listened"
        time.sleep(0.05)


def live_circuits(operator, port: int) -> list[dict]:
    return [c for c in admin(operator, "circuits")
            if c["from"].startswith("web ") and c["to"] == f"db tcp://10.0.0.2:{port}"]


def test_library_is_built_and_run_preloads_it(operator):
    assert Path(library_path()).is_file()
    out = subprocess.run([sys.executable, "-m", "circuits", "run", "--guest", "web", "--config",
                          str(operator.config), "--", "sh", "-c", "echo $LD_PRELOAD"],
                         env={**os.environ, "LD_PRELOAD": "libfoo.so"}, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == f"libfoo.so:{library_path()}"  # appended to what was there


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed (make deps)")
def test_curl_downloads_from_http_server_checked_by_hash(operator, guests, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    blob = os.urandom(6 << 20)
    (www / "blob").write_bytes(blob)
    server = guests("db", [sys.executable, "-m", "http.server", "--bind", "10.0.0.2", "7001",
                           "--directory", str(www)])
    wait_listening(operator, "db", server)
    seen: list[dict] = []
    stop = threading.Event()

    def watch():  # look at the live circuits for as long as curl runs (well under a second)
        while not stop.is_set():
            seen.extend(live_circuits(operator, 7001))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        curl = guests("web", ["curl", "-sS", "--limit-rate", "6M", "-o", str(tmp_path / "got"),
                              "http://10.0.0.2:7001/blob"])
        _, err = curl.communicate(timeout=60)
    finally:
        stop.set()
        watcher.join()
    assert curl.returncode == 0, err
    assert hashlib.sha256((tmp_path / "got").read_bytes()).digest() == hashlib.sha256(blob).digest()
    assert seen, "no circuit web -> db:7001 was seen while curl downloaded"
    assert max(c["bytes_to_from"] for c in seen) > 0  # db's bytes went through its ring
    audit = [json.loads(line) for line in (Path(operator("web")).parent / "audit.jsonl").open()]
    assert [(a["from"], a["to"], a["port"], a["verdict"]) for a in audit] == [
        ("web", "10.0.0.2", 7001, "allow")]  # one setup, by the operator


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed (make deps)")
def test_curl_to_a_forbidden_destination_fails(operator, guests):
    curl = guests("web", ["curl", "-sS", "http://10.0.0.2:22/"])  # port 22: not in the rule
    _, err = curl.communicate(timeout=30)
    assert curl.returncode == 7, err  # curl: couldn't connect
    assert "Failed to connect to 10.0.0.2 port 22" in err
    metrics = admin(operator, "metrics")
    assert 'circuits_denials_total{guest="web"} 1' in metrics  # the operator said no


@pytest.mark.parametrize("mode,conns", [("blocking", 1), ("select", 1), ("timeout", 1),
                                        ("blocking", 4)])
def test_plain_socket_echo(operator, guests, mode, conns):
    size = 4 << 20
    server = guests("db", app("echo-server", "10.0.0.2", "7002", str(conns)))
    wait_listening(operator, "db", server)
    client = guests("web", app("echo-client", "10.0.0.2", "7002", mode, str(size), str(conns)))
    assert client.stdout.readline().strip() == "ok", client.communicate()
    live = live_circuits(operator, 7002)  # the client holds its connections open
    assert len(live) == conns
    assert all(c["bytes_from_to"] == size and c["bytes_to_from"] == size for c in live)
    client.communicate("\n", timeout=30)
    assert client.returncode == 0
    server.communicate(timeout=30)
    assert server.returncode == 0


def test_ctl_circuits_shows_the_programs_circuit(operator, guests):
    server = guests("db", app("echo-server", "10.0.0.2", "7003"))
    wait_listening(operator, "db", server)
    client = guests("web", app("echo-client", "10.0.0.2", "7003", "blocking", "100000"))
    assert client.stdout.readline().strip() == "ok"
    table = subprocess.run([sys.executable, "-m", "circuits", "ctl", "--config",
                            str(operator.config), "circuits"],
                           capture_output=True, text=True, check=True).stdout
    assert "tcp://10.0.0.2:7003" in table and "100000" in table
    client.communicate("\n", timeout=30)


@pytest.mark.parametrize("port,mode,expect", [
    ("22", "", "EACCES"),                      # the policy forbids it
    ("5432", "", "ECONNREFUSED"),              # allowed, nobody listens
    ("22", "nonblock", "EINPROGRESS EACCES"),  # non-blocking: told by SO_ERROR
    ("5432", "nonblock", "EINPROGRESS ECONNREFUSED"),
])
def test_refused_connect_gives_the_operators_errno(operator, guests, port, mode, expect):
    out, err = guests("web", app("connect", "10.0.0.2", port, mode)).communicate(timeout=30)
    assert out.strip() == expect, err


def test_unreachable_operator_fails_connect_loudly(tmp_path):
    env = {**os.environ, "LD_PRELOAD": library_path(),
           "CIRCUITS_CONTROL": str(tmp_path / "nobody.sock")}
    proc = subprocess.run(app("connect", "10.0.0.2", "80"), env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.stdout.strip() == "ENETUNREACH"
    assert "cannot reach the operator" in proc.stderr


def test_unix_sockets_pass_through(operator, guests):
    out, err = guests("web", app("unix")).communicate(timeout=30)
    assert out.strip() == "unix ok AF_UNIX AF_UNIX", err


@contextlib.contextmanager
def kernel_echo():
    """A kernel TCP echo server for one connection, on loopback only; yields its port."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        threading.Thread(target=lambda: preload_app.echo(srv.accept()[0]), daemon=True).start()
        yield srv.getsockname()[1]


def test_bypass_leaves_a_destination_to_the_kernel(operator, guests):
    with kernel_echo() as port:
        client = guests("web", app("echo-client", "127.0.0.1", str(port), "blocking", "65536"),
                        env={"CIRCUITS_BYPASS": "127.0.0.0/8", "CIRCUITS_LOG": "debug"})
        assert client.stdout.readline().strip() == "ok"
        _, err = client.communicate("\n", timeout=30)
    assert "handed to the kernel (connect to a CIRCUITS_BYPASS address)" in err
    assert not [c for c in admin(operator, "circuits") if str(port) in c["to"]]


def test_debug_log_tells_the_life_of_each_socket(operator, guests):
    env = {"CIRCUITS_LOG": "debug"}
    server = guests("db", app("echo-server", "10.0.0.2", "7004"), env=env)
    wait_listening(operator, "db", server)
    client = guests("web", app("echo-client", "10.0.0.2", "7004", "blocking", "1000"), env=env)
    assert client.stdout.readline().strip() == "ok"
    _, cerr = client.communicate("\n", timeout=30)
    _, serr = server.communicate(timeout=30)
    for line in ("socket inet stream", "connect to 10.0.0.2:7004: connected, circuit", ": close",
                 "1000 bytes sent, 1000 received"):
        assert line in cerr, cerr
    for line in ("bound to 10.0.0.2:7004", "listen on 10.0.0.2:7004: ok",
                 "accepted circuit", "1000 bytes sent, 1000 received"):
        assert line in serr, serr


def test_signal_interrupts_a_blocked_recv(operator, guests):
    server = guests("db", app("echo-server", "10.0.0.2", "7005"))
    wait_listening(operator, "db", server)
    t0 = time.monotonic()
    out, err = guests("web", app("recv-interrupted", "10.0.0.2", "7005")).communicate(timeout=30)
    assert out.strip() == "interrupted", err
    assert time.monotonic() - t0 < 15


@pytest.mark.parametrize("conns", [1, 3])
@pytest.mark.parametrize("server_loop,client_loop", [
    ("asyncio", "asyncio"), ("uvloop", "uvloop"), ("asyncio", "uvloop"), ("uvloop", "asyncio")])
def test_asyncio_on_both_ends(operator, guests, conns, server_loop, client_loop):
    """asyncio's default loop waits in epoll: the library's epoll_* wrappers.
    uvloop's libuv would submit epoll_ctl through io_uring: the library refuses
    io_uring_setup, so libuv falls back to epoll_ctl, which it wraps."""
    server = guests("db", app("aio-server", "10.0.0.2", "7006", str(conns), server_loop))
    wait_listening(operator, "db", server)
    client = guests("web", app("aio-client", "10.0.0.2", "7006", str(2 << 20), str(conns),
                               client_loop))
    out, err = client.communicate(timeout=60)
    assert out.strip() == "ok", err
    server.communicate(timeout=30)
    assert server.returncode == 0
    assert f'circuits_setups_total{{guest="web"}} {conns}' in admin(operator, "metrics")


def test_without_circuits_control_the_library_does_nothing():
    with kernel_echo() as port:
        env = {k: v for k, v in os.environ.items() if k != "CIRCUITS_CONTROL"}
        env.update(LD_PRELOAD=library_path(), CIRCUITS_LOG="debug")
        proc = subprocess.run(app("echo-client", "127.0.0.1", str(port), "select", "65536"),
                              env=env, input="\n", capture_output=True, text=True, timeout=30)
    assert proc.stdout.split() == ["ok", "eof"]
    assert "circuits[" not in proc.stderr  # not one socket was touched


@pytest.mark.parametrize("server", ["fork-server", "prefork-server"])
def test_forking_servers(operator, guests, server):
    """fork-server: a child per connection (which also fork+execs a helper) while
    the parent closes its copy; prefork-server: workers forked after listen()
    each accept.  Each client gets its echo, then a clean end of data."""
    conns = 3
    srv = guests("db", app(server, "10.0.0.2", "7007", str(conns)))
    wait_listening(operator, "db", srv)
    client = guests("web", app("echo-client", "10.0.0.2", "7007", "blocking", str(1 << 20),
                               str(conns)))
    assert client.stdout.readline().strip() == "ok", client.communicate()
    out, err = client.communicate("\n", timeout=30)
    assert out.strip() == "eof", err
    _, err = srv.communicate(timeout=30)
    assert srv.returncode == 0, err


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("server", ["echo-server", "aio-server"])
def test_listener_listens_again_after_an_operator_restart(operator, guests, server):
    """The listener's control connection dies with the operator: the listening
    descriptor must not poll readable for ever (no spinning while the operator
    is away), and accept LISTENs again once it is back (tried each second)."""
    argv = [server, "10.0.0.2", "7008", "2"] + (["asyncio"] if server == "aio-server" else [])
    srv = guests("db", app(*argv))
    wait_listening(operator, "db", srv)

    def one_client():
        client = guests("web", app("aio-client", "10.0.0.2", "7008", "100000", "1", "asyncio"))
        out, err = client.communicate(timeout=30)
        assert out.strip() == "ok", err

    one_client()
    child.stop(operator.proc)
    before = cpu_seconds(srv.pid)
    time.sleep(1.5)
    assert cpu_seconds(srv.pid) - before < 0.5  # asleep, not spinning on a dead connection
    operator.proc = child.start(str(operator.config))
    wait_listening(operator, "db", srv)
    one_client()
    srv.communicate(timeout=30)
    assert srv.returncode == 0


def test_execl_counts_the_process_out_of_its_circuits(operator, guests):
    """glibc's execl calls execve inside libc: the library wraps execl itself,
    so the forked child's exec counts it out of the circuit, the parent's close
    is the last and the peer reads end of data (not ECONNRESET)."""
    server = guests("db", app("hash-server", "10.0.0.2", "7009"))
    wait_listening(operator, "db", server)
    client = guests("web", app("execl-client", "10.0.0.2", "7009"))
    _, err = client.communicate(timeout=30)
    assert client.returncode == 0, err
    out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert out.split()[-1] == hashlib.sha256(b"hello").hexdigest()


def test_so_rcvtimeo_bounds_a_blocking_recv(operator, guests):
    server = guests("db", app("hash-server", "10.0.0.2", "7010"))
    wait_listening(operator, "db", server)
    client = guests("web", app("rcvtimeo", "10.0.0.2", "7010"))
    out, err = client.communicate(timeout=30)
    words = out.split()
    assert words[:2] == ["timed", "out"] and 0.25 <= float(words[2]) < 3, out + err
    assert out.strip().endswith("(0, 300000)")  # read back as set
    server.communicate(timeout=30)


def test_so_rcvtimeo_bounds_a_blocking_accept(operator, guests):
    server = guests("db", app("accept-timeout", "10.0.0.2", "7011"))
    out, err = server.communicate(timeout=30)
    words = out.split()
    assert words[:2] == ["timed", "out"] and 0.25 <= float(words[2]) < 3, out + err


def test_bind_to_port_0_listens_on_a_port_the_library_picks(operator, guests):
    server = guests("db", app("echo-server", "10.0.0.2", "0"))
    words = server.stdout.readline().split()
    assert words[0] == "listening" and 49152 <= int(words[1]) <= 65535, server.communicate()
    client = guests("batch", app("echo-client", "10.0.0.2", words[1], "blocking", "100000"))
    out, err = client.communicate("\n", timeout=30)
    assert out.split()[0] == "ok", err  # batch may reach any port of db
    server.communicate(timeout=30)
    assert server.returncode == 0


def test_epoll_interest_deleted_and_added_again(operator, guests):
    """A deleted interest is parked for a quick re-add; while deleted it
    reports nothing, and a doorbell ringing for it does not make the set spin."""
    server = guests("db", app("echo-server", "10.0.0.2", "7011"))
    wait_listening(operator, "db", server)
    client = guests("batch", app("epoll-park", "10.0.0.2", "7011"))
    out, err = client.communicate(timeout=30)
    assert out.split()[:1] == ["ok"], out + err
    cpu = out.split()[1]
    assert float(cpu) < 0.3  # 0.9 s of waiting, not of spinning
    server.communicate(timeout=30)
