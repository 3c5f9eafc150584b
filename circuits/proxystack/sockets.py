"""Where the proxy stack's host sockets are made: in `[operator] host_netns`.

A socket belongs for life to the network namespace its creating thread was
in, so only socket() has to happen there.  The worker moves its one thread
into the namespace once, at start.  Inside the operator (placement =
"operator") the thread must stay in the operator's own namespace, so each
socket is made after a switch into host_netns and a switch back (two setns
calls, a few microseconds, per connection; never across an await).
"""
from __future__ import annotations

import ctypes
import os
import socket

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class HostSockets:
    """A socket factory for one namespace (None: the caller's own)."""

    def __init__(self, netns_path: str | None = None):
        self._there = self._home = -1
        if netns_path is not None:
            self._there = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def socket(self, family: int, kind: int) -> socket.socket:
        """A new socket in the namespace; the thread comes back home even on error."""
        if self._there < 0:
            return socket.socket(family, kind)
        _setns(self._there)
        try:
            return socket.socket(family, kind)
        finally:
            _setns(self._home)  # a failure here would leave the operator elsewhere: let it raise

    def close(self) -> None:
        for fd in (self._there, self._home):
            if fd >= 0:
                os.close(fd)
        self._there = self._home = -1


PLAIN = HostSockets()  # the worker's: its whole thread is in host_netns already
