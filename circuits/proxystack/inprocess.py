"""The proxy stack inside the operator's own loop (`[proxystack] placement = "operator"`).

The operator imports this module only for that placement, and only when it
starts the stack, so the operator package never depends on the proxy stack
at import time.  The stack is the same service the worker runs and speaks
the same protocol (HELLO, EGRESS, INGRESS) over a socketpair the operator
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
        self.task = loop.create_task(self._serve(sock))

    async def _serve(self, sock: socket.socket) -> None:
        try:
            link = await self.stack.attach(sock)
            self.stack.publish()
            why = await link.gone
        except Exception as e:  # noqa: BLE001 - any failure is the stack's end, never the operator's
            log.exception("the in-process proxy stack failed")
            why = str(e)
        self.stack.stop()
        self.on_end(why)

    def stop(self) -> None:
        self.task.cancel()
        self.stack.stop()
        if self.sockets is not PLAIN:
            self.sockets.close()


def start(config: Config, loop: asyncio.AbstractEventLoop, sock: socket.socket,
          on_end=lambda why: None) -> InProcess:
    """Serve the proxy stack on `loop` over `sock` (the operator holds its
    other end); on_end(why) when it ends by itself."""
    return InProcess(config, loop, sock, on_end)
