"""The configuration keys of namespaced guests: netns, mark, egress_rate, host_netns."""
from __future__ import annotations

import pytest

from circuits.operator.config import MARK_BASE, ConfigError, default_mark, parse


def guests(*bodies: str, operator: str = "") -> str:
    text = f"[operator]\n{operator}\n" if operator else ""
    for body in bodies:
        text += f"\n[[guests]]\n{body}\n"
    return text


def test_defaults_and_values():
    cfg = parse(guests('name = "web"\nnetns = true\n[guests.limits]\negress_rate = "10 MiB/s"',
                       'name = "db"\nmark = 0x1234\n[guests.limits]\negress_rate = "64 KiB"',
                       'name = "batch"', operator='host_netns = "proxy"'))
    web, db, batch = (cfg.guests[n] for n in ("web", "db", "batch"))
    assert web.netns and not db.netns and not batch.netns
    assert web.limits.egress_rate == 10 << 20 and db.limits.egress_rate == 64 << 10
    assert batch.limits.egress_rate == 0  # no limit
    assert db.mark == 0x1234
    assert web.mark == default_mark("web") and web.mark >> 16 == MARK_BASE >> 16
    assert cfg.host_netns == "proxy"


def test_the_default_mark_does_not_depend_on_order():
    one = parse(guests('name = "web"', 'name = "db"'))
    two = parse(guests('name = "db"', 'name = "web"'))
    assert one.guests["web"].mark == two.guests["web"].mark
    assert one.guests["db"].mark == two.guests["db"].mark != one.guests["web"].mark


@pytest.mark.parametrize("text,line,what", [
    (guests('name = "web"\nnetns = "yes"'), 4, "netns must be true or false"),
    (guests('name = "web"\nmark = 0'), 4, "mark must be a number from 1 to 0xffffffff"),
    (guests('name = "web"\nmark = "red"'), 4, "mark must be a number"),
    (guests('name = "web"\nmark = 5', 'name = "db"\nmark = 5'), 8,
     "mark 0x5 is already the mark of guest 'web'"),
    (guests('name = "web"\n[guests.limits]\negress_rate = "fast"'), 5, "egress_rate must be bytes"),
    (guests('name = "web"\n[guests.limits]\negress_rate = 0'), 5, "egress_rate must be bytes"),
    (guests('name = "web"', operator='host_netns = "../x"'), 2, "host_netns must be"),
    (guests('name = "web"\nnetwork = true'), 4, "unknown key 'network'"),
])
def test_bad_values_are_refused_with_their_line(text, line, what):
    with pytest.raises(ConfigError) as e:
        parse(text, "g.toml")
    assert e.value.line == line, str(e.value)
    assert what in str(e.value)


def test_a_default_mark_clash_says_how_to_fix_it():
    taken = default_mark("web")
    with pytest.raises(ConfigError) as e:
        parse(guests(f'name = "db"\nmark = {taken}', 'name = "web"'))
    assert "set mark = ... to choose" in str(e.value)


def test_resolver_of_the_operator_is_every_guests_unless_one_sets_its_own():
    cfg = parse(guests('name = "web"', 'name = "db"\nresolver = ["192.0.2.53", "2001:db8::53"]',
                       'name = "batch"\nresolver = []', operator='resolver = "198.51.100.53"'))
    assert [str(a) for a in cfg.guests["web"].resolvers] == ["198.51.100.53"]
    assert [str(a) for a in cfg.guests["db"].resolvers] == ["192.0.2.53", "2001:db8::53"]
    assert cfg.guests["batch"].resolvers == ()  # none: circuits run leaves /etc alone
    assert parse(guests('name = "web"')).guests["web"].resolvers == ()


@pytest.mark.parametrize("text,line,what", [
    (guests('name = "web"\nresolver = "dns.example"'), 4,
     "guest 'web': resolver: 'dns.example' is not an IP address"),
    (guests('name = "web"\nresolver = 53'), 4, "must be an IP address or a list of at most 3"),
    (guests('name = "web"', operator='resolver = ["1.1.1.1", "1.0.0.1", "8.8.8.8", "9.9.9.9"]'),
     2, "[operator] resolver must be an IP address or a list of at most 3"),
])
def test_bad_resolvers_are_refused_with_their_line(text, line, what):
    with pytest.raises(ConfigError) as e:
        parse(text, "g.toml")
    assert e.value.line == line, str(e.value)
    assert what in str(e.value)
