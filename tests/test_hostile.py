"""A hostile peer scribbles over shared memory; the victims must never crash or hang.

Three real processes per round: a scribbler that maps the circuit memory and
writes random values over the header, control lines and data records, and two
victims (one per side) that send and receive through it.  Each victim checks
every result (counts within bounds, views within the ring) and must end by a
reset or by its time limit, with exit code 0: no signal, no exception.
"""
from __future__ import annotations

import os

import pytest

from circuits.ring import pair
from conftest import spawn, spawn_peer


@pytest.mark.parametrize("kind", ["stream", "dgram"])
@pytest.mark.parametrize("round_", range(6))
def test_scribbled_memory_gives_data_or_reset(kind, round_, peers):
    size = [4096, 65536][round_ % 2]
    a, b = pair(kind, size)
    memfd = os.dup(a.memfd)
    victims = [spawn_peer("victim", ep, seed=round_ * 2 + i, seconds=2.0) for i, ep in enumerate((a, b))]
    peers.extend(victims)
    for v in victims:
        v.expect("attached")
    peers.append(scribbler := spawn("scribble", [memfd], memfd=memfd, seed=round_, seconds=1.5))
    os.close(memfd)
    for v in victims:
        line = v.line()
        assert line.startswith("ended"), line
        v.finish(timeout=30)
    scribbler.expect("scribbled")
    scribbler.finish(timeout=30)


def test_scribbling_does_break_the_circuit(peers):
    """The attack is real: at least some rounds end in a reset, not by time."""
    ends = []
    for seed in range(4):
        a, b = pair("dgram", 4096)
        memfd = os.dup(a.memfd)
        v = spawn_peer("victim", a, seed=seed, seconds=1.5)
        peers.append(v)
        v.expect("attached")
        peers.append(s := spawn("scribble", [memfd], memfd=memfd, seed=100 + seed, seconds=1.0))
        os.close(memfd)
        ends.append(v.line())
        v.finish(timeout=30)
        s.finish(timeout=30)
        b.close()
    assert any("ConnectionResetError" in e for e in ends), ends
