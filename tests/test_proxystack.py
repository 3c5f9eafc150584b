"""The proxy stack, end to end: guests (the client API) reach a test-made outside
namespace through it, and the outside reaches a guest through a published port."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time

import pytest

import circuits
from circuits.guestnet import hosttable
from circuits.operator.config import default_mark
from outside import BLOCK, pattern_sha256
from proxystack_fixtures import (  # noqa: F401 - fixtures
    HOST_IP, HOST_IP6, OUTSIDE_IP, OUTSIDE_IP6, PUBLISHED, SOURCE_IP, both_placements,
    Held, requires_netns, world, world_no_restart)

pytestmark = requires_netns
BIG = 200 << 20  # the 200 MB each way


def response_body_start(conn, head: bytes) -> bytes:
    """Send a request head; return the bytes of the body that came with the response head."""
    conn.sendall(head)
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        assert more, "the response ended in its head"
        data += more
    return data.split(b"\r\n\r\n", 1)[1]


def read_to_eof(conn, into=None) -> int:
    """Read to EOF, hashing into `into`; the byte count."""
    buf, n = bytearray(1 << 20), 0
    while got := conn.recv_into(buf):
        if into is not None:
            into.update(memoryview(buf)[:got])
        n += got
    return n


def connect(world, guest: str, port: int, **kw):
    return circuits.connect((OUTSIDE_IP, port), control=world.control(guest), **kw)


@both_placements
def test_http_download_and_upload_checked_by_hash(world):
    world.serve("http", 80)
    conn = connect(world, "web", 80, ring_size=1 << 20)
    assert conn.getpeername() == (OUTSIDE_IP, 80)
    start = time.monotonic()
    first = response_body_start(conn, f"GET /download/{BIG} HTTP/1.1\r\n\r\n".encode())
    h = hashlib.sha256(first)
    assert len(first) + read_to_eof(conn, h) == BIG  # the server's FIN is our EOF
    conn.close()
    down = time.monotonic() - start
    assert h.hexdigest() == pattern_sha256(BIG)

    conn = connect(world, "web", 80, ring_size=1 << 20)
    start = time.monotonic()
    conn.sendall(f"POST /upload HTTP/1.1\r\nContent-Length: {BIG}\r\n\r\n".encode())
    for _ in range(BIG // len(BLOCK)):
        conn.sendall(BLOCK)
    body = response_body_start(conn, b"")
    body += conn.recv(100)
    conn.close()
    up = time.monotonic() - start
    assert body.decode() == pattern_sha256(BIG)
    print(f"200 MiB through egress: download {down:.2f} s, upload {up:.2f} s")


@both_placements
def test_published_port_shows_the_outside_address_to_the_guest(world):
    with circuits.listen(("0.0.0.0", 80), control=world.control("web")) as lst:
        client = world.in_outside([sys.executable, "-c", f"""
import socket
s = socket.create_connection(("{HOST_IP}", {PUBLISHED}), timeout=10)
print(s.getsockname()[0], s.getsockname()[1], flush=True)
s.sendall(b"hello guest")
s.shutdown(socket.SHUT_WR)
print(s.recv(100).decode(), flush=True)
print(repr(s.recv(100)), flush=True)
"""])
        conn, peer = lst.accept()
        address, port = client.stdout.readline().split()
        assert peer == (address, int(port)) == (OUTSIDE_IP, int(port))
        assert conn.getpeername() == peer
        assert conn.getsockname() == ("10.0.0.1", 80)
        conn.settimeout(10)
        assert conn.recv(100) == b"hello guest"
        assert conn.recv(100) == b""  # the outside's FIN
        conn.sendall(b"hello outside")
        conn.close()
        assert client.stdout.readline().strip() == "hello outside"
        assert client.stdout.readline().strip() == "b''"  # the guest's close: FIN
        assert client.wait(10) == 0
    with open(world.dir / "audit.jsonl") as f:
        last = json.loads(f.readlines()[-1])
    assert {"from": "proxystack", "to": "10.0.0.1", "to_guest": "web", "port": 80,
            "rule": "publish", "peer": f"tcp://{peer[0]}:{peer[1]}"}.items() <= last.items()


@both_placements
def test_published_port_with_no_listener_is_reset(world):
    client = world.in_outside([sys.executable, "-c", f"""
import socket
try:  # the RST can come before connect() returns (a quick refusal, a busy machine)
    s = socket.create_connection(("{HOST_IP}", {PUBLISHED}), timeout=10)
    print(repr(s.recv(100)))
