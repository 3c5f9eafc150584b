"""An operator with a proxy stack, and an "outside world" made for the test.

Two scratch namespaces: "host" (where the proxy stack runs: [operator]
host_netns) and "outside" (servers standing for the world), joined by a veth
with 198.18.0.1 and fd00:198:18::1 (host), 198.18.0.2 and fd00:198:18::2
(outside).  No traffic leaves them.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from circuits.operator import child
from circuits.operator.admin import request
from circuits.operator.proxy import stop_worker, worker_pid
from guestnet_fixtures import remove_netns_named, requires_netns, sh, tag  # noqa: F401 - re-exported

OUTSIDE = Path(__file__).with_name("outside.py")
HOST_IP, OUTSIDE_IP = "198.18.0.1", "198.18.0.2"
HOST_IP6, OUTSIDE_IP6 = "fd00:198:18::1", "fd00:198:18::2"
SOURCE_IP = "198.18.0.3"  # a second host address: db's [guests.stack] source
PUBLISHED = 8080

CONFIG = """
[operator]
control_dir = "{dir}"
admin_socket = "{dir}/admin.sock"
audit_log = "{dir}/audit.jsonl"
host_netns = "{host}"
default_ring = "256 KiB"

[proxystack]
connect_timeout = 10
udp_idle_timeout = 1
restarts = {restarts}
placement = "{placement}"
orphan_grace = {orphan_grace}

[[guests]]
name = "web"
addresses = ["10.0.0.1"]
mark = 0x43520101
[guests.limits]
egress_rate = "4 GiB/s"
[guests.stack]
congestion = "bbr"
keepalive = 60

[[guests]]
name = "db"
addresses = ["10.0.0.2"]
[guests.limits]
ring_size = "64 KiB"
[guests.stack]
congestion = "cubic"
connect_timeout = 1
source = "{source_ip}"
sndbuf = "256 KiB"
rcvbuf = "128 KiB"

[[publish]]
address = "{host_ip}"
port = {published}
guest = "web"
guest_port = 80

[[publish]]
address = "{host_ip}"
port = {published}
proto = "udp"
guest = "web"
guest_port = 53

[[rules]]
from = "*"
to = "{outside_ip}/32"
ports = [25]
action = "deny"

[[rules]]
from = "web"
to = "external"
proto = "udp"
ports = [53]
action = "allow"

