"""The guests' names and addresses as /etc/hosts lines (`circuits ctl hosts`,
and the /etc/hosts that `circuits run` gives a guest with a resolver)."""
from __future__ import annotations


def hosts_file(config) -> str:
    """/etc/hosts lines: each guest's addresses under its name."""
    lines = ["# guests of the circuits operator " + config.path]
    for g in config.guests.values():
        lines += [f"{a}\t{g.name}" for a in g.addresses]
    return "\n".join(lines) + "\n"
