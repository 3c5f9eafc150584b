"""The host-side table: per-guest egress bytes and rate limits, keyed by SO_MARK.

The proxy stack sends on a guest's behalf from host sockets marked with the
guest's SO_MARK.  Table ``inet circuits`` in the host's namespace (or the
one the operator is told to use) has one output chain: for each guest, a
rule that drops what goes over the guest's egress rate (counted in
``limited-NAME``), then a rule that counts what goes out (``egress-NAME``).
Counters count IP packets and their bytes, headers included.
"""
from __future__ import annotations

from dataclasses import dataclass

from circuits.guestnet import nft
from circuits.guestnet.errors import GuestNetError

FAMILY, TABLE, CHAIN = "inet", "circuits", "egress"


@dataclass(frozen=True)
class Egress:
    """One guest's line in the table."""

    guest: str
    mark: int  # the SO_MARK the proxy stack puts on this guest's sockets
    rate: int = 0  # bytes per second; 0: no limit


@dataclass(frozen=True)
class Count:
    packets: int
    bytes: int
    limited_packets: int  # dropped for going over the rate
    limited_bytes: int


def _mark_is(mark: int) -> dict:
    return {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": mark}}


def commands(guests: list[Egress], marker: str) -> list[dict]:
    """The batch that makes the table, written as nft lists it back."""
    t = {"family": FAMILY, "table": TABLE}
    out: list[dict] = [{"add": {"table": {"family": FAMILY, "name": TABLE}}},
                       nft.owner_object(FAMILY, TABLE, marker)]
    for g in guests:
        out.append({"add": {"counter": {**t, "name": f"egress-{g.guest}"}}})
        if g.rate:
            out.append({"add": {"counter": {**t, "name": f"limited-{g.guest}"}}})
            out.append({"add": {"limit": {**t, "name": f"rate-{g.guest}", "rate": g.rate,
                                          "per": "second", "rate_unit": "bytes", "inv": True}}})
    out.append({"add": {"chain": {**t, "name": CHAIN, "type": "filter", "hook": "output",
                                  "prio": 0, "policy": "accept"}}})
    for g in guests:
        if g.rate:
            out.append({"add": {"rule": {**t, "chain": CHAIN, "expr": [
                _mark_is(g.mark), {"limit": f"rate-{g.guest}"},
                {"counter": f"limited-{g.guest}"}, {"drop": None}]}}})
        out.append({"add": {"rule": {**t, "chain": CHAIN, "expr": [
            _mark_is(g.mark), {"counter": f"egress-{g.guest}"}]}}})
    return out


def expected(guests: list[Egress], marker: str) -> list[dict]:
    return nft.canonical([{k: dict(v)} for c in commands(guests, marker)
                          for k, v in c["add"].items()])


def read(netns: str | None) -> list[dict] | None:
    """The table's items, None if there is no such table."""
    return nft.read_table(FAMILY, TABLE, netns)


def install(netns: str | None, guests: list[Egress], marker: str) -> None:
    """Make the table; GuestNetError if a table of that name is there already
    (the caller removes its own leftovers first, never someone else's)."""
    if (FAMILY, TABLE) in nft.list_tables(netns):
        raise GuestNetError(f"an nftables table {FAMILY} {TABLE} already exists in"
                            f" {_where(netns)} and is not this operator's; remove it"
                            f" (nft delete table {FAMILY} {TABLE}) or set [operator] host_netns")
    nft.run(commands(guests, marker), netns)
    if wrong := problems(netns, guests, marker):
        raise GuestNetError(f"the host table did not read back as installed: {wrong}")


def problems(netns: str | None, guests: list[Egress], marker: str) -> list[str]:
    """What differs from the installed table, in words; [] when intact."""
    items = read(netns)
    if items is None:
        return [f"the host table {FAMILY} {TABLE} in {_where(netns)} is gone (ruleset flushed?)"]
    if nft.canonical(items) != expected(guests, marker):
        return [f"the host table {FAMILY} {TABLE} in {_where(netns)} was changed"]
    return []


def counts(netns: str | None) -> dict[str, Count]:
    """Each guest's egress so far; guests whose counters are gone are left out."""
    counters = nft.objects(read(netns) or [], "counter")
    out = {}
    for name, c in counters.items():
        if name.startswith("egress-"):
            guest = name.removeprefix("egress-")
            lim = counters.get(f"limited-{guest}", {})
            out[guest] = Count(c["packets"], c["bytes"], lim.get("packets", 0), lim.get("bytes", 0))
    return out


def _where(netns: str | None) -> str:
    return f"network namespace {netns}" if netns else "the host's network namespace"