except ConnectionResetError:
    print("reset")
"""])
    assert client.stdout.readline().strip() == "reset"
    client.wait(10)


@both_placements
def test_refused_unreachable_and_timed_out_destinations(world):
    with pytest.raises(ConnectionRefusedError):  # the outside answers RST
        connect(world, "web", 1)
    with pytest.raises(OSError) as e:  # no route from the host namespace
        circuits.connect(("203.0.113.5", 80), control=world.control("web"))
    assert e.value.errno == errno.ENETUNREACH
    drop = world.in_outside(["sh", "-c", "nft add table inet t && nft add chain inet t in"
                             " '{ type filter hook input priority 0; }' && nft add rule inet t in"
                             " tcp dport 9999 drop && echo done"])
    assert drop.stdout.readline().strip() == "done"
    start = time.monotonic()
    with pytest.raises(TimeoutError) as e:  # SYNs dropped; db's connect_timeout is 1 s
        connect(world, "db", 9999)
    assert e.value.errno == errno.ETIMEDOUT
    assert 0.9 < time.monotonic() - start < 5
    with pytest.raises(OSError) as e:  # on the link, but nobody answers ARP
        circuits.connect(("198.18.0.77", 80), control=world.control("web"))
    assert e.value.errno == errno.EHOSTUNREACH


def test_forbidden_destination_is_eacces_and_audited(world):
    with pytest.raises(PermissionError):
        connect(world, "web", 25)
    with open(world.dir / "audit.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert {"from": "web", "to": OUTSIDE_IP, "port": 25, "verdict": "deny", "rule": 1}.items() \
        <= lines[-1].items()


def test_outside_reset_mid_transfer_is_connection_reset(world):
    world.serve("reset", 81)
    conn = connect(world, "web", 81)
    conn.settimeout(10)
    conn.sendall(b"go")
    with pytest.raises(ConnectionResetError):
        read_to_eof(conn)


def test_half_close_both_ways(world):
    world.serve("halfclose", 82)
    conn = connect(world, "web", 82)
    conn.settimeout(10)
    conn.sendall(b"x" * 100000)
    conn.shutdown(socket.SHUT_WR)  # a FIN out: the server reads to its end, then answers
    assert conn.recv(100).decode() == hashlib.sha256(b"x" * 100000).hexdigest()
    assert conn.recv(100) == b""
    conn.close()

    greeter = world.serve("greet", 83)
    conn = connect(world, "web", 83)
    conn.settimeout(10)
    assert conn.recv(100) == b"hello from outside"
    assert conn.recv(100) == b""  # the outside's FIN; our direction stays open
    conn.sendall(b"y" * 300000)
    conn.close()
    assert greeter.stdout.readline().strip() == "read 300000"


def _resets_sent(world) -> int:
    """TCP resets sent from the host namespace, where the proxy stack's sockets are."""
    rows = [line.split() for line in world.in_host("cat", "/proc/net/snmp").splitlines()
            if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("OutRsts")])


@both_placements
def test_a_guests_close_is_a_fin_not_a_reset(world):
    """A guest that closes once its exchange is done, as a client or as a
    server, ends the outside connection as a kernel socket's close does: a
    FIN, and no reset, since nothing is left unread."""
    echo = world.serve("echoend", 91)
    before = _resets_sent(world)
    for _ in range(10):
        conn = connect(world, "web", 91)
        conn.settimeout(10)
        conn.sendall(b"ping")
        assert conn.recv(100) == b"ping"
        conn.close()
        assert echo.stdout.readline().strip() == "eof"
    with circuits.listen(("0.0.0.0", 80), control=world.control("web")) as lst:
        client = world.in_outside([sys.executable, "-c", f"""
import socket
for _ in range(10):
    s = socket.create_connection(("{HOST_IP}", {PUBLISHED}), timeout=10)
    s.sendall(b"hi")
    print(s.recv(100).decode(), repr(s.recv(100)), flush=True)
"""])
        for _ in range(10):
            conn, _ = lst.accept()
            conn.settimeout(10)
            assert conn.recv(100) == b"hi"
            conn.sendall(b"bye")
            conn.close()
            assert client.stdout.readline().strip() == "bye b''"
        assert client.wait(10) == 0
    time.sleep(0.2)  # a reset would go out as the proxy stack ends the connection
    assert _resets_sent(world) == before


