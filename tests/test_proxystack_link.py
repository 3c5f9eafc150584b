"""The link between the operator and the proxy stack, one end at a time.  The operator's
end against a proxy stack played by the test: replies of the wrong kind, reloads that
overlap, what each EGRESS carries after a reload.  A real operator process; the test
holds the worker's pidfile lock, so the operator adopts the test's stand-in instead of
starting a worker.  Then the proxy stack's end (its Link and Ports, on the test's own
loop) against an operator that breaks the protocol.  Nothing leaves the test's own Unix
sockets but one socket bound on 127.0.0.1."""
from __future__ import annotations

import asyncio
import errno
import fcntl
import ipaddress
import os
import socket
import subprocess
import sys
import time

import pytest

from circuits import protocol as p
from circuits.operator import child
from circuits.operator.admin import request
from circuits.proxystack.link import Link
from circuits.proxystack.ports import Ports, _overlap
from circuits.proxystack.sockets import PLAIN

CONFIG = """
[operator]
control_dir = "{dir}"
admin_socket = "{dir}/admin.sock"

[proxystack]
connect_timeout = 10

[[guests]]
name = "web"
addresses = ["10.0.0.1"]
mark = 0x10
[guests.stack]
keepalive = 60

[[publish]]
address = "127.0.0.1"
port = 18080
guest = "web"
guest_port = 80

[[rules]]
from = "*"
to = "external"
action = "allow"
"""


class Stack:
    """The proxy stack's end of its control socket, played by the test."""

    def __init__(self, path: str):
        deadline = time.monotonic() + 10
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.sock.settimeout(10)
            try:
                self.sock.connect(path)
                break
            except OSError:  # the operator serves it a moment after the guests' sockets
                self.sock.close()
                assert time.monotonic() < deadline, "no proxy stack control socket"
                time.sleep(0.05)
        p.send(self.sock, p.Hello(request=1))
        assert isinstance(p.receive(self.sock)[0], p.Welcome)

    def next(self, kind: type[p.Message]) -> tuple[p.Message, list[int]]:
        msg, fds = p.receive(self.sock)
        assert isinstance(msg, kind), msg
        return msg, fds

    def answer(self, msg: p.Message) -> None:
        p.send(self.sock, msg)


class Operator:
    def __init__(self, root):
        self.root, self.run = root, root / "run"
        self.config = root / "link.toml"
        self.config.write_text(CONFIG.format(dir=self.run))

    def status(self) -> dict:
        return request(str(self.run / "admin.sock"), "status")["result"]

    def wait_status(self, key: str, value: str) -> dict:
        deadline = time.monotonic() + 10
        while (status := self._status()) is None or status[key] != value:
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        return status

    def _status(self) -> dict | None:
        try:
            return self.status()
        except OSError:  # the admin socket comes a moment after the control sockets
            return None

    def reload(self) -> subprocess.Popen:
        """`circuits ctl reload`, under way: it answers once the table is answered."""
        return subprocess.Popen([sys.executable, "-m", "circuits", "ctl", "--config",
                                 str(self.config), "reload"], stdout=subprocess.PIPE, text=True)

    def guest(self, name: str = "web") -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(10)
        sock.connect(str(self.run / f"{name}.sock"))
        p.send(sock, p.Hello(request=1))
        assert isinstance(p.receive(sock)[0], p.Welcome)
        return sock


