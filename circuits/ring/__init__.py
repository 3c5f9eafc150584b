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
    made: list[int] = []
    try:
        made.append(create(spec))
        made.extend(_doorbell())
        made.extend(_doorbell())
        memfd, bell0, ring0, bell1, ring1 = made
        made.append(os.dup(ring1))
        made.append(os.dup(memfd))
        made.append(os.dup(ring0))
    except OSError:  # out of descriptors half-way: give back what was made
        for fd in made:
            os.close(fd)
        raise
    side0 = [memfd, bell0, ring0, made[5]]
    side1 = [made[6], bell1, ring1, made[7]]
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
