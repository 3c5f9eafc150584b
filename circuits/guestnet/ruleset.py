"""The ruleset inside a guest's namespace: drop and count every packet not on loopback.

Two tables, both named ``circuits``: ``inet`` (IPv4 and IPv6; input, output
and forward) and ``arp`` (input and output; loopback has no ARP).  Each
chain's policy is drop; loopback is accepted in input and output, everything
else goes through a named counter and is dropped.  A drop in any base chain
is final in nftables, so a table someone adds beside ours cannot let a
packet through.  docs/guests.md shows the ruleset as `nft list ruleset`
prints it.
"""
from __future__ import annotations

from circuits.guestnet import nft
from circuits.guestnet.errors import GuestNetError

TABLE = "circuits"
# family -> hook -> accept loopback first?
CHAINS = {"inet": {"input": "iif", "output": "oif", "forward": None},
          "arp": {"input": None, "output": None}}


def _loopback(direction: str) -> dict:
    return {"match": {"op": "==", "left": {"meta": {"key": direction}}, "right": "lo"}}


def commands(marker: str) -> list[dict]:
    """The batch that (re)makes both tables, written as nft lists them back."""
    out: list[dict] = []
    for family, chains in CHAINS.items():
        table = {"family": family, "table": TABLE}
        out.append({"add": {"table": {"family": family, "name": TABLE}}})
        out.append(nft.owner_object(family, TABLE, marker))
        for hook in chains:
            out.append({"add": {"counter": {**table, "name": f"dropped-{hook}"}}})
        for hook, lo in chains.items():
            out.append({"add": {"chain": {**table, "name": hook, "type": "filter", "hook": hook,
                                          "prio": 0, "policy": "drop"}}})
            if lo:
                out.append({"add": {"rule": {**table, "chain": hook,
                                             "expr": [_loopback(lo), {"accept": None}]}}})
            out.append({"add": {"rule": {**table, "chain": hook,
                                         "expr": [{"counter": f"dropped-{hook}"}, {"drop": None}]}}})
    return out


def expected(marker: str) -> dict[str, list[dict]]:
    """Each table's canonical shape, by family, as it must stay."""
    by_family: dict[str, list[dict]] = {}
    for command in commands(marker):
        (kind, body), = command["add"].items()
        by_family.setdefault(body["family"], []).append({kind: dict(body)})
    return {f: nft.canonical(v) for f, v in by_family.items()}


def install(netns: str, marker: str) -> None:
    """Make (or remake) both tables in one atomic batch, then check they
    read back exactly as meant."""
    present = set(nft.list_tables(netns))
    drop = [{"delete": {"table": {"family": f, "name": TABLE}}}
            for f in CHAINS if (f, TABLE) in present]
    nft.run(drop + commands(marker), netns)
    if wrong := problems(netns, marker):
        raise GuestNetError(f"the ruleset in {netns} did not read back as installed: {wrong}")


def problems(netns: str, marker: str) -> list[str]:
    """What differs from the installed ruleset, in words; [] when intact."""
    out = []
    tables = nft.list_tables(netns)
    want = expected(marker)
    if gone := [f"{family} {TABLE}" for family in CHAINS if (family, TABLE) not in tables]:
        out.append(f"its nftables ruleset was flushed or deleted: table {' and '.join(gone)}"
                   f" {'is' if len(gone) == 1 else 'are'} gone")
    for family in CHAINS:
        if (family, TABLE) not in tables:
            continue
        items = nft.read_table(family, TABLE, netns) or []
        if nft.canonical(items) != want[family]:
            out.append(f"its nftables table {family} {TABLE} was changed"
                       f" ({_summary(items)} instead of {_summary_canon(want[family])})")
    for family, name in tables:
        if name != TABLE or family not in CHAINS:
            out.append(f"an nftables table {family} {name} was added")
    return out


def _summary(items: list[dict]) -> str:
    return _summary_canon(nft.shape(items))


def _summary_canon(items: list[dict]) -> str:
    chains = sum("chain" in i for i in items)
    rules = sum("rule" in i for i in items)
    return f"{chains} chains, {rules} rules"


def dropped(netns: str) -> dict[str, int]:
    """Packets dropped so far, by chain ("input", "output", "forward",
    "arp-input", "arp-output"); chains whose table is gone are left out."""
    out = {}
    for family in CHAINS:
        items = nft.read_table(family, TABLE, netns)
        for name, counter in nft.objects(items or [], "counter").items():
            if name.startswith("dropped-"):
                hook = name.removeprefix("dropped-")
                out[hook if family == "inet" else f"{family}-{hook}"] = counter["packets"]
    return out
