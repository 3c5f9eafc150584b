"""The configuration file and the policy it declares."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from circuits.operator.config import ConfigError, load, parse
from circuits.operator.policy import Policy

EXAMPLE = Path(__file__).parent.parent / "examples" / "policy.toml"
ip = ipaddress.ip_address


@pytest.fixture(scope="module")
def policy():
    return Policy(load(EXAMPLE))


def test_example_loads(policy):
    cfg = policy.config
    assert set(cfg.guests) == {"web", "db", "batch"}
    assert cfg.guests["db"].limits.ring_size == 4 << 20
    assert cfg.guests["batch"].limits.memory == 128 << 20
    assert cfg.guests["web"].control == "/run/circuits/guests/web.sock"
    assert cfg.default_ring == 1 << 20 and not cfg.default_allow


@pytest.mark.parametrize("src,dst,port,proto,allow,rule", [
    ("web", "10.0.0.2", 5432, "tcp", True, 1),        # a guest, a port, a protocol
    ("web", "fd00::2", 5432, "tcp", True, 1),         # the same guest by IPv6
    ("web", "10.0.0.2", 5434, "tcp", False, None),    # another port: the default
    ("web", "10.0.0.2", 5432, "udp", False, None),    # another protocol: the default
    ("batch", "10.0.0.2", 5432, "tcp", False, 2),     # an explicit deny
    ("db", "10.0.0.1", 8080, "tcp", True, 3),         # a group and a port range
    ("batch", "10.0.0.1", 8099, "tcp", True, 3),
    ("batch", "10.0.0.1", 8100, "tcp", False, None),  # just past the range
    ("db", "198.51.100.9", 53, "udp", True, 4),       # "*" to "external"
    ("db", "10.0.0.1", 53, "udp", False, None),       # a guest is not external
    ("web", "192.0.2.80", 443, "tcp", True, 5),       # a CIDR
    ("web", "192.0.3.80", 443, "tcp", False, None),
    ("web", "::ffff:10.0.0.2", 5432, "tcp", True, 1),  # IPv4-mapped means the IPv4 guest
])
def test_verdicts(policy, src, dst, port, proto, allow, rule):
    v = policy.check(src, ip(dst), port, proto)
    assert v.allow is allow
    assert (v.rule.index + 1 if v.rule else None) == rule


def test_remembered_verdicts_are_the_rules_verdicts(monkeypatch):
    """Verdicts are cached per question; asked again (or after the cache
    starts over) the answer is what the rules say."""
    import circuits.operator.policy as policy_module
    monkeypatch.setattr(policy_module, "MAX_CACHED", 8)
    fresh = Policy(load(EXAMPLE))
    questions = [(src, ip(dst), port, proto) for src in ("web", "db", "batch")
                 for dst in ("10.0.0.1", "10.0.0.2", "198.51.100.9")
                 for port in (53, 5432, 8080) for proto in ("tcp", "udp")]
    for _ in range(2):
        for q in questions:
            assert fresh.check(*q) == fresh._judge(*q)
    assert len(fresh._verdicts) <= 8


def test_first_match_wins_and_default_allow():
    cfg = parse("""
