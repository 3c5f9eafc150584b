"""A reload applies a new [[publish]] list and new [proxystack] timeouts, and so does
every link with a proxy stack (a fresh worker, one adopted after an operator's kill -9,
the in-process placement): the operator gives it its table (PUBLISH), and the proxy stack
changes only what differs.  Real processes; the outside world is the test's own namespace."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import circuits
from guestnet_fixtures import circuits_cmd
from proxystack_fixtures import (  # noqa: F401 - fixtures
    CONFIG, HOST_IP, OUTSIDE_IP, _world, both_placements, requires_netns)

pytestmark = requires_netns
# The fixtures' file (tcp and udp 8080 to web's 80 and 53), and tcp 8082 to web's 82;
# UDP flows live 5 s without a datagram, so none ends by itself while a test runs.
assert "udp_idle_timeout = 1\n" in CONFIG
TEMPLATE = CONFIG.replace("udp_idle_timeout = 1\n", "udp_idle_timeout = 5\n") + """
[[publish]]
address = "{host_ip}"
port = 8082
guest = "web"
guest_port = 82
"""
FIRST = [("tcp", HOST_IP, 8080, 80), ("udp", HOST_IP, 8080, 53), ("tcp", HOST_IP, 8082, 82)]
PUBLISH_BLOCK = re.compile(r"^\[\[publish\]\]\n(?:\w+ = .*\n)+", re.M)


@pytest.fixture
def world(request, tmp_path):
    """The fixtures' world with FIRST published, its operator's log kept."""
    yield from _world(tmp_path, log=True, template=TEMPLATE,
                      placement=getattr(request, "param", "worker"))


def set_publish(world, *entries: tuple[str, str, int, int]) -> None:
    """The file's [[publish]] list, now: (proto, host address, port, web's port) each."""
    text = PUBLISH_BLOCK.sub("", world.config.read_text())
    for proto, address, port, guest_port in entries:
        text += (f'\n[[publish]]\naddress = "{address}"\nport = {port}\nproto = "{proto}"\n'
                 f'guest = "web"\nguest_port = {guest_port}\n')
    world.config.write_text(text)


def ctl(world, *args: str) -> subprocess.CompletedProcess:
    return circuits_cmd("ctl", "--config", str(world.config), *args)


def reload(world, listening: int, of: int) -> subprocess.CompletedProcess:
    """`circuits ctl reload`, whose answer says how many published ports listen."""
    out = ctl(world, "reload")
    assert f"publish: {listening} of {of} published ports listening" in out.stdout, out
    return out


def listening_socket(world, proto: str, port: int) -> str | None:
    """The inode of the host socket bound to HOST_IP:port (None: none is)."""
    flags = "-Hltne" if proto == "tcp" else "-Hulne"
    ss = world.in_host("ss", flags, "src", f"{HOST_IP}:{port}")
    found = re.search(r"ino:(\d+)", ss)
    return found.group(1) if found else None


class Web:
    """Guest web's listeners; each answers "PORT PEER DATA": its own port, the
    outside peer its accept showed, and what it got ("bye": then it closes)."""

    def __init__(self, world):
        self.world, self.listeners = world, []

    def tcp(self, port: int) -> None:
        self._serve(circuits.listen(("0.0.0.0", port), control=self.world.control("web")), port)

    def udp(self, port: int) -> None:
        self._serve(circuits.listen(("0.0.0.0", port), kind="dgram",
                                    control=self.world.control("web")), port)

    def _serve(self, lst, port: int) -> None:
        self.listeners.append(lst)
        threading.Thread(target=self._accept, args=(lst, port), daemon=True).start()

    @staticmethod
    def _accept(lst, port: int) -> None:
        while True:
            try:
                conn, peer = lst.accept()
            except OSError:  # the listener is closed: the test is over
                return
            threading.Thread(target=Web._answer, args=(conn, peer, port), daemon=True).start()

    @staticmethod
    def _answer(conn, peer, port: int) -> None:
        with conn:
            try:
                while data := conn.recv(200):
                    conn.sendto(f"{port} {peer[0]}:{peer[1]} ".encode() + data, peer)
                    if data == b"bye":  # then this guest ends the connection (or UDP flow)
                        return
            except OSError:
                pass

    def close(self) -> None:
        for lst in self.listeners:
            lst.close()


CLIENT = f"""
import socket, sys
conns = {{}}
for line in sys.stdin:
    cmd, name, arg = line.split()
    try:
        if cmd in ("tcp", "udp"):  # a new connection (a connected UDP socket) to HOST_IP:arg
            if cmd == "tcp":
                s = socket.create_connection(("{HOST_IP}", int(arg)), timeout=10)
            else:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.settimeout(10)
                s.connect(("{HOST_IP}", int(arg)))
            conns[name] = s
            print("open %s:%d" % s.getsockname(), flush=True)
        else:  # say: send arg, print the answer
            conns[name].send(arg.encode())
            print(conns[name].recv(200).decode() or "eof", flush=True)
    except OSError as e:
        print(type(e).__name__, flush=True)
