"""What this operator created, and removing it: never anything else.

A state file (``guestnet.json`` beside the operator's admin socket) lists
every namespace and host table made for this operator, each with a marker:
"circuits <random token> <state file>".  The same marker is put on the
thing itself (a namespace's loopback alias, a table's ``owner`` object), so
a thing is removed only when the state file lists it AND it still carries
that marker.  A look-alike (a namespace named circuits-NAME made by hand, a
table named like ours, a namespace that was ours, removed and made again by
someone) has no such marker and survives.

Entries are written before the thing is made, so a crash in between leaves
an entry whose thing does not exist (dropped at the next sweep), never a
thing nobody knows of.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
from typing import Iterator

from circuits.guestnet import namespace, nft
from circuits.guestnet.errors import GuestNetError

log = logging.getLogger("circuits.guestnet")
EMPTY = {"version": 1, "namespaces": {}, "tables": []}


class Owned:
    """The state file; every change happens under an exclusive lock."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> dict:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return json.loads(json.dumps(EMPTY))
        except (OSError, ValueError) as e:
            raise GuestNetError(f"cannot read the state file {self.path}: {e}") from None
        return {**json.loads(json.dumps(EMPTY)), **data}

    @contextlib.contextmanager
    def edit(self) -> Iterator[dict]:
        """Yield the state to change; it is written back (atomically) on exit."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.read()
            try:
                yield data
            finally:  # what was recorded before an error must stay recorded
                tmp = f"{self.path}.{os.getpid()}.tmp"
                with open(tmp, "w") as f:
                    json.dump(data, f, indent=1)
                os.replace(tmp, self.path)

    def new_marker(self) -> str:
        return f"circuits {secrets.token_hex(8)} {self.path}"[:120]

    def netns_marker(self, name: str) -> str | None:
        """The marker recorded for a namespace, None if it is not ours."""
        entry = self.read()["namespaces"].get(name)
        return entry["marker"] if entry else None


def is_ours(name: str, marker: str | None) -> bool:
    """Does namespace `name` exist and carry this marker?"""
    return marker is not None and namespace.marker(name) == marker


def remove_netns(state: dict, name: str) -> str:
    """Remove a recorded namespace if it is still ours; forget it either way.
    Returns what was done, in words."""
    entry = state["namespaces"].pop(name, None)
    if not namespace.exists(name):
        return f"network namespace {name}: already gone"
    if entry is None:
        return f"network namespace {name}: not made by circuits, left alone"
    if not is_ours(name, entry["marker"]):
        log.warning("network namespace %s is not ours any more (its marker differs): kept", name)
        return f"network namespace {name}: not ours any more, kept"
    namespace.remove(name)
    return f"network namespace {name}: removed"


def remove_table(state: dict, entry: dict) -> str:
    """Remove a recorded table if it still carries our marker; forget it either way."""
    state["tables"] = [t for t in state["tables"] if t != entry]
    where, family, name = entry["netns"], entry["family"], entry["name"]
    label = f"nftables table {family} {name} in {where or 'the host namespace'}"
    if where and not namespace.exists(where):
        return f"{label}: its namespace is gone"
    items = nft.read_table(family, name, where)
    if items is None:
        return f"{label}: already gone"
    if nft.marker_of(items) != entry["marker"]:
        log.warning("%s is not ours (its marker differs): kept", label)
        return f"{label}: not ours, kept"
    nft.delete_table(family, name, where)
    return f"{label}: removed"


def sweep(owned: Owned) -> list[str]:
    """Remove everything the state file lists that still carries its marker
    (what an operator that died left behind); returns what was done."""
    done = []
    with owned.edit() as state:
        for entry in list(state["tables"]):
            done.append(remove_table(state, entry))
        for name in list(state["namespaces"]):
            done.append(remove_netns(state, name))
    return done
