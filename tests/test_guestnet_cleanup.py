"""Cleanup: `circuits guest down`, a clean shutdown, and kill -9 followed by a
restart remove every namespace and table circuits made, and nothing else."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from click.testing import CliRunner

from circuits.cli import main
from circuits.guestnet import namespace, nft, ruleset
from guestnet_fixtures import (netns_list, netop_stopped, requires_netns,  # noqa: F401
                               scratch_ns, sh)

pytestmark = requires_netns


def state(op) -> dict:
    return json.loads(op.state.read_text())


def ours_are_up(op) -> None:
    for g in (op.a, op.b):
        name = op.ns(g)
        assert name in netns_list()
        assert not ruleset.problems(name, state(op)["namespaces"][name]["marker"])
    assert op.ns(op.c) not in netns_list()  # a plain guest has no namespace
    assert ("inet", "circuits") in nft.list_tables(op.host_ns)


def ours_are_gone(op) -> None:
    assert not {op.ns(op.a), op.ns(op.b)} & netns_list()
    assert ("inet", "circuits") not in nft.list_tables(op.host_ns)
    assert state(op)["namespaces"] == {} and state(op)["tables"] == []


def add_lookalikes(op) -> str:
    """A namespace named like ours and a table named like ours, made by someone else."""
    foreign = f"circuits-{op.tag}-z"
    sh("ip", "netns", "add", foreign)
    sh("ip", "netns", "exec", op.host_ns, "nft", "add", "table", "ip", "circuits")
    sh("ip", "netns", "exec", op.host_ns, "nft", "add", "table", "inet", "circuits-other")
    return foreign


def lookalikes_survive(op, foreign: str) -> None:
    assert foreign in netns_list()
    tables = nft.list_tables(op.host_ns)
    assert ("ip", "circuits") in tables and ("inet", "circuits-other") in tables


def test_guest_up_list_and_down_without_an_operator(netop_stopped):
    op = netop_stopped
    up = op.guest("up", op.a)
    assert up.returncode == 0 and "is up" in up.stdout, up.stderr
    name = op.ns(op.a)
    assert name in netns_list()
    assert [i.name for i in namespace.interfaces(name)] == ["lo"]
    listing = op.guest("list").stdout
    row = next(line for line in listing.splitlines() if op.a in line)
    assert "yes" in row and "ok" in row
    again = op.guest("up", op.a)
    assert again.returncode == 0 and "installed again" in again.stdout
    down = op.guest("down", op.a)
    assert down.returncode == 0 and "removed" in down.stdout, down.stderr
    assert name not in netns_list()
    assert state(op)["namespaces"] == {}
    assert "MISSING" in next(line for line in op.guest("list").stdout.splitlines() if op.a in line)
    plain = op.guest("up", op.c)
    assert plain.returncode != 0 and "set netns = true" in plain.stderr


def test_down_keeps_a_namespace_that_someone_else_made_again(netop_stopped):
    op = netop_stopped
    name = op.ns(op.a)
    assert op.guest("up", op.a).returncode == 0
    sh("ip", "netns", "del", name)
    sh("ip", "netns", "add", name)  # same name, not ours
    down = op.guest("down", op.a)
    assert down.returncode == 0 and "not ours any more, kept" in down.stdout
    assert name in netns_list()
    up = op.guest("up", op.a)
    assert up.returncode != 0 and "was not made by this operator" in up.stderr
    assert name in netns_list()


def test_a_clean_shutdown_removes_what_it_made_and_nothing_else(netop_stopped):
    op = netop_stopped
    op.start()
    ours_are_up(op)
    foreign = add_lookalikes(op)
    op.stop()  # SIGTERM
    ours_are_gone(op)
    lookalikes_survive(op, foreign)


def test_kill9_then_restart_removes_leftovers_and_keeps_lookalikes(netop_stopped):
    op = netop_stopped
    op.start()
    before = state(op)
    op.kill9()
    ours_are_up(op)  # a killed operator leaves everything behind...
    foreign = add_lookalikes(op)
    op.start()  # ... and the next one finds it, removes it and starts afresh
    ours_are_up(op)
    after = state(op)
    for name, entry in after["namespaces"].items():
        assert entry["marker"] != before["namespaces"][name]["marker"]  # made anew
    assert len(after["tables"]) == 1
    assert nft.marker_of(nft.read_table("inet", "circuits", op.host_ns)) == \
        after["tables"][0]["marker"]
    lookalikes_survive(op, foreign)
    status = op.ctl("status")
    assert status.returncode == 0 and "errors: 0" in status.stdout, status.stdout
    op.stop()
    ours_are_gone(op)
    lookalikes_survive(op, foreign)


def test_a_lookalike_under_a_guest_name_stops_the_start_cleanly(netop_stopped):
    op = netop_stopped
    sh("ip", "netns", "add", op.ns(op.b))  # someone else's, named as guest b's would be
    out = subprocess.run([sys.executable, "-m", "circuits", "operator", "--config",
                          str(op.config)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert f"network namespace {op.ns(op.b)} already exists and was not made by this operator" \
        in out.stderr
    assert "Traceback" not in out.stderr
    assert op.ns(op.b) in netns_list()  # kept
    assert op.ns(op.a) not in netns_list()  # what this start made before failing is undone
    assert ("inet", "circuits") not in nft.list_tables(op.host_ns)


def test_without_root_the_message_is_clear(netop_stopped):
    op = netop_stopped
    readable = tempfile.mkdtemp(prefix="circuits-cfg-")  # the config, readable by nobody
    try:
        os.chmod(readable, 0o755)
        config = shutil.copy(op.config, readable)
        os.chmod(config, 0o644)
        runner = CliRunner()
        os.seteuid(65534)
        try:
            listed = runner.invoke(main, ["guest", "list", "--config", config])
            up = runner.invoke(main, ["guest", "up", op.a, "--config", config])
        finally:
            os.seteuid(0)
    finally:
        shutil.rmtree(readable)
    for result in (listed, up):
        assert result.exit_code == 1, result.output
        assert "needs root" in result.output
        assert result.exc_info is None or result.exc_info[0] is SystemExit
