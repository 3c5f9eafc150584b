"""Fixtures for the guestnet tests: real namespaces, rulesets and operators,
each under a unique name and removed at the end even when a test fails.

Traffic in these tests stays on loopback or inside namespaces the tests make
themselves (a "host" scratch namespace stands in for the host, so the real
host's ruleset is never touched).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from circuits.operator import child
from circuits.operator.admin import request


def _why_not() -> str:
    """Why these tests cannot run here ("" when they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and nftables)"
    if not os.path.exists("/proc/self/ns/net"):
        return "the kernel has no network namespaces"
    try:
        import nftables

        nftables.Nftables()
    except (ImportError, OSError) as e:
        return f"libnftables cannot be loaded ({e})"
    return ""


WHY_NOT = _why_not()
requires_netns = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT or "ok")


def tag() -> str:
    """A unique, short, valid guest-name prefix for one test."""
    return "t" + secrets.token_hex(3)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """An admin's command (ip, nft), as a person would type it."""
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {out.stderr}")
    return out


def netns_list() -> set[str]:
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


def remove_netns_named(prefix: str) -> None:
    """Test cleanup: every namespace whose name starts with prefix."""
    for name in netns_list():
        if name.startswith(prefix):
            sh("ip", "netns", "del", name, check=False)


def circuits_cmd(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "circuits", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "250"}, **kw)


@pytest.fixture
def scratch_ns():
    """A namespace standing in for the host (loopback up); removed at the end."""
    name = f"cxt-{tag()}-host"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


GUESTS_CONFIG = """
[operator]
control_dir = "{dir}"
admin_socket = "{dir}/admin.sock"
host_netns = "{host}"

[[guests]]
name = "{a}"
addresses = ["192.0.2.1"]
netns = true
[guests.limits]
egress_rate = "1 MiB/s"

[[guests]]
name = "{b}"
addresses = ["192.0.2.2"]
netns = true

[[guests]]
name = "{c}"
addresses = ["192.0.2.3"]

[[rules]]
from = "{a}"
to = "{b}"
proto = "tcp"
action = "allow"
"""


# The same guests without limits, for the unmodified programs of
# tests/test_preload_apps.py: a (the client) may reach b (the server).
APPS_CONFIG = GUESTS_CONFIG.replace('[guests.limits]\negress_rate = "1 MiB/s"\n', "")
assert APPS_CONFIG != GUESTS_CONFIG


class NetOperator:
    """An operator serving two namespaced guests (a, b) and, with the default
    template, a plain one (c)."""

    def __init__(self, root: Path, host_ns: str, template: str = GUESTS_CONFIG):
        self.tag = tag()
        self.a, self.b, self.c = f"{self.tag}-a", f"{self.tag}-b", f"{self.tag}-c"
        self.host_ns = host_ns
        self.dir = root / "run"
        self.config = root / "guests.toml"
        self.config.write_text(template.format(dir=self.dir, host=host_ns, a=self.a,
                                               b=self.b, c=self.c))
        self.state = self.dir / "guestnet.json"
        self.proc = None

    def ns(self, guest: str) -> str:
        return f"circuits-{guest}"

    def start(self) -> None:
        """Start the operator and wait until it answers on its admin socket
        (after a kill -9 the old control sockets are still there: child.start
        alone may return before the new operator has set anything up)."""
        self.proc = child.start(str(self.config))
        deadline = time.monotonic() + 30
        while True:
            try:
                if request(str(self.dir / "admin.sock"), "status")["ok"]:
                    return
            except OSError:
                pass
            assert self.proc.poll() is None, "the operator exited"
            assert time.monotonic() < deadline, "the operator did not answer"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            child.stop(self.proc)
            self.proc = None

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return circuits_cmd("ctl", "--config", str(self.config), *args)

    def guest(self, *args: str) -> subprocess.CompletedProcess:
        return circuits_cmd("guest", *args, "--config", str(self.config))

    def run(self, guest: str, code: str, **kw) -> subprocess.Popen:
        """`circuits run --guest GUEST -- python -c CODE`, stdout piped."""
        return subprocess.Popen([sys.executable, "-m", "circuits", "run", "--guest", guest,
                                 "--config", str(self.config), "--", sys.executable, "-c", code],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)

    def cleanup(self) -> None:
        """Whatever a failed test left: the operator, then every namespace of this tag."""
        self.stop()
        remove_netns_named(f"circuits-{self.tag}")


@contextlib.contextmanager
def running(op: NetOperator):
    """op started; all of it (operator, namespaces) removed at the end."""
    try:
        op.start()
        yield op
    finally:
        op.cleanup()


@pytest.fixture
def netop(tmp_path, scratch_ns):
    """A running operator with namespaced guests; all of it removed at the end."""
    with running(NetOperator(tmp_path, scratch_ns)) as op:
        yield op


@pytest.fixture
def netop_stopped(tmp_path, scratch_ns):
    """The same, not started (for tests of start and stop)."""
    op = NetOperator(tmp_path, scratch_ns)
    try:
        yield op
    finally:
        op.cleanup()


def wait_for(predicate, timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