"""


class Outside:
    """Connections from the outside namespace, one command at a time."""

    def __init__(self, world):
        self.proc = subprocess.Popen(["ip", "netns", "exec", world.outside, sys.executable, "-c",
                                      CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def __call__(self, cmd: str, name: str, arg) -> str:
        self.proc.stdin.write(f"{cmd} {name} {arg}\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def open(self, cmd: str, name: str, port: int) -> str:
        """A new connection that works; its local address, as the guest must see it."""
        answer = self(cmd, name, port)
        assert answer.startswith("open "), answer
        return answer.split()[1]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def web(world):
    guest = Web(world)
    yield guest
    guest.close()


@pytest.fixture
def outside(world):
    client = Outside(world)
    yield client
    client.close()


@both_placements
def test_a_reload_publishes_a_new_tcp_and_udp_port(world, web, outside):
    for port in (81, 82):
        web.tcp(port)
    web.udp(54)
    assert outside("tcp", "early", 8081) == "ConnectionRefusedError"  # not published yet
    kept = listening_socket(world, "tcp", 8082)
    set_publish(world, *FIRST, ("tcp", HOST_IP, 8081, 81), ("udp", HOST_IP, 8081, 54))
    out = reload(world, 5, 5)
    assert out.returncode == 0 and "errors" not in out.stdout, out
    me = outside.open("tcp", "t", 8081)
    assert outside("say", "t", "hello") == f"81 {me} hello"  # the guest saw the outside peer
    me = outside.open("udp", "u", 8081)
    assert me.startswith(OUTSIDE_IP + ":")
    assert outside("say", "u", "ping") == f"54 {me} ping"
    assert outside("say", "u", "again") == f"54 {me} again"
    assert listening_socket(world, "tcp", 8082) == kept  # the others were not touched
    assert world.status()["publish"] == "5 of 5 published ports listening"


@both_placements
def test_a_reload_unpublishes_a_port_and_leaves_the_others_alone(world, web, outside):
    for port in (80, 82):
        web.tcp(port)
    web.udp(53)
    removed, kept = outside.open("tcp", "removed", 8080), outside.open("tcp", "kept", 8082)
    flow = outside.open("udp", "flow", 8080)
    assert outside("say", "removed", "a") == f"80 {removed} a"
    assert outside("say", "kept", "b") == f"82 {kept} b"
    assert outside("say", "flow", "c") == f"53 {flow} c"
    kept_socket = listening_socket(world, "tcp", 8082)
    set_publish(world, ("tcp", HOST_IP, 8082, 82))  # tcp and udp 8080 go
    reload(world, 1, 1)

    assert outside("tcp", "new", 8080) == "ConnectionRefusedError"  # nothing listens there now
    assert listening_socket(world, "tcp", 8080) is None
    assert outside("say", "removed", "d") == f"80 {removed} d"  # established: both ways still
    assert outside("say", "kept", "e") == f"82 {kept} e"  # untouched, never reset
    assert listening_socket(world, "tcp", 8082) == kept_socket  # the same socket, never rebound
    again = outside.open("tcp", "again", 8082)
    assert outside("say", "again", "f") == f"82 {again} f"
    # A removed UDP port's socket carries its flows on until they end (here: the guest
    # closes it), then closes: the outside then gets the kernel's port unreachable.
    assert outside("say", "flow", "g") == f"53 {flow} g"
    assert listening_socket(world, "udp", 8080) is not None
    assert outside("say", "flow", "bye") == f"53 {flow} bye"
    deadline = time.monotonic() + 10
    while listening_socket(world, "udp", 8080) is not None:
        assert time.monotonic() < deadline, "the removed UDP port's socket stayed open"
        time.sleep(0.1)
    assert outside("say", "flow", "h") == "ConnectionRefusedError"


@both_placements
def test_a_reload_points_a_port_at_another_guest_port_without_rebinding(world, web, outside):
    for port in (82, 83):
        web.tcp(port)
    before = outside.open("tcp", "before", 8082)
    assert outside("say", "before", "a") == f"82 {before} a"
    socket_before = listening_socket(world, "tcp", 8082)
    set_publish(world, *FIRST[:2], ("tcp", HOST_IP, 8082, 83))
    reload(world, 3, 3)
    after = outside.open("tcp", "after", 8082)
    assert outside("say", "after", "b") == f"83 {after} b"  # new connections: the new target
    assert outside("say", "before", "c") == f"82 {before} c"  # the established one: its own
    assert listening_socket(world, "tcp", 8082) == socket_before


@both_placements
def test_a_port_that_cannot_be_bound_is_reported_and_the_rest_applied(world, web, outside):
    taken = re.compile(r"publish 4 \(line \d+\) tcp://198\.18\.0\.1:8084 -> web:84: cannot"
                       r" listen: EADDRINUSE \(Address already in use\)")
    absent = re.compile(r"publish 6 \(line \d+\) tcp://198\.18\.0\.99:8086 -> web:85: cannot"
                        r" listen: EADDRNOTAVAIL")
    web.tcp(84)
    web.tcp(85)
    squatter = subprocess.Popen(["ip", "netns", "exec", world.host, sys.executable, "-c", f"""
