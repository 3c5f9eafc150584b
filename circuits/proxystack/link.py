"""The proxy stack's control connection to the operator.

It says HELLO as any guest does (the operator knows it as "proxystack" by the
socket it connects to), then serves the operator's EGRESS and PUBLISH requests
and asks INGRESS for published connections.  Replies are matched by request
number; a table's PUBLISH parts are joined here, and the service sees whole
tables.
One Link is one operator's connection: when that operator goes, the worker
reaches for the next one (`reach`) and makes a new Link.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from typing import Callable

from circuits import protocol as p

log = logging.getLogger("circuits.proxystack")


RETRY_FIRST, RETRY_MAX = 0.02, 0.25  # seconds between attempts to reach an operator


class OperatorGone(Exception):
    """The control connection closed (or is not there): requests on it fail."""


async def reach(path: str, give_up: Callable[[], bool]) -> socket.socket | None:
    """A connection to the operator's control socket at `path`, retried with
    backoff (a restarting operator binds it anew); None once give_up() says so."""
    delay = RETRY_FIRST
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)  # a Unix connect then never waits: EAGAIN on a full backlog
        try:
            sock.connect(path)
            return sock
        except OSError:  # no file yet (ENOENT), a dead operator's file (ECONNREFUSED), EAGAIN
            sock.close()
        if give_up():
            return None
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)


class Link:
    """Requests both ways over one connected SOCK_SEQPACKET control socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 on_egress: Callable[[p.Egress, list[int]], None],
                 on_publish: Callable[[p.Publish], p.Message]):
        self.loop, self.sock = loop, sock
        self.on_egress, self.on_publish = on_egress, on_publish
        self.tables = p.Joiner()
        self.sock.setblocking(False)
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future] = {}
        self.gone: asyncio.Future = loop.create_future()

    async def hello(self) -> str:
        self.loop.add_reader(self.sock, self._readable)
        welcome, _ = await self.request(p.Hello())
        return welcome.guest

    async def request(self, msg: p.Message) -> tuple[p.Message, list[int]]:
        """Send a request, wait for its reply; ERROR raises OSError (the
        descriptors of a reply are the caller's); OperatorGone if the link is."""
        if self.gone.done():
            raise OperatorGone(self.gone.result())
        request = (next(self.ids) - 1) % 0xFFFFFFFF + 1  # 1..2**32-1: 0 is unsolicited
        future = self.loop.create_future()
        self.waiting[request] = future
        self.send(type(msg)(**{**msg.__dict__, "request": request}))
        try:
            reply, fds = await future
        except asyncio.CancelledError:
            # Cancelled after the reply came but before we woke (a port closed
            # under its INGRESS): the reply's descriptors are nobody's but ours.
            self.waiting.pop(request, None)
            if future.done() and not future.cancelled() and future.exception() is None:
                p.close_all(future.result()[1])
            raise
        if isinstance(reply, p.Error):
            p.close_all(fds)
            raise OSError(reply.code, reply.reason)
        return reply, fds

    def send(self, msg: p.Message, fds: list[int] = ()) -> None:
        """One message; the operator reads its socket promptly, so a full
        buffer means it is stuck: that ends the link.  Nothing is sent on a
        link that is gone (its operator asked nothing we can answer)."""
        if self.gone.done():
            return
        try:
            p.send(self.sock, msg, fds)
        except OSError as e:
            self._lost(f"cannot send to the operator: {e}")

    def _readable(self) -> None:
        for _ in range(64):
            try:
                msg, fds = p.receive(self.sock)
            except BlockingIOError:
                return
            except (EOFError, ConnectionError) as e:
                return self._lost(str(e))
            except p.ProtocolError as e:
                log.error("operator sent a bad message: %s", e)
                self._refuse(e)
                continue
            self._dispatch(msg, fds)

    def _refuse(self, e: p.ProtocolError) -> None:
        """A bad reply fails the request it answers; anything else (a request,
        a type we do not know) is answered ERROR EPROTO (docs/protocol.md 5)."""
        if e.type in p.REPLIES:
            future = self.waiting.pop(e.request, None)
            if future is not None and not future.done():
                future.set_result((p.Error(e.errno, f"a bad reply: {e}"), []))
            return
        self.send(p.Error(e.errno, str(e), request=e.request))

    def _dispatch(self, msg: p.Message, fds: list[int]) -> None:
        if isinstance(msg, p.Egress):
            self.on_egress(msg, fds)
            return
        if isinstance(msg, p.Publish):
            self._publish(msg)
            return
        future = self.waiting.pop(msg.request, None)
        if future is None or future.done():
            log.warning("a %s for no request (%d)", type(msg).__name__, msg.request)
            p.close_all(fds)
            return
        future.set_result((msg, fds))

    def _publish(self, part: p.Publish) -> None:
        """OK to each part of a table but its last, which the service answers
        once it has applied the whole table (which answers the last part)."""
        try:
            table = self.tables.add(part)
        except p.ProtocolError as e:
            self.send(p.Error(e.errno, str(e), request=part.request))
            return
        if table is None:
            self.send(p.Ok(request=part.request))
        else:
            self.send(self.on_publish(table))

    def _lost(self, why: str, quiet: bool = False) -> None:
        if self.gone.done():
            return
        if not quiet:
            log.warning("the operator's control connection is gone: %s", why)
        self.loop.remove_reader(self.sock)
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(OperatorGone(why))
        self.waiting.clear()
        self.gone.set_result(why)

    def close(self) -> None:
        self._lost("closed here", quiet=True)
        self.sock.close()
