"""JSON commands to libnftables, in a given network namespace.

Every call opens a fresh libnftables context inside a thread that entered
the namespace (see ``within``), so its netlink socket is the namespace's.
"""
from __future__ import annotations

from circuits.guestnet.errors import GuestNetError
from circuits.guestnet.within import within

# What a listing says that is not part of the ruleset's shape: handles, and the
# values of counters (which change with traffic).
VOLATILE = ("handle", "packets", "bytes")


def _run(commands: list[dict]) -> list[dict]:
    import nftables  # the binding loads libnftables.so.1: only where needed

    ctx = nftables.Nftables()
    ctx.set_handle_output(False)
    rc, out, err = ctx.json_cmd({"nftables": commands})
    if rc != 0:
        raise GuestNetError(f"nftables refused: {err.strip() or f'error {rc}'}")
    return out.get("nftables", []) if isinstance(out, dict) else []


def run(commands: list[dict], netns: str | None) -> list[dict]:
    """Run a batch (atomic: all or nothing) in `netns`; return its output items."""
    return within(netns, _run, commands)


def list_tables(netns: str | None) -> list[tuple[str, str]]:
    """(family, name) of every table in the namespace."""
    items = run([{"list": {"tables": None}}], netns)
    return [(i["table"]["family"], i["table"]["name"]) for i in items if "table" in i]


def read_table(family: str, name: str, netns: str | None) -> list[dict] | None:
    """The items of one table (the table, its objects, chains and rules, in
    nft's order), or None when there is no such table."""
    if (family, name) not in list_tables(netns):
        return None
    items = run([{"list": {"table": {"family": family, "name": name}}}], netns)
    return [i for i in items if "metainfo" not in i]


def shape(items: list[dict]) -> list[dict]:
    """Items without handles and counter values: what must stay as installed."""
    out = []
    for item in items:
        (kind, body), = item.items()
        out.append({kind: {k: v for k, v in body.items() if k not in VOLATILE}})
    return out


def objects(items: list[dict], kind: str) -> dict[str, dict]:
    """Named objects of one kind (counter, limit) by name."""
    return {i[kind]["name"]: i[kind] for i in items if kind in i}


def delete_table(family: str, name: str, netns: str | None) -> None:
    run([{"delete": {"table": {"family": family, "name": name}}}], netns)


# Ownership: libnftables 1.0.6 neither takes nor shows a table's comment in
# JSON, so each table we make holds a named counter "owner" whose comment is
# the marker (docs/guests.md, "Ownership").
OWNER = "owner"


def owner_object(family: str, table: str, marker: str) -> dict:
    """The command adding a table's owner marker."""
    return {"add": {"counter": {"family": family, "table": table, "name": OWNER,
                                "comment": marker}}}


def marker_of(items: list[dict] | None) -> str | None:
    """The marker in a table's items, or None (no table, or not marked)."""
    if not items:
        return None
    return objects(items, "counter").get(OWNER, {}).get("comment")


UNITS = {"bytes": 1, "kbytes": 1 << 10, "mbytes": 1 << 20}


def canonical(items: list[dict]) -> list[dict]:
    """A table's shape in one order whatever nft's listing order: the table,
    its objects by kind and name, its chains by name, each chain's rules in
    order.  Limits are given in bytes (nft shows 1048576 bytes as 1 mbytes)."""
    items = shape(items)

    def key(item: dict) -> tuple:
        (kind, body), = item.items()
        rank = {"table": 0, "counter": 1, "limit": 1, "chain": 2, "rule": 3}.get(kind, 4)
        return (body.get("family", ""), body.get("table", body.get("name")), rank,
                kind if rank == 1 else "", body.get("chain", body.get("name", "")))

    for item in items:
        if "limit" in item:
            body = item["limit"]
            for field in ("rate", "burst"):
                if f"{field}_unit" in body:
                    body[field] *= UNITS[body.pop(f"{field}_unit")]
    return sorted(items, key=key)  # stable: rules keep their order within a chain
