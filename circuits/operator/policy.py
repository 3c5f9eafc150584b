"""Connection policy: the verdict on one setup, from the rules of a Config.

Rules are evaluated once per connection, in file order; the first rule that
matches decides, and when none does, the operator's default does
(docs/policy.md, "Order of evaluation").
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from circuits.operator.config import Config, IPAddress, Rule

MAX_CACHED = 65536  # verdicts kept


@dataclass(frozen=True)
class Verdict:
    allow: bool
    rule: Rule | None  # None: no rule matched, the default decided
    dest_guest: str | None  # the guest the address belongs to; None: external

    def describe(self) -> str:
        which = f"rule {self.rule.index + 1} (line {self.rule.line})" if self.rule else "default"
        return f"{'allow' if self.allow else 'deny'} by {which}"


class Policy:
    """The rules of one configuration, ready to judge setups."""

    def __init__(self, config: Config):
        self.config = config
        self.owner: dict[IPAddress, str] = {
            addr: g.name for g in config.guests.values() for addr in g.addresses}
        # Verdicts by (source, address, port, proto): a policy never changes
        # (a reload makes a new one), and setups repeat the same few questions.
        self._verdicts: dict[tuple, Verdict] = {}

    def guest_at(self, address: IPAddress) -> str | None:
        """The guest an address belongs to, or None for the outside world."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return self.owner.get(address)

    def check(self, source: str, address: IPAddress, port: int, proto: str) -> Verdict:
        """May guest `source` open a `proto` connection to address:port?"""
        key = (source, address, port, proto)
        verdict = self._verdicts.get(key)
        if verdict is None:
            if len(self._verdicts) >= MAX_CACHED:
                self._verdicts.clear()  # bounded: a guest scanning ports cannot grow it
            verdict = self._verdicts[key] = self._judge(source, address, port, proto)
        return verdict

    def _judge(self, source: str, address: IPAddress, port: int, proto: str) -> Verdict:
        dest = self.guest_at(address)
        for rule in self.config.rules:
            if self._matches(rule, source, dest, address, port, proto):
                return Verdict(rule.allow, rule, dest)
        return Verdict(self.config.default_allow, None, dest)

    def _in(self, name: str, guest: str | None) -> bool:
        """Does a rule's guest-or-group name cover this guest?"""
        return guest is not None and (name == guest or guest in self.config.groups.get(name, ()))

    def _matches(self, rule: Rule, source: str, dest: str | None, address: IPAddress,
                 port: int, proto: str) -> bool:
        if rule.source != "*" and not self._in(rule.source, source):
            return False
        if rule.proto != "*" and rule.proto != proto:
            return False
        if rule.ports and not any(lo <= port <= hi for lo, hi in rule.ports):
            return False
        to = rule.dest
        if to == "*":
            return True
        if to == "external":
            return dest is None
        if isinstance(to, str):
            return self._in(to, dest)
        return address.version == to.version and address in to
