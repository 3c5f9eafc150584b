"""Run a program inside a guest's namespace, with the capabilities that
reach the network or leave the namespace dropped.

Dropped from the bounding, permitted, effective, inheritable and ambient
sets, so no program the guest runs gets them back (no_new_privs is set too,
so neither setuid binaries nor file capabilities give them back):

- CAP_NET_RAW: raw and packet sockets (AF_PACKET bypasses nftables);
- CAP_NET_ADMIN: adding links or addresses, changing or flushing the ruleset;
- CAP_SYS_ADMIN: setns(2) back to the host's network, unshare, mount;
- CAP_SYS_PTRACE: driving a host process that has the host's network;
- CAP_SYS_MODULE, CAP_BPF: kernel code that could see or send packets.

The guest keeps its user id and the other capabilities: this confines its
network, not everything else (docs/guests.md, "What the guest keeps").
"""
from __future__ import annotations

import ctypes
import os
import subprocess

from circuits.guestnet.within import netns_path, setns

DROPPED = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_MODULE": 16,
           "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_BPF": 39}
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
CAPABILITY_VERSION_3 = 0x20080522
_libc = ctypes.CDLL(None, use_errno=True)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def drop_capabilities(caps: list[int]) -> None:
    """Drop `caps` from every capability set of this process."""
    for cap in caps:
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
            _check(-1, f"dropping capability {cap} from the bounding set")  # EINVAL: unknown cap
    header, data = _Header(CAPABILITY_VERSION_3, 0), (_Data * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    for cap in caps:
        word, bit = divmod(cap, 32)
        for field in ("effective", "permitted", "inheritable"):
            setattr(data[word], field, getattr(data[word], field) & ~(1 << bit))
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clearing ambient caps")


def confine(netns: str) -> None:
    """Move this process into `netns` and give up the network's capabilities.
    Only for a process about to exec (a child, or `circuits run`)."""
    setns(netns_path(netns))
    drop_capabilities(list(DROPPED.values()))
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "setting no_new_privs")


def popen(netns: str, argv: list[str], **kwargs) -> subprocess.Popen:
    """Start argv as a child confined to `netns` (kwargs as for Popen)."""
    return subprocess.Popen(argv, preexec_fn=lambda: confine(netns), **kwargs)
