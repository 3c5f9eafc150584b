"""A guest's network namespace: created with pyroute2, loopback only.

The namespace of guest NAME is bound at /run/netns/circuits-NAME (so
`ip netns` sees it too).  Its loopback carries the owner's marker as its
alias: a marker that an admin flushing the ruleset does not remove, and
that a look-alike namespace made by someone else does not have.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from circuits.guestnet.errors import GuestNetError
from circuits.guestnet.within import netns_path, within

PREFIX = "circuits-"


@dataclass(frozen=True)
class Interface:
    name: str
    kind: str  # "loopback", "veth", "dummy", ... ("" when the kernel says none)
    up: bool


def ns_name(guest: str) -> str:
    """The namespace's name for a guest."""
    return PREFIX + guest


def exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def create(name: str, marker: str) -> None:
    """Make the namespace, bring loopback up and mark it; GuestNetError if
    the name is taken (by a namespace this caller cannot prove is its own)."""
    from pyroute2 import netns

    if exists(name):
        raise GuestNetError(f"network namespace {name} already exists and was not made by this"
                            f" operator (no marker of ours): remove it (ip netns del {name}) or"
                            f" rename the guest")
    try:
        netns.create(name)
    except OSError as e:
        if e.errno == errno.EEXIST:  # made by someone else since we looked
            raise GuestNetError(f"network namespace {name} appeared meanwhile") from None
        raise GuestNetError(f"cannot create network namespace {name}: {e}") from None
    try:
        within(name, _setup_loopback, marker)
    except BaseException:
        remove(name)
        raise


def _setup_loopback(marker: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        (lo,) = ipr.link_lookup(ifname="lo")
        ipr.link("set", index=lo, state="up", ifalias=marker)


def remove(name: str) -> None:
    """Unbind the namespace; it ends once no process is left in it."""
    from pyroute2 import netns

    try:
        netns.remove(name)
    except FileNotFoundError:
        pass


def marker(name: str) -> str | None:
    """The owner's marker on the namespace's loopback, None if it has none."""
    if not exists(name):
        return None
    return within(name, _loopback_alias)


def _loopback_alias() -> str | None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname="lo")
        if not found:
            return None
        (link,) = ipr.get_links(found[0])
        return link.get("IFLA_IFALIAS")


def interfaces(name: str) -> list[Interface]:
    """Every interface in the namespace."""
    return within(name, _interfaces)


def _interfaces() -> list[Interface]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        out = []
        for link in ipr.get_links():
            kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or ""
            if link.get("IFLA_IFNAME") == "lo" and not kind:
                kind = "loopback"
            out.append(Interface(link.get("IFLA_IFNAME"), kind, link.get("state") == "up"))
        return out
