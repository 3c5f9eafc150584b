"""Guests that have no network but circuits: network namespaces and nftables.

A namespaced guest lives in its own network namespace (``circuits-NAME``)
that holds loopback only, with an nftables ruleset that drops and counts
every packet not on loopback.  On the host side one nftables table counts
and limits the egress that the proxy stack sends on each guest's behalf
(sockets marked with the guest's SO_MARK).  docs/guests.md explains the
model; this layer knows nothing of the operator, which uses it.

One idea per module:

- ``errors``: the one exception of this layer, and the root check;
- ``within``: run code with a thread inside another network namespace;
- ``nft``: JSON commands to libnftables, in a given namespace;
- ``namespace``: create, remove and look into a guest's namespace;
- ``ruleset``: the guest's in-namespace ruleset;
- ``hosttable``: the host-side egress table;
- ``ownership``: what was created here (a state file and markers), and sweeping it;
- ``drift``: what changed in a guest's namespace since it was set up;
- ``enter``: run a program inside a guest's namespace with capabilities dropped;
- ``network``: all of it for a set of guests (what the operator and CLI call).
"""
from circuits.guestnet.errors import GuestNetError

__all__ = ["GuestNetError"]
