"""PUBLISH between peers of different ages: an operator and a proxy stack older than the
message each keep working.  Real operator and worker processes; the published port is on
127.0.0.1 of the test's own namespace, and no packet leaves loopback."""
from __future__ import annotations

import errno
import socket
import subprocess
import sys
import time

import pytest

from circuits import protocol as p
from circuits.operator import child
from circuits.operator.admin import request
from circuits.operator.proxy import stop_worker
from guestnet_fixtures import circuits_cmd

CONFIG = """
[operator]
control_dir = "{dir}"
admin_socket = "{dir}/admin.sock"

[proxystack]
orphan_grace = 5

[[guests]]
name = "web"
addresses = ["10.0.0.1"]

[[publish]]
address = "127.0.0.1"
port = {port}
guest = "web"
guest_port = 80
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "publish.toml"
    path.write_text(CONFIG.format(dir=tmp_path / "run", port=free_port()))
    yield path
    stop_worker(str(tmp_path / "run" / "proxystack.pid"))


def status(config) -> dict:
    return request(str(config.parent / "run" / "admin.sock"), "status")["result"]


def wait_for(what, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not _true(what):
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.05)


def _true(what) -> bool:
    try:
        return what()
    except OSError:  # the admin socket comes a moment after the control sockets
        return False


def hello(path: str) -> socket.socket:
    """A control connection to the operator that has said HELLO and was welcomed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(path)
    p.send(sock, p.Hello(request=1))
    assert isinstance(p.receive(sock)[0], p.Welcome)
    return sock


def refuse_as_an_older_peer(sock: socket.socket) -> None:
    """Answer the operator's next PUBLISH as a peer that does not know the type and
    refuses it, as section 2 asks (the proxy stack from before PUBLISH answered nothing:
    below)."""
    msg, _ = p.receive(sock)
    assert isinstance(msg, p.Publish) and msg.total == 1 and msg.entries[0].guest == "web"
    p.send(sock, p.Error(errno.EPROTO, f"unknown message type {p.Publish.TYPE}",
                         request=msg.request))


def test_a_proxy_stack_older_than_publish_keeps_the_operator_working(config):
    op = child.start(str(config))
    try:
        wait_for(lambda: status(config)["publish"] == "1 of 1 published ports listening")
        out = circuits_cmd("ctl", "--config", str(config), "stop-proxystack")
        assert out.returncode == 0, out
        wait_for(lambda: status(config)["proxystack"] == "not connected, not running")

        older = hello(str(config.parent / "run" / "proxystack.sock"))  # its HELLO is version 1
        refuse_as_an_older_peer(older)  # the table on its link
        wait_for(lambda: status(config)["publish"].startswith("not applied"))
        (error,) = status(config)["errors"]
        assert "the proxy stack did not take the publish table: EPROTO" in error
        reload = subprocess.Popen([sys.executable, "-m", "circuits", "ctl", "--config",
                                   str(config), "reload"], stdout=subprocess.PIPE, text=True)
        refuse_as_an_older_peer(older)  # the reload's table
        out, _ = reload.communicate(timeout=30)
        assert reload.returncode == 1 and "reloaded" in out, out
        assert "publish: not applied; the proxy stack serves the ports it had" in out
        assert "error: the proxy stack did not take the publish table: EPROTO" in out
        assert status(config)["proxystack"].startswith("connected")  # the link stays

        # The proxy stack from before PUBLISH answers a message it does not know with
        # nothing at all (so does one stuck for a while): the reload's answer does not wait
        # for ever.
        start = time.monotonic()
        out = circuits_cmd("ctl", "--config", str(config), "reload")
        assert out.returncode == 1 and "publish: not known: the proxy stack has not answered" \
            in out.stdout and "ETIMEDOUT (Connection timed out) no answer in 5 s" \
            in out.stdout, out
        assert time.monotonic() - start < 20  # bounded: the operator stopped waiting
        late, _ = p.receive(older)  # an answer that comes after all still counts
        assert isinstance(late, p.Publish)
        p.send(older, p.Published(request=late.request))
        wait_for(lambda: status(config)["publish"] == "1 of 1 published ports listening")
        assert status(config)["errors"] == []
        older.close()
    finally:
        child.stop(op)


def test_a_worker_whose_operator_gives_no_table_publishes_its_own_file(config, tmp_path):
    """An operator older than PUBLISH welcomes the worker and sends no table."""
    port = int(config.read_text().split("port = ")[1].split()[0])
    (tmp_path / "run").mkdir()
    older = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    older.bind(str(tmp_path / "run" / "proxystack.sock"))
    older.listen(1)
    older.settimeout(20)
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "circuits.proxystack", "--config",
                               str(config)], stderr=log)
    try:
        conn, _ = older.accept()
        conn.settimeout(10)
        msg, _ = p.receive(conn)
        assert isinstance(msg, p.Hello)
        p.send(conn, p.Welcome(p.VERSION, "proxystack", request=msg.request))

        def listens() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listens)
        assert "the operator gave no publish table: publishing the ports of" in \
            (tmp_path / "worker.log").read_text()
        conn.close()
    finally:
        worker.terminate()
        worker.wait(10)
        log.close()
        older.close()
