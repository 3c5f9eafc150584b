"""Per-guest egress accounting and rate limits in the host table, measured
with real sockets carrying a guest's SO_MARK.  The table goes into a scratch
namespace standing in for the host; all traffic is on its loopback."""
from __future__ import annotations

import re
import socket
import struct
import threading
import time

from circuits.guestnet import hosttable
from circuits.guestnet.within import within
from guestnet_fixtures import netop, requires_netns, scratch_ns  # noqa: F401

pytestmark = requires_netns

MARK_1, MARK_2 = 0x4352F001, 0x4352F002
UDP_OVERHEAD = 20 + 8  # what the counters see besides the payload: IPv4 and UDP headers


def udp_pair(mark: int | None):
    """A receiver and a sender made in the calling thread's namespace."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if mark is not None:
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    return rx, tx


def send_udp(netns: str, mark: int | None, count: int, size: int) -> int:
    """Send count datagrams of size bytes with this mark; returns how many arrived."""
    rx, tx = within(netns, udp_pair, mark)
    with rx, tx:
        rx.settimeout(2)
        for i in range(count):
            tx.sendto(bytes([i % 256]) * size, rx.getsockname())
        return sum(len(rx.recv(65536)) == size for _ in range(count))


def test_the_egress_counter_matches_the_marked_bytes_sent(scratch_ns):
    lines = [hosttable.Egress("one", MARK_1), hosttable.Egress("two", MARK_2)]
    hosttable.install(scratch_ns, lines, "circuits test")
    assert send_udp(scratch_ns, MARK_1, 200, 1000) == 200
    assert send_udp(scratch_ns, MARK_2, 7, 333) == 7
    assert send_udp(scratch_ns, None, 50, 1000) == 50  # unmarked: nobody's
    assert send_udp(scratch_ns, 0x4352F0FF, 50, 1000) == 50  # a mark of no guest
    counts = hosttable.counts(scratch_ns)
    assert counts["one"] == hosttable.Count(200, 200 * (1000 + UDP_OVERHEAD), 0, 0)
    assert counts["two"] == hosttable.Count(7, 7 * (333 + UDP_OVERHEAD), 0, 0)


def tcp_for(netns: str, mark: int, seconds: float) -> tuple[int, float, int]:
    """A marked TCP flow on loopback, sending as fast as it may for `seconds`,
    then reset (what is still queued is dropped, not sent at the limited rate);
    returns the bytes that arrived in time, the time, and all bytes that arrived."""
    def pair():
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        cli = socket.socket()
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        return srv, cli

    srv, cli = within(netns, pair)
    with srv, cli:
        cli.connect(srv.getsockname())
        conn, _ = srv.accept()
        received = [0]

        def read():
            with conn:
                try:
                    while data := conn.recv(1 << 16):
                        received[0] += len(data)
                except ConnectionResetError:
                    pass

        reader = threading.Thread(target=read)
        reader.start()
        cli.settimeout(0.1)
        block = b"\0" * 65536
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            try:
                cli.send(block)
            except TimeoutError:
                pass
        elapsed = time.monotonic() - t0
        arrived_in_time = received[0]
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        cli.close()
        reader.join(10)
    return arrived_in_time, elapsed, received[0]


def test_the_egress_rate_limit_bounds_a_marked_tcp_flow(scratch_ns):
    rate = 1 << 20  # 1 MiB/s
    lines = [hosttable.Egress("slow", MARK_1, rate)]
    hosttable.install(scratch_ns, lines, "circuits test")
    arrived, elapsed, total = tcp_for(scratch_ns, MARK_1, 3)
    # The kernel's token bucket holds one second at the rate: at most rate x (t + 1),
    # with room for timing on a busy machine (an unlimited flow moves gigabytes in
    # that time, so the bound still shows the limit); and the flow did move.
    assert arrived <= rate * (elapsed + 1) * 1.5, (arrived, elapsed)
    assert arrived >= rate * elapsed * 0.2, (arrived, elapsed)
    count = hosttable.counts(scratch_ns)["slow"]
    assert count.limited_packets > 0  # what went over was dropped, and counted
    assert total <= count.bytes <= total + count.packets * 100  # payload, headers, handshake


def metric(text: str, name: str, guest: str) -> float:
    m = re.search(rf'^circuits_{name}\{{guest="{guest}"\}} (\S+)$', text, re.M)
    assert m, f"no {name} for {guest} in the metrics"
    return float(m.group(1))


def test_the_operator_counts_a_guests_marked_egress_in_its_metrics(netop):
    from circuits.operator.config import load

    config = load(netop.config)
    mark_a, mark_c = config.guests[netop.a].mark, config.guests[netop.c].mark
    assert send_udp(netop.host_ns, mark_a, 10, 500) == 10  # under a's 1 MiB/s
    assert send_udp(netop.host_ns, mark_c, 3, 100) == 3  # c has no namespace, but a mark
    metrics = netop.ctl("metrics").stdout
    assert metric(metrics, "guest_egress_bytes", netop.a) == 10 * (500 + UDP_OVERHEAD)
    assert metric(metrics, "guest_egress_packets", netop.a) == 10
    assert metric(metrics, "guest_egress_limited_bytes", netop.a) == 0
    assert metric(metrics, "guest_egress_bytes", netop.c) == 3 * (100 + UDP_OVERHEAD)
    assert metric(metrics, "guest_egress_bytes", netop.b) == 0