@pytest.fixture
def op(tmp_path):
    """An operator that adopted the test's stand-in for a worker, and that stand-in."""
    run = tmp_path / "run"
    run.mkdir()
    stand_in = subprocess.Popen(["sleep", "600"])  # the "worker" the operator watches
    lock = os.open(run / "proxystack.pid", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.write(lock, str(stand_in.pid).encode())
    operator = Operator(tmp_path)
    proc = child.start(str(operator.config))
    try:
        operator.stack = Stack(str(run / "proxystack.sock"))
        yield operator
    finally:
        child.stop(proc)
        os.close(lock)
        stand_in.kill()
        stand_in.wait(10)


def connect_outside(guest: socket.socket, request_id: int = 2) -> None:
    p.send(guest, p.Connect(p.Endpoint.parse("192.0.2.1", 80), 0, request=request_id))


def test_a_reply_of_the_wrong_kind_fails_its_request(op):
    # OK is what a table's other parts get; its last part needs PUBLISHED.
    table, _ = op.stack.next(p.Publish)
    op.stack.answer(p.Ok(request=table.request))
    status = op.wait_status("publish", "not applied; the proxy stack serves the ports it had")
    assert any("EPROTO" in line for line in status["errors"]), status
    # PUBLISHED to an EGRESS: the guest's CONNECT fails instead of waiting for ever.
    guest = op.guest()
    connect_outside(guest)
    egress, fds = op.stack.next(p.Egress)
    p.close_all(fds)
    op.stack.answer(p.Published(request=egress.request))
    reply, _ = p.receive(guest)
    assert isinstance(reply, p.Error) and reply.code == errno.EPROTO, reply
    # and the link still serves: the next EGRESS gets the stack's own answer
    connect_outside(guest, 3)
    egress, fds = op.stack.next(p.Egress)
    p.close_all(fds)
    op.stack.answer(p.Error(errno.ECONNREFUSED, "refused", request=egress.request))
    reply, _ = p.receive(guest)
    assert isinstance(reply, p.Error) and reply.code == errno.ECONNREFUSED, reply


@pytest.mark.parametrize("failures", [((5, errno.EADDRINUSE),),  # the table has 1 entry
                                      ((0, errno.EADDRINUSE), (0, errno.EADDRINUSE))])
def test_a_published_that_names_no_entry_of_the_table_is_a_bad_reply(op, failures):
    table, _ = op.stack.next(p.Publish)
    op.stack.answer(p.Published(failures, request=table.request))
    status = op.wait_status("publish", "not applied; the proxy stack serves the ports it had")
    assert any("EPROTO" in line for line in status["errors"]), status


def test_each_reload_answers_with_its_own_table(op):
    table, _ = op.stack.next(p.Publish)
    op.stack.answer(p.Published(request=table.request))
    op.wait_status("publish", "1 of 1 published ports listening")
    first = op.reload()
    a, _ = op.stack.next(p.Publish)
    second = op.reload()
    b, _ = op.stack.next(p.Publish)  # a second reload before the first table is answered
    op.stack.answer(p.Published(((0, errno.EADDRINUSE),), request=a.request))
    out, _ = first.communicate(timeout=30)
    assert first.returncode == 1, out
    assert "publish: 0 of 1 published ports listening" in out
    assert "cannot listen: EADDRINUSE" in out
    op.stack.answer(p.Published(request=b.request))
    out, _ = second.communicate(timeout=30)
    assert second.returncode == 0 and "publish: 1 of 1 published ports listening" in out, out
    assert op.status()["errors"] == []


def test_a_reload_gives_egress_the_new_stack_options_and_keeps_the_mark(op):
    """[guests.stack] applies to the next connects; the mark is the one the host table
    counts and limits by, set when the operator started: a reload keeps it."""
    table, _ = op.stack.next(p.Publish)
    op.stack.answer(p.Published(request=table.request))
    guest = op.guest()

    def egress(request_id: int) -> p.Egress:
        connect_outside(guest, request_id)
        msg, fds = op.stack.next(p.Egress)
        p.close_all(fds)
        op.stack.answer(p.Error(errno.ECONNREFUSED, "refused", request=msg.request))
        assert isinstance(p.receive(guest)[0], p.Error)
        return msg

    before = egress(2)
    assert (before.mark, before.keepalive, before.connect_timeout_ms) == (0x10, 60, 10_000)
    op.config.write_text(op.config.read_text().replace("mark = 0x10", "mark = 0x20").replace(
        "keepalive = 60", "keepalive = 30\nconnect_timeout = 3"))
    reload = op.reload()
    table, _ = op.stack.next(p.Publish)
    op.stack.answer(p.Published(request=table.request))
    out, _ = reload.communicate(timeout=30)
    assert reload.returncode == 0, out
    assert "the mark of guest web changes at the operator's next start (0x10 until then)" in out
    after = egress(3)
    assert (after.mark, after.keepalive, after.connect_timeout_ms) == (0x10, 30, 3_000)
    again = op.guest()  # a control connection made after the reload: the same
    guest.close()
    guest = again
    assert egress(2).mark == 0x10


def test_a_table_that_names_a_host_twice_serves_the_first_and_reports_the_second():
    """The proxy stack's side, for an operator that breaks section 4.7 (its own check
    refuses such a file): the count of listening ports stays true."""
    loop = asyncio.new_event_loop()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        host = p.Endpoint.parse("127.0.0.1", probe.getsockname()[1])
    ports = Ports(loop, PLAIN, None, None)
    try:
        failures = ports.apply((p.PublishEntry(host, 80, "web"), p.PublishEntry(host, 81, "db")),
                               1.0)
        assert [(i, e.errno) for i, e in failures] == [(1, errno.EADDRINUSE)]
        assert list(ports.open) == [host] and ports.open[host].entry.guest == "web"
    finally:
        ports.close()
        loop.close()


def test_the_proxy_stack_does_not_answer_a_bad_reply():
    """A bad PUBLISHED (or any bad reply) on the proxy stack's link fails the request it
    names, if any, and is not answered: an ERROR would read as the reply to the
    operator's own request of that number (docs/protocol.md, section 5)."""
    loop = asyncio.new_event_loop()
    ours, operator = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    operator.settimeout(5)
    link = Link(loop, ours, lambda msg, fds: None, lambda table: None)
    try:
        hello = loop.create_task(link.hello())
        loop.run_until_complete(asyncio.sleep(0))
        msg, _ = p.receive(operator)
        p.send(operator, p.Welcome(p.VERSION, "proxystack", request=msg.request))
        loop.run_until_complete(hello)
        bad = bytearray(p.encode(p.Published(((0, errno.EADDRINUSE),)), request=7))
        bad[16] = 2  # `failed` says 2, one follows
        operator.send(bytes(bad))
        loop.run_until_complete(asyncio.sleep(0.1))
        operator.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing came back
            operator.recv(4096)
        assert not link.gone.done()
    finally:
        link.close()
        operator.close()
        loop.close()


@pytest.mark.parametrize("a, b, clash", [
    ("0.0.0.0", "::", True), ("::", "0.0.0.0", True),  # a dual-stack wildcard takes IPv4's
    ("198.18.0.1", "0.0.0.0", True), ("0.0.0.0", "198.18.0.1", True),
    ("198.18.0.1", "::", True), ("::", "198.18.0.1", True),
    ("fd00::1", "::", True), ("fd00::1", "0.0.0.0", False), ("0.0.0.0", "fd00::1", False),
    ("198.18.0.1", "198.18.0.2", False), ("198.18.0.1", "198.18.0.1", True),
])
def test_overlapping_addresses_clash_in_either_order(a, b, clash):
    assert _overlap(ipaddress.ip_address(a), ipaddress.ip_address(b)) is clash


def test_a_reply_to_a_request_cancelled_before_it_woke_has_its_descriptors_closed():
    """A port closed under its INGRESS cancels the request after the CIRCUIT came
    but before the task woke: the reply's descriptors must not be lost open."""
    loop = asyncio.new_event_loop()
    ours, operator = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link = Link(loop, ours, lambda msg, fds: None, lambda table: None)
    try:
        task = loop.create_task(link.request(p.Hello()))
        loop.run_until_complete(asyncio.sleep(0))
        (request,) = link.waiting
        fds = list(os.pipe())
        link._dispatch(p.Welcome(p.VERSION, "proxystack", request=request), fds)
        task.cancel()  # before the task has woken to take its reply
        with pytest.raises(asyncio.CancelledError):
            loop.run_until_complete(task)
        for fd in fds:
            with pytest.raises(OSError) as e:
                os.fstat(fd)
            assert e.value.errno == errno.EBADF
        assert not link.waiting
    finally:
        link.close()
        operator.close()
        loop.close()
