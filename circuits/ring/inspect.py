"""Reading a circuit's shared state from outside its two sides (for the
operator's accounting): side states and indices, read-only, never trusted
for anything but display."""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

STATES = ("open", "write-shut", "closed", "aborted")
_CTRL = 4096
_DIR = 384
_PROD = struct.Struct("<Q")


@dataclass(frozen=True)
class Snapshot:
    states: tuple[str, str]  # side 0, side 1
    sent: tuple[int, int]  # bytes published by side 0, by side 1 (their prod indices)


def sent_counts(memfd: int) -> tuple[int, int]:
    """Bytes published by side 0 and by side 1 (their producer indices), read
    without mapping: what an ended circuit carried, for the running totals."""
    lines = os.pread(memfd, _DIR + 8, _CTRL)  # both directions' producer lines, in one read
    return _PROD.unpack_from(lines, 0)[0], _PROD.unpack_from(lines, _DIR)[0]


class Inspector:
    """A read-only map of a circuit's header and control pages."""

    def __init__(self, memfd: int):
        self._map = mmap.mmap(memfd, 2 * 4096, mmap.MAP_SHARED, mmap.PROT_READ)

    def snapshot(self) -> Snapshot:
        m = self._map
        states = tuple(STATES[s] if s < 4 else f"invalid({s})"
                       for s in (struct.unpack_from("<I", m, 128)[0],
                                 struct.unpack_from("<I", m, 256)[0]))
        sent = tuple(struct.unpack_from("<Q", m, _CTRL + d * _DIR)[0] for d in (0, 1))
        return Snapshot(states, sent)  # type: ignore[arg-type]

    def abort_both(self, memfd: int) -> None:
        """Mark both sides ABORTED (a revocation): each then reads its peer as reset."""
        with mmap.mmap(memfd, 4096, mmap.MAP_SHARED) as w:
            struct.pack_into("<I", w, 128, 3)
            struct.pack_into("<I", w, 256, 3)

    def close(self) -> None:
        self._map.close()
