"""The operator's side of namespaced guests: its configuration handed to the
guestnet layer, drift for status, and rows for the metrics."""
from __future__ import annotations

import logging

from circuits.guestnet.network import GuestNetwork, GuestSpec
from circuits.operator.config import Config

log = logging.getLogger("circuits.operator")


def specs(config: Config) -> list[GuestSpec]:
    return [GuestSpec(g.name, g.netns, g.mark, g.limits.egress_rate)
            for g in config.guests.values()]


def network_for(config: Config) -> GuestNetwork:
    return GuestNetwork(config.guestnet_state, config.host_netns or None, specs(config))


def start(config: Config) -> GuestNetwork:
    """Remove a dead operator's leftovers, bring up namespaced guests and the
    host table, then check for drift once (GuestNetError if it cannot)."""
    net = network_for(config)
    for line in net.start():
        log.info("guestnet: %s", line)
    for problem in net.problems():
        log.error("drift: %s", problem)
    return net


def stop(net: GuestNetwork | None) -> None:
    """Remove every namespace and table made for this operator; a failure is
    logged, not raised (the rest of the shutdown goes on)."""
    if net is None:
        return
    try:
        for line in net.stop():
            log.info("guestnet: %s", line)
    except Exception as e:  # noqa: BLE001 - logged; the next start sweeps again
        log.error("guestnet: cleanup failed, the next start retries: %s", e)


def problems(net: GuestNetwork | None) -> list[str]:
    """Drift, for `circuits ctl status`: one sentence per problem."""
    return net.problems() if net else []


def metric_families(net: GuestNetwork | None) -> list[tuple[str, str, str, list[tuple[dict, float]]]]:
    """(name, type, help, rows) for the admin socket's Prometheus text."""
    if net is None:
        return []
    drift = net.drift_by_guest()
    dropped = net.dropped()
    egress = net.egress()
    out = [
        ("guest_drift", "gauge", "1 when a namespaced guest's namespace or ruleset changed.",
         [({"guest": g}, int(bool(p))) for g, p in drift.items()]),
        ("guest_dropped_packets", "counter", "Packets a guest's ruleset dropped, by chain.",
         [({"guest": g, "chain": c}, n) for g, chains in dropped.items() for c, n in chains.items()]),
        ("guest_egress_bytes", "counter", "Bytes the proxy stack sent for a guest (IP packets).",
         [({"guest": g}, c.bytes) for g, c in egress.items()]),
        ("guest_egress_packets", "counter", "Packets the proxy stack sent for a guest.",
         [({"guest": g}, c.packets) for g, c in egress.items()]),
        ("guest_egress_limited_bytes", "counter", "Bytes dropped over a guest's egress rate.",
         [({"guest": g}, c.limited_bytes) for g, c in egress.items()]),
    ]
    if net.host_marker:
        host = net.host_problems()
        out.append(("host_table_drift", "gauge", "1 when the host table changed.",
                    [({}, int(bool(host)))]))
    return out
