"""Socket semantics of an endpoint: blocking, timeouts, ends, resets, dead peers."""
from __future__ import annotations

import gc
import os
import signal
import socket
import threading
import time

import pytest

from circuits.ring import Circuit, pair
from conftest import spawn_peer
from peer import pattern_block


def test_blocking_recv_waits_for_data():
    a, b = pair()
    threading.Timer(0.2, a.sendall, [b"late"]).start()
    t0 = time.monotonic()
    assert b.recv(10) == b"late"
    assert time.monotonic() - t0 >= 0.15


def test_nonblocking_raises_blocking_io_error():
    a, b = pair("stream", 4096)
    b.setblocking(False)
    assert not b.getblocking()
    with pytest.raises(BlockingIOError):
        b.recv(10)
    a.setblocking(False)
    assert a.send(b"x" * 10000) == 4096  # takes what fits
    with pytest.raises(BlockingIOError):
        a.send(b"y")


def test_timeouts_raise_timeout_error():
    a, b = pair("stream", 4096)
    b.settimeout(0.1)
    assert b.gettimeout() == 0.1
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        b.recv(10)
    assert 0.09 <= time.monotonic() - t0 < 2
    a.settimeout(0.1)
    with pytest.raises(TimeoutError):
        a.sendall(b"x" * 10000)  # the ring holds 4096, nobody reads


def test_shutdown_write_gives_eof_after_the_data():
    a, b = pair()
    a.sendall(b"last words")
    a.shutdown(socket.SHUT_WR)
    assert b.recv(100) == b"last words"
    assert b.recv(100) == b""
    assert b.recv(100) == b""
    b.sendall(b"reply")  # the other direction still works
    assert a.recv(100) == b"reply"
    with pytest.raises(BrokenPipeError):
        a.send(b"more")


def test_shutdown_read_is_local():
    a, b = pair()
    b.shutdown(socket.SHUT_RD)
    a.sendall(b"ignored")
    assert b.recv(10) == b""


def test_send_after_peer_close_is_broken_pipe():
    a, b = pair()
    a.sendall(b"unread")
    b.close()
    with pytest.raises(BrokenPipeError):
        a.send(b"x")


def test_abort_is_a_reset():
    a, b = pair()
    a.abort()
    with pytest.raises(ConnectionResetError):
        b.recv(10)
    with pytest.raises(ConnectionResetError):
        b.send(b"x")


def test_calls_after_close_raise_ebadf():
    a, b = pair()
    a.close()
    assert a.closed and a.fileno() == -1
    with pytest.raises(OSError) as e:
        a.send(b"x")
    assert e.value.errno == 9


def test_context_manager_closes():
    a, b = pair()
    with a:
        a.sendall(b"hi")
    assert a.closed
    assert b.recv(10) == b"hi" and b.recv(10) == b""


@pytest.mark.parametrize("op,outcome", [("recv", "eof"), ("send", "error BrokenPipeError")])
def test_close_wakes_a_peer_blocked_in_another_process(op, outcome, peers):
    a, b = pair("stream", 4096)
    peers.append(peer := spawn_peer("block_in", b, op=op))
    peer.expect("ready")
    time.sleep(0.3)  # the peer is asleep in recv, or in send on a full ring
    a.close()
    assert peer.line() == outcome
    peer.finish(timeout=10)


def test_close_wakes_our_own_blocked_thread():
    a, b = pair()
    result = []

    def blocked():
        try:
            a.recv(10)
        except OSError as e:
            result.append(e.errno)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.2)
    a.close()
    t.join(5)
    assert not t.is_alive() and result == [9]


def test_peer_killed_mid_transfer(peers):
    """The survivor reads every byte published before SIGKILL, then a reset."""
    reader, writer = pair("stream", 65536)
    peers.append(peer := spawn_peer("write_until_killed", writer, seed=7, chunk=1000))
    block = pattern_block(7)
    got = bytearray()
    while len(got) < 300_000:
        got += reader.recv(4096)
    os.kill(peer.proc.pid, signal.SIGKILL)
    peer.proc.wait(10)
    published = 0
    for line in peer.proc.stdout:
        if line.endswith("\n"):  # the kill may cut the last line short
            published = int(line.split()[1])
    reader.settimeout(10)  # never hang; a reset must come long before
    with pytest.raises(ConnectionResetError):
        while True:
            data = reader.recv(65536)
            assert data, "a killed peer must be a reset, not a clean end"
            got += data
    assert len(got) >= published
    expect = (block * (len(got) // len(block) + 1))[: len(got)]
    assert got == expect


def test_peer_gone_without_a_word_while_we_sleep():
    """Closing the peer's descriptors without touching memory: a reset."""
    a, b = pair()
    b.detach()  # as if its process vanished: fds closed, state untouched
    a.settimeout(5)
    t0 = time.monotonic()
    with pytest.raises(ConnectionResetError):
        a.recv(10)
    assert time.monotonic() - t0 < 1


def test_signal_runs_its_handler_and_the_call_goes_on():
    """PEP 475: a signal wakes the call, the handler runs, the call goes on."""
    a, b = pair()
    seen = []
    old = signal.signal(signal.SIGALRM, lambda *_: seen.append(1))
    try:
        threading.Timer(0.5, a.sendall, [b"after"]).start()
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        assert b.recv(10) == b"after"
        assert seen == [1]
    finally:
        signal.signal(signal.SIGALRM, old)


def test_signal_handler_that_raises_ends_the_call():
    a, b = pair()

    def stop(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, stop)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(KeyboardInterrupt):
            b.recv(10)
    finally:
        signal.signal(signal.SIGALRM, old)


def test_a_forked_child_that_forgets_its_copy_leaves_the_circuit_alone():
    a, b = pair()
    pid = os.fork()
    if pid == 0:  # the child drops its copies without close(), then exits
        del a, b
        gc.collect()
        os._exit(0)
    os.waitpid(pid, 0)
    a.sendall(b"still here")
    assert b.recv(20) == b"still here"


def test_endpoint_handed_over_with_send_fds(peers):
    """One process passes its end to another over a Unix socket."""
    a, b = pair()
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    socket.send_fds(left, [b"circuit"], b.fds())
    msg, fds, _, _ = socket.recv_fds(right, 64, 4)
    b.detach()
    moved = Circuit(*fds, a.spec.peer())
    a.sendall(b"across")
    assert msg == b"circuit" and moved.recv(10) == b"across"
    moved.sendall(b"back")
    assert a.recv(10) == b"back"


def test_shutdown_turns_away_our_own_blocked_sender():
    """No byte may follow the end of data: a sender asleep on a full ring
    gets BrokenPipeError, and the peer reads exactly what came before."""
    a, b = pair("stream", 4096)
    a.sendall(b"x" * 4096)
    result = []

    def blocked():
        try:
            a.sendall(b"y" * 100)
        except BrokenPipeError:
            result.append("epipe")

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.2)
    a.shutdown(socket.SHUT_WR)
    t.join(5)
    assert not t.is_alive() and result == ["epipe"]
    got = b""
    while data := b.recv(8192):
        got += data
    assert got == b"x" * 4096