def test_a_guests_close_with_data_still_coming_resets(world):
    """Data that reaches a closed socket is answered with a reset, by the
    kernel's TCP as here: the outside's sender learns the guest is gone."""
    talker = world.serve("talk", 92)
    conn = connect(world, "web", 92)
    conn.settimeout(10)
    assert conn.recv(100)
    conn.close()
    assert talker.stdout.readline().strip() in ("ConnectionResetError", "BrokenPipeError")


def test_200_concurrent_egress_connections(world):
    world.serve("echo", 84)
    conns = [connect(world, "db", 84) for _ in range(200)]
    try:
        for i, conn in enumerate(conns):
            conn.settimeout(20)
            conn.sendall(i.to_bytes(4, "big") * 4096)
        for i, conn in enumerate(conns):
            got = b""
            while len(got) < 16384:
                got += conn.recv(16384 - len(got))
            assert got == i.to_bytes(4, "big") * 4096
        assert world.status()["circuits"] >= 200
    finally:
        for conn in conns:
            conn.close()


def test_a_connect_waiting_for_the_outside_holds_up_no_other_thread(world):
    """The operator answers a connect to the outside once the host connection
    is up; a thread whose destination does not answer must not hold up
    another thread's connect (one control connection each while both wait)."""
    world.serve("echo", 84)
    world.serve("echo", 85)
    held = Held(world, 85)
    slow: list = []
    waiting = threading.Thread(target=lambda: slow.append(connect(world, "web", 85)))
    waiting.start()
    try:
        time.sleep(0.5)  # its CONNECT is at the operator, the handshake held
        start = time.monotonic()
        connect(world, "web", 84).close()
        assert time.monotonic() - start < 2 and waiting.is_alive()
    finally:
        held.release()
        waiting.join(15)  # the next SYN goes through
    assert slow and slow[0].getpeername() == (OUTSIDE_IP, 85)
    slow[0].close()


@both_placements
def test_per_guest_stack_options_in_ss(world):
    """Congestion control, mark, keepalive, source address and buffer sizes, per guest."""
    world.serve("echo", 85)
    web, db = connect(world, "web", 85), connect(world, "db", 85)
    try:
        for conn in (web, db):
            conn.sendall(b"ping")
            conn.settimeout(10)
            assert conn.recv(10) == b"ping"
        ss = world.in_host("ss", "-Htiem", "state", "established", "dst", OUTSIDE_IP)
        sockets = re.split(r"\n(?=\S)", ss.strip())  # each socket: a line, then indented ones
        assert len(sockets) == 2, ss
        by_mark = {re.search(r"fwmark:(0x[0-9a-f]+)", s).group(1): s for s in sockets}
        web_ss, db_ss = by_mark["0x43520101"], by_mark[hex(default_mark("db"))]
        assert " bbr " in web_ss and " cubic " in db_ss, ss  # each guest's congestion control
        assert "timer:(keepalive," in web_ss and "keepalive" not in db_ss, ss  # web: keepalive 60
        assert web_ss.split()[2].startswith(HOST_IP + ":"), ss
        assert db_ss.split()[2].startswith(SOURCE_IP + ":"), ss  # db's source address
        assert "tb524288" in db_ss and "rb262144" in db_ss, ss  # SO_SNDBUF/RCVBUF (doubled)
    finally:
        web.close()
        db.close()


def test_egress_is_counted_by_mark_in_the_host_table(world):
    world.serve("halfclose", 86)
    before = hosttable.counts(world.host)["web"].bytes
    conn = connect(world, "web", 86)
    conn.sendall(b"z" * 1_000_000)
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(10)
    assert len(conn.recv(100)) == 64
    conn.close()
    assert hosttable.counts(world.host)["web"].bytes - before >= 1_000_000


