"""A publish table in PUBLISH messages (docs/protocol.md, section 4.7).

A table may be longer than one message holds: the sender splits it into
parts (`parts`), sent in order on one control connection, and the receiver
joins them (`Joiner`), applying the table only once its last part is in.
"""
from __future__ import annotations

from typing import Iterable

from circuits.protocol.messages import (
    HEADER, MAX_MESSAGE, MAX_PUBLISH, PUBLISH_ENTRY, TCP, UDP, Endpoint, ProtocolError, Publish,
    PublishEntry)

PART = (MAX_MESSAGE - HEADER.size - Publish.BODY.size) // PUBLISH_ENTRY.size  # entries per part


def entries_of(publish: Iterable) -> tuple[PublishEntry, ...]:
    """The table of a configuration's [[publish]] entries (each with address,
    port, proto "tcp"/"udp", guest and guest_port), in the file's order."""
    return tuple(PublishEntry(Endpoint(e.address, e.port, TCP if e.proto == "tcp" else UDP),
                              e.guest_port, e.guest) for e in publish)


def parts(entries: Iterable[PublishEntry], udp_idle_timeout_ms: int,
          orphan_grace_ms: int) -> list[Publish]:
    """The PUBLISH messages of one table, in the order they must be sent; an
    empty table is one part with no entries."""
    entries = tuple(entries)
    if len(entries) > MAX_PUBLISH:
        raise ValueError(f"{len(entries)} published ports: at most {MAX_PUBLISH}")
    return [Publish(first, len(entries), udp_idle_timeout_ms, orphan_grace_ms,
                    entries[first:first + PART])
            for first in range(0, len(entries), PART) or [0]]


class Joiner:
    """Parts of tables in, whole tables out (one control connection's)."""

    def __init__(self) -> None:
        self._head: Publish | None = None  # the first part of the table being joined
        self._entries: list[PublishEntry] = []

    def add(self, msg: Publish) -> Publish | None:
        """The whole table, as one Publish answering msg's request, once msg is
        its last part; None before.  ProtocolError for a part that does not
        follow the one before (that table is dropped; its next first part
        starts again)."""
        if msg.first == 0:
            self._head, self._entries = msg, []
        elif self._head is None or msg.first != len(self._entries) or \
                _settings(msg) != _settings(self._head):
            self._head = None
            raise ProtocolError(f"publish: entries from {msg.first} of {msg.total} follow no"
                                " part of that table", request=msg.request)
        self._entries.extend(msg.entries)
        if not msg.last:
            return None
        head, self._head = self._head, None
        return Publish(0, head.total, head.udp_idle_timeout_ms, head.orphan_grace_ms,
                       tuple(self._entries), request=msg.request)


def _settings(msg: Publish) -> tuple[int, int, int]:
    return msg.total, msg.udp_idle_timeout_ms, msg.orphan_grace_ms