[[rules]]
from = "*"
to = "external"
proto = "tcp"
action = "allow"
"""


class Held:
    """An nft rule in the outside namespace dropping every packet to `port`:
    a connect there gets no SYN-ACK until release() (then the host's next
    SYN retransmission, a second or three later, completes it)."""

    def __init__(self, world, port: int):
        self.ns = world.outside
        nft = f"""table inet held {{
            chain in {{ type filter hook input priority 0; tcp dport {port} drop; }}
        }}"""
        sh("ip", "netns", "exec", self.ns, "nft", nft)

    def release(self) -> None:
        sh("ip", "netns", "exec", self.ns, "nft", "delete", "table", "inet", "held")


class World:
    """The host and outside namespaces, the operator, and outside servers."""

    def __init__(self, root: Path, restarts: int = 5, placement: str = "worker",
                 orphan_grace: float = 30, template: str = CONFIG):
        self.tag, self.placement = tag(), placement
        self.host, self.outside = f"cxp-{self.tag}-host", f"cxp-{self.tag}-out"
        self.dir = root / "run"
        self.config = root / "proxy.toml"
        self.config.write_text(template.format(dir=self.dir, host=self.host, host_ip=HOST_IP,
                                               outside_ip=OUTSIDE_IP, published=PUBLISHED,
                                               restarts=restarts, source_ip=SOURCE_IP,
                                               placement=placement, orphan_grace=orphan_grace,
                                               tag=self.tag))
        self.pidfile = str(self.dir / "proxystack.pid")
        self.proc: subprocess.Popen | None = None
        self.servers: list[subprocess.Popen] = []
        self.log: Path | None = None  # set: the operator's stderr (and its worker's) go there

    def control(self, guest: str) -> str:
        return str(self.dir / f"{guest}.sock")

    def make_network(self) -> None:
        host_if, out_if = f"cxh{self.tag[1:]}", f"cxo{self.tag[1:]}"
        for ns in (self.host, self.outside):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", host_if, "netns", self.host, "type", "veth", "peer", "name",
           out_if, "netns", self.outside)
        for ns, ifname, addr, addr6 in ((self.host, host_if, HOST_IP, HOST_IP6),
                                        (self.outside, out_if, OUTSIDE_IP, OUTSIDE_IP6)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            sh("ip", "-n", ns, "addr", "add", f"{addr6}/64", "dev", ifname, "nodad")
            sh("ip", "-n", ns, "link", "set", ifname, "up")
        sh("ip", "-n", self.host, "addr", "add", f"{SOURCE_IP}/24", "dev", host_if)

    def start(self) -> None:
        if self.log is None:
            self.proc = child.start(str(self.config))
        else:
            with open(self.log, "a") as log:
                self.proc = child.start(str(self.config), stderr=log)
        self.wait_proxystack()
        if self.placement == "operator":  # the same service, in the operator's own process
            assert self.status()["proxystack"] == f"connected, in the operator, pid {self.proc.pid}"
            assert self.worker() is None

    def worker(self) -> int | None:
        """The pid of the proxy stack worker running now (None: none)."""
        return worker_pid(self.pidfile)

    def proxystack_pid(self) -> int:
        """The serving process's pid, as `circuits ctl status` shows it."""
        return int(self.status()["proxystack"].rsplit(" ", 1)[1])

    def status(self) -> dict:
        return request(str(self.dir / "admin.sock"), "status")["result"]

    def wait_proxystack(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not self._connected():
            assert self.proc.poll() is None, "the operator exited"
            assert time.monotonic() < deadline, "the proxy stack did not connect"
            time.sleep(0.05)

    def _connected(self) -> bool:
        try:
            return self.status()["proxystack"].startswith("connected")
        except OSError:  # the admin socket comes after the control sockets
            return False

    def serve(self, role: str, port: int) -> subprocess.Popen:
        """An outside server (tests/outside.py ROLE PORT), once it listens."""
        proc = self.in_outside([sys.executable, str(OUTSIDE), role, str(port)])
        self.servers.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    def in_outside(self, argv: list[str]) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.outside, *argv],
                                stdout=subprocess.PIPE, text=True)

    def in_host(self, *argv: str) -> str:
        return sh("ip", "netns", "exec", self.host, *argv).stdout

    def cleanup(self) -> None:
        for proc in self.servers:
            proc.kill()
            proc.wait(10)
        if self.proc is not None:
            child.stop(self.proc)
        stop_worker(self.pidfile)  # an operator's stop leaves it running: stop it for good
        left = self.worker()
        for ns in (self.host, self.outside):
            sh("ip", "netns", "del", ns, check=False)
        remove_netns_named(f"circuits-{self.tag}")  # namespaced guests, if the operator left any
        assert left is None, f"a proxy stack worker is left behind: pid {left}"


def _world(root: Path, log: bool = False, **kw):
    w = World(root, **kw)
    w.log = root / "operator.log" if log else None
    try:
        w.make_network()
        w.start()
        yield w
    finally:
        w.cleanup()


@pytest.fixture
def world(request, tmp_path):
    """A running operator and proxy stack, and an empty outside namespace;
    the stack's placement is "worker" unless parametrized (both_placements)."""
    yield from _world(tmp_path, placement=getattr(request, "param", "worker"))


both_placements = pytest.mark.parametrize("world", ["worker", "operator"], indirect=True)


@pytest.fixture
def world_short_grace(tmp_path):
    """The same, with a worker that waits 1 s for a new operator once idle."""
    yield from _world(tmp_path, orphan_grace=1)


@pytest.fixture
def world_no_restart(tmp_path):
    """The same, with a proxy stack the operator never restarts."""
    yield from _world(tmp_path, restarts=0)
