"""Ingress: published host ports whose connections go to guests' listeners.

For each TCP ``[[publish]]`` entry the proxy stack listens on the host address
and port.  Each accepted connection is handed to the operator (INGRESS, with
the outside peer's address); the operator answers with side 0 of a circuit
to the guest's listener, whose accept shows that outside address.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Awaitable, Callable

from circuits import protocol as p
from circuits.operator.config import Publish
from circuits.proxystack.sockets import PLAIN, HostSockets

log = logging.getLogger("circuits.proxystack")
BACKLOG = 1024


def endpoint_of(address: tuple, proto: int) -> p.Endpoint:
    """A socket address as the protocol's endpoint."""
    return p.Endpoint(ipaddress.ip_address(address[0].split("%")[0]), address[1], proto)


class Published:
    """One listening host socket for one [[publish]] entry."""

    def __init__(self, loop: asyncio.AbstractEventLoop, entry: Publish,
                 hand_over: Callable[[socket.socket, p.Ingress], Awaitable[None]],
                 sockets: HostSockets = PLAIN):
        self.loop, self.entry, self.hand_over = loop, entry, hand_over
        family = socket.AF_INET if entry.address.version == 4 else socket.AF_INET6
        self.sock = sockets.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((str(entry.address), entry.port))
        self.sock.listen(BACKLOG)
        self.sock.setblocking(False)
        loop.add_reader(self.sock, self._accept)
        self.tasks: set[asyncio.Task] = set()
        log.info("published tcp %s:%d -> %s:%d", entry.address, entry.port, entry.guest,
                 entry.guest_port)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, peer = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:  # out of fds: the backlog holds them meanwhile
                log.error("cannot accept on %s:%d: %s", self.entry.address, self.entry.port, e)
                return
            any_addr = "0.0.0.0" if conn.family == socket.AF_INET else "::"
            msg = p.Ingress(endpoint_of(peer, p.TCP),
                            p.Endpoint(ipaddress.ip_address(any_addr), self.entry.guest_port),
                            0, self.entry.guest)
            task = self.loop.create_task(self.hand_over(conn, msg))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def close(self) -> None:
        self.loop.remove_reader(self.sock)
        self.sock.close()
        for task in self.tasks:
            task.cancel()


PENDING_DATAGRAMS = 8  # per new peer, held while its circuit is being set up


class PublishedUdp:
    """One host UDP socket for one [[publish]] entry: a flow per outside peer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, entry: Publish, idle: float,
                 hand_over: Callable[[socket.socket, p.Ingress], Awaitable[object]],
                 sockets: HostSockets = PLAIN):
        self.loop, self.entry, self.idle, self.hand_over = loop, entry, idle, hand_over
        family = socket.AF_INET if entry.address.version == 4 else socket.AF_INET6
        self.sock = sockets.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((str(entry.address), entry.port))
        self.sock.setblocking(False)
        self.flows: dict[tuple, object] = {}  # peer -> Flow
        self.pending: dict[tuple, list[bytes]] = {}  # peer -> datagrams before its circuit
        self.tasks: set[asyncio.Task] = set()
        loop.add_reader(self.sock, self._readable)
        log.info("published udp %s:%d -> %s:%d", entry.address, entry.port, entry.guest,
                 entry.guest_port)

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
        self.pending[peer] = [data]
        any_addr = "0.0.0.0" if self.sock.family == socket.AF_INET else "::"
        msg = p.Ingress(endpoint_of(peer, p.UDP),
                        p.Endpoint(ipaddress.ip_address(any_addr), self.entry.guest_port, p.UDP),
                        0, self.entry.guest)
        task = self.loop.create_task(self._open(peer, msg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _open(self, peer: tuple, msg: p.Ingress) -> None:
        from circuits.proxystack.datagrams import Flow

        circuit = await self.hand_over(self.sock, msg)
        held = self.pending.pop(peer, [])
        if circuit is None:
            return  # refused: its datagrams are dropped, as by a closed port
        flow = Flow(self.loop, self.sock, circuit, peer, self.idle,
                    lambda f: self.flows.pop(peer, None))
        self.flows[peer] = flow
        flow.start()
        for data in held:
            flow.deliver(data)

    def close(self) -> None:
        self.loop.remove_reader(self.sock)
        for task in self.tasks:
            task.cancel()
        for flow in list(self.flows.values()):
            flow.close()
        self.sock.close()
