"""The operator's side of the proxy stack: its process and its control connection.

The proxy stack is a guest-like peer (docs/proxystack.md): a process the
operator starts, which connects back over its own control socket as the
identity "proxystack".  The operator hands it egress circuits (EGRESS, whose
reply decides the guest's CONNECT) and serves its INGRESS requests.  If it
dies, the operator starts it again (at most `restarts` times a minute); while
none is connected, egress is refused with ENETUNREACH.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from circuits import protocol as p
from circuits.operator.config import Config

log = logging.getLogger("circuits.operator")
RESTART_WINDOW = 60.0  # seconds over which restarts are counted
STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL


@dataclass
class PendingEgress:
    """A guest's CONNECT waiting for the proxy stack's connect."""

    on_done: Callable[[p.Message], None]  # called with OK or ERROR


class ProxyLink:
    """The proxy stack's control connection, as the operator sees it."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.pending: dict[int, PendingEgress] = {}
        self._ids = 0

    def egress(self, msg: p.Egress, fds: list[int], on_done: Callable[[p.Message], None]) -> None:
        """Send an EGRESS; on_done gets its reply (or an ERROR if the link dies)."""
        self._ids = self._ids % 0xFFFFFFFF + 1
        msg = p.Egress(**{**msg.__dict__, "request": self._ids})
        p.send(self.sock, msg, fds)  # BlockingIOError/OSError: the caller refuses
        self.pending[self._ids] = PendingEgress(on_done)

    def answered(self, msg: p.Message) -> None:
        """An OK or ERROR from the proxy stack: the reply to one of our EGRESS."""
        pending = self.pending.pop(msg.request, None)
        if pending is None:
            log.warning("proxy stack: a reply to no request (%d)", msg.request)
            return
        pending.on_done(msg)

    def fail_all(self, reason: str) -> None:
        """The link is gone: every waiting connect is refused."""
        pending, self.pending = self.pending, {}
        for request in pending.values():
            request.on_done(p.Error(errno.ENETUNREACH, reason))


class Supervisor:
    """Starts the proxy stack process, restarts it when it dies, stops it."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop):
        self.config, self.loop = config, loop
        self.proc: subprocess.Popen | None = None
        self.starts: deque[float] = deque()
        self._pidfd = -1
        self._stopping = False

    def start(self) -> None:
        """Start the process (its readiness is its HELLO on the control socket)."""
        now = time.monotonic()
        while self.starts and self.starts[0] < now - RESTART_WINDOW:
            self.starts.popleft()
        if len(self.starts) > self.config.proxystack.restarts:
            log.error("proxy stack: died %d times within a minute; not restarted (egress is"
                      " refused with ENETUNREACH)", len(self.starts))
            return
        self.starts.append(now)
        argv = [sys.executable, "-m", "circuits.proxystack", "--config", self.config.path]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, close_fds=True)
        self._pidfd = os.pidfd_open(self.proc.pid)
        self.loop.add_reader(self._pidfd, self._exited)
        log.info("proxy stack: started, pid %d", self.proc.pid)

    def _exited(self) -> None:
        self._forget_pidfd()
        code = self.proc.wait() if self.proc else None
        if self._stopping:
            return
        log.error("proxy stack: exited (%s); starting it again", code)
        self.loop.call_later(0.2, self.start)

    def _forget_pidfd(self) -> None:
        if self._pidfd >= 0:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period."""
        self._stopping = True
        self._forget_pidfd()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
