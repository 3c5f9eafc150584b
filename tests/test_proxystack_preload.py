"""Unmodified programs connecting to the outside: the preload library and the proxy stack.

The operator answers a CONNECT to the outside only once the proxy stack's host
TCP connection is up.  A non-blocking connect must not wait for that: it says
EINPROGRESS at once, the socket turns writable when the answer arrives, and
SO_ERROR gives the kernel's errno.  tests/egress_app.py (plain sockets and
selectors, under `circuits run`) connects to servers in the test's outside
namespace; an nft rule there, dropping a port's packets until the test
deletes it, holds a handshake back for as long as the test wants, so what
the program does meanwhile shows it was not blocked.
"""
from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from circuits.operator.admin import request
from proxystack_fixtures import Held, OUTSIDE_IP, requires_netns, world  # noqa: F401 - fixtures

pytestmark = requires_netns
APP = Path(__file__).with_name("egress_app.py")


def app(world, guest: str, *args: str, debug: bool = False) -> subprocess.Popen:
    env = {"CIRCUITS_LOG": "debug"} if debug else {}
    return subprocess.Popen([sys.executable, "-m", "circuits", "run", "--guest", guest,
                             "--config", str(world.config), "--", sys.executable, str(APP),
                             *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def line(proc: subprocess.Popen, timeout: float = 30) -> str:
    """The next line proc prints, within timeout."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"nothing printed within {timeout} s"
    got = proc.stdout.readline().strip()
    assert got, f"the program ended: {proc.communicate(timeout=30)}"
    return got


def finish(proc: subprocess.Popen, timeout: float = 30) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out + err
    return out, err


def live_to(world, port: int) -> list[dict]:
    circuits = request(str(world.dir / "admin.sock"), "circuits")["result"]
    return [c for c in circuits if c["to"].endswith(f":{port}")]


def wait_gone(world, port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while live_to(world, port):
        assert time.monotonic() < deadline, f"a circuit to port {port} is left: {live_to(world, port)}"
        time.sleep(0.1)


@pytest.mark.parametrize("selector", ["epoll", "select"])
def test_event_loop_serves_on_while_an_outside_handshake_is_held(world, selector):
    world.serve("echo", 91)
    world.serve("echo", 92)
    held = Held(world, 92)
    proc = app(world, "web", "serve", OUTSIDE_IP, "91", "92", selector)
    assert line(proc) == "connecting EINPROGRESS"
    assert line(proc) == "served 50 while connecting"  # the loop went on: 50 round trips
    held.release()  # only now can the handshake complete
    assert line(proc) == "slow connected 0"
    assert line(proc) == "slow echo ok"
    finish(proc)


@pytest.mark.parametrize("selector", ["epoll", "select"])
@pytest.mark.parametrize("guest,address,port,expect", [
    ("web", OUTSIDE_IP, "1", "ECONNREFUSED"),   # the outside answers RST
    ("db", OUTSIDE_IP, "9999", "ETIMEDOUT"),    # held for good; db's connect_timeout is 1 s
    ("web", "203.0.113.5", "80", "ENETUNREACH"),  # no route from the host's namespace
    ("web", OUTSIDE_IP, "25", "EACCES"),        # the policy says no
])
def test_failed_outside_connect_is_told_by_so_error(world, selector, guest, address, port,
                                                    expect):
    if expect == "ETIMEDOUT":
        Held(world, 9999)
    out, _ = finish(app(world, guest, "connect", address, port, selector))
    assert out.strip() == f"EINPROGRESS {expect}"


@pytest.mark.parametrize("when", ["at-once", "answered"])
def test_close_while_the_connect_is_in_flight(world, when):
    """Nothing is left: not the program's descriptors, not the operator's
    circuit, not the proxy stack's connection to the outside."""
    world.serve("echo", 91)
    outside = world.serve("ends", 93)  # prints "ended" when its connection ends
    held = Held(world, 93) if when == "at-once" else None
    proc = app(world, "web", "close", OUTSIDE_IP, "91", "93", when, debug=True)
    words = line(proc).split()
    assert words[0] == "closed" and int(words[2]) <= int(words[1]), words  # no descriptor left
    if held:
        held.release()  # the handshake completes after the close: its answer finds nobody
    # The proxy stack ends the outside connection: the guest's side of its circuit is gone.
    assert line(outside) == "ended"
    wait_gone(world, 93)  # and the operator's record of the circuit with it
    proc.stdin.write("\n")
    proc.stdin.flush()
    _, err = finish(proc)
    how = "no answer yet" if when == "at-once" else "its circuit closed"
    assert f"connect to {OUTSIDE_IP}:93: closed in flight ({how})" in err, err


def test_fork_while_the_connect_is_in_flight(world):
    """fork waits for the answer: parent and child share one connected circuit."""
    world.serve("echo", 94)
    held = Held(world, 94)
    proc = app(world, "web", "fork", OUTSIDE_IP, "94")
    assert line(proc) == "forking"
    held.release()  # fork returns once the answer is in: in both processes, connected
    assert line(proc) == "child: SO_ERROR 0 peer 94"
    assert line(proc) == "parent: child exited 0 echo parent"  # the child's close only let go
    finish(proc)


@pytest.fixture(scope="module")
def fork_connect(tmp_path_factory) -> str:
    """tests/fork_connect.c, built."""
    if not shutil.which("cc"):
        pytest.skip("no C compiler (cc) to build tests/fork_connect.c")
    exe = tmp_path_factory.mktemp("fork") / "fork_connect"
    subprocess.run(["cc", "-O1", "-Wall", "-Werror", "-pthread", "-o", str(exe),
                    str(Path(__file__).with_name("fork_connect.c"))], check=True)
    return str(exe)


def test_connect_started_while_fork_waits_is_the_childs_too(world, fork_connect):
    """fork waits for a held connect; meanwhile another thread connects a
    second socket.  The child is counted in for that one too: its close
    leaves the parent's connection going."""
    world.serve("echo", 95)
    world.serve("echo", 96)
    held = Held(world, 95)
    proc = subprocess.Popen([sys.executable, "-m", "circuits", "run", "--guest", "web",
                             "--config", str(world.config), "--", fork_connect, OUTSIDE_IP,
                             "95", "96"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert line(proc) == "waiting"
    time.sleep(1)  # the other thread connects (at 0.3 s) while fork waits
    held.release()
    out, err = finish(proc)
    assert out.strip().splitlines()[-1] == "ok", out + err


def test_signal_interrupts_a_blocking_connect(world):
    """A blocking connect returns EINTR when a signal handler runs (Python
    raises from the handler), as the kernel's does, and the connect goes on:
    the socket turns writable once the handshake completes."""
    world.serve("echo", 95)
    held = Held(world, 95)
    proc = app(world, "web", "interrupt", OUTSIDE_IP, "95")
    try:
        words = line(proc, timeout=10).split()
        assert words[0] == "interrupted" and float(words[1]) < 5, words
    finally:
        held.release()
    assert line(proc) == "connected 0"
    finish(proc)