[operator]
default = "allow"
[[guests]]
name = "a"
addresses = ["10.1.0.1"]
[[guests]]
name = "b"
addresses = ["10.1.0.2"]
[[rules]]
from = "a"
to = "b"
action = "deny"
[[rules]]
from = "a"
to = "*"
action = "allow"
""")
    p = Policy(cfg)
    assert not p.check("a", ip("10.1.0.2"), 1, "tcp").allow  # rule 1 before rule 2
    assert p.check("b", ip("10.1.0.1"), 1, "tcp").describe() == "allow by default"


BAD = [
    ("[[guests]]\nname = 'web'\naddresses = ['10.0.0.300']\n", 3, "not an IP address"),
    ("[[guests]]\nname = 'Web'\n", 2, "guest name"),
    ("[[guests]]\nname = 'a'\naddresses=['10.0.0.1']\n[[guests]]\nname = 'b'\n"
     "addresses = ['10.0.0.1']\n", 6, "belongs to 'a'"),
    ("[[guests]]\nname = 'a'\n[[guests]]\nname = 'a'\n", 4, "defined twice"),
    ("[[guests]]\nname = 'a'\n[guests.limits]\nring_size = 5000\n", 4, "power of two"),
    ("[[guests]]\nname = 'a'\n[guests.limits]\ncircuits = 0\n", 4, "above 0"),
    ("[[guests]]\nname = 'a'\nsize = 3\n", 3, "unknown key 'size'"),
    ("[groups]\nteam = ['nobody']\n", 2, "no guest is called 'nobody'"),
    ("[[guests]]\nname = 'a'\n[[rules]]\nfrom = 'a'\nto = 'zz'\naction = 'allow'\n", 5, "no guest, group, CIDR"),
    ("[[guests]]\nname = 'a'\n[[rules]]\nfrom = 'a'\nto = '10.0.0.1/8'\naction = 'allow'\n", 5, "host bits"),
    ("[[guests]]\nname = 'a'\n[[rules]]\nfrom = 'a'\nto = '*'\nports = ['90-80']\naction = 'allow'\n",
     6, "reversed"),
    ("[[guests]]\nname = 'a'\n[[rules]]\nfrom = 'a'\nto = '*'\nproto = 'sctp'\naction = 'allow'\n",
     6, "proto must be"),
    ("[[guests]]\nname = 'a'\n[[rules]]\nfrom = 'a'\nto = '*'\naction = 'maybe'\n", 6, "action must be"),
    ("[[rules]]\nfrom = '*'\nto = '*'\n", 1, "has no 'action'"),
    ("[operator]\ndefault = 'perhaps'\n", 2, "default must be"),
    ("[[guests]\nname = 'a'\n", 1, "not valid TOML"),
    ("[[guests]]\nname = 'a'\n[guests.stack]\ncongestion = 'nosuchcc'\n", 4, "not available here"),
    ("[[guests]]\nname = 'a'\n[guests.stack]\ncongestion = 'Bad Name'\n", 4, "not a congestion"),
    ("[[guests]]\nname = 'a'\n[guests.stack]\nsource = 'here'\n", 4, "not an IP address"),
    ("[[guests]]\nname = 'a'\n[guests.stack]\nkeepalive = -1\n", 4, "keepalive must be"),
    ("[[guests]]\nname = 'a'\n[guests.stack]\nsndbuf = '0 KiB'\n", 4, "sndbuf must be"),
    ("[[guests]]\nname = 'a'\n[guests.stack]\nconnect_timeout = 0\n", 4, "connect_timeout"),
    ("[[guests]]\nname = 'a'\n[guests.stack]\nmtu = 9000\n", 4, "unknown key 'mtu'"),
    ("[[guests]]\nname = 'proxystack'\n", 2, "the proxy stack's name"),
    ("[proxystack]\nenabled = 'yes'\n", 2, "true or false"),
    ("[proxystack]\nconnect_timeout = 'long'\n", 2, "must be seconds"),
    ("[proxystack]\nrestarts = 1\nplacement = 'thread'\n", 3, 'placement must be "worker"'),
    ("[proxystack]\norphan_grace = -1\n", 2, "orphan_grace must be seconds"),
    ("[[guests]]\nname = 'a'\n[[publish]]\naddress = '198.18.0.1'\nport = 80\nguest = 'b'\n", 6,
     "no guest is called 'b'"),
    ("[[guests]]\nname = 'a'\n[[publish]]\naddress = '198.18.0.1'\nport = 0\nguest = 'a'\n", 5,
     "port must be"),
    ("[[guests]]\nname = 'a'\n[[publish]]\naddress = '198.18.0.1'\nport = 80\nguest = 'a'\n"
     "proto = 'sctp'\n", 7, "proto must be"),
    ("[[publish]]\nport = 80\n", 1, "has no 'address'"),
    ("[[guests]]\nname = 'a'\n" + "[[publish]]\naddress = '198.18.0.1'\nport = 80\nguest = 'a'\n"
     "[[publish]]\naddress = '198.18.0.2'\nport = 80\nguest = 'a'\n"
     "[[publish]]\naddress = '198.18.0.1'\nport = 80\nguest = 'a'\nguest_port = 81\n", 11,
     "publish 3: tcp 198.18.0.1 port 80 is published already (line 3)"),
    ("[[guests]]\nname = 'a'\n" + "[[publish]]\naddress = '198.18.0.1'\nport = 80\nguest = 'a'\n"
     "[[publish]]\naddress = '::ffff:198.18.0.1'\nport = 80\nguest = 'a'\n", 7,
     "publish 2: tcp 198.18.0.1 port 80 is published already (line 3)"),  # the same, mapped
    ("[[guests]]\nname = 'a'\n" + "".join(
        f"[[publish]]\naddress = '198.18.0.1'\nport = {1 + i}\nguest = 'a'\n" for i in range(1001)),
     3 + 4 * 1000, "1001 [[publish]] entries: at most 1000"),
]


def test_stack_options_publish_and_proxystack():
    cfg = parse("""
[operator]
control_dir = "/run/x"
[[guests]]
name = "a"
[guests.stack]
congestion = "cubic"
source = "198.18.0.1"
sndbuf = "1 MiB"
rcvbuf = 65536
keepalive = 30
connect_timeout = 2.5
[[guests]]
name = "b"
[[publish]]
address = "198.18.0.1"
port = 8080
guest = "b"
guest_port = 80
""")
    a = cfg.guests["a"].stack
    assert (a.congestion, str(a.source), a.sndbuf, a.rcvbuf, a.keepalive, a.connect_timeout) == \
        ("cubic", "198.18.0.1", 1 << 20, 65536, 30, 2.5)
    assert cfg.guests["b"].stack.congestion == ""
    (pub,) = cfg.publish
    assert (str(pub.address), pub.port, pub.proto, pub.guest, pub.guest_port) == \
        ("198.18.0.1", 8080, "tcp", "b", 80)
    assert cfg.proxystack.enabled  # a published port needs one
    udp = parse("[[guests]]\nname = 'a'\n" + "".join(  # a port for TCP and one for UDP
        f"[[publish]]\naddress = '198.18.0.1'\nport = 80\nproto = '{proto}'\nguest = 'a'\n"
        for proto in ("tcp", "udp"))).publish
    assert [e.proto for e in udp] == ["tcp", "udp"]
    assert cfg.proxystack.control == "/run/x/proxystack.sock"
    assert cfg.proxystack.pidfile == "/run/x/proxystack.pid"
    assert cfg.proxystack.placement == "worker"
    assert parse("[proxystack]\nplacement = 'operator'\n").proxystack.placement == "operator"
    assert not parse("[[guests]]\nname = 'a'\n").proxystack.enabled  # none unless asked


@pytest.mark.parametrize("text,line,what", BAD)
def test_bad_files_name_the_line_and_the_fault(text, line, what):
    with pytest.raises(ConfigError) as e:
        parse(text, "policy.toml")
    assert e.value.line == line, str(e.value)
    assert what in str(e.value)
    assert str(e.value).startswith(f"policy.toml:{line}: ")


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")
