"""The operator's configuration file (TOML): guests, groups and rules.

``load(path)`` returns a checked Config or raises ConfigError naming the line
and what is wrong.  The format is documented in docs/policy.md.
"""
from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from circuits.protocol.messages import MAX_PUBLISH  # what one PUBLISHED can report on

DEFAULT_CONTROL_DIR = "/run/circuits/guests"
DEFAULT_ADMIN_SOCKET = "/run/circuits/admin.sock"
DEFAULT_RING = 1 << 20
NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
SIZE = re.compile(r"^(\d+)\s*(B|KiB|MiB|GiB)?$")
UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
# A guest's default SO_MARK: "CR" in the high half, 16 bits of its name's CRC
# below, so it stays the same whatever the order of the file (docs/policy.md).
MARK_BASE = 0x43520000
MAX_RESOLVERS = 3  # what glibc's resolver reads from resolv.conf (MAXNS)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A configuration that cannot be used; ``line`` is 1-based, 0 if unknown."""

    def __init__(self, path: str, line: int, what: str):
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {what}")
        self.path, self.line, self.what = path, line, what


@dataclass(frozen=True)
class Limits:
    circuits: int = 1024
    ring_size: int = 4 << 20
    setups_per_second: int = 1000
    memory: int = 1 << 30
    egress_rate: int = 0  # bytes per second through the proxy stack; 0: no limit


@dataclass(frozen=True)
class Stack:
    """A guest's host stack options: what the proxy stack sets on its sockets."""

    congestion: str = ""  # TCP_CONGESTION; "": the kernel's default
    source: IPAddress | None = None  # the host address its connections leave from
    sndbuf: int = 0  # SO_SNDBUF / SO_RCVBUF; 0: the kernel's default (autotuned)
    rcvbuf: int = 0
    keepalive: int = 0  # TCP keepalive idle seconds; 0: off
    connect_timeout: float = 0.0  # seconds; 0: [proxystack] connect_timeout


@dataclass(frozen=True)
class Guest:
    name: str
    addresses: tuple[IPAddress, ...]
    control: str
    limits: Limits
    netns: bool = False  # in its own network namespace, with no network but circuits
    mark: int = 0  # the SO_MARK of the proxy stack's sockets for this guest
    stack: Stack = field(default_factory=Stack)
    # Nameservers for the guest's /etc/resolv.conf under `circuits run` (its
    # own `resolver`, else [operator] resolver); reached over UDP circuits,
    # so only where a rule allows UDP port 53 (docs/policy.md, "Resolver").
    resolvers: tuple[IPAddress, ...] = ()


def available_congestion() -> frozenset[str] | None:
    """The congestion controls the kernel offers now; None if it cannot say."""
    try:
        with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
            return frozenset(f.read().split())
    except OSError:
        return None


def default_mark(name: str) -> int:
    """A guest's SO_MARK when the file sets none."""
    return MARK_BASE | (zlib.crc32(name.encode()) & 0xFFFF)


@dataclass(frozen=True)
class Rule:
    """One line of policy; ``index`` is its place in the file (0-based)."""

    index: int
    line: int
    source: str  # a guest, a group or "*"
    dest: str | IPNetwork  # a guest, a group, "*", "external", or a network
    proto: str  # "tcp", "udp" or "*"
    ports: tuple[tuple[int, int], ...]  # inclusive ranges; empty: every port
    allow: bool


@dataclass(frozen=True)
class Publish:
    """A host address and port whose connections go to a guest's listener."""

    line: int
    address: IPAddress  # on the host (the proxy stack's namespace)
    port: int
    proto: str  # "tcp" or "udp"
    guest: str
    guest_port: int


@dataclass(frozen=True)
class ProxyStack:
    """[proxystack]: whether the operator runs one, and its settings."""

    enabled: bool = False
    control: str = ""  # its control socket
    connect_timeout: float = 30.0  # seconds an egress connect may take
    restarts: int = 5  # restarts within a minute before the operator gives up
    udp_idle_timeout: float = 60.0  # seconds a UDP flow lives without a datagram
    placement: str = "worker"  # "worker": its own process; "operator": in the operator's loop
    orphan_grace: float = 30.0  # seconds a worker with no operator and no connection lives on

    @property
    def pidfile(self) -> str:
        """The worker's pidfile, locked while it lives: one worker per control socket."""
        return os.path.splitext(self.control)[0] + ".pid"


PROXY_IDENTITY = "proxystack"  # the proxy stack's name on its control socket; no guest's


