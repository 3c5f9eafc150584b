"""The circuit data plane: shared-memory rings behind a socket-shaped endpoint.

``pair()`` makes two connected endpoints (for tests, benchmarks, and one
process handing an end to another); the operator makes circuits the same
way with ``create()`` and hands each side its descriptors.
"""
from __future__ import annotations

import os
import socket

from circuits.ring._ring import lib
from circuits.ring.endpoint import Circuit, CircuitSpec, Kind, ViewError

__all__ = ["Circuit", "CircuitSpec", "Kind", "ViewError", "create", "pair",
           "MIN_RING", "MAX_RING"]

MIN_RING: int = lib.CIRCUIT_MIN_RING
MAX_RING: int = lib.CIRCUIT_MAX_RING
DEFAULT_RING = 1 << 20


def create(spec: CircuitSpec) -> int:
    """Create the sealed memory object of a circuit; returns its memfd."""
    fd = lib.circuit_create(spec.params())
    if fd < 0:
        err = -fd
        raise OSError(err, f"cannot create circuit {spec}: {os.strerror(err)}")
    return fd


def _doorbell() -> tuple[int, int]:
    """A doorbell: (the end its side sleeps on, the end that rings it)."""
    sleep_end, ring_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return sleep_end.detach(), ring_end.detach()


def endpoint_fds(spec: CircuitSpec) -> tuple[list[int], list[int]]:
    """Everything two sides need: [memfd, bell, self_bell, peer_bell] for
    side 0 and for side 1.  Every descriptor is new and close-on-exec."""
    memfd = create(spec)
    bell0, ring0 = _doorbell()
    bell1, ring1 = _doorbell()
    side0 = [memfd, bell0, ring0, os.dup(ring1)]
    side1 = [os.dup(memfd), bell1, ring1, os.dup(ring0)]
    return side0, side1


def pair(kind: Kind = "stream", size: int = DEFAULT_RING,
         sizes: tuple[int, int] | None = None) -> tuple[Circuit, Circuit]:
    """Two connected endpoints: side 0 and side 1 of one new circuit.

    ``size`` is each direction's ring (a power of two from MIN_RING to
    MAX_RING); ``sizes`` sets the two directions apart.
    """
    spec = CircuitSpec(kind, 0, sizes or (size, size))
    fds0, fds1 = endpoint_fds(spec)
    return Circuit(*fds0, spec), Circuit(*fds1, spec.peer())
