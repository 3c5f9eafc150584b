"""The DNS relay's own parts (circuits/dnsrelay.py); end to end in tests/test_dns.py."""
from __future__ import annotations

import errno
import ipaddress
import os
import struct

import pytest

from circuits import dnsrelay


def query(name: str, qid: int = 0x1234, extra: bytes = b"") -> bytes:
    """A DNS query for name's A record, with extra bytes after the question (EDNS)."""
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1 if extra else 0) + qname \
        + struct.pack("!HH", 1, 1) + extra


def test_an_error_reply_answers_the_question_with_the_code():
    q = query("www.outside.test", extra=b"\0\0\x29\x04\xd0\0\0\0\0\0\0")
    r = dnsrelay.error_reply(q, dnsrelay.REFUSED)
    qid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", r[:12])
    assert qid == 0x1234 and flags & 0x8000 and flags & 0x0100 and flags & 0xF == 5
    assert (qd, an, ns, ar) == (1, 0, 0, 0)
    assert r[12:] == query("www.outside.test")[12:]  # the question, without the EDNS record


def test_malformed_queries_get_no_reply():
    assert dnsrelay.error_reply(b"\x12\x34", dnsrelay.SERVFAIL) is None
    assert dnsrelay.error_reply(query("a.b")[:-3], dnsrelay.SERVFAIL) is None  # cut short
    compressed = query("a.b")[:12] + b"\xc0\x0c" + b"\0\1\0\1"
    assert dnsrelay.error_reply(compressed, dnsrelay.SERVFAIL) is None


def test_local_addresses_are_loopback_and_apart_from_127_0_0():
    for _ in range(100):
        addrs = [ipaddress.ip_address(a) for a in dnsrelay.local_addresses(3)]
        assert all(a.is_loopback and a.packed[1:3] != b"\0\0" for a in addrs)
        assert len(set(addrs)) == 3


def test_a_relay_that_cannot_fork_is_an_error_not_a_silent_start(monkeypatch):
    """The relay is a grandchild: a second fork that fails (no process to spare)
    makes start() fail, never a program left with a resolv.conf nobody serves."""
    real_fork, forks = os.fork, []

    def fork():
        forks.append(1)
        if len(forks) > 1:  # in the child: the relay's own fork
            raise OSError(errno.EAGAIN, "no process to spare")
        return real_fork()

    monkeypatch.setattr(os, "fork", fork)
    with pytest.raises(OSError, match="could not start"):
        dnsrelay.start([], ["192.0.2.53"], "/nonexistent/control.sock")

