"""The proxy stack process: its loop, its link to the operator, its splices."""
from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import socket
import sys

from circuits import protocol as p
from circuits.operator.config import Config, ConfigError, load
from circuits.proxystack import egress
from circuits.proxystack.datagrams import DatagramSplice
from circuits.proxystack.ingress import Published, PublishedUdp
from circuits.proxystack.link import Link, OperatorGone
from circuits.proxystack.splice import Splice

log = logging.getLogger("circuits.proxystack")


class ProxyStack:
    """Everything one proxy stack process serves."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop):
        self.config, self.loop = config, loop
        self.splices: set[Splice] = set()
        self.tasks: set[asyncio.Task] = set()
        self.published: list[Published] = []
        self.link = Link(loop, config.proxystack.control, self.on_egress)

    async def serve(self) -> None:
        """HELLO, open the published ports, then serve until the operator goes."""
        await self.link.hello()
        idle = self.config.proxystack.udp_idle_timeout
        for entry in self.config.publish:
            if entry.proto == "tcp":
                self.published.append(Published(self.loop, entry, self.hand_over))
            else:
                self.published.append(PublishedUdp(self.loop, entry, idle, self.ask_circuit))
        await self.link.gone

    # -- egress --------------------------------------------------------------

    def on_egress(self, msg: p.Egress, fds: list[int]) -> None:
        try:
            circuit = egress.circuit_of(msg, fds)
        except OSError as e:  # parameters the ring refuses: the fds are still ours
            p.close_all(fds)
            self.link.send(p.Error(e.errno or errno.EINVAL, str(e), request=msg.request))
            return
        self._spawn(self._egress(msg, circuit))

    async def _egress(self, msg: p.Egress, circuit) -> None:
        try:
            sock = await egress.connect(self.loop, msg)
        except OSError as e:
            circuit.close()
            log.info("egress %s for %s: %s", msg.remote, msg.guest, e)
            self.link.send(p.Error(e.errno or errno.EIO, e.strerror or str(e),
                                   request=msg.request))
            return
        if msg.kind == p.STREAM:
            self._splice(sock, circuit)  # before OK: the guest may send at once
        else:
            idle = self.config.proxystack.udp_idle_timeout
            self._start(DatagramSplice(self.loop, sock, circuit, idle, self.splices.discard))
        self.link.send(p.Ok(request=msg.request))

    # -- ingress -------------------------------------------------------------

    async def ask_circuit(self, sock: socket.socket, msg: p.Ingress):
        """A circuit to the guest's listener for an outside peer; None if refused."""
        try:
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
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            sock.close()
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
        for published in self.published:
            published.close()
        for task in self.tasks:
            task.cancel()
        for splice in list(self.splices):
            splice.abort()
        self.link.close()


def enter_namespace(config: Config) -> None:
    """The proxy stack sends from [operator] host_netns when one is set."""
    if config.host_netns:
        from circuits.guestnet.within import netns_path, setns

        setns(netns_path(config.host_netns))


def run(config: Config) -> None:
    enter_namespace(config)
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        loop = asyncio.new_event_loop()
    stack = ProxyStack(config, loop)
    serving = loop.create_task(stack.serve())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, serving.cancel)
    try:
        loop.run_until_complete(serving)
    except (asyncio.CancelledError, OperatorGone):
        pass
    finally:
        stack.stop()
        loop.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="circuits.proxystack")
    parser.add_argument("--config", required=True)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"%(asctime)s proxystack[{os.getpid()}] %(levelname)s %(message)s")
    try:
        config = load(args.config)
    except ConfigError as e:
        sys.exit(f"proxystack: {e}")
    run(config)
