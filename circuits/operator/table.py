"""The operator's table of live circuits, for accounting and revocation.

For each circuit the operator keeps the memory object (mapped read-only, to
read states and byte counts) and a duplicate of each side's ringing end,
whose hang-up tells when that side is gone.  It keeps neither side's bell:
holding one would hide that side's death from its peer.

Ended circuits are found in batches, not one by one: every ringing end sits
in one epoll set asking for nothing but its hang-up, and `Table.sweep`
collects the hung-up ends when the operator looks (a moment after the set
becomes readable, and before any answer that counts circuits).  Watching
each end on the event loop instead cost two registrations, two wake-ups and
two callbacks per circuit, a large part of a setup's cost.
"""
from __future__ import annotations

import os
import select
import socket
import time
from dataclasses import dataclass, field

from circuits import protocol as p
from circuits.ring.inspect import Inspector, sent_counts


@dataclass
class Record:
    circuit_id: int
    guests: tuple[str, str]  # side 0 (connector), side 1 (listener)
    endpoints: tuple[p.Endpoint, p.Endpoint]
    memfd: int
    rings: list[int]  # side 0's and side 1's ringing ends; -1 once that side is gone
    memory: int = 0  # bytes of circuit memory, counted against both guests' limits
    created: float = field(default_factory=time.time)
    _inspector: Inspector | None = None

    @property
    def inspector(self) -> Inspector:
        """Mapped at the first look, not at setup: most circuits are never looked at."""
        if self._inspector is None:
            self._inspector = Inspector(self.memfd)
        return self._inspector

    def side_gone(self, side: int) -> bool:
        """Forget side `side`; True when both sides are gone."""
        if self.rings[side] >= 0:
            os.close(self.rings[side])
            self.rings[side] = -1
        return all(r < 0 for r in self.rings)

    def revoke(self) -> None:
        """Abort the circuit for both sides and wake them."""
        self.inspector.abort_both(self.memfd)
        for fd in self.rings:
            if fd >= 0:
                # MSG_DONTWAIT: the guest shares this description and may have
                # made it blocking; a full doorbell is rung already.
                try:
                    with socket.socket(fileno=os.dup(fd)) as s:
                        s.send(b"\x01", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                except OSError:
                    pass

    def sent(self) -> tuple[int, int]:
        """Bytes sent by side 0 and by side 1 so far, as the ring indices say
        (the guests write them: good for accounting, not for trust)."""
        try:
            return sent_counts(self.memfd)
        except (OSError, ValueError):
            return (0, 0)

    def close(self) -> None:
        for side in (0, 1):
            self.side_gone(side)
        if self._inspector is not None:
            self._inspector.close()
        os.close(self.memfd)

    def describe(self) -> dict:
        snap = self.inspector.snapshot()
        return {"id": self.circuit_id,
                "from": f"{self.guests[0]} {self.endpoints[0]}",
                "to": f"{self.guests[1]} {self.endpoints[1]}",
                "age_s": round(time.time() - self.created, 3),
                "bytes_from_to": snap.sent[0], "bytes_to_from": snap.sent[1],
                "states": list(snap.states)}


class Table:
    """The live circuits by id, and the epoll set of their ringing ends."""

    def __init__(self) -> None:
        self.records: dict[int, Record] = {}
        self._ends = select.epoll()
        self._sides: dict[int, tuple[Record, int]] = {}  # ringing end -> its record, side

    def fileno(self) -> int:
        """Readable when some side has hung up since the last sweep."""
        return self._ends.fileno()

    def add(self, record: Record) -> None:
        self.records[record.circuit_id] = record
        for side, fd in enumerate(record.rings):
            # No events asked for: a hang-up (EPOLLHUP) is always reported, and
            # bytes a guest writes into its own bell are never taken for one.
            self._ends.register(fd, 0)
            self._sides[fd] = (record, side)

    def sweep(self, most: int = 0) -> tuple[list[Record], bool]:
        """Forget the sides that hung up (at most `most`, 0: all); the circuits
        both of whose sides are gone leave the table and are returned, still
        open (close them), with whether hung-up sides may remain."""
        ended = []
        batch = most or 1024
        while True:
            events = self._ends.poll(0, batch)
            for fd, _ in events:
                record, side = self._sides.pop(fd)
                # Unregister before closing: the guest still holds the description.
                self._ends.unregister(fd)
                if record.side_gone(side):
                    del self.records[record.circuit_id]
                    ended.append(record)
            if len(events) < batch or most:
                return ended, len(events) == batch

    def close(self) -> None:
        """Let go of every circuit (they go on without us) and of the set."""
        for record in self.records.values():
            record.close()
        self.records.clear()
        self._sides.clear()
        self._ends.close()
