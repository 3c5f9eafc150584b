"""Ingress: published host ports whose connections go to guests' listeners.

For each TCP entry of the publish table the proxy stack listens on the host
address and port.  Each accepted connection is handed to the operator
(INGRESS, with the outside peer's address); the operator answers with side 0
of a circuit to the guest's listener, whose accept shows that outside address.

A published port can be pointed at another guest listener in place
(`retarget`: the socket stays, so there is no moment without a listener) and
retired (`retire`: it takes no new peer; what it carries goes on).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Awaitable, Callable

from circuits import protocol as p
from circuits.proxystack.sockets import PLAIN, HostSockets

log = logging.getLogger("circuits.proxystack")
BACKLOG = 1024


def endpoint_of(address: tuple, proto: int) -> p.Endpoint:
    """A socket address as the protocol's endpoint."""
    return p.Endpoint(ipaddress.ip_address(address[0].split("%")[0]), address[1], proto)


def describe(entry: p.PublishEntry) -> str:
    """An entry for logs: `tcp://198.18.0.1:8080 -> web:80`."""
    return f"{entry.host} -> {entry.guest}:{entry.guest_port}"


def bound(sockets: HostSockets, entry: p.PublishEntry) -> socket.socket:
    """A non-blocking host socket bound to the entry's address (and listening,
    for TCP); OSError (EADDRINUSE, EADDRNOTAVAIL, ...) leaves nothing open."""
    family = socket.AF_INET if entry.host.address.version == 4 else socket.AF_INET6
    tcp = entry.host.proto == p.TCP
    sock = sockets.socket(family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    try:
        if tcp:  # what TIME_WAIT holds of earlier connections must not stop a rebind
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((str(entry.host.address), entry.host.port))
        if tcp:
            sock.listen(BACKLOG)
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


def _wildcard(family: int, port: int, proto: int) -> p.Endpoint:
    any_addr = "0.0.0.0" if family == socket.AF_INET else "::"
    return p.Endpoint(ipaddress.ip_address(any_addr), port, proto)


class PublishedTcp:
    """One listening host socket for one TCP entry of the publish table."""

    def __init__(self, loop: asyncio.AbstractEventLoop, entry: p.PublishEntry,
                 hand_over: Callable[[socket.socket, p.Ingress], Awaitable[None]],
                 sockets: HostSockets = PLAIN):
        self.loop, self.entry, self.hand_over = loop, entry, hand_over
        self.sock = bound(sockets, entry)
        loop.add_reader(self.sock, self._accept)
        self.tasks: set[asyncio.Task] = set()
        log.info("published %s", describe(entry))

    def retarget(self, entry: p.PublishEntry, idle: float) -> None:
        """New connections go to this entry's guest listener; nothing is rebound."""
        self.entry = entry

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, peer = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:  # out of fds: the backlog holds them meanwhile
                log.error("cannot accept on %s: %s", self.entry.host, e)
                return
            msg = p.Ingress(endpoint_of(peer, p.TCP),
                            _wildcard(conn.family, self.entry.guest_port, p.TCP), 0,
                            self.entry.guest)
            task = self.loop.create_task(self.hand_over(conn, msg))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def retire(self, on_closed: Callable[[object], None]) -> None:
        """No new connection: the listening socket closes (the kernel resets what
        waits in its backlog); connections being handed over, and those handed
        over already, go on."""
        self.loop.remove_reader(self.sock)
        self.sock.close()
        on_closed(self)

    def close(self) -> None:
        """Everything goes, hand-overs in flight too (the proxy stack stops)."""
        self.loop.remove_reader(self.sock)
        self.sock.close()
        for task in self.tasks:
            task.cancel()


PENDING_DATAGRAMS = 8  # per new peer, held while its circuit is being set up


class PublishedUdp:
    """One host UDP socket for one UDP entry of the publish table: a flow per
    outside peer.  Retired, it takes no new peer, and closes once the flows
    it carries have ended (they share its socket)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, entry: p.PublishEntry, idle: float,
                 hand_over: Callable[[socket.socket, p.Ingress], Awaitable[object]],
                 sockets: HostSockets = PLAIN):
        self.loop, self.entry, self.idle, self.hand_over = loop, entry, idle, hand_over
        self.sock = bound(sockets, entry)
        self.flows: dict[tuple, object] = {}  # peer -> Flow
        self.pending: dict[tuple, list[bytes]] = {}  # peer -> datagrams before its circuit
        self.tasks: set[asyncio.Task] = set()
        self.on_closed: Callable[[object], None] | None = None  # set while retired
        loop.add_reader(self.sock, self._readable)
        log.info("published %s", describe(entry))

    def retarget(self, entry: p.PublishEntry, idle: float) -> None:
        """New peers go to this entry's guest listener, with this idle timeout;
        flows open now keep theirs."""
        self.entry, self.idle = entry, idle

    def _readable(self) -> None:
        for _ in range(64):
            try:
                _, peer = self.sock.recvfrom(1, socket.MSG_PEEK)
            except BlockingIOError:
                return
            except OSError:  # an ICMP error for an earlier datagram: go on
                continue
            flow = self.flows.get(peer)
            if flow is not None and not flow.closed:
                flow.deliver()
            else:
                self._hold(peer)

    def _hold(self, peer: tuple) -> None:
        """A datagram of a peer with no circuit yet: keep a few while asking."""
        data = self.sock.recv(65535)
        if peer in self.pending:
            if len(self.pending[peer]) < PENDING_DATAGRAMS:
                self.pending[peer].append(data)
            return
        if self.on_closed is not None:
            return  # retired: a new peer's datagrams are dropped
        self.pending[peer] = [data]
        msg = p.Ingress(endpoint_of(peer, p.UDP),
                        _wildcard(self.sock.family, self.entry.guest_port, p.UDP), 0,
                        self.entry.guest)
        task = self.loop.create_task(self._open(peer, msg))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _open(self, peer: tuple, msg: p.Ingress) -> None:
        from circuits.proxystack.datagrams import Flow

        circuit = await self.hand_over(self.sock, msg)
        held = self.pending.pop(peer, [])
        if circuit is None:
            return  # refused: its datagrams are dropped, as by a closed port
        flow = Flow(self.loop, self.sock, circuit, peer, self.idle, lambda f: self._ended(peer))
        self.flows[peer] = flow
        flow.start()
        for data in held:
            flow.deliver(data)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self._close_if_drained()

    def _ended(self, peer: tuple) -> None:
        self.flows.pop(peer, None)
        self._close_if_drained()

    def retire(self, on_closed: Callable[[object], None]) -> None:
        """No new peer from now on; on_closed(self) once the last flow has ended
        (at once if none is open)."""
        self.on_closed = on_closed
        self._close_if_drained()

    def revive(self) -> None:
        """Published again while it drained: it takes new peers again."""
        self.on_closed = None

    def _close_if_drained(self) -> None:
        if self.on_closed is None or self.flows or self.tasks:
            return
        on_closed, self.on_closed = self.on_closed, None
        self.close()
        log.info("unpublished %s: its last flow ended", describe(self.entry))
        on_closed(self)

    def close(self) -> None:
        """The socket and every flow on it go (the proxy stack stops)."""
        if self.sock.fileno() < 0:
            return
        self.on_closed = None
        self.loop.remove_reader(self.sock)
        for task in self.tasks:
            task.cancel()
        for flow in list(self.flows.values()):
            flow.close()
        self.sock.close()
