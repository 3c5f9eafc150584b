"""The operator's side of the proxy stack: its process and its control connection.

The proxy stack is a guest-like peer (docs/proxystack.md): a process the
operator starts, which connects back over its own control socket as the
identity "proxystack" (or, with placement "operator", a service on the
operator's own loop, linked by a socketpair).  The operator hands it egress
circuits (EGRESS, whose reply decides the guest's CONNECT) and its publish
table (PUBLISH, on every link and reload), and serves its INGRESS requests.
If it dies, the operator starts it again (at most `restarts` times a
minute); while none is connected, egress is refused with ENETUNREACH.  A
worker outlives the operator; the next operator adopts it.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from typing import Callable

from circuits import protocol as p
from circuits.operator.config import Config

log = logging.getLogger("circuits.operator")
RESTART_WINDOW = 60.0  # seconds over which restarts are counted
STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
PUBLISH_TIMEOUT = 5.0  # seconds a proxy stack may take to answer a publish table


class ProxyLink:
    """The proxy stack's control connection, as the operator sees it: our
    requests on it (EGRESS, PUBLISH) and their replies."""

    def __init__(self, sock, loop: asyncio.AbstractEventLoop) -> None:
        self.sock, self.loop = sock, loop
        # request -> its on_done, the reply types it takes besides ERROR, and its name
        self.pending: dict[int, tuple[Callable[[p.Message], None], tuple[type, ...], str]] = {}
        self._ids = 0

    def egress(self, msg: p.Egress, fds: list[int], on_done: Callable[[p.Message], None]) -> None:
        """Send an EGRESS; on_done gets its reply (or an ERROR if the link dies)."""
        self._request(msg, fds, on_done)  # BlockingIOError/OSError: the caller refuses

    def publish(self, table: tuple[p.PublishEntry, ...], udp_idle_timeout: float,
                orphan_grace: float, on_done: Callable[[p.Message], None]) -> None:
        """Send a publish table, in as many PUBLISH parts as it takes; on_done
        gets PUBLISHED, or an ERROR: the first refusal of a part (EPROTO from a
        proxy stack older than PUBLISH), or the link's end.  With no answer
        after PUBLISH_TIMEOUT seconds (a proxy stack so old it answers nothing,
        or a stuck one) it gets ETIMEDOUT first, and the answer too if it
        comes later."""
        refused: list[p.Message] = []
        asked: list[int] = []

        def part_done(reply: p.Message) -> None:
            if isinstance(reply, p.Error) and not refused:
                refused.append(reply)

        def last_done(reply: p.Message) -> None:
            timer.cancel()
            if isinstance(reply, p.Published) and not _names_entries_of(reply, table):
                reply = p.Error(errno.EPROTO, "a bad reply: a PUBLISHED naming entries twice"
                                f" or beyond the table's {len(table)}")
            on_done(refused[0] if refused else reply)

        def too_late() -> None:
            on_done(p.Error(errno.ETIMEDOUT, f"no answer in {PUBLISH_TIMEOUT:.0f} s"))

        timer = self.loop.call_later(PUBLISH_TIMEOUT, too_late)
        msgs = p.parts(table, _ms(udp_idle_timeout), _ms(orphan_grace))
        try:
            for msg in msgs:
                asked.append(self._request(msg, (), last_done, (p.Published,)) if msg.last
                             else self._request(msg, (), part_done))
        except OSError as e:  # a stuck or gone proxy stack: the table is not applied
            timer.cancel()
            for request in asked:
                self.pending.pop(request, None)
            on_done(p.Error(e.errno or errno.EIO, f"cannot send it: {e}"))

    def _request(self, msg: p.Message, fds, on_done: Callable[[p.Message], None],
                 replies: tuple[type, ...] = (p.Ok,)) -> int:
        """Send a request whose answer is ERROR or one of `replies`."""
        self._ids = self._ids % 0xFFFFFFFF + 1
        p.send(self.sock, msg, fds, request=self._ids)
        self.pending[self._ids] = (on_done, replies, type(msg).__name__.upper())
        return self._ids

    def answered(self, msg: p.Message) -> None:
        """An OK, ERROR or PUBLISHED from the proxy stack: the reply to one of
        ours.  A reply of a kind its request does not take (a PUBLISHED to an
        EGRESS, an OK to a table's last part) fails that request with EPROTO."""
        pending = self.pending.pop(msg.request, None)
        if pending is None:
            log.warning("proxy stack: a reply to no request (%d)", msg.request)
            return
        on_done, replies, asked = pending
        if not isinstance(msg, (p.Error, *replies)):
            reply = type(msg).__name__.upper()
            log.error("proxy stack: a %s in answer to a %s (%d)", reply, asked, msg.request)
            msg = p.Error(errno.EPROTO, f"a bad reply: a {reply} to a {asked}",
                          request=msg.request)
        on_done(msg)

    def fail_all(self, reason: str) -> None:
        """The link is gone: every request waiting is answered ENETUNREACH
        (every waiting connect is refused)."""
        pending, self.pending = self.pending, {}
        for on_done, _, _ in pending.values():
            on_done(p.Error(errno.ENETUNREACH, reason))


def _names_entries_of(reply: p.Published, table: tuple) -> bool:
    """Whether each failure of a PUBLISHED is an entry of the table, once."""
    indices = [index for index, _ in reply.failures]
    return len(set(indices)) == len(indices) and all(i < len(table) for i in indices)


def _ms(seconds: float) -> int:
    """Seconds as the protocol's milliseconds: 1 at least (the file allows any above 0)."""
    return max(1, round(seconds * 1000))


class Supervisor:
    """Runs the proxy stack in its placement: a worker process (started, or
    adopted from an earlier operator, restarted when it dies, left running
    when the operator stops) or a service in the operator's own loop."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop,
                 attach: Callable[[socket.socket], None]):
        self.config, self.loop, self.attach = config, loop, attach
        self.proc: subprocess.Popen | None = None  # a worker this operator started
        self.worker: int | None = None  # the worker's pid, started or adopted
        self.inprocess = None  # circuits.proxystack.inprocess.InProcess, placement "operator"
        self.starts: deque[float] = deque()
        self._pidfd = -1
        self._stopping = False

    def start(self) -> None:
        """Adopt the worker that holds the pidfile, or start the proxy stack
        (a worker's readiness is its HELLO on the control socket)."""
        held = worker_pid(self.config.proxystack.pidfile)
        if held is not None and self._watch(held):
            log.info("proxy stack: adopted the running worker, pid %d", held)
            return
        now = time.monotonic()
        while self.starts and self.starts[0] < now - RESTART_WINDOW:
            self.starts.popleft()
        if len(self.starts) > self.config.proxystack.restarts:
            log.error("proxy stack: died %d times within a minute; not restarted (egress is"
                      " refused with ENETUNREACH)", len(self.starts))
            return
        self.starts.append(now)
        if self.config.proxystack.placement == "operator":
            self._start_inprocess()
        else:
            self._spawn()

    def _spawn(self) -> None:
        argv = [sys.executable, "-m", "circuits.proxystack", "--config", self.config.path]
        # Its own session: a signal to the operator's process group (a terminal's
        # Ctrl-C, a service manager's kill) does not reach the connections it carries.
        # It may outlive us: it keeps our stderr (its log) but not our stdout, so a
        # caller reading the operator's stdout to its end is not held by the worker.
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     close_fds=True, start_new_session=True)
        self._watch(self.proc.pid)
        log.info("proxy stack: started, pid %d", self.proc.pid)

    def _watch(self, pid: int) -> bool:
        """Be told when `pid` exits (a pidfd works for a process we did not start)."""
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        self.worker = pid
        self.loop.add_reader(self._pidfd, self._exited)
        return True

    def _start_inprocess(self) -> None:
        # Imported here, not at the top: the operator depends on the proxy stack's
        # modules only when it runs the stack itself.
        from circuits.proxystack import inprocess

        mine, its = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:  # its first step (HELLO) runs on the loop's next turn, once `mine` is served
            self.inprocess = inprocess.start(self.config, self.loop, its, self._ended)
        except OSError as e:  # e.g. host_netns does not exist: as a worker failing to start
            mine.close()
            its.close()
            self._ended(f"cannot start: {e}")
            return
        mine.setblocking(False)
        self.attach(mine)
        log.info("proxy stack: serving in the operator's process")

    def _ended(self, why: str) -> None:
        self.inprocess = None
        if not self._stopping:
            log.error("proxy stack (in the operator) ended: %s; starting it again", why)
            self.loop.call_later(0.2, self.start)

    def _exited(self) -> None:
        self._forget_pidfd()
        self.worker = None
        code = self.proc.wait() if self.proc and self.proc.poll() is not None else None
        self.proc = None
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
        """The process serving the proxy stack: the worker's, or ours when in process."""
        if self.inprocess is not None:
            return os.getpid()
        return self.worker

    def stop(self) -> None:
        """The operator stops: an in-process stack ends with it (its connections
        are reset); a worker is left running with its connections, and waits
        for the next operator (docs/proxystack.md, "Running it")."""
        self._stopping = True
        self._forget_pidfd()
        if self.inprocess is not None:
            self.inprocess.stop()
            self.inprocess = None
        elif self.worker is not None:
            log.info("proxy stack: left running, pid %d", self.worker)

    def shut_down(self) -> str:
        """Stop the proxy stack for good (`circuits ctl stop-proxystack`): its
        connections are reset, and it is not started again until the operator
        restarts.  A worker is told with SIGTERM; its exit is watched as ever."""
        self._stopping = True
        if self.inprocess is not None:
            self.inprocess.stop()
            self.inprocess = None
            return "stopped the proxy stack in the operator"
        if self.worker is None or self._pidfd < 0:
            return "no proxy stack was running"
        try:
            signal.pidfd_send_signal(self._pidfd, signal.SIGTERM)
        except ProcessLookupError:
            pass
        return f"stopping the proxy stack worker, pid {self.worker}"


def worker_pid(pidfile: str) -> int | None:
    """The pid of the worker holding `pidfile` locked; None if no worker lives."""
    try:
        fd = os.open(pidfile, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: the worker writes its pid right after locking
            for _ in range(100):  # so this waits only when one is starting at this moment
                text = os.pread(fd, 32, 0).strip()
                if text:
                    return int(text) if text.isdigit() else None
                time.sleep(0.01)
            return None
        return None  # we got the lock: nobody holds it (closing the fd lets it go)
    finally:
        os.close(fd)


def stop_worker(pidfile: str, timeout: float = STOP_GRACE) -> int | None:
    """Stop the worker for good (SIGTERM: it resets its connections), SIGKILL
    after `timeout`; its pid, or None if none ran.  Returns once it is gone."""
    pid = worker_pid(pidfile)
    if pid is None:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return pid
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if not select.select([pidfd], [], [], timeout)[0]:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], timeout)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)
    return pid
