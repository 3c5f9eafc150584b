"""What the proxy stack said of the publish table the operator gave it last.

The operator sends its table (its configuration's [[publish]] entries and
the proxy stack's timeouts) whenever a proxy stack links and on every
reload; the answer names the entries that could not be bound.  This is how
`circuits ctl status`, the reload's answer and the log tell of it.
"""
from __future__ import annotations

import errno
import logging
import os

from circuits import protocol as p
from circuits.operator.config import Publish

log = logging.getLogger("circuits.operator")


def describe(i: int, entry: Publish) -> str:
    """`publish 2 (line 40) udp://198.18.0.1:8080 -> web:53`."""
    host = p.Endpoint(entry.address, entry.port, p.TCP if entry.proto == "tcp" else p.UDP)
    return f"publish {i + 1} (line {entry.line}) {host} -> {entry.guest}:{entry.guest_port}"


def errno_text(code: int) -> str:
    """`EADDRINUSE (Address already in use)`."""
    return f"{errno.errorcode.get(code, f'errno {code}')} ({os.strerror(code)})"


class PublishReport:
    """One table sent to the proxy stack, and its answer once it came."""

    def __init__(self, entries: tuple[Publish, ...]):
        self.entries = entries
        self.reply: p.Message | None = None  # PUBLISHED or ERROR; None: no answer yet

    def answered(self, reply: p.Message) -> None:
        """The proxy stack's answer (or the ERROR standing for none): logged."""
        self.reply = reply
        for line in self.errors():
            log.error("proxy stack: %s", line)
        if isinstance(reply, p.Published):
            log.info("proxy stack: %s", self.summary())

    def summary(self) -> str:
        """One line for `circuits ctl status` and the reload's answer."""
        if self.reply is None:
            return "given to the proxy stack, no answer yet"
        if self._link_gone():
            return "no proxy stack connected: the next one to link gets the table"
        if isinstance(self.reply, p.Published):
            return f"{len(self.entries) - len(self.reply.failures)} of {len(self.entries)}" \
                   " published ports listening"
        if self.reply.code == errno.ETIMEDOUT:
            return "not known: the proxy stack has not answered"
        return "not applied; the proxy stack serves the ports it had"

    def errors(self) -> list[str]:
        """What is wrong, one line each: an entry that could not be bound, or
        a table the proxy stack did not take (or has not answered)."""
        if self._link_gone():
            return []  # not refused: the next proxy stack to link gets the table
        if isinstance(self.reply, p.Error):
            how = "has not answered" if self.reply.code == errno.ETIMEDOUT else "did not take"
            return [f"the proxy stack {how} the publish table: {errno_text(self.reply.code)}"
                    f" {self.reply.reason}".rstrip()]
        if not isinstance(self.reply, p.Published):
            return []
        return [f"{describe(i, self.entries[i])}: cannot listen: {errno_text(code)}"
                for i, code in self.reply.failures if i < len(self.entries)]

    def _link_gone(self) -> bool:
        """Whether the link ended before an answer (ProxyLink.fail_all)."""
        return isinstance(self.reply, p.Error) and self.reply.code == errno.ENETUNREACH
