"""The circuit data plane: shared-memory rings behind a socket-shaped endpoint.

``pair()`` makes two connected endpoints (for tests, benchmarks, and one
process handing an end to another); the operator makes circuits with
``make()`` and hands each side its descriptors (``endpoint_fds()`` gives
each side descriptors of its own, for owners that close them).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from circuits.ring._ring import ffi, lib
from circuits.ring.endpoint import Circuit, CircuitSpec, Kind, ViewError

__all__ = ["Circuit", "CircuitSpec", "Kind", "Made", "ViewError", "create", "endpoint_fds", "make",
           "pair", "MIN_RING", "MAX_RING", "DATA_OFFSET"]

MIN_RING: int = lib.CIRCUIT_MIN_RING
MAX_RING: int = lib.CIRCUIT_MAX_RING
DATA_OFFSET: int = lib.CIRCUIT_DATA_OFFSET  # header and control pages, then the data areas
DEFAULT_RING = 1 << 20


def create(spec: CircuitSpec) -> int:
    """Create the sealed memory object of a circuit; returns its memfd."""
    fd = lib.circuit_create(spec.params())
    if fd < 0:
        err = -fd
        raise OSError(err, f"cannot create circuit {spec}: {os.strerror(err)}")
    return fd


def endpoint_fds(spec: CircuitSpec) -> tuple[list[int], list[int]]:
    """Everything two sides need: [memfd, bell, self_bell, peer_bell] for
    side 0 and for side 1.  Every descriptor is new and close-on-exec."""
    side0, side1 = ffi.new("int[4]"), ffi.new("int[4]")
    rc = lib.circuit_create_endpoints(spec.params(), side0, side1)
    if rc < 0:
        raise OSError(-rc, f"cannot create circuit {spec}: {os.strerror(-rc)}")
    return list(side0), list(side1)


@dataclass(frozen=True)
class Made:
    """A new circuit's five descriptors, as a creator that sends them holds
    them (circuit_make in csrc/endpoints.c).  Side s is handed ``side(s)``;
    close ``bells[s]`` once it has it (no one but side s may hold its bell),
    and keep ``memfd`` and ``rings`` (``rings[s]`` hangs up when side s is
    gone) or close them."""

    memfd: int
    bells: tuple[int, int]
    rings: tuple[int, int]

    def side(self, s: int) -> list[int]:
        """[memfd, bell, self_bell, peer_bell] for side s (docs/circuit-format.md 2)."""
        return [self.memfd, self.bells[s], self.rings[s], self.rings[1 - s]]


def make(spec: CircuitSpec) -> Made:
    """A new circuit's descriptors, none duplicated: see Made."""
    m = ffi.new("struct circuit_made *")
    rc = lib.circuit_make(spec.params(), m)
    if rc < 0:
        raise OSError(-rc, f"cannot create circuit {spec}: {os.strerror(-rc)}")
    return Made(m.memfd, (m.bell[0], m.bell[1]), (m.ring[0], m.ring[1]))


def pair(kind: Kind = "stream", size: int = DEFAULT_RING,
         sizes: tuple[int, int] | None = None) -> tuple[Circuit, Circuit]:
    """Two connected endpoints: side 0 and side 1 of one new circuit.

    ``size`` is each direction's ring (a power of two from MIN_RING to
    MAX_RING); ``sizes`` sets the two directions apart.
    """
    spec = CircuitSpec(kind, 0, sizes or (size, size))
    fds0, fds1 = endpoint_fds(spec)
    return Circuit(*fds0, spec), Circuit(*fds1, spec.peer())
