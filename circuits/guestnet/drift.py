"""Drift: what changed in a namespaced guest since it was set up.

A namespaced guest must keep its namespace (ours: it carries our marker),
loopback only (up), and its ruleset exactly as installed.  Each problem is
one sentence naming the guest and what changed, for `circuits ctl status`,
the metrics and the logs.
"""
from __future__ import annotations

from circuits.guestnet import namespace, ruleset
from circuits.guestnet.namespace import ns_name


def guest_problems(guest: str, marker: str | None) -> list[str]:
    """[] when the guest's namespace is as it was set up."""
    name = ns_name(guest)
    if not namespace.exists(name):
        return [f"guest {guest}: its network namespace {name} is gone"]
    if marker is None:
        return [f"guest {guest}: the network namespace {name} was not made by circuits"]
    if namespace.marker(name) != marker:
        return [f"guest {guest}: its network namespace {name} was replaced by one that is not"
                f" the operator's"]
    out = []
    for i in namespace.interfaces(name):
        if i.name == "lo":
            if not i.up:
                out.append(f"guest {guest}: its loopback is down")
        else:
            out.append(f"guest {guest}: interface {i.name} ({i.kind or 'unknown kind'})"
                       f" was added to its namespace")
    out += [f"guest {guest}: {p}" for p in ruleset.problems(name, marker)]
    return out