import socket, sys
s = socket.create_server(("{HOST_IP}", 8084))
print("ready", flush=True)
sys.stdin.read()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout.readline().strip() == "ready"
        set_publish(world, *FIRST, ("tcp", HOST_IP, 8084, 84), ("tcp", HOST_IP, 8085, 85),
                    ("tcp", "198.18.0.99", 8086, 85))  # not an address of the host namespace
        out = reload(world, 4, 6)
        assert out.returncode == 1, out
        assert taken.search(out.stdout) and absent.search(out.stdout), out.stdout
        status = ctl(world, "status")
        assert status.returncode == 1 and taken.search(status.stdout), status.stdout
        assert "publish: 4 of 6 published ports listening" in status.stdout
        assert "cannot publish tcp://198.18.0.1:8084 -> web:84" in world.log.read_text()
        me = outside.open("tcp", "free", 8085)  # the rest applied
        assert outside("say", "free", "a") == f"85 {me} a"
    finally:
        squatter.stdin.close()
        squatter.wait(10)
    out = reload(world, 5, 6)  # the port is free now: the next reload binds it
    assert out.returncode == 1 and not taken.search(out.stdout) and absent.search(out.stdout)
    me = outside.open("tcp", "freed", 8084)
    assert outside("say", "freed", "c") == f"84 {me} c"


def test_a_bad_publish_entry_is_refused_and_the_running_ports_stay(world, web, outside):
    web.tcp(82)
    text = world.config.read_text()
    world.config.write_text(text + '\n[[publish]]\naddress = "198.18.0.1"\nport = 70000\n'
                            'guest = "web"\n')
    out = ctl(world, "reload")
    line = len(text.splitlines()) + 4
    assert out.returncode == 1 and f"proxy.toml:{line}: publish 4: port must be from 1 to 65535" \
        in out.stderr, out
    me = outside.open("tcp", "t", 8082)
    assert outside("say", "t", "still") == f"82 {me} still"
    assert world.status()["publish"] == "3 of 3 published ports listening"


def test_sighup_applies_the_table_too(world, web, outside):
    web.tcp(81)
    set_publish(world, *FIRST, ("tcp", HOST_IP, 8081, 81))
    world.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while world.status()["publish"] != "4 of 4 published ports listening":
        assert time.monotonic() < deadline, world.status()
        time.sleep(0.05)
    me = outside.open("tcp", "t", 8081)
    assert outside("say", "t", "hup") == f"81 {me} hup"


