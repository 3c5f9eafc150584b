"""UDP sockets of unmodified programs as datagram circuits (udp.c).

tests/udp_app.py uses plain `socket` SOCK_DGRAM under `circuits run` (the
preload library applies).  Its peer here is another guest's datagram
listener, made with the client API in the test process, which echoes each
datagram with "|" and the sender's address.  The guests' addresses (10.0.0.x)
exist on no interface, so every datagram that came back crossed a circuit;
the tests also count the circuits and their bytes from the operator.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import circuits
from circuits.operator.admin import request
from datagram_echo import Echo

UDP_APP = Path(__file__).with_name("udp_app.py")
RESOLVER_C = Path(__file__).with_name("udp_resolver.c")
DB = "10.0.0.2"
SMALL_RING = 16384  # the listener's rings: datagrams beyond 16376 bytes cannot fit


def admin(operator, cmd: str):
    answer = request(str(Path(operator("db")).parent / "admin.sock"), cmd)
    assert answer["ok"], answer
    return answer["result"]


@pytest.fixture
def echoes(operator):
    made: list[Echo] = []

    def make(port: int, **kw) -> Echo:
        made.append(Echo(operator, port, **kw))
        return made[-1]

    yield make
    for e in made:
        e.close()


def run_app(operator, guest: str, *args: str, timeout: float = 60) -> dict:
    out = subprocess.run([sys.executable, "-m", "circuits", "run", "--guest", guest, "--config",
                          str(operator.config), "--", sys.executable, str(UDP_APP), *args],
                         capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "CIRCUITS_LOG": "debug"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1]) | {"log": out.stderr}


def test_connected_udp_socket_keeps_datagram_boundaries_between_guests(operator, echoes):
    echo = echoes(7001, ring_size=1 << 20)
    got = run_app(operator, "batch", "echo", DB, "7001")
    suffix = len(f"|{got['sockname'][0]}:{got['sockname'][1]}")
    assert got["so_type"] == 2  # SOCK_DGRAM
    for sent, e in zip([1, 100, 1500, 9000, 60000], got["echo"]):
        assert e["ok"] and e["selected"], e
        assert e["peer"] == [DB, 7001]
        assert e["fionread"] == e["len"] == sent + suffix  # FIONREAD: the next datagram
    assert got["sockname"][0] == "10.0.0.3" and got["peername"] == [DB, 7001]
    assert got["too_big"] == 90  # EMSGSIZE: more than UDP carries
    assert got["other_peer"] == 106  # EISCONN: one circuit, one peer
    assert got["truncation"] == {"data": "x" * 10, "msg_trunc": True, "full": 1000 + suffix,
                                 "buf": "y" * 10}
    assert got["vectors"] == {"n": 6 + suffix, "first": "abc",
                              "rest": "def" + f"|{got['sockname'][0]}:{got['sockname'][1]}"}
    assert got["epoll"] == [True, True, True]
    assert got["empty"] == 11  # EAGAIN: non-blocking, nothing waiting
    assert got["unspec"] == 0 and got["after_unspec"] == 89  # EDESTADDRREQ once dissolved
    assert echo.bytes_in >= sum([1, 100, 1500, 9000, 60000])
    assert "udp connect to 10.0.0.2:7001: connected" in got["log"]


def test_sendto_connects_implicitly_and_a_second_peer_is_eisconn(operator, echoes):
    echoes(7002)
    got = run_app(operator, "batch", "sendto", DB, "7002")
    assert all(e["ok"] and e["peer"] == [DB, 7002] for e in got["echo"]), got["echo"]
    assert got["peername"] == 107  # ENOTCONN: sendto does not connect the socket
    assert got["other_peer"] == 106  # EISCONN, never a datagram to the wrong peer
    assert "udp send to 10.0.0.2:7002: connected" in got["log"]


def test_connect_to_another_address_replaces_the_circuit(operator, echoes):
    first, second = echoes(7003), echoes(7004)
    got = run_app(operator, "batch", "reconnect", DB, "7003", "7004")
    assert got["first"]["ok"] and got["first"]["peer"] == [DB, 7003]
    assert got["second"]["ok"] and got["second"]["peer"] == [DB, 7004]
    assert got["peer"] == [DB, 7004]
    assert first.bytes_in == 3 and second.bytes_in == 3
    assert "udp circuit" in got["log"] and "ended" in got["log"]


def test_datagram_larger_than_the_ring_is_emsgsize(operator, echoes):
    echoes(7005, ring_size=SMALL_RING)
    script = ("import socket\n"
              "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              f"s.connect(('{DB}', 7005))\n"
              "s.send(b'a' * (16384 - 8))\n"
              "try:\n    s.send(b'a' * (16384 - 7))\nexcept OSError as e:\n    print(e.errno)\n")
    out = subprocess.run([sys.executable, "-m", "circuits", "run", "--guest", "batch", "--config",
                          str(operator.config), "--", sys.executable, "-c", script],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["90"], out.stderr  # EMSGSIZE; the ring's largest went


def test_policy_denied_udp_connect_is_eacces_and_audited(operator, echoes):
    echoes(7006)  # web may reach db by TCP only
    got = run_app(operator, "web", "send-one", DB, "7006")
    assert got["connect"] == "EACCES"
    audit = (Path(operator("db")).parent / "audit.jsonl").read_text().splitlines()
    denials = [json.loads(line) for line in audit if '"deny"' in line and "7006" in line]
    assert denials, audit[-5:]


@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler")
def test_glibc_resolver_and_getaddrinfo_calls_through_the_plt(operator, echoes, tmp_path):
    """What send_dg and the RFC 3484 sort do, made by a program of our own:
    glibc's copies call libc-internal functions, which the DNS relay serves."""
    exe = tmp_path / "udp_resolver"
    subprocess.run(["cc", "-O1", "-Wall", "-o", str(exe), str(RESOLVER_C)], check=True)
    echoes(7007), echoes(7008)
    out = subprocess.run([sys.executable, "-m", "circuits", "run", "--guest", "batch", "--config",
                          str(operator.config), "--", str(exe), DB, "7007", "7008"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout == "ok\n", out.stdout + out.stderr
    deadline = time.monotonic() + 10
    while udp := [c for c in admin(operator, "circuits") if "udp://" in json.dumps(c)]:
        assert time.monotonic() < deadline, udp  # every circuit ends with the program
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """User and system time of pid (and of the program circuits run became)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(operator, guest: str, host: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "circuits", "run", "--guest", guest, "--config",
                             str(operator.config), "--", sys.executable, str(UDP_APP), "serve",
                             host, str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready", proc.communicate(timeout=10)
    return proc


def test_a_bound_udp_server_of_one_guest_serves_another_guests_sockets(operator):
    server = start_server(operator, "db", "0.0.0.0", 7010)
    try:
        got = run_app(operator, "batch", "echo", DB, "7010")
        first = run_app(operator, "batch", "reconnect", DB, "7010", "7010")  # a second peer
        idle = cpu_seconds(server.pid)
        time.sleep(1)
        idle = cpu_seconds(server.pid) - idle  # its peers gone, the server sleeps
    finally:
        server.kill()
        _, err = server.communicate(timeout=10)
    assert all(e["ok"] and e["peer"] == [DB, 7010] for e in got["echo"]), got["echo"]
    assert got["truncation"]["msg_trunc"] and got["vectors"]["first"] == "abc"
    assert first["first"]["ok"] and first["second"]["ok"]
    told = json.loads(err.splitlines()[0])
    assert told["fionread"] == told["len"] == 1  # the first datagram, one byte
    assert told["sockname"] == ["0.0.0.0", 7010] and told["acceptconn"] == 0
    assert told["peername"] == 107  # ENOTCONN: a server is not connected
    assert idle < 0.1, f"the idle server used {idle} s of CPU in 1 s"


def test_a_bound_udp_server_sends_first_to_a_new_peer(operator, echoes):
    """sendto from a bound socket to an address that never sent to it: a new
    circuit, whose answers recvfrom takes like any peer's."""
    echo = echoes(7011)
    script = ("import socket\n"
              "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              "s.bind(('0.0.0.0', 7012))\n"
              f"s.sendto(b'first', ('{DB}', 7011))\n"
              "s.settimeout(10)\n"
              "data, peer = s.recvfrom(100)\n"
              "print(data.decode().split('|')[0], peer[0], peer[1])\n")
    out = subprocess.run([sys.executable, "-m", "circuits", "run", "--guest", "batch", "--config",
                          str(operator.config), "--", sys.executable, "-c", script],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["first", DB, "7011"], out.stderr
    assert echo.bytes_in == 5


@pytest.mark.skipif(not shutil.which("nc"), reason="netcat-openbsd: make deps")
def test_unmodified_nc_udp_listener_talks_with_a_guest(operator):
    """OpenBSD nc -u -l peeks at the first datagram and connects to its sender:
    the server adopts that peer's circuit, the datagram still in it."""
    server = subprocess.Popen([sys.executable, "-m", "circuits", "run", "--guest", "db",
                               "--config", str(operator.config), "--", "nc", "-u", "-l", DB,
                               "7020"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    script = ("import socket, time\n"
              "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              "s.settimeout(10)\n"
              "for _ in range(100):\n"
              "    try:\n"
              f"        s.connect(('{DB}', 7020))\n"
              "        break\n"
              "    except ConnectionRefusedError:\n"  # nc not listening yet
              "        time.sleep(0.1)\n"
              "s.send(b'hello from batch\\n')\n"
              "print(s.recv(100).decode(), end='', flush=True)\n")
    try:
        client = subprocess.Popen([sys.executable, "-m", "circuits", "run", "--guest", "batch",
                                   "--config", str(operator.config), "--", sys.executable, "-c",
                                   script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        assert server.stdout.readline() == "hello from batch\n"
        server.stdin.write("hello from nc\n")
        server.stdin.flush()
        out, err = client.communicate(timeout=30)
        assert out == "hello from nc\n", err
    finally:
        server.kill()
        server.communicate(timeout=10)


def test_reconnects_of_a_socket_in_an_epoll_set_unmap_the_old_circuits(operator, echoes):
    """An epoll registration holds a reference but no circuit: each replaced
    circuit is unmapped at once, so 50 more connects leave no mappings."""
    echoes(7030), echoes(7031)
    got = run_app(operator, "batch", "reconnects", DB, "7030", "7031")
    assert got["ok"]
    assert got["maps"][1] - got["maps"][0] < 10, got["maps"]


def test_a_threaded_server_drops_leaving_peers_under_concurrent_sends(operator):
    """Two threads in recvfrom and one in sendto while 100 peers come and go:
    the server survives, answers all, and unmaps the dropped peers' circuits."""
    server = subprocess.Popen([sys.executable, "-m", "circuits", "run", "--guest", "db",
                               "--config", str(operator.config), "--", sys.executable,
                               str(UDP_APP), "threads-serve", "0.0.0.0", "7032", "100"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready", server.communicate(timeout=10)
        got = run_app(operator, "batch", "many-peers", DB, "7032", "100")
        out, err = server.communicate(timeout=30)
    finally:
        server.kill()
    assert got["ok"] == 100
    assert server.returncode == 0, err[-3000:]
    maps = json.loads(out.splitlines()[-1])["maps"]
    assert maps[1] - maps[0] < 20, maps


def serve_and_judge(operator, role: str, port: int, n: int, *args: str) -> tuple[dict, dict]:
    """A server role of udp_app.py under guest db for n datagrams of n peers."""
    server = subprocess.Popen([sys.executable, "-m", "circuits", "run", "--guest", "db",
                               "--config", str(operator.config), "--", sys.executable,
                               str(UDP_APP), role, "0.0.0.0", str(port), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready", server.communicate(timeout=10)
        got = run_app(operator, "batch", "many-peers", DB, str(port), str(n))
        out, err = server.communicate(timeout=30)
    finally:
        server.kill()
    assert server.returncode == 0, err[-3000:]
    return got, json.loads(out.splitlines()[-1])


def test_socketserver_udpserver_serve_forever_then_shutdown(operator):
    """select says readable only while a datagram (or a new peer) waits: after
    each datagram taken, and each peer gone, the server's descriptor is quiet,
    so serve_forever's blocking recvfrom never waits for the next datagram and
    shutdown() returns."""
    got, server = serve_and_judge(operator, "socketserver", 7033, 5, "5")
    assert got["ok"] == 5
    assert server["shutdown"] and server["seconds"] < 2, server


def test_select_on_a_udp_server_means_a_datagram_waits(operator):
    """role serve: select, then a non-blocking recvfrom that dies of EAGAIN."""
    server = start_server(operator, "db", "0.0.0.0", 7034)
    try:
        with contextlib.suppress(AssertionError):
            got = {}
            got = run_app(operator, "batch", "many-peers", DB, "7034", "5")
        time.sleep(0.5)  # the peers are gone: select must not wake the server
        alive = server.poll() is None
    finally:
        server.kill()
        _, err = server.communicate(timeout=10)
    assert alive, err[-3000:]
    assert got["ok"] == 5


def test_a_forked_child_closing_a_udp_server_leaves_the_parents_peers(operator):
    """The child's close of its copy only detaches the peers' circuits: the
    parent's answer reaches the peer on the circuit it sent on."""
    got, server = serve_and_judge(operator, "fork-serve", 7035, 1)
    assert server["child"] == 0
    assert got["ok"] == 1


def test_shutdown_wakes_a_blocked_udp_receiver_with_zero_bytes(operator, echoes):
    """As Linux: shutdown(SHUT_RDWR) of a bound, unconnected socket says
    ENOTCONN but shuts it; of a connected one, 0.  Either way a thread asleep
    in recvfrom returns 0 bytes, and so does every receive after; a send is
    EPIPE."""
    echoes(7036)
    got = run_app(operator, "batch", "shutdown", DB, "7036")
    assert got["server"] == {"data": "", "shutdown": 107, "woke": True, "after": ""}, got
    assert got["connected"] == {"data": "", "shutdown": 0, "woke": True, "after": ""}, got
    assert got["send_after"] == 32  # EPIPE


def test_msg_errqueue_is_eagain_and_takes_no_datagram(operator, echoes):
    """No ICMP error crosses a circuit: MSG_ERRQUEUE finds the queue empty
    (EAGAIN), as Linux's does, and leaves the waiting datagram alone."""
    echoes(7037)
    got = run_app(operator, "batch", "shutdown", DB, "7037")
    assert got["errqueue"] == 11 and got["kept"], got


def test_two_threads_receiving_into_vectors_share_no_datagram(operator, echoes):
    """recvmsg with two buffers peeks, copies, then consumes: one receive at a
    time per socket, so 400 datagrams reach the two threads once each, whole."""
    echoes(7038, ring_size=1 << 20)
    got = run_app(operator, "batch", "vector-race", DB, "7038")
    got.pop("log")
    assert got == {"count": 400, "unique": 400, "torn": 0, "errors": []}, got


def test_connect_af_unspec_on_a_udp_server_keeps_its_port(operator):
    """A disconnect of a socket connected to nobody: the server keeps its
    listener and port, and serves the next peer (the kernel's does)."""
    got, server = serve_and_judge(operator, "unspec-serve", 7039, 1)
    assert server == {"unspec": 0, "sockname": ["0.0.0.0", 7039]}
    assert got["ok"] == 1


def test_poll_on_a_dup_follows_a_reconnect_through_the_other_number(operator, echoes):
    """The dup's number still holds the old circuit's doorbell (ended: readable
    for ever): poll sleeps on the socket's circuit's own instead, without
    spinning, and wakes when the echo comes."""
    echoes(7040), echoes(7041)
    got = run_app(operator, "batch", "dup-poll", DB, "7040", "7041")
    assert got["idle"] == [] and got["cpu"] < 0.005, got  # spinning: 0.02 s
    assert got["readable"] and got["seconds"] < 2, got
