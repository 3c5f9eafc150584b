"""DNS for unmodified programs in namespaced guests, through the proxy stack.

A real DNS server (dnsmasq) runs in the test's outside namespace.  Guests
with `netns = true` have no network but loopback; `circuits run` gives them
a resolv.conf naming their DNS relay on a loopback address (a private mount
namespace), glibc's resolver sends UDP there (its own internal calls, which
no preload library sees), the relay sends each query through a datagram
circuit, the operator's policy allows it (UDP port 53) and the proxy stack
sends it out.  Guest n has that rule, guest m has none.  Also here: UDP of a plain
Python program through egress, to a UDP echo outside.
"""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from circuits.operator.admin import request
from proxystack_fixtures import CONFIG, OUTSIDE_IP, Held, World, requires_netns

pytestmark = [requires_netns,
              pytest.mark.skipif(not shutil.which("dnsmasq"), reason="dnsmasq-base: make deps")]

UDP_APP = Path(__file__).with_name("udp_app.py")
NAME = "www.outside.test"
HTTP_PORT = 8081
BIG, BIG_COUNT = "big.outside.test", 60  # 60 A records: about 1 KB, truncated over UDP

# Two namespaced guests with the outside's resolver: n may use it, m may not;
# and p, a plain guest (the host's network namespace) that may use it.
DNS_CONFIG = CONFIG.replace('''[[rules]]
from = "web"''', '''[[guests]]
name = "{tag}-n"
addresses = ["10.0.1.1"]
netns = true
resolver = "{outside_ip}"

[[guests]]
name = "{tag}-m"
addresses = ["10.0.1.2"]
netns = true
resolver = ["{outside_ip}"]

[[guests]]
name = "{tag}-p"
addresses = ["10.0.1.3"]
resolver = "{outside_ip}"

[[rules]]
from = "{tag}-p"
to = "{outside_ip}/32"
proto = "udp"
ports = [53]
action = "allow"

[[rules]]
from = "{tag}-n"
to = "{outside_ip}/32"
proto = "udp"
ports = [53]
action = "allow"

[[rules]]
from = "web"''')
assert DNS_CONFIG != CONFIG


@pytest.fixture
def dns(tmp_path):
    """The proxy stack's world, two namespaced guests, and dnsmasq outside."""
    w = World(tmp_path, template=DNS_CONFIG)
    try:
        w.make_network()
        w.start()
        w.n, w.m, w.p = f"{w.tag}-n", f"{w.tag}-m", f"{w.tag}-p"
        yield w
    finally:
        w.cleanup()


def start_dnsmasq(w: World) -> subprocess.Popen:
    """dnsmasq in the outside namespace: NAME, and BIG with more addresses than a
    512-byte UDP answer holds; nothing from any file, no pid file."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", w.outside, "dnsmasq", "--keep-in-foreground", "--no-resolv",
         "--no-hosts", "--conf-file=/dev/null", "--pid-file", "--port", "53",
         "--listen-address", OUTSIDE_IP, "--bind-interfaces", "--log-facility=-",
         "--log-queries", f"--host-record={NAME},{OUTSIDE_IP}",
         *(f"--host-record={BIG},198.18.1.{i}" for i in range(1, BIG_COUNT + 1))],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    w.servers.append(proc)
    for line in proc.stderr:
        if "started" in line:
            return proc
    raise AssertionError(f"dnsmasq did not start: {proc.wait(5)}")


def run(w: World, guest: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "circuits", "run", "--guest", guest, "--config",
                           str(w.config), "--", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "CIRCUITS_LOG": "debug"})


def audit(w: World) -> list[dict]:
    return [json.loads(line) for line in (w.dir / "audit.jsonl").read_text().splitlines()]


def sent_total(w: World, guest: str) -> int:
    """circuits_bytes_sent_total of guest: bytes it sent through circuits."""
    metrics = request(str(w.dir / "admin.sock"), "metrics")["result"]
    m = re.search(rf'^circuits_bytes_sent_total{{guest="{guest}"}} (\d+)$', metrics, re.M)
    return int(m.group(1)) if m else 0


def wait_sent(w: World, guest: str, at_least: int, timeout: float = 10) -> int:
    """The operator counts a circuit's bytes when it ends: wait for them."""
    deadline = time.monotonic() + timeout
    while (n := sent_total(w, guest)) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def test_getent_resolves_through_the_proxy_stack_and_host_files_stay(dns):
    start_dnsmasq(dns)
    host_files = {p: Path(p).read_text() for p in ("/etc/resolv.conf", "/etc/hosts")}
    out = run(dns, dns.n, "getent", "hosts", NAME)
    assert out.returncode == 0, (out.stderr, audit(dns))
    assert out.stdout.split() == [OUTSIDE_IP, NAME]
    udp = [a for a in audit(dns) if a["from"] == dns.n and a["proto"] == "udp"]
    assert udp and all(a["to"] == OUTSIDE_IP and a["port"] == 53 for a in udp), udp
    assert any(a["verdict"] == "allow" for a in udp)
    assert wait_sent(dns, dns.n, 2 * 30) >= 2 * 30  # the A and AAAA queries crossed circuits
    assert {p: Path(p).read_text() for p in host_files} == host_files
    # the guest's /etc/hosts names the guests (circuits ctl hosts)
    out = run(dns, dns.n, "getent", "hosts", dns.m)
    assert out.stdout.split() == ["10.0.1.2", dns.m], out.stderr
    # the relay went with the program
    deadline = time.monotonic() + 5
    while subprocess.run(["pgrep", "-f", f"--guest {dns.n} "]).returncode == 0:
        assert time.monotonic() < deadline, "a DNS relay outlived its program"
        time.sleep(0.05)


