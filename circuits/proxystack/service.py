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
from circuits.proxystack.link import Link, OperatorGone
from circuits.proxystack.ports import Ports
from circuits.proxystack.sockets import PLAIN, HostSockets
from circuits.proxystack.splice import Splice

log = logging.getLogger("circuits.proxystack")
# Seconds after WELCOME with no PUBLISH before we publish our own file's ports
# ourselves: an operator that knows PUBLISH sends it right after its WELCOME.
OWN_TABLE_AFTER = 2.0


class ProxyStack:
    """Everything one proxy stack serves; its connections outlive its links."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop,
                 sockets: HostSockets = PLAIN):
        self.config, self.loop, self.sockets = config, loop, sockets
        self.splices: set[Splice] = set()
        self.tasks: set[asyncio.Task] = set()  # egress connects, each for the link that asked
        self.ports = Ports(loop, sockets, self.hand_over, self.ask_circuit)
        # The operator's, from its PUBLISH; until then our own file's.
        self.udp_idle = config.proxystack.udp_idle_timeout
        self.orphan_grace = config.proxystack.orphan_grace
        self.link: Link | None = None
        self._own_table: asyncio.TimerHandle | None = None

    async def attach(self, sock: socket.socket) -> Link:
        """HELLO on a connected control socket: the link to serve from now on.
        OperatorGone or OSError if the operator does not welcome us."""
        self.link = Link(self.loop, sock, self.on_egress, self.on_publish)
        await self.link.hello()
        if not self.ports.applied:  # the operator's PUBLISH follows its WELCOME
            self._own_table = self.loop.call_later(OWN_TABLE_AFTER, self._publish_own, self.link)
        return self.link

    def on_publish(self, table: p.Publish) -> p.Published:
        """The operator's whole publish table and timeouts: applied as a
        difference (ports.py); the answer names the entries that failed."""
        if self._own_table is not None:
            self._own_table.cancel()
            self._own_table = None
        self.udp_idle = table.udp_idle_timeout_ms / 1000
        self.orphan_grace = table.orphan_grace_ms / 1000
        failures = self.ports.apply(table.entries, self.udp_idle)
        log.info("publish table applied: %d of %d ports listening", len(table.entries) -
                 len(failures), len(table.entries))
        return p.Published(tuple((i, e.errno or errno.EIO) for i, e in failures),
                           request=table.request)

    def _publish_own(self, link: Link) -> None:
        """An operator that welcomed us but gave no table (one older than
        PUBLISH): the ports of our own configuration file, as before it."""
        self._own_table = None
        if self.ports.applied or link is not self.link or link.gone.done():
            return
        log.warning("the operator gave no publish table: publishing the ports of %s",
                    self.config.path)
        self.ports.apply(p.entries_of(self.config.publish), self.udp_idle)

    def operator_gone(self) -> None:
        """The link's operator is gone: the connects it asked for are abandoned
        (no one can tell its guests); established connections go on."""
        for task in list(self.tasks):
            task.cancel()

    @property
    def connections(self) -> int:
        """Established connections and UDP flows carried now."""
        return len(self.splices) + self.ports.flows

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
            self._start(DatagramSplice(self.loop, sock, circuit, self.udp_idle,
                                       self.splices.discard))
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
        if self._own_table is not None:
            self._own_table.cancel()
        self.ports.close()
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
