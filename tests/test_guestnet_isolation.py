"""Namespaced guests: no kernel network between them, even over a veth added
by hand, while a circuit carries data; no raw sockets, no changing the
network from inside."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from circuits.guestnet import enter, ruleset
from guestnet_fixtures import netop, requires_netns, scratch_ns, sh  # noqa: F401

pytestmark = requires_netns

# A veth between the two guests, with addresses only these namespaces ever see.
ADDR_A, ADDR_B = "198.18.0.1", "198.18.0.2"

TCP_SERVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket()
    s.bind(("0.0.0.0", 5555)); s.listen(); s.settimeout(float(sys.argv[1]))
    print("ready", flush=True)
    try:
        c, _ = s.accept(); c.sendall(b"kernel tcp works"); print("accepted", flush=True)
    except socket.timeout:
        print("nobody came", flush=True)
""")

TCP_CLIENT = textwrap.dedent("""
    import errno, socket
    try:
        c = socket.create_connection(("%s", 5555), timeout=2)
        print("connected", c.recv(100).decode())
    except OSError as e:
        print("failed", errno.errorcode.get(e.errno, "timeout"))
""" % ADDR_B)


def add_veth(op) -> None:
    """What an admin might do by hand: a veth between the two guests, up, with addresses."""
    a, b = op.ns(op.a), op.ns(op.b)
    sh("ip", "link", "add", "cxa0", "netns", a, "type", "veth", "peer", "name", "cxb0",
       "netns", b)
    sh("ip", "-n", a, "addr", "add", f"{ADDR_A}/30", "dev", "cxa0")
    sh("ip", "-n", b, "addr", "add", f"{ADDR_B}/30", "dev", "cxb0")
    sh("ip", "-n", a, "link", "set", "cxa0", "up")
    sh("ip", "-n", b, "link", "set", "cxb0", "up")