@dataclass(frozen=True)
class Config:
    path: str
    default_allow: bool
    default_ring: int
    control_dir: str
    admin_socket: str
    audit_log: str  # "" for none
    revoke: bool  # a reload tears down live circuits the new rules forbid
    guests: dict[str, Guest]
    groups: dict[str, frozenset[str]]
    rules: tuple[Rule, ...] = field(default=())
    host_netns: str = ""  # where the host table goes; "": the operator's own namespace
    proxystack: ProxyStack = field(default_factory=ProxyStack)
    publish: tuple[Publish, ...] = ()

    @property
    def guestnet_state(self) -> str:
        """The file listing the namespaces and tables made for this operator."""
        return os.path.join(os.path.dirname(self.admin_socket) or ".", "guestnet.json")


class _Lines:
    """Where tables and keys stand in the TOML source, for error messages."""

    HEADER = re.compile(r"^\s*(\[\[?)\s*([\w.-]+)\s*\]\]?")
    KEY = re.compile(r"^\s*([\w-]+|\"[^\"]+\")\s*=")

    def __init__(self, text: str):
        self.tables: list[tuple[str, int]] = []  # (name, line) of [[arrays]] and [tables]
        self.keys: list[tuple[int, str]] = []  # (line, key)
        for n, line in enumerate(text.splitlines(), 1):
            if m := self.HEADER.match(line):
                self.tables.append((m.group(2), n))
            elif m := self.KEY.match(line):
                self.keys.append((n, m.group(1).strip('"')))

    def of(self, table: str, index: int = 0, key: str | None = None) -> int:
        """The line of key in the index-th [[table]] (or of the table itself)."""
        starts = [n for name, n in self.tables if name == table]
        if index >= len(starts):
            return 0
        start = starts[index]
        ends = [n for _, n in self.tables if n > start]
        end = min(ends) if ends else 1 << 30
        if key is None:
            return start
        return next((n for n, k in self.keys if start < n < end and k == key), start)


def load(path: str | Path) -> Config:
    """Read and check a configuration file."""
    path = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(path, 0, f"cannot read: {e.strerror}") from None
    return parse(text, path)


