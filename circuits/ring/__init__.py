"""The circuit data plane: shared-memory rings behind a socket-shaped endpoint.

``pair()`` makes two connected endpoints (for tests, benchmarks, and one
process handing an end to another); the operator makes circuits with
``endpoint_fds()`` and hands each side its descriptors.
"""
from __future__ import annotations

import os

from circuits.ring._ring import ffi, lib
from circuits.ring.endpoint import Circuit, CircuitSpec, Kind, ViewError

__all__ = ["Circuit", "CircuitSpec", "Kind", "ViewError", "create", "endpoint_fds", "pair", "ring_end_alive",
           "MIN_RING", "MAX_RING", "DATA_OFFSET"]

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


def ring_end_alive(fd: int) -> bool:
    """For a creator holding a duplicate of a side's self_bell: False once
    that side is gone.  Never blocks; drains what the side rang itself with."""
    return bool(lib.circuit_ring_end_alive(fd))


def pair(kind: Kind = "stream", size: int = DEFAULT_RING,
         sizes: tuple[int, int] | None = None) -> tuple[Circuit, Circuit]:
    """Two connected endpoints: side 0 and side 1 of one new circuit.

    ``size`` is each direction's ring (a power of two from MIN_RING to
    MAX_RING); ``sizes`` sets the two directions apart.
    """
    spec = CircuitSpec(kind, 0, sizes or (size, size))
    fds0, fds1 = endpoint_fds(spec)
    return Circuit(*fds0, spec), Circuit(*fds1, spec.peer())
