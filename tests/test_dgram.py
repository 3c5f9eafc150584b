"""Datagram circuits: boundaries, sizes 0 to the maximum, truncation, EMSGSIZE."""
from __future__ import annotations

import random
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from circuits.ring import pair
from conftest import peer_group, spawn_peer


def expected(seed: int, i: int, size: int) -> bytes:
    return random.Random(seed * 1_000_003 + i).randbytes(size)


def check_dgrams(ring_size: int, seed: int, sizes: list[int], peers) -> None:
    reader, writer = pair("dgram", ring_size)
    peers.append(peer := spawn_peer("send_dgrams", writer, seed=seed, lengths=sizes))
    buf = bytearray(ring_size)
    for i, size in enumerate(sizes):
        if i % 3 == 2:  # every third one read in place
            view = reader.read_view()
            assert bytes(view) == expected(seed, i, size)
            reader.consume()
        else:
            n = reader.recv_into(buf)
            assert n == size
            assert buf[:n] == expected(seed, i, size)
    assert reader.recv(10) == b""  # the peer closed: end of data
    peer.expect("sent")
    peer.finish()


@pytest.mark.parametrize("ring_size", [4096, 65536, 1 << 20])
def test_dgram_integrity_with_zero_and_max(ring_size, peers):
    rng = random.Random(ring_size)
    biggest = ring_size - 8
    sizes = [0, biggest, 1, 7, 8, 9, biggest, 0] + [rng.randrange(0, biggest + 1) for _ in range(300)]
    check_dgrams(ring_size, ring_size, sizes, peers)


@settings(max_examples=15, deadline=None)
@given(ring_size=st.sampled_from([4096, 8192, 65536]), seed=st.integers(0, 2**31),
       sizes=st.lists(st.integers(0, 4088), max_size=200))
def test_dgram_integrity_random(ring_size, seed, sizes):
    with peer_group() as started:
        check_dgrams(ring_size, seed, sizes, started)


def test_truncation_reported_as_udp_does():
    a, b = pair("dgram", 4096)
    a.send(b"0123456789")
    data, _, flags, _ = b.recvmsg(4)
    assert data == b"0123" and flags & socket.MSG_TRUNC
    a.send(b"0123456789")
    assert b.recv(4) == b"0123"  # the rest of the datagram is gone
    a.send(b"abc")
    buf = bytearray(2)
    assert b.recv_into(buf, 2, socket.MSG_TRUNC) == 3  # the real length, as Linux
    a.send(b"next")
    assert b.recv(100) == b"next"


def test_too_large_raises_emsgsize():
    a, b = pair("dgram", 4096)
    assert a.max_datagram == 4088
    with pytest.raises(OSError) as e:
        a.send(b"x" * 4089)
    assert e.value.errno == 90  # EMSGSIZE
    a.send(b"x" * 4088)
    assert len(b.recv(5000)) == 4088


def test_asymmetric_rings_limit_each_direction():
    a, b = pair("dgram", sizes=(4096, 65536))
    assert a.max_datagram == 4088 and b.max_datagram == 65528
    b.send(b"y" * 65528)
    assert len(a.recv(65536)) == 65528