def test_a_dead_proxy_stack_is_restarted(world):
    world.serve("echo", 87)
    pid = world.proxystack_pid()
    conn = connect(world, "web", 87)
    os.kill(pid, signal.SIGKILL)
    conn.settimeout(10)
    with pytest.raises((ConnectionResetError, BrokenPipeError)):  # its circuits die with it
        for _ in range(100):
            conn.sendall(b"a" * 65536)
            conn.recv(65536)
    deadline = time.monotonic() + 20
    while str(pid) in world.status()["proxystack"] or \
            not world.status()["proxystack"].startswith("connected"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    again = connect(world, "web", 87)
    again.sendall(b"back")
    again.settimeout(10)
    assert again.recv(10) == b"back"
    again.close()


@both_placements
def test_udp_echo_through_egress_and_its_idle_timeout(world):
    world.serve("udp-echo", 53)
    conn = circuits.connect((OUTSIDE_IP, 53), kind="dgram", control=world.control("web"))
    conn.settimeout(10)
    me = None
    for i in range(20):
        conn.sendto(b"query %d" % i, (OUTSIDE_IP, 53))
        data, peer = conn.recvfrom(65536)
        assert peer == (OUTSIDE_IP, 53)
        text, me = data.decode().split("|")
        assert text == f"query {i}"
    assert me.startswith(HOST_IP + ":")  # it left from the host's address, one socket for all
    big = bytes(range(256)) * 200  # 51200 bytes in one datagram
    conn.send(big)
    assert conn.recv(65536).startswith(big + b"|")
    time.sleep(1.5)  # udp_idle_timeout is 1 s: the flow is closed
    assert conn.recv(100) == b""
    with pytest.raises(PermissionError):  # db has no udp rule
        circuits.connect((OUTSIDE_IP, 53), kind="dgram", control=world.control("db"))


@both_placements
def test_published_udp_port_gives_each_outside_peer_a_circuit(world):
    with circuits.listen(("0.0.0.0", 53), kind="dgram", control=world.control("web")) as lst:
        client = world.in_outside([sys.executable, "-c", f"""
import socket
for n in range(2):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(10)
    s.bind(("{OUTSIDE_IP}", 0))
    print(s.getsockname()[1], flush=True)
    for i in range(3):
        s.sendto(b"ping %d" % i, ("{HOST_IP}", {PUBLISHED}))
        print(s.recvfrom(100)[0].decode(), flush=True)
"""])
        for _ in range(2):
            port = int(client.stdout.readline())
            conn, peer = lst.accept()
            assert peer == (OUTSIDE_IP, port)
            conn.settimeout(10)
            for i in range(3):
                assert conn.recv(100) == b"ping %d" % i
                conn.sendto(b"pong %d" % i, peer)
                assert client.stdout.readline().strip() == f"pong {i}"
            conn.close()
        assert client.wait(10) == 0


def test_back_pressure_both_ways_through_the_full_ring(world):
    """Nothing is buffered in the proxy stack: a reader that stops stops the writer."""
    holder = world.serve("hold", 88)
    conn = connect(world, "web", 88, ring_size=256 << 10)
    conn.setblocking(False)
    sent, deadline = 0, time.monotonic() + 1.5
    while time.monotonic() < deadline:  # the outside reads nothing for 2 s
        try:
            sent += conn.send(BLOCK)
        except BlockingIOError:
            time.sleep(0.01)
    # the ring (256 KiB) and the two kernels' socket buffers: far less than 1.5 s of 3 GB/s
    assert 0 < sent < 32 << 20, sent
    conn.setblocking(True)
    conn.shutdown(socket.SHUT_WR)
    assert holder.stdout.readline().strip() == f"read {sent}"
    conn.close()

    flooder = world.serve("flood", 89)
    conn = connect(world, "web", 89, ring_size=256 << 10)
    time.sleep(1.5)  # we read nothing: the outside sender must be stuck
    os.set_blocking(flooder.stdout.fileno(), False)
    assert flooder.stdout.readline() == ""
    os.set_blocking(flooder.stdout.fileno(), True)
    conn.settimeout(20)
    assert read_to_eof(conn) == 64 << 20
    assert flooder.stdout.readline().strip() == "sent"


def test_without_a_proxy_stack_egress_is_unreachable(world_no_restart):
    world = world_no_restart
    os.kill(world.proxystack_pid(), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while world.status()["proxystack"] != "not connected, not running":
        assert time.monotonic() < deadline, world.status()
        time.sleep(0.05)
    with pytest.raises(OSError) as e:
        connect(world, "web", 80)
    assert e.value.errno == errno.ENETUNREACH


@both_placements
def test_ipv6_egress(world):
    world.serve("halfclose", 90)
    conn = circuits.connect((OUTSIDE_IP6, 90), control=world.control("web"))
    assert conn.getpeername() == (OUTSIDE_IP6, 90)
    ss = world.in_host("ss", "-Htn", "state", "established", "dst", f"[{OUTSIDE_IP6}]")
    assert f"[{HOST_IP6}]:" in ss, ss  # the host's socket, from the host's IPv6 address
    conn.settimeout(10)
    conn.sendall(b"v6" * 1000)
    conn.shutdown(socket.SHUT_WR)
    assert conn.recv(100).decode() == hashlib.sha256(b"v6" * 1000).hexdigest()
    conn.close()