def parse(text: str, path: str = "<config>") -> Config:
    """Check a configuration given as TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line = int(m.group(1)) if (m := re.search(r"line (\d+)", str(e))) else 0
        raise ConfigError(path, line, f"not valid TOML: {e}") from None
    return _Checker(path, _Lines(text)).config(data)


class _Checker:
    def __init__(self, path: str, lines: _Lines):
        self.path, self.lines = path, lines

    def fail(self, line: int, what: str):
        raise ConfigError(self.path, line, what)

    def only(self, table: dict, allowed: set[str], where: str, index: int = 0) -> None:
        for key in table:
            if key not in allowed:
                self.fail(self.lines.of(where, index, key) if where else 0,
                          f"unknown key {key!r} in [{where or 'top level'}]"
                          f" (known: {', '.join(sorted(allowed))})")

    def config(self, data: dict) -> Config:
        self.only(data, {"operator", "groups", "guests", "rules", "proxystack", "publish"}, "")
        op = data.get("operator", {})
        self.only(op, {"default", "default_ring", "control_dir", "admin_socket", "audit_log",
                       "revoke", "host_netns", "resolver"}, "operator")
        default = op.get("default", "deny")
        if default not in ("allow", "deny"):
            self.fail(self.lines.of("operator", 0, "default"),
                      f"default must be \"allow\" or \"deny\", not {default!r}")
        ring = self.ring_size(op.get("default_ring", DEFAULT_RING), "operator", 0, "default_ring")
        control_dir = op.get("control_dir", DEFAULT_CONTROL_DIR)
        revoke = op.get("revoke", False)
        if not isinstance(revoke, bool):
            self.fail(self.lines.of("operator", 0, "revoke"), "revoke must be true or false")
        resolvers = self.resolvers(op.get("resolver", []), self.lines.of("operator", 0, "resolver"),
                                   "[operator] resolver")
        guests = self.guests(data.get("guests", []), control_dir, resolvers)
        groups = self.groups(data.get("groups", {}), guests)
        rules = tuple(self.rule(i, r, guests, groups) for i, r in enumerate(data.get("rules", [])))
        host_netns = op.get("host_netns", "")
        if not isinstance(host_netns, str) or "/" in host_netns or host_netns in (".", ".."):
            self.fail(self.lines.of("operator", 0, "host_netns"),
                      f"host_netns must be a network namespace's name, not {host_netns!r}")
        publish = self.publish_table(data.get("publish", []), guests)
        proxy = self.proxystack(data.get("proxystack"), control_dir, bool(publish))
        return Config(self.path, default == "allow", ring, control_dir,
                      op.get("admin_socket", DEFAULT_ADMIN_SOCKET), op.get("audit_log", ""),
                      revoke, guests, groups, rules, host_netns, proxy, publish)

    def proxystack(self, table: dict | None, control_dir: str, published: bool) -> ProxyStack:
        """[proxystack]: present (or any [[publish]]) means the operator runs one."""
        if table is None:
            return ProxyStack(published, f"{control_dir}/{PROXY_IDENTITY}.sock")
        self.only(table, {"enabled", "control", "connect_timeout", "restarts",
                          "udp_idle_timeout", "placement", "orphan_grace"}, "proxystack")
        at = lambda key: self.lines.of("proxystack", 0, key)  # noqa: E731
        enabled = table.get("enabled", True)
        if not isinstance(enabled, bool):
            self.fail(at("enabled"), "enabled must be true or false")
        restarts = table.get("restarts", 5)
        if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 0:
            self.fail(at("restarts"), f"restarts must be a whole number, not {restarts!r}")
        placement = table.get("placement", "worker")
        if placement not in ("worker", "operator"):
            self.fail(at("placement"), f'placement must be "worker" or "operator", not {placement!r}')
        return ProxyStack(enabled or published,
                          table.get("control", f"{control_dir}/{PROXY_IDENTITY}.sock"),
                          self.seconds(table.get("connect_timeout", 30.0), at("connect_timeout"),
                                       "connect_timeout"), restarts,
                          self.seconds(table.get("udp_idle_timeout", 60.0),
                                       at("udp_idle_timeout"), "udp_idle_timeout"), placement,
                          self.seconds(table.get("orphan_grace", 30.0), at("orphan_grace"),
                                       "orphan_grace"))

    def seconds(self, value, line: int, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
            self.fail(line, f"{what} must be seconds, above 0 and at most 3600, not {value!r}")
        return float(value)

    def publish_table(self, items: list, guests: dict[str, Guest]) -> tuple[Publish, ...]:
        """[[publish]]: at most MAX_PUBLISH entries, each host port once."""
        if len(items) > MAX_PUBLISH:
            self.fail(self.lines.of("publish", MAX_PUBLISH), f"{len(items)} [[publish]] entries:"
                      f" at most {MAX_PUBLISH}")
        table: dict[tuple, Publish] = {}
        for i, e in enumerate(items):
            entry = self.publish(i, e, guests)
            key = (entry.proto, entry.address, entry.port)
            if key in table:
                self.fail(entry.line, f"publish {i + 1}: {entry.proto} {entry.address} port"
                          f" {entry.port} is published already (line {table[key].line})")
            table[key] = entry
        return tuple(table.values())

    def publish(self, i: int, e: dict, guests: dict[str, Guest]) -> Publish:
        at = lambda key=None: self.lines.of("publish", i, key)  # noqa: E731
        self.only(e, {"address", "port", "proto", "guest", "guest_port"}, "publish", i)
        for key in ("address", "port", "guest"):
            if key not in e:
                self.fail(at(), f"publish {i + 1} has no {key!r}")
        try:
            address = ipaddress.ip_address(e["address"])
        except ValueError:
            self.fail(at("address"), f"publish {i + 1}: {e['address']!r} is not an IP address")
        if address.version == 6 and address.ipv4_mapped:  # the IPv4 address it maps, as on
            address = address.ipv4_mapped  # the wire: it may be published once, not twice
        port, guest_port = e["port"], e.get("guest_port", e["port"])
        for key, v in (("port", port), ("guest_port", guest_port)):
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65535:
                self.fail(at(key), f"publish {i + 1}: {key} must be from 1 to 65535, not {v!r}")
        proto = e.get("proto", "tcp")
        if proto not in ("tcp", "udp"):
            self.fail(at("proto"), f"publish {i + 1}: proto must be tcp or udp, not {proto!r}")
        if e["guest"] not in guests:
            self.fail(at("guest"), f"publish {i + 1}: no guest is called {e['guest']!r}")
        return Publish(at(), address, port, proto, e["guest"], guest_port)

    def resolvers(self, value, line: int, what: str) -> tuple[IPAddress, ...]:
        """An address, or a list of at most MAX_RESOLVERS; [] for none."""
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or len(items) > MAX_RESOLVERS:
            self.fail(line, f"{what} must be an IP address or a list of at most {MAX_RESOLVERS},"
                      f" not {value!r}")
        out = []
        for a in items:
            try:
                out.append(ipaddress.ip_address(a))
            except ValueError:
                self.fail(line, f"{what}: {a!r} is not an IP address")
        return tuple(out)

    def guests(self, items: list, control_dir: str,
               resolvers: tuple[IPAddress, ...] = ()) -> dict[str, Guest]:
        guests: dict[str, Guest] = {}
        owner: dict[IPAddress, str] = {}
        for i, g in enumerate(items):
            at = lambda key=None, i=i: self.lines.of("guests", i, key)  # noqa: E731
            self.only(g, {"name", "addresses", "control", "limits", "netns", "mark", "stack",
                          "resolver"}, "guests", i)
            name = g.get("name")
            if not isinstance(name, str) or not NAME.match(name):
                self.fail(at("name"), f"guest name {name!r}: lower-case letters, digits and -,"
                          " starting with a letter, at most 32")
            if name == PROXY_IDENTITY:
                self.fail(at("name"), f"{PROXY_IDENTITY!r} is the proxy stack's name, no guest's")
            if name in guests:
                self.fail(at("name"), f"guest {name!r} is defined twice")
            addresses = []
            for a in g.get("addresses", []):
                try:
                    addr = ipaddress.ip_address(a)
                except ValueError:
                    self.fail(at("addresses"), f"guest {name!r}: {a!r} is not an IP address")
                if addr in owner:
                    self.fail(at("addresses"), f"guest {name!r}: {addr} belongs to {owner[addr]!r}")
                owner[addr] = name
                addresses.append(addr)
            control = g.get("control", f"{control_dir}/{name}.sock")
            netns = g.get("netns", False)
            if not isinstance(netns, bool):
                self.fail(at("netns"), f"guest {name!r}: netns must be true or false")
            guests[name] = Guest(name, tuple(addresses), control, self.limits(g.get("limits", {}), i),
                                 netns, self.mark(g, name, guests, at("mark")),
                                 self.stack(g.get("stack", {}), i, name),
                                 self.resolvers(g["resolver"], at("resolver"),
                                                f"guest {name!r}: resolver")
                                 if "resolver" in g else resolvers)
        return guests

    def mark(self, g: dict, name: str, guests: dict[str, Guest], line: int) -> int:
        """The guest's SO_MARK: given, or its default; one guest's only."""
        mark = g.get("mark", default_mark(name))
        if not isinstance(mark, int) or isinstance(mark, bool) or not 0 < mark <= 0xFFFFFFFF:
            self.fail(line, f"guest {name!r}: mark must be a number from 1 to 0xffffffff,"
                      f" not {mark!r}")
        for other in guests.values():
            if other.mark == mark:
                how = "" if "mark" in g else " (its default, from its name; set mark = ... to choose)"
                self.fail(line, f"guest {name!r}: mark {mark:#x} is already the mark of guest"
                          f" {other.name!r}{how}")
        return mark

    def stack(self, table: dict, i: int, name: str) -> Stack:
        """[guests.stack]: the options of the host sockets opened for the guest."""
        self.only(table, {"congestion", "source", "sndbuf", "rcvbuf", "keepalive",
                          "connect_timeout"}, "guests.stack", i)
        at = lambda key: self.lines.of("guests.stack", i, key)  # noqa: E731
        values: dict = {}
        if "congestion" in table:
            values["congestion"] = self.congestion(table["congestion"], at("congestion"), name)
        if "source" in table:
            try:
                values["source"] = ipaddress.ip_address(table["source"])
            except ValueError:
                self.fail(at("source"), f"guest {name!r}: source {table['source']!r} is not an"
                          " IP address")
        for key in ("sndbuf", "rcvbuf"):
            if key in table:
                values[key] = self.size(table[key], at(key), key)
                if values[key] >= 1 << 31:
                    self.fail(at(key), f"guest {name!r}: {key} must be below 2 GiB")
        if "keepalive" in table:
            k = table["keepalive"]
            if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 32767:
                self.fail(at("keepalive"), f"guest {name!r}: keepalive must be idle seconds from"
                          f" 0 (off) to 32767, not {k!r}")
            values["keepalive"] = k
        if "connect_timeout" in table:
            values["connect_timeout"] = self.seconds(table["connect_timeout"],
                                                     at("connect_timeout"), "connect_timeout")
        return Stack(**values)

    def congestion(self, value, line: int, name: str) -> str:
        """A congestion control the kernel offers now (nothing is loaded for it)."""
        if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9_]{1,15}", value):
            self.fail(line, f"guest {name!r}: congestion {value!r} is not a congestion"
                      " control's name")
        available = available_congestion()
        if available is not None and value not in available:
            self.fail(line, f"guest {name!r}: congestion {value!r} is not available here"
                      f" (available: {' '.join(sorted(available))}; nothing is loaded for you)")
        return value

    def limits(self, table: dict, i: int) -> Limits:
        self.only(table, {"circuits", "ring_size", "setups_per_second", "memory", "egress_rate"},
                  "guests.limits", i)
        at = lambda key: self.lines.of("guests.limits", i, key)  # noqa: E731
        values = {}
        for key in ("circuits", "setups_per_second"):
            if key in table:
                v = table[key]
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    self.fail(at(key), f"{key} must be a whole number above 0, not {v!r}")
                values[key] = v
        if "ring_size" in table:
            values["ring_size"] = self.ring_size(table["ring_size"], "guests.limits", i, "ring_size")
        if "memory" in table:
            values["memory"] = self.size(table["memory"], at("memory"), "memory")
        if "egress_rate" in table:  # bytes per second: "10 MiB" or "10 MiB/s"
            rate = table["egress_rate"]
            if isinstance(rate, str) and rate.endswith("/s"):
                rate = rate[:-2].rstrip()
            values["egress_rate"] = self.size(rate, at("egress_rate"), "egress_rate")
        return Limits(**values)

    def size(self, value, line: int, what: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        m = SIZE.match(value) if isinstance(value, str) else None
        if not m or int(m.group(1)) == 0:
            self.fail(line, f"{what} must be bytes, as 4096 or \"64 MiB\", not {value!r}")
        return int(m.group(1)) * UNITS[m.group(2)]

    def ring_size(self, value, table: str, i: int, key: str) -> int:
        line = self.lines.of(table, i, key)
        n = self.size(value, line, key)
        if n < 4096 or n > 64 << 20 or n & (n - 1):
            self.fail(line, f"{key} must be a power of two from 4 KiB to 64 MiB, not {n}")
        return n

    def groups(self, table: dict, guests: dict[str, Guest]) -> dict[str, frozenset[str]]:
        groups = {}
        for name, members in table.items():
            line = self.lines.of("groups", 0, name)
            if not NAME.match(name) or name in guests or name in ("external",):
                self.fail(line, f"group name {name!r} is not valid or is a guest's name")
            if not isinstance(members, list) or not members:
                self.fail(line, f"group {name!r} must list guests")
            for m in members:
                if m not in guests:
                    self.fail(line, f"group {name!r}: no guest is called {m!r}")
            groups[name] = frozenset(members)
        return groups

    def rule(self, i: int, r: dict, guests: dict, groups: dict) -> Rule:
        at = lambda key=None: self.lines.of("rules", i, key)  # noqa: E731
        self.only(r, {"from", "to", "proto", "ports", "action"}, "rules", i)
        for key in ("from", "to", "action"):
            if key not in r:
                self.fail(at(), f"rule {i + 1} has no {key!r}")
        source = r["from"]
        if source != "*" and source not in guests and source not in groups:
            self.fail(at("from"), f"rule {i + 1}: from {source!r} is no guest, group or \"*\"")
        dest = r["to"]
        if dest not in ("*", "external") and dest not in guests and dest not in groups:
            try:
                dest = ipaddress.ip_network(dest)
            except ValueError as e:
                self.fail(at("to"), f"rule {i + 1}: to {dest!r} is no guest, group, CIDR,"
                          f" \"external\" or \"*\" ({e})")
        proto = r.get("proto", "*")
        if proto not in ("tcp", "udp", "*"):
            self.fail(at("proto"), f"rule {i + 1}: proto must be tcp, udp or \"*\", not {proto!r}")
        action = r["action"]
        if action not in ("allow", "deny"):
            self.fail(at("action"), f"rule {i + 1}: action must be allow or deny, not {action!r}")
        ports = tuple(self.port_range(p, at("ports"), i) for p in r.get("ports", []))
        return Rule(i, at(), source, dest, proto, ports, action == "allow")

    def port_range(self, p, line: int, i: int) -> tuple[int, int]:
        if isinstance(p, int) and not isinstance(p, bool):
            lo = hi = p
        elif isinstance(p, str) and (m := re.fullmatch(r"(\d+)-(\d+)", p.strip())):
            lo, hi = int(m.group(1)), int(m.group(2))
        else:
            self.fail(line, f"rule {i + 1}: port {p!r} is neither a number nor \"low-high\"")
        if not 1 <= lo <= hi <= 65535:
            self.fail(line, f"rule {i + 1}: port range {p!r} outside 1-65535 or reversed")
        return lo, hi
