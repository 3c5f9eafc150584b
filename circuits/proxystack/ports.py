"""The proxy stack's published ports, and how a new publish table changes them.

The operator gives the whole table (PUBLISH, docs/protocol.md section 4.7) on
every link and every reload; applying it changes only what differs, as a
reload of nginx or haproxy adds and removes listeners:

- a port (host address, port, protocol) published already keeps its socket:
  no moment without a listener, nothing reset; a new guest or guest port, or
  a new UDP idle timeout, applies to its next connections;
- a port no longer in the table is retired: it takes no new connection, and
  what it handed over goes on (a UDP port's socket stays open for the flows it
  carries, until they end);
- a new port is bound; a bind that fails is reported (its index in the table
  and the errno) and never stops the others.

Retired ports close before new ones are bound, so a port can move between
addresses that overlap (`0.0.0.0` and `198.18.0.1`, same port); a retired UDP
port still draining flows there closes when the new one needs its port, and
its flows end (their peers' next datagrams reach the new one).
"""
from __future__ import annotations

import asyncio
import errno
import logging
from typing import Awaitable, Callable

from circuits import protocol as p
from circuits.proxystack.ingress import PublishedTcp, PublishedUdp, describe
from circuits.proxystack.sockets import HostSockets

log = logging.getLogger("circuits.proxystack")
Port = PublishedTcp | PublishedUdp


class Ports:
    """Published ports by host endpoint: those open, and retired UDP ports
    still carrying flows."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sockets: HostSockets,
                 hand_over: Callable[..., Awaitable[None]],
                 ask_circuit: Callable[..., Awaitable[object]]):
        self.loop, self.sockets = loop, sockets
        self.hand_over, self.ask_circuit = hand_over, ask_circuit
        self.open: dict[p.Endpoint, Port] = {}
        self.draining: dict[p.Endpoint, PublishedUdp] = {}
        self.applied = False  # whether any table was applied yet

    def apply(self, entries: tuple[p.PublishEntry, ...],
              idle: float) -> list[tuple[int, OSError]]:
        """Serve exactly `entries` from now on (UDP flows opened from now on
        get `idle`); the entries that could not be bound, by index."""
        self.applied = True
        wanted: dict[p.Endpoint, tuple[int, p.PublishEntry]] = {}
        failures = []
        for i, entry in enumerate(entries):
            if entry.host in wanted:  # an operator's bug: the first one is served
                log.error("cannot publish %s: %s is in the table already", describe(entry),
                          entry.host)
                failures.append((i, OSError(errno.EADDRINUSE, "published twice")))
            else:
                wanted[entry.host] = (i, entry)
        for host in [h for h in self.open if h not in wanted]:
            self._retire(host)
        for i, entry in wanted.values():
            try:
                self._publish(entry, idle)
            except OSError as e:
                log.error("cannot publish %s: %s", describe(entry), e)
                failures.append((i, e))
        return failures

    def _publish(self, entry: p.PublishEntry, idle: float) -> None:
        port = self.open.get(entry.host) or self._revived(entry.host)
        if port is not None:
            if port.entry != entry:
                log.info("published %s (was -> %s:%d)", describe(entry), port.entry.guest,
                         port.entry.guest_port)
            port.retarget(entry, idle)
            return
        if entry.host.proto == p.TCP:
            self.open[entry.host] = PublishedTcp(self.loop, entry, self.hand_over, self.sockets)
            return
        try:
            port = PublishedUdp(self.loop, entry, idle, self.ask_circuit, self.sockets)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or not self._end_overlapping(entry.host):
                raise
            port = PublishedUdp(self.loop, entry, idle, self.ask_circuit, self.sockets)
        self.open[entry.host] = port

    def _end_overlapping(self, host: p.Endpoint) -> bool:
        """A UDP port moving to an address that overlaps a retired one still
        draining (`0.0.0.0` and `198.18.0.1`, same port): the retired socket
        holds the port, so it closes now and its flows end.  Whether one did.
        Not when an open port of the table overlaps it too: that one holds the
        port, and the draining flows would end for nothing."""
        def clashes(other: p.Endpoint) -> bool:
            return (other.proto == host.proto and other.port == host.port
                    and _overlap(other.address, host.address))
        if any(clashes(other) for other in self.open):
            return False
        clash = [port for other, port in self.draining.items() if clashes(other)]
        for port in clash:
            log.info("unpublished %s: %s takes its port, its flows end", describe(port.entry),
                     host)
            del self.draining[port.entry.host]
            port.close()
        return bool(clash)

    def _revived(self, host: p.Endpoint) -> PublishedUdp | None:
        """A retired UDP port published again while its flows drain: its socket
        takes new peers again (binding another would clash with it)."""
        port = self.draining.pop(host, None)
        if port is not None:
            port.revive()
            self.open[host] = port
        return port

    def _retire(self, host: p.Endpoint) -> None:
        port = self.open.pop(host)
        log.info("unpublished %s; its connections go on", describe(port.entry))
        if isinstance(port, PublishedUdp):
            self.draining[host] = port
        port.retire(self._drained)

    def _drained(self, port: Port) -> None:
        if self.draining.get(port.entry.host) is port:
            del self.draining[port.entry.host]

    @property
    def flows(self) -> int:
        """UDP flows carried now, retired ports' too."""
        ports = [*self.open.values(), *self.draining.values()]
        return sum(len(port.flows) for port in ports if isinstance(port, PublishedUdp))

    def close(self) -> None:
        """Every port and what it carries goes (the proxy stack stops)."""
        ports = [*self.open.values(), *self.draining.values()]
        self.open, self.draining = {}, {}
        for port in ports:
            port.close()


def _overlap(a, b) -> bool:
    """Whether sockets bound to addresses a and b (one port) clash: the same
    address, or a wildcard of its family (IPv6's also takes IPv4's), in
    either order."""
    if a == b:
        return True
    return any(wild.is_unspecified and (wild.version == other.version or wild.version == 6)
               for wild, other in ((a, b), (b, a)))
