"""Run code with a thread inside another network namespace.

Network namespaces belong to threads: setns(2) moves only the calling
thread, and netlink sockets (pyroute2's, libnftables') talk to the namespace
of the thread that opened them.  So code for a guest's namespace runs in a
short-lived thread that enters it first; the caller's own namespace is never
changed.  A fresh thread also has no running asyncio loop, which pyroute2's
synchronous API needs (the operator calls this from inside its loop).
"""
from __future__ import annotations

import ctypes
import os
import threading
from typing import Callable, TypeVar

from circuits.guestnet.errors import GuestNetError

T = TypeVar("T")
NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name: str) -> str:
    """Where a named namespace is bound (as `ip netns` and pyroute2 do)."""
    return os.path.join(NETNS_DIR, name)


def setns(path: str) -> None:
    """Move the calling thread into the network namespace bound at `path`,
    and check that it is there (a wrong namespace would be a silent disaster)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
        if os.stat("/proc/thread-self/ns/net").st_ino != os.fstat(fd).st_ino:
            raise GuestNetError(f"setns({path}) did not move this thread into it")
    finally:
        os.close(fd)


def within(netns: str | None, fn: Callable[..., T], *args) -> T:
    """Call fn(*args) in a thread inside the named namespace (None: the
    caller's own) and return its result, or raise what it raised."""
    result: dict[str, object] = {}

    def body() -> None:
        try:
            if netns is not None:
                setns(netns_path(netns))
            result["value"] = fn(*args)
        except BaseException as e:  # handed to the caller below
            result["error"] = e

    if netns is not None and not os.path.exists(netns_path(netns)):
        raise GuestNetError(f"network namespace {netns!r} does not exist")
    thread = threading.Thread(target=body, name=f"netns:{netns or 'own'}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]  # type: ignore[return-value]

