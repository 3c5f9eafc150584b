"""All of it for a set of guests: what the operator and the CLI call.

``up``/``down``/``status`` act on one guest; ``GuestNetwork`` brings up the
namespaced guests of one operator and its host table, checks them for
drift, reads their counters, and removes all it made.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from circuits.guestnet import drift, hosttable, namespace, ruleset
from circuits.guestnet.errors import GuestNetError, require_root
from circuits.guestnet.namespace import ns_name
from circuits.guestnet.ownership import Owned, is_ours, remove_netns, remove_table, sweep


@dataclass(frozen=True)
class GuestSpec:
    """What this layer needs to know of a guest."""

    name: str
    netns: bool  # lives in its own network namespace
    mark: int  # SO_MARK of the proxy stack's sockets for it
    egress_rate: int = 0  # bytes per second; 0: no limit


@dataclass
class GuestStatus:
    name: str
    netns: bool  # its namespace exists and is ours
    ruleset_ok: bool
    interfaces: list[str] = field(default_factory=list)
    dropped: int = 0  # packets, all chains together
    problems: list[str] = field(default_factory=list)


def up(owned: Owned, guest: str) -> str:
    """Make the guest's namespace and ruleset, or repair the ruleset of the
    one we made before.  Returns what was done."""
    require_root(f"bringing up guest {guest}")
    name = ns_name(guest)
    marker = owned.netns_marker(name)
    if marker and is_ours(name, marker):
        ruleset.install(name, marker)
        return f"guest {guest}: namespace {name} was up; its ruleset is installed again"
    with owned.edit() as state:
        if name in state["namespaces"]:
            remove_netns(state, name)  # ours and gone, or not ours any more (kept)
        marker = owned.new_marker()
        state["namespaces"][name] = {"guest": guest, "marker": marker}
    try:
        namespace.create(name, marker)
        ruleset.install(name, marker)
    except BaseException:
        with owned.edit() as state:
            remove_netns(state, name)
        raise
    return f"guest {guest}: namespace {name} is up"


def down(owned: Owned, guest: str) -> str:
    """Remove the guest's namespace (with its ruleset) if we made it."""
    require_root(f"bringing down guest {guest}")
    with owned.edit() as state:
        return remove_netns(state, ns_name(guest))


def status(owned: Owned, guest: str) -> GuestStatus:
    """The guest's namespace as it is now."""
    name = ns_name(guest)
    marker = owned.netns_marker(name)
    if not (marker and is_ours(name, marker)):
        return GuestStatus(guest, False, False, problems=drift.guest_problems(guest, marker))
    problems = drift.guest_problems(guest, marker)
    return GuestStatus(guest, True, not ruleset.problems(name, marker),
                       [i.name for i in namespace.interfaces(name)],
                       sum(ruleset.dropped(name).values()), problems)


class GuestNetwork:
    """The namespaced guests and the host table of one operator."""

    def __init__(self, state_path: str, host_netns: str | None, guests: list[GuestSpec]):
        self.owned = Owned(state_path)
        self.host_netns = host_netns or None
        self.guests = guests
        self.egress_lines = [hosttable.Egress(g.name, g.mark, g.egress_rate) for g in guests]
        self.host_marker: str | None = None

    @property
    def namespaced(self) -> list[str]:
        return [g.name for g in self.guests if g.netns]

    @property
    def needs_host_table(self) -> bool:
        """Only an operator that manages guests' networking touches nftables."""
        return any(g.netns or g.egress_rate for g in self.guests)

    def start(self) -> list[str]:
        """Remove what an earlier operator left, then bring everything up;
        on failure, remove what was made and raise."""
        if not (self.needs_host_table or self._owns_anything()):
            return []  # no nftables, no namespaces, no root needed
        require_root("an operator with namespaced guests or egress limits")
        done = sweep(self.owned)
        if not self.needs_host_table:
            return done
        try:
            done += [up(self.owned, g) for g in self.namespaced]
            done.append(self._install_host_table())
        except BaseException:
            self.stop()
            raise
        return done

    def _owns_anything(self) -> bool:
        state = self.owned.read()
        return bool(state["namespaces"] or state["tables"])

    def _install_host_table(self) -> str:
        marker = self.owned.new_marker()
        entry = {"netns": self.host_netns, "family": hosttable.FAMILY,
                 "name": hosttable.TABLE, "marker": marker}
        with self.owned.edit() as state:
            state["tables"].append(entry)
        try:
            hosttable.install(self.host_netns, self.egress_lines, marker)
        except BaseException:
            with self.owned.edit() as state:
                remove_table(state, entry)
            raise
        self.host_marker = marker
        return f"host table {hosttable.FAMILY} {hosttable.TABLE} is up"

    def stop(self) -> list[str]:
        """Remove every namespace and table recorded as ours."""
        self.host_marker = None
        return sweep(self.owned) if self._owns_anything() else []

    def problems(self) -> list[str]:
        """Drift, every guest's and the host table's; [] when all is as set up."""
        return [p for problems in self.drift_by_guest().values() for p in problems] + \
            self.host_problems()

    def host_problems(self) -> list[str]:
        """The host table's drift ([] when intact, or when there is no host table)."""
        if not self.host_marker:
            return []
        return hosttable.problems(self.host_netns, self.egress_lines, self.host_marker)

    def drift_by_guest(self) -> dict[str, list[str]]:
        """Each namespaced guest's drift ([] for one as set up)."""
        return {g: drift.guest_problems(g, self.owned.netns_marker(ns_name(g)))
                for g in self.namespaced}

    def dropped(self) -> dict[str, dict[str, int]]:
        """Packets each namespaced guest's ruleset dropped, by chain."""
        out = {}
        for g in self.namespaced:
            name = ns_name(g)
            out[g] = ruleset.dropped(name) if namespace.exists(name) else {}
        return out

    def egress(self) -> dict[str, hosttable.Count]:
        """Each guest's egress through the proxy stack, from the host table."""
        if not self.host_marker:
            return {}
        try:
            return hosttable.counts(self.host_netns)
        except GuestNetError:
            return {}
