"""The proxy stack inside the operator's own loop (`[proxystack] placement = "operator"`).

The operator imports this module only for that placement, and only when it
starts the stack, so the operator package never depends on the proxy stack
at import time.  The stack is the same service the worker runs and speaks
the same protocol (HELLO, EGRESS, INGRESS, PUBLISH) over a socketpair the operator
made, so the two placements differ only in where the service runs.  Host
sockets are made in `[operator] host_netns` by a switch around each
socket() call (sockets.py), since the operator's thread must stay home.
It lives and dies with the operator: its connections do not outlive it.
"""
from __future__ import annotations

import asyncio
import logging
import socket

from circuits.operator.config import Config
from circuits.proxystack.service import ProxyStack
from circuits.proxystack.sockets import PLAIN, HostSockets

log = logging.getLogger("circuits.proxystack")


class InProcess:
    """A proxy stack served on the operator's loop; stop() resets its connections."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 on_end=lambda why: None):
        if config.host_netns:
            from circuits.guestnet.within import netns_path

            self.sockets = HostSockets(netns_path(config.host_netns))
        else:
            self.sockets = PLAIN
        self.stack = ProxyStack(config, loop, self.sockets)
        self.on_end = on_end
        self.task = loop.create_task(self._attach(sock))

    async def _attach(self, sock: socket.socket) -> None:
        """HELLO (the operator's PUBLISH follows); then no task waits on the
        link (a callback does), so the operator's loop can close with nothing
        pending."""
        try:
            link = await self.stack.attach(sock)
        except Exception as e:  # noqa: BLE001 - any failure is the stack's end, never the operator's
            log.exception("the in-process proxy stack failed")
            self._end(str(e))
            return
        link.gone.add_done_callback(lambda gone: self._end(gone.result()))

    def _end(self, why: str) -> None:
        """It ended by itself (a failure, or the operator dropped its link)."""
        if self.on_end is None:
            return  # stopped already
        on_end, self.on_end = self.on_end, None
        self._close()
        on_end(why)

    def stop(self) -> None:
        """Reset every connection; on_end is not called (the operator asked)."""
        self.on_end = None
        self.task.cancel()
        self._close()

    def _close(self) -> None:
        self.stack.stop()
        self.sockets.close()  # PLAIN holds nothing: closing it is nothing


def start(config: Config, loop: asyncio.AbstractEventLoop, sock: socket.socket,
          on_end=lambda why: None) -> InProcess:
    """Serve the proxy stack on `loop` over `sock` (the operator holds its
    other end); on_end(why) when it ends by itself."""
    return InProcess(config, loop, sock, on_end)
