"""The proxy stack's service: its splices, published ports and egress, for
whichever operator it is linked to.  The same in a worker process (main.py)
and inside the operator's own loop (inprocess.py)."""
from __future__ import annotations

import asyncio
import errno
import logging
import socket

from circuits import protocol as p
from circuits.operator.config import Config
from circuits.proxystack import egress
from circuits.proxystack.datagrams import DatagramSplice
from circuits.proxystack.ingress import Published, PublishedUdp
from circuits.proxystack.link import Link, OperatorGone
from circuits.proxystack.sockets import PLAIN, HostSockets
from circuits.proxystack.splice import Splice

log = logging.getLogger("circuits.proxystack")


class ProxyStack:
    """Everything one proxy stack serves; its connections outlive its links."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop,
                 sockets: HostSockets = PLAIN):
        self.config, self.loop, self.sockets = config, loop, sockets
        self.splices: set[Splice] = set()
        self.tasks: set[asyncio.Task] = set()  # egress connects, each for the link that asked
        self.published: list[Published | PublishedUdp] = []
        self.link: Link | None = None

    async def attach(self, sock: socket.socket) -> Link:
        """HELLO on a connected control socket: the link to serve from now on.
        OperatorGone or OSError if the operator does not welcome us."""
        self.link = Link(self.loop, sock, self.on_egress)
        await self.link.hello()
        return self.link

    def publish(self) -> None:
        """Listen on the published ports, once (they stay across links); a port
        that cannot be bound raises OSError: the stack cannot serve its config."""
        if self.published:
            return
        idle = self.config.proxystack.udp_idle_timeout
        for entry in self.config.publish:
            if entry.proto == "tcp":
                self.published.append(Published(self.loop, entry, self.hand_over, self.sockets))
            else:
                self.published.append(PublishedUdp(self.loop, entry, idle, self.ask_circuit,
                                                   self.sockets))

    def operator_gone(self) -> None:
        """The link's operator is gone: the connects it asked for are abandoned
        (no one can tell its guests); established connections go on."""
        for task in list(self.tasks):
            task.cancel()

    @property
    def connections(self) -> int:
        """Established connections and UDP flows carried now."""
        flows = sum(len(pub.flows) for pub in self.published if isinstance(pub, PublishedUdp))
        return len(self.splices) + flows

    # -- egress --------------------------------------------------------------

    def on_egress(self, msg: p.Egress, fds: list[int]) -> None:
        try:
            circuit = egress.circuit_of(msg, fds)
        except OSError as e:  # parameters the ring refuses: the fds are still ours
            p.close_all(fds)
            self.link.send(p.Error(e.errno or errno.EINVAL, str(e), request=msg.request))
            return
        self._spawn(self._egress(self.link, msg, circuit))

    async def _egress(self, link: Link, msg: p.Egress, circuit) -> None:
        try:
            sock = await egress.connect(self.loop, msg, self.sockets)
        except OSError as e:
            circuit.close()
            log.info("egress %s for %s: %s", msg.remote, msg.guest, e)
            link.send(p.Error(e.errno or errno.EIO, e.strerror or str(e), request=msg.request))
            return
        except asyncio.CancelledError:  # its operator is gone (or we stop): the socket is closed
            circuit.close()
            raise
        if link.gone.done():  # connected just as its operator went: no guest will use it
            reset(sock)
            circuit.close()
            return
        if msg.kind == p.STREAM:
            self._splice(sock, circuit)  # before OK: the guest may send at once
        else:
            idle = self.config.proxystack.udp_idle_timeout
            self._start(DatagramSplice(self.loop, sock, circuit, idle, self.splices.discard))
        link.send(p.Ok(request=msg.request))

    # -- ingress -------------------------------------------------------------

    async def ask_circuit(self, sock: socket.socket, msg: p.Ingress):
        """A circuit to the guest's listener for an outside peer; None if refused."""
        try:
            if self.link is None:
                raise OperatorGone("no operator yet")
            reply, fds = await self.link.request(msg)
        except (OSError, OperatorGone) as e:
            log.info("ingress %s -> %s:%d refused: %s", msg.remote, msg.guest, msg.local.port, e)
            return None
        try:
            if not isinstance(reply, p.Circuit) or len(fds) != p.FDS_PER_CIRCUIT:
                raise OSError(errno.EPROTO, f"a {type(reply).__name__} for an INGRESS")
            return egress.circuit_of(reply, fds)
        except OSError as e:  # the ring refused its parameters: the fds are still ours
            log.error("ingress %s: %s", msg.remote, e)
            p.close_all(fds)
            return None

    async def hand_over(self, sock: socket.socket, msg: p.Ingress) -> None:
        """An accepted outside connection: a circuit to the guest's listener,
        then splice; refused: the outside gets a RST."""
        circuit = await self.ask_circuit(sock, msg)
        if circuit is None:
            reset(sock)
            return
        self._splice(sock, circuit)

    # -- both ----------------------------------------------------------------

    def _splice(self, sock: socket.socket, circuit) -> None:
        self._start(Splice(self.loop, sock, circuit, self.splices.discard))

    def _start(self, splice: Splice) -> None:
        self.splices.add(splice)
        splice.start()

    def _spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def stop(self) -> None:
        """Every connection is reset both ways; nothing is left half-open."""
        published, self.published = self.published, []
        for port in published:
            port.close()
        for task in self.tasks:
            task.cancel()
        for splice in list(self.splices):
            splice.abort()
        if self.link is not None:
            self.link.close()


def reset(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0): the outside knows at once, nothing half-open."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    sock.close()