def test_the_adopted_worker_serves_the_changed_file_after_an_operator_kill_9(world, web, outside):
    for port in (80, 81, 82):
        web.tcp(port)
    carried = outside.open("tcp", "carried", 8080)
    assert outside("say", "carried", "a") == f"80 {carried} a"
    worker, kept = world.worker(), listening_socket(world, "tcp", 8082)
    world.proc.send_signal(signal.SIGKILL)
    world.proc.wait(10)
    set_publish(world, ("tcp", HOST_IP, 8082, 82), ("tcp", HOST_IP, 8081, 81))  # 8080 goes
    world.start()
    assert world.worker() == worker  # adopted, not replaced
    deadline = time.monotonic() + 10
    while world.status()["publish"] != "2 of 2 published ports listening":
        assert time.monotonic() < deadline, world.status()
        time.sleep(0.05)
    assert outside("tcp", "gone", 8080) == "ConnectionRefusedError"
    assert outside("say", "carried", "b") == f"80 {carried} b"  # carried across, both ways
    deadline = time.monotonic() + 10
    while True:  # once web's listeners have listened again at the new operator
        me = outside.open("tcp", "new", 8081)
        if (answer := outside("say", "new", "c")) == f"81 {me} c":
            break
        assert answer == "ConnectionResetError" and time.monotonic() < deadline, answer
        time.sleep(0.05)
    assert listening_socket(world, "tcp", 8082) == kept


def test_a_reload_gives_new_udp_flows_the_new_idle_timeout(world):
    world.serve("udp-echo", 53)
    before = circuits.connect((OUTSIDE_IP, 53), kind="dgram", control=world.control("web"))
    before.settimeout(10)
    before.send(b"one")
    assert before.recv(100).startswith(b"one|")  # a flow with the file's 5 s
    text = world.config.read_text()
    world.config.write_text(text.replace("udp_idle_timeout = 5\n", "udp_idle_timeout = 1\n"))
    reload(world, 3, 3)
    after = circuits.connect((OUTSIDE_IP, 53), kind="dgram", control=world.control("web"))
    after.settimeout(10)
    after.send(b"two")
    assert after.recv(100).startswith(b"two|")
    time.sleep(1.5)  # past the new timeout, well within the old one
    assert after.recv(100) == b""  # the new flow was closed for idleness
    before.send(b"three")  # the flow opened before the reload keeps its own timeout
    assert before.recv(100).startswith(b"three|")
    before.close()
    after.close()



@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_port_moves_to_an_overlapping_address_while_it_carries_a_connection(world, web, outside,
                                                                               proto):
    """198.18.0.1:8080 to 0.0.0.0:8080 (and web's port 84) while an outside peer uses it."""
    old_port = 80 if proto == "tcp" else 53
    getattr(web, proto)(old_port)
    getattr(web, proto)(84)
    old = outside.open(proto, "old", 8080)
    assert outside("say", "old", "a") == f"{old_port} {old} a"
    others = [e for e in FIRST if (e[0], e[2]) != (proto, 8080)]
    set_publish(world, *others, (proto, "0.0.0.0", 8080, 84))
    out = reload(world, 3, 3)
    assert out.returncode == 0, out
    new = outside.open(proto, "new", 8080)
    assert outside("say", "new", "b") == f"84 {new} b"
    if proto == "tcp":  # an established connection goes on with its guest port
        assert outside("say", "old", "c") == f"80 {old} c"
    else:  # the old socket made way: the peer's next datagram is a new flow, to port 84
        assert outside("say", "old", "c") == f"84 {old} c"


def test_a_port_that_cannot_move_leaves_the_retired_flows_alone(world, web, outside):
    """UDP 198.18.0.1:8080 is retired while a flow uses it, for 0.0.0.0:8080, which
    the table's own 127.0.0.1:8080 keeps from binding.  The move fails and is
    reported; the retired port is not closed for nothing: its flow goes on."""
    web.udp(53)
    web.udp(84)
    web.udp(85)
    old = outside.open("udp", "old", 8080)
    assert outside("say", "old", "a") == f"53 {old} a"
    others = [e for e in FIRST if (e[0], e[2]) != ("udp", 8080)]
    set_publish(world, *others, ("udp", "127.0.0.1", 8080, 85), ("udp", "0.0.0.0", 8080, 84))
    out = reload(world, 3, 4)
    assert out.returncode == 1 and "udp://0.0.0.0:8080 -> web:84: cannot" in out.stdout, out
    assert outside("say", "old", "b") == f"53 {old} b"