def test_curl_fetches_by_name_from_outside(dns):
    start_dnsmasq(dns)
    dns.serve("http", HTTP_PORT)
    out = run(dns, dns.n, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
              f"http://{NAME}:{HTTP_PORT}/download/100000")
    assert out.stdout == "200 100000", out.stderr
    tcp = [a for a in audit(dns) if a["from"] == dns.n and a["proto"] == "tcp"]
    assert any(a["to"] == OUTSIDE_IP and a["port"] == HTTP_PORT and a["verdict"] == "allow"
               for a in tcp), tcp
    assert wait_sent(dns, dns.n, 100) > 0


def test_a_guest_without_a_udp_rule_cannot_resolve_and_the_denial_is_audited(dns):
    start_dnsmasq(dns)
    out = run(dns, dns.m, "getent", "hosts", NAME)
    assert out.returncode == 2 and out.stdout == "", out  # 2: not found
    denied = [a for a in audit(dns) if a["from"] == dns.m and a["proto"] == "udp"]
    assert denied and all(a["verdict"] == "deny" and a["port"] == 53 for a in denied), denied


def test_plain_udp_socket_echoes_through_egress(dns):
    dns.serve("udp-echo", 53)  # the outside's port 53, which guest n may reach
    before = sent_total(dns, dns.n)
    out = run(dns, dns.n, sys.executable, str(UDP_APP), "echo", OUTSIDE_IP, "53")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert all(e["ok"] and e["peer"] == [OUTSIDE_IP, 53] for e in got["echo"]), got["echo"]
    assert got["truncation"]["msg_trunc"] and got["truncation"]["data"] == "x" * 10
    assert got["too_big"] == 90 and got["other_peer"] == 106
    assert wait_sent(dns, dns.n, before + 70000) >= before + 70000


def test_a_flow_the_proxy_stack_closed_when_idle_is_connected_again_by_the_next_send(dns):
    dns.serve("udp-echo", 53)
    out = run(dns, dns.n, sys.executable, str(UDP_APP), "idle", OUTSIDE_IP, "53")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"first": True, "ended": 111, "again": True}  # ECONNREFUSED
    allowed = [a for a in audit(dns) if a["from"] == dns.n and a["verdict"] == "allow"]
    assert len(allowed) == 2  # two circuits, one per flow


def test_a_plain_guest_resolves_through_its_relay_too(dns):
    """No namespace: the relay binds on the host's loopback, the lookup still
    goes through a circuit and the proxy stack (the host itself has no route
    to the outside namespace)."""
    start_dnsmasq(dns)
    out = run(dns, dns.p, "getent", "hosts", NAME)
    assert out.stdout.split() == [OUTSIDE_IP, NAME], out.stderr
    assert any(a["from"] == dns.p and a["proto"] == "udp" and a["verdict"] == "allow"
               for a in audit(dns))


