"""fileno() with select, poll and selectors: woken by data, never left asleep."""
from __future__ import annotations

import select
import selectors
import threading
import time

from circuits.ring import pair
from conftest import spawn_peer


def test_select_wakes_on_data():
    a, b = pair()
    assert select.select([b], [], [], 0) == ([], [], [])
    threading.Timer(0.1, a.sendall, [b"x"]).start()
    readable, _, _ = select.select([b], [], [], 5)
    assert readable == [b]
    assert b.recv(10) == b"x"


def test_poll_wakes_on_data_and_on_close():
    a, b = pair()
    p = select.poll()
    p.register(b.fileno(), select.POLLIN)
    assert p.poll(0) == []
    threading.Timer(0.1, a.sendall, [b"y"]).start()
    assert p.poll(5000)
    assert b.recv(10) == b"y"
    b.setblocking(False)
    try:
        b.recv(10)
    except BlockingIOError:
        pass
    threading.Timer(0.1, a.close).start()
    assert p.poll(5000)
    assert b.recv(10) == b""


def test_selectors_with_partial_reads_never_stall(peers):
    """Non-blocking, one small read per wake-up (as asyncio does): no data is stranded."""
    a, b = pair("stream", 4096)
    peers.append(peer := spawn_peer("trickle", b, seed=3, count=2000))
    a.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(a, selectors.EVENT_READ)
    got = 0
    while True:
        assert sel.select(timeout=5), f"stalled after {got} bytes with data pending"
        try:
            data = a.recv(100)
        except BlockingIOError:
            continue
        if not data:
            break
        got += len(data)
    assert got == int(peer.expect("sent").split()[1])
    peer.finish()


def test_doorbell_wakes_a_blocked_nonblocking_sender(peers):
    """A send refused for lack of room makes fileno() readable once room comes."""
    a, b = pair("stream", 4096)
    a.setblocking(False)
    sent = 0
    try:
        while True:
            sent += a.send(b"z" * 1000)
    except BlockingIOError:
        pass
    assert sent == 4096
    peers.append(peer := spawn_peer("drain_slowly", b, pause=0.2))
    t0 = time.monotonic()
    readable, _, _ = select.select([a], [], [], 5)
    assert readable == [a] and time.monotonic() - t0 >= 0.1
    assert a.send(b"more") == 4
    a.close()
    assert peer.expect("read") == "read 4100"
    peer.finish()


def test_select_wakes_when_the_peer_dies_silently(peers):
    """A peer killed without a word: pollers of fileno() wake, recv resets."""
    a, b = pair()
    peers.append(peer := spawn_peer("block_in", b, op="recv"))
    peer.expect("ready")
    readable, _, _ = select.select([a], [], [], 0.2)
    assert readable == []
    peer.proc.kill()
    peer.proc.wait(10)
    readable, _, _ = select.select([a], [], [], 5)
    assert readable == [a]
    a.setblocking(False)
    try:
        a.recv(10)
    except ConnectionResetError:
        pass
    else:
        raise AssertionError("a dead peer must read as a reset")


def test_blocked_sender_never_stranded_by_unread_rings():
    """A blocking send of a big datagram, room coming 16 bytes at a time, with
    data for a poller waiting on the same endpoint: the sender finishes (its
    doorbell's queue fills with rings, which must not end its wake-ups), and
    close() returns."""
    a, b = pair("dgram", 65536)
    b.send(b"for a poller of a")  # a's bell must stay readable for this
    count = 0
    a.setblocking(False)
    try:
        while True:
            a.send(b"12345678")
            count += 1
    except BlockingIOError:
        pass
    a.setblocking(True)
    done = threading.Event()
    threading.Thread(target=lambda: (a.send(b"y" * 60000), done.set()), daemon=True).start()
    time.sleep(0.05)
    got = 0
    while got < count and not done.is_set():
        b.recv(64)
        got += 1
        time.sleep(0.0003)
    assert done.wait(5), "the blocked sender was stranded"
    closer = threading.Thread(target=a.close, daemon=True)
    closer.start()
    closer.join(5)
    assert not closer.is_alive()
