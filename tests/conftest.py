"""Shared fixtures: real peer processes holding one end of a circuit, and a real
operator process serving test guests."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# Tests assert behaviour, not speed: no per-example deadline, which a busy
# machine (CI's, or one shared with other work) would turn into failures.
settings.register_profile("circuits", deadline=None)
settings.load_profile("circuits")

from circuits.operator import child
from circuits.ring import Circuit

PEER = Path(__file__).with_name("peer.py")


class Peer:
    """A peer process (tests/peer.py) and its stdout, read line by line."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def line(self) -> str:
        return self.proc.stdout.readline().strip()

    def expect(self, prefix: str) -> str:
        line = self.line()
        assert line.startswith(prefix), f"peer said {line!r}, expected {prefix!r}"
        return line

    def finish(self, timeout: float = 60) -> str:
        out, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, f"peer exited {self.proc.returncode}: {out}"
        return out


def spawn(role: str, inherit: list[int], **args) -> Peer:
    """Start tests/peer.py with `inherit` fds inherited and `args` as its JSON."""
    proc = subprocess.Popen(
        [sys.executable, str(PEER), role, json.dumps(args)],
        pass_fds=inherit, stdout=subprocess.PIPE, text=True)
    return Peer(proc)


def spawn_peer(role: str, ep: Circuit, **args) -> Peer:
    """Hand endpoint `ep` to a new peer process; this process gives it up."""
    spec = ep.spec
    peer = spawn(role, ep.fds(), fds=ep.fds(), kind=spec.kind, side=spec.side,
                 sizes=list(spec.sizes), **args)
    ep.detach()
    return peer


@contextlib.contextmanager
def peer_group():
    """A list to put started peers in; any still running at the end are killed.
    (A context manager too, for hypothesis tests, which cannot take fixtures.)"""
    started: list[Peer] = []
    try:
        yield started
    finally:
        for p in started:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()


@pytest.fixture
def peers():
    """Peers started by a test; any still running at its end are killed."""
    with peer_group() as started:
        yield started


OPERATOR_CONFIG = """
[operator]
control_dir = "{dir}"
admin_socket = "{dir}/admin.sock"
audit_log = "{dir}/audit.jsonl"
revoke = true
default_ring = "256 KiB"

[[guests]]
name = "web"
addresses = ["10.0.0.1", "fd00::1"]

[[guests]]
name = "db"
addresses = ["10.0.0.2", "fd00::2"]

[[guests]]
name = "batch"
addresses = ["10.0.0.3"]
[guests.limits]
setups_per_second = 20

[[guests]]
name = "tiny"
addresses = ["10.0.0.4"]
[guests.limits]
circuits = 5
memory = "4 MiB"

[[rules]]
from = "web"
to = "db"
proto = "tcp"
ports = [5432, "7000-7010"]
action = "allow"

[[rules]]
from = "batch"
to = "*"
action = "allow"

[[rules]]
from = "tiny"
to = "*"
action = "allow"
"""


@pytest.fixture
def operator(tmp_path):
    """A running operator; yields a function giving a guest's control path."""
    cfg = tmp_path / "policy.toml"
    cfg.write_text(OPERATOR_CONFIG.format(dir=tmp_path / "guests"))
    path = lambda g: str(tmp_path / "guests" / f"{g}.sock")  # noqa: E731
    path.proc, path.config = child.start(str(cfg)), cfg
    yield path
    child.stop(path.proc)
