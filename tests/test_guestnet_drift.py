"""Drift: a veth added by hand and a flushed ruleset are reported by
`circuits ctl status`, the metrics and `circuits guest list`, naming the guest."""
from __future__ import annotations

import re

from guestnet_fixtures import netop, requires_netns, scratch_ns, sh  # noqa: F401

pytestmark = requires_netns


def metric(text: str, name: str, **labels) -> float | None:
    lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^circuits_{name}\{{{re.escape(lab)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_no_drift_after_start(netop):
    out = netop.ctl("status")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "errors: 0" in out.stdout
    metrics = netop.ctl("metrics").stdout
    assert metric(metrics, "guest_drift", guest=netop.a) == 0
    assert metric(metrics, "guest_drift", guest=netop.b) == 0
    assert metric(metrics, "host_table_drift") == 0


def test_an_added_interface_and_a_flushed_ruleset_are_reported(netop):
    a, b = netop.ns(netop.a), netop.ns(netop.b)
    sh("ip", "link", "add", "cxdrift0", "netns", a, "type", "veth", "peer", "name", "cxdrift1")
    try:
        out = netop.ctl("status")
        assert out.returncode == 1
        assert f"error: guest {netop.a}: interface cxdrift0 (veth) was added to its namespace" \
            in out.stdout, out.stdout
        assert f"guest {netop.b}" not in out.stdout
        metrics = netop.ctl("metrics").stdout
        assert metric(metrics, "guest_drift", guest=netop.a) == 1
        assert metric(metrics, "guest_drift", guest=netop.b) == 0

        sh("ip", "netns", "exec", b, "nft", "flush", "ruleset")
        out = netop.ctl("status")
        assert f"error: guest {netop.b}: its nftables ruleset was flushed or deleted" in out.stdout
        assert metric(netop.ctl("metrics").stdout, "guest_drift", guest=netop.b) == 1
        listing = netop.guest("list").stdout
        row_b = next(line for line in listing.splitlines() if netop.b in line)
        assert "BROKEN" in row_b

        # a guest not as set up is not run
        run = netop.run(netop.b, "print('ran')")
        out_run, err = run.communicate(timeout=30)
        assert run.returncode != 0 and "ran" not in out_run
        assert "not as set up" in err and "flushed" in err

        # `circuits guest up` installs the ruleset again; the interface stays reported
        up = netop.guest("up", netop.b)
        assert up.returncode == 0 and "installed again" in up.stdout, up.stderr
        out = netop.ctl("status")
        assert f"guest {netop.b}" not in out.stdout
        assert f"guest {netop.a}: interface cxdrift0" in out.stdout
    finally:
        sh("ip", "-n", a, "link", "del", "cxdrift0", check=False)
    assert netop.ctl("status").returncode == 0


def test_a_changed_rule_and_a_changed_host_table_are_reported(netop):
    a = netop.ns(netop.a)
    sh("ip", "netns", "exec", a, "nft", "insert", "rule", "inet", "circuits", "output",
       "accept")
    sh("ip", "netns", "exec", netop.host_ns, "nft", "flush", "chain", "inet", "circuits",
       "egress")
    out = netop.ctl("status").stdout
    assert f"error: guest {netop.a}: its nftables table inet circuits was changed" in out
    assert "host table inet circuits" in out and "was changed" in out
    metrics = netop.ctl("metrics").stdout
    assert metric(metrics, "host_table_drift") == 1
    sh("ip", "netns", "exec", netop.host_ns, "nft", "delete", "table", "inet", "circuits")
    assert "host table inet circuits in network namespace" in netop.ctl("status").stdout


def test_dropped_packets_in_the_metrics(netop):
    a = netop.ns(netop.a)
    sh("ip", "link", "add", "cxdrop0", "netns", a, "type", "veth", "peer", "name", "cxdrop1",
       "netns", a)
    sh("ip", "-n", a, "addr", "add", "198.18.1.1/30", "dev", "cxdrop0")
    sh("ip", "-n", a, "link", "set", "cxdrop0", "up")
    # a datagram from inside the guest, towards the dummy's peer address: dropped, counted
    sh("ip", "netns", "exec", a, "python3", "-c",
       "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
       "try: s.sendto(b'x', ('198.18.1.2', 9))\nexcept OSError: pass")
    metrics = netop.ctl("metrics").stdout
    assert metric(metrics, "guest_dropped_packets", guest=netop.a, chain="output") >= 1
    assert metric(metrics, "guest_dropped_packets", guest=netop.b, chain="output") == 0