def tcp_attempt(netns_a: str, netns_b: str, accept_for: float) -> tuple[str, str]:
    """A kernel TCP server in b and a client in a (caps dropped, as a guest)."""
    server = enter.popen(netns_b, [sys.executable, "-c", TCP_SERVER, str(accept_for)],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        client = enter.popen(netns_a, [sys.executable, "-c", TCP_CLIENT],
                             stdout=subprocess.PIPE, text=True)
        said_client = client.communicate(timeout=30)[0].strip()
        said_server = server.communicate(timeout=30)[0].strip()
    finally:
        server.kill()
        server.wait()
    return said_client, said_server


def test_no_kernel_tcp_between_guests_even_over_a_hand_made_veth(netop):
    add_veth(netop)
    a, b = netop.ns(netop.a), netop.ns(netop.b)
    before = ruleset.dropped(a)
    client, server = tcp_attempt(a, b, accept_for=4)
    assert client.startswith("failed"), client
    assert server == "nobody came"
    after = ruleset.dropped(a)
    assert after["output"] > before["output"], (before, after)  # the SYNs, counted
    assert after["arp-output"] + after["output"] > 0
    # The veth itself works: with the rulesets flushed, the same attempt connects.
    # So it was the ruleset that stopped it.
    sh("ip", "netns", "exec", a, "nft", "flush", "ruleset")
    sh("ip", "netns", "exec", b, "nft", "flush", "ruleset")
    client, server = tcp_attempt(a, b, accept_for=10)
    assert client == "connected kernel tcp works", client


CIRCUIT_SERVER = textwrap.dedent("""
    import hashlib, os, circuits
    lst = circuits.listen(("192.0.2.2", 7000))
    print("listening", os.stat("/proc/self/ns/net").st_ino, flush=True)
    conn, _ = lst.accept()
    h, n = hashlib.sha256(), 0
    while data := conn.recv(1 << 16):
        h.update(data); n += len(data)
    print(n, h.hexdigest(), flush=True)
""")

CIRCUIT_CLIENT = textwrap.dedent("""
    import hashlib, os, random, socket, circuits
    data = random.Random(4).randbytes(32 << 20)
    conn = circuits.connect(("192.0.2.2", 7000))
    conn.sendall(data); conn.shutdown(socket.SHUT_WR); conn.close()
    print(os.stat("/proc/self/ns/net").st_ino, len(data), hashlib.sha256(data).hexdigest())
""")


def test_a_circuit_between_namespaced_guests_carries_data(netop):
    server = netop.run(netop.b, CIRCUIT_SERVER)
    try:
        word, ino = server.stdout.readline().split()
        assert word == "listening", server.stderr.read()
        assert int(ino) == os.stat(f"/run/netns/{netop.ns(netop.b)}").st_ino  # really inside
        client = netop.run(netop.a, CIRCUIT_CLIENT)
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0, err
        ino_a, sent, digest = out.split()
        assert int(ino_a) == os.stat(f"/run/netns/{netop.ns(netop.a)}").st_ino
        got = server.communicate(timeout=60)[0].split()
        assert got == [sent, digest]  # every byte, checked by hash
    finally:
        server.kill()
        server.wait()


ESCAPES = textwrap.dedent("""
    import ctypes, errno, json, os, socket
    libc = ctypes.CDLL(None, use_errno=True)
    out = {}
    def attempt(name, fn):
        try:
            fn(); out[name] = "ALLOWED"
        except OSError as e:
            out[name] = errno.errorcode.get(e.errno, str(e.errno))
    def check(rc):
        if rc != 0:
            e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
    attempt("raw_inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
    attempt("raw_inet6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, 58))
    attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0x0300))
    def add_link():
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
        with IPRoute() as ipr:
            try:
                ipr.link("add", ifname="escape0", kind="dummy")
            except NetlinkError as e:
                raise OSError(e.code, str(e))
    attempt("add_link", add_link)
    def flush_ruleset():
        import nftables
        rc, _, err = nftables.Nftables().json_cmd({"nftables": [{"flush": {"ruleset": None}}]})
        if rc != 0:
            raise OSError(errno.EPERM, err)
    attempt("flush_ruleset", flush_ruleset)
    def setns(path):
        fd = os.open(path, os.O_RDONLY)
        check(libc.setns(fd, 0x40000000))
    attempt("setns_host", lambda: setns("/proc/1/ns/net"))
    attempt("setns_other", lambda: setns(os.environ["ESCAPE_TO"]))
    attempt("unshare_net", lambda: check(libc.unshare(0x40000000)))
    status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\\t" in l)
    out["no_new_privs"] = status["NoNewPrivs"].strip()
    out["cap_eff"] = status["CapEff"].strip()
    out["cap_bnd"] = status["CapBnd"].strip()
    import circuits.client
    out["control"] = circuits.client.Control().guest
    print(json.dumps(out))
""")


def test_a_guest_cannot_open_raw_sockets_nor_change_its_network(netop):
    proc = netop.run(netop.a, ESCAPES, env={**os.environ, "ESCAPE_TO": f"/run/netns/{netop.host_ns}"})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    got = json.loads(out)
    assert got["raw_inet"] == got["raw_inet6"] == got["packet"] == "EPERM"
    assert got["add_link"] == "EPERM"
    assert got["flush_ruleset"] == "EPERM"
    assert got["setns_host"] in ("EACCES", "EPERM")  # no CAP_SYS_PTRACE: not even opened
    assert got["setns_other"] == "EPERM"  # opened, but no CAP_SYS_ADMIN to enter
    assert got["unshare_net"] == "EPERM"
    assert got["no_new_privs"] == "1"
    for name, cap in enter.DROPPED.items():
        for field in ("cap_eff", "cap_bnd"):
            assert not int(got[field], 16) & (1 << cap), f"{name} still in {field}"
    assert got["control"] == netop.a  # its control socket is reachable from inside
    assert not ruleset.problems(netop.ns(netop.a), _marker(netop, netop.a))  # nothing changed


def _marker(op, guest):
    return json.loads(op.state.read_text())["namespaces"][op.ns(guest)]["marker"]


def test_run_in_a_plain_guest_is_unchanged(netop):
    proc = netop.run(netop.c, "import os; print(os.stat('/proc/self/ns/net').st_ino)")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert int(out) == os.stat("/proc/self/ns/net").st_ino  # the host's, as before
