"""Stream integrity across two processes: random chunks, ring sizes, wrap-around."""
from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from circuits.ring import pair
from conftest import peer_group, spawn_peer

# Eight fixed cases of 128 MiB: 1 GiB in all, every ring size wrapping many times.
FIXED = [(4096, 1), (8192, 2), (65536, 3), (1 << 18, 4), (1 << 20, 5), (4 << 20, 6),
         (1 << 20, 7), (16384, 8)]
CASE_BYTES = 128 << 20


def read_all_randomly(ep, seed: int) -> tuple[str, int]:
    """Read to end of data with random sizes, by copy and in place; hash it."""
    rng = random.Random(seed)
    h, total = hashlib.sha256(), 0
    buf = bytearray(1 << 20)
    while True:
        if rng.random() < 0.3:
            view = ep.read_view()
            if view is None:
                break
            n = rng.randint(0, len(view))
            h.update(view[:n])
            ep.consume(n)
        else:
            n = ep.recv_into(buf, rng.randint(1, len(buf)))
            if n == 0:
                break
            h.update(memoryview(buf)[:n])
        total += n
    return h.hexdigest(), total


def transfer(ring_size: int, seed: int, total: int, peers) -> None:
    reader, writer = pair("stream", ring_size)
    peer = spawn_peer("write_stream", writer, seed=seed, total=total)
    peers.append(peer)
    digest, got = read_all_randomly(reader, seed)
    sent = peer.expect("sha256").split()[1]
    peer.finish()
    assert got == total
    assert digest == sent


@pytest.mark.parametrize("ring_size,seed", FIXED)
def test_stream_integrity_gib(ring_size, seed, peers):
    transfer(ring_size, seed, CASE_BYTES, peers)


@settings(max_examples=10, deadline=None)
@given(ring_size=st.sampled_from([4096, 8192, 32768, 1 << 20]),
       seed=st.integers(0, 2**32 - 1), total=st.integers(0, 8 << 20))
def test_stream_integrity_random(ring_size, seed, total):
    with peer_group() as started:
        transfer(ring_size, seed, total, started)
