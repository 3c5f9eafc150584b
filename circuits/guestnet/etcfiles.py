"""A guest's own /etc/resolv.conf and /etc/hosts, in a private mount namespace.

`circuits run --guest NAME` calls ``give_guest_files`` for a guest with a
resolver (docs/policy.md, "Resolver") before it drops its capabilities, as
`ip netns exec` bind-mounts /etc/netns/NAME/*: the process gets a mount
namespace of its own (mounts propagate from the host into it, never out),
and there each generated file is bind-mounted, read-only, over the host's.
The host's files are never written.  The generated files live on a tmpfs
of this mount namespace, detached once bound: they last as long as a mount
holds them, and nothing is left behind on disk.

resolv.conf names the loopback addresses of the guest's DNS relay
(circuits/dnsrelay.py), which sends each query through a datagram circuit
to the guest's resolvers: through the proxy stack, where a UDP rule for
port 53 allows it.  hosts is the host's
/etc/hosts with the guests' names appended (`circuits ctl hosts`).
"""
from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_SLAVE = 1, 32, 4096, 16384, 1 << 19
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, flags: int, what: str, fstype: str | None = None):
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, flags, None), what)


def resolv_conf(guest, nameservers: list[str]) -> str:
    """The resolv.conf text for a guest: the relay's addresses, one per resolver."""
    lines = [f"# circuits: guest {guest.name}'s resolvers "
             f"{', '.join(map(str, guest.resolvers))}, through its DNS relay (docs/policy.md)"]
    lines += [f"nameserver {a}" for a in nameservers]
    return "\n".join(lines) + "\n"


def guest_hosts(guests_lines: str, host_hosts: str = "/etc/hosts") -> str:
    """The host's /etc/hosts (localhost and the like), then `guests_lines`
    (the guests' names: what `circuits ctl hosts` prints)."""
    try:
        base = Path(host_hosts).read_text()
    except OSError:
        base = "127.0.0.1\tlocalhost\n::1\tlocalhost\n"
    return base.rstrip("\n") + "\n" + guests_lines


def _bind_files(files: dict[str, str]) -> None:
    """Bind a read-only file holding each text over its target (which must exist).

    The files are written to a tmpfs mounted, in this mount namespace only,
    on a fresh empty directory; the tmpfs is detached and the directory
    removed once the binds hold the files, so nothing stays on the host."""
    for target in files:
        if not os.path.isfile(target):
            raise OSError(2, f"{target} is not a file here: there is nothing to bind over")
    scratch = tempfile.mkdtemp(prefix="circuits-etc-")
    mounted = False
    try:
        _mount("tmpfs", scratch, 0, "a tmpfs for the generated files", fstype="tmpfs")
        mounted = True
        for target, text in files.items():
            source = os.path.join(scratch, os.path.basename(target))
            Path(source).write_text(text)
            os.chmod(source, 0o644)
            _mount(source, target, MS_BIND, f"binding over {target}")
            _mount(None, target, MS_BIND | MS_REMOUNT | MS_RDONLY, f"making {target} read-only")
    finally:
        # Also when a bind failed: detached first, the directory can go, and
        # the error that matters is the one raised above, not an EBUSY here.
        if mounted:
            _libc.umount2(scratch.encode(), MNT_DETACH)
        os.rmdir(scratch)


def give_guest_files(guest, nameservers: list[str], guests_lines: str) -> None:
    """This process (about to exec the guest's program) sees the guest's own
    resolv.conf and hosts (with `guests_lines` added); the host's stay as
    they are.  Needs CAP_SYS_ADMIN."""
    _check(_libc.unshare(CLONE_NEWNS), "a mount namespace of its own (unshare)")
    _mount(None, "/", MS_REC | MS_SLAVE, "keeping its mounts from the host's (make-rslave /)")
    _bind_files({"/etc/resolv.conf": resolv_conf(guest, nameservers),
                 "/etc/hosts": guest_hosts(guests_lines)})