def test_an_answer_too_big_for_udp_comes_again_over_tcp(dns):
    """glibc asks without EDNS: an answer over 512 bytes comes truncated, and it
    asks again over TCP, which the relay sends through a stream circuit.  (getent
    ahostsv4 asks getaddrinfo with AI_ADDRCONFIG, which the preload library drops:
    the namespace shows no IPv4 address but loopback.)"""
    start_dnsmasq(dns)
    out = run(dns, dns.n, "getent", "ahostsv4", BIG)
    assert out.returncode == 0, (out.stderr, audit(dns))
    got = {line.split()[0] for line in out.stdout.splitlines()}
    assert got == {f"198.18.1.{i}" for i in range(1, BIG_COUNT + 1)}
    tcp = [a for a in audit(dns) if a["from"] == dns.n and a["proto"] == "tcp"]
    assert any(a["port"] == 53 and a["verdict"] == "allow" for a in tcp), tcp


def test_the_relay_holds_none_of_the_programs_descriptors(dns):
    """A descriptor `circuits run` passes on is the program's alone: once the
    program closes it, its reader sees the end, though the relay runs on."""
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "circuits", "run", "--guest", dns.n,
                             "--config", str(dns.config), "--", sys.executable, "-c",
                             f"import os, time; os.close({w}); time.sleep(3)"],
                            pass_fds=[w], stderr=subprocess.PIPE)
    os.close(w)
    t0 = time.monotonic()
    ready = select.select([r], [], [], 10)[0]
    assert ready and os.read(r, 1) == b"" and time.monotonic() - t0 < 2.5, \
        "someone but the program held the pipe"
    os.close(r)
    assert proc.wait(30) == 0, proc.stderr.read()


def test_a_program_asking_the_nameserver_itself_reaches_the_relay(dns):
    """A program that sends its own queries (c-ares, Node's dns.resolve, this
    one: plain sockets, which the preload library sees) to the nameserver of
    its resolv.conf: the relay's address goes to the kernel (CIRCUITS_BYPASS),
    and the relay sends the query on through a circuit, as for glibc.  (It
    was a circuit to 127.x.y.z:53, which no policy rule names: EACCES.)"""
    start_dnsmasq(dns)
    asker = f"""
import socket, struct
ns = next(l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver"))
name = b"".join(bytes([len(p)]) + p.encode() for p in "{NAME}".split(".")) + b"\\0"
query = struct.pack("!HHHHHH", 0x4321, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.connect((ns, 53))  # as c-ares does (an unconnected sendto there: ENETUNREACH, preload.md)
s.send(query)
answer = s.recv(2048)
print(struct.unpack("!H", answer[:2])[0] == 0x4321, socket.inet_ntoa(answer[-4:]))
"""
    out = run(dns, dns.n, sys.executable, "-c", asker)
    assert out.returncode == 0, (out.stderr, audit(dns))
    assert out.stdout.split() == ["True", OUTSIDE_IP]
    assert any(a["from"] == dns.n and a["proto"] == "udp" and a["to"] == OUTSIDE_IP
               and a["verdict"] == "allow" for a in audit(dns))


def test_a_tcp_retry_held_at_the_resolver_holds_up_no_udp_query(dns):
    """The resolver drops TCP: a lookup whose answer comes truncated waits on
    its TCP retry (the proxy stack's connect_timeout, 10 s here).  Another
    thread's lookup meanwhile goes over UDP at once, not behind that connect
    on a shared control connection."""
    start_dnsmasq(dns)
    Held(dns, 53)  # released with the outside namespace
    program = f"""
import os, socket, threading, time
big = threading.Thread(target=socket.getaddrinfo, args=("{BIG}", None, socket.AF_INET))
big.start()
time.sleep(1)  # its TCP retry waits for the resolver now
t0 = time.monotonic()
addr = socket.getaddrinfo("{NAME}", None, socket.AF_INET)[0][4][0]
print(addr, round(time.monotonic() - t0, 2), big.is_alive(), flush=True)
os._exit(0)
"""
    out = run(dns, dns.n, sys.executable, "-c", program)
    assert out.returncode == 0, (out.stderr, audit(dns))
    addr, took, waiting = out.stdout.split()
    assert addr == OUTSIDE_IP and float(took) < 3 and waiting == "True", out.stdout
