"""Unmodified programs from Debian's packages on circuits.

Each server and its client run in two different namespaced guests of one
operator (`netns = true`: the guest's namespace has no route anywhere, so a
connection that works went through the operator), under `circuits run
--guest`, which preloads libcircuits_preload.so.  Each test also reads the
live circuits from the operator's admin API while the client runs and checks
that the bytes crossed them.  The servers are our own instances, on the
guests' addresses, with their configuration and files in the test's tmp dir
(never the services the packages install).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from circuits.bench.apps import NGINX_CONF, nginx_conf
from circuits.operator.admin import request
from guestnet_fixtures import APPS_CONFIG, WHY_NOT, NetOperator, running, scratch_ns  # noqa: F401

APP = str(Path(__file__).with_name("preload_app.py"))
SERVER = "192.0.2.2"  # guest b; the clients run as guest a (192.0.2.1)



def needs(*programs: str):
    missing = [p for p in programs if not shutil.which(p)]
    return pytest.mark.skipif(bool(missing), reason=f"not installed (make deps): {missing}")


class Apps:
    """Programs started as guests of one operator; all killed at the end."""

    def __init__(self, op: NetOperator, tmp: Path):
        self.op, self.tmp, self.procs = op, tmp, []

    def argv(self, guest: str, argv: list[str]) -> list[str]:
        return [sys.executable, "-m", "circuits", "run", "--guest", guest,
                "--config", str(self.op.config), "--", *argv]

    def server(self, argv: list[str], guest: str | None = None, **kw) -> subprocess.Popen:
        """A server in guest b (or `guest`), once that guest listens."""
        proc = subprocess.Popen(self.argv(guest or self.op.b, argv), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kw)
        self.procs.append(proc)
        self.wait_listening(proc, guest=guest or self.op.b)
        return proc

    def client(self, argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(self.op.a, argv), capture_output=True, text=True,
                              timeout=timeout, **kw)

    def admin(self, cmd: str):
        answer = request(str(self.op.dir / "admin.sock"), cmd)
        assert answer["ok"], answer
        return answer["result"]

    def wait_listening(self, proc: subprocess.Popen, timeout: float = 20,
                       guest: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        guest = guest or self.op.b
        while not any(g["name"] == guest and g["listeners"] for g in self.admin("guests")):
            assert proc.poll() is None, f"the server exited: {proc.communicate()}"
            assert time.monotonic() < deadline, "the server never listened"
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
            proc.communicate()


class Watch:
    """Sample the operator's live circuits (every 50 ms) while a client runs:
    the most bytes seen each way on each circuit from guest a to guest b."""

    def __init__(self, apps: Apps):
        self.apps, self.seen = apps, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.stop.is_set():
            for c in self.apps.admin("circuits"):
                if c["from"].startswith(self.apps.op.a + " ") and c["to"].startswith(self.apps.op.b):
                    old = self.seen.get(c["id"], (0, 0))
                    self.seen[c["id"]] = (max(old[0], c["bytes_from_to"]),
                                          max(old[1], c["bytes_to_from"]))
            self.stop.wait(0.05)

    def __enter__(self) -> "Watch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def crossed(self) -> tuple[int, int]:
        """Bytes seen client -> server and server -> client, over all circuits."""
        return (sum(s[0] for s in self.seen.values()), sum(s[1] for s in self.seen.values()))


def _apps(tmp_path, request, template: str):
    """An operator with namespaced guests (needs root: skipped otherwise)."""
    if WHY_NOT:
        pytest.skip(WHY_NOT)
    with running(NetOperator(tmp_path, request.getfixturevalue("scratch_ns"),
                             template=template)) as op:
        a = Apps(op, tmp_path)
        try:
            yield a
        finally:
            a.stop()


@pytest.fixture
def apps(tmp_path, request):
    """Two namespaced guests: a (the client) may reach b (the server)."""
    yield from _apps(tmp_path, request, APPS_CONFIG)


# Three namespaced guests: a (the client) reaches b (a reverse proxy), which
# reaches c (the upstream).
PROXY_CONFIG = APPS_CONFIG.replace(
    'addresses = ["192.0.2.3"]\n', 'addresses = ["192.0.2.3"]\nnetns = true\n') + """
[[rules]]
from = "{b}"
to = "{c}"
proto = "tcp"
action = "allow"
"""
assert PROXY_CONFIG.count("netns = true") == 3


@pytest.fixture
def proxy_apps(tmp_path, request):
    """Three namespaced guests: a reaches b, b reaches c."""
    yield from _apps(tmp_path, request, PROXY_CONFIG)


def sent_total(apps: Apps, guest: str) -> int:
    """circuits_bytes_sent_total of guest, from the operator's metrics."""
    m = re.search(rf'^circuits_bytes_sent_total{{guest="{guest}"}} (\d+)$',
                  apps.admin("metrics"), re.M)
    return int(m.group(1)) if m else 0


def wait_crossed(apps: Apps, guest: str, before: int, n: int) -> None:
    """A download too quick for the live table to catch: the operator's
    running total, kept from the ring indices of ended circuits, shows that
    guest sent at least n bytes through circuits since `before`."""
    deadline = time.monotonic() + 5
    while sent_total(apps, guest) - before < n:
        assert time.monotonic() < deadline, f"{guest}'s bytes are not in the operator's totals"
        time.sleep(0.05)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- curl and python http.server -----------------------------------------

@needs("curl")
def test_curl_downloads_from_http_server(apps, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / "blob").write_bytes(os.urandom(8 << 20))
    apps.server([sys.executable, "-m", "http.server", "--bind", SERVER, "7001",
                 "--directory", str(www)])
    before = sent_total(apps, apps.op.b)
    got = apps.client(["curl", "-sS", "-o", str(tmp_path / "got"), f"http://{SERVER}:7001/blob"])
    assert got.returncode == 0, got.stderr
    assert sha256(tmp_path / "got") == sha256(www / "blob")
    wait_crossed(apps, apps.op.b, before, 8 << 20)


# ---- redis ----------------------------------------------------------------

@pytest.fixture
def redis(apps, tmp_path):
    apps.server(["redis-server", "--bind", SERVER, "--port", "7002", "--save", "",
                 "--appendonly", "no", "--dir", str(tmp_path), "--protected-mode", "no"])


@needs("redis-server", "redis-cli")
def test_redis_cli_set_and_get(apps, redis):
    cli = ["redis-cli", "-h", SERVER, "-p", "7002"]
    assert apps.client([*cli, "SET", "greeting", "over circuits"]).stdout.strip() == "OK"
    with Watch(apps) as w:  # GET ten times on one connection, 0.1 s apart: the watch sees it
        got = apps.client([*cli, "-r", "10", "-i", "0.1", "GET", "greeting"])
    assert got.stdout.split("\n")[:10] == ["over circuits"] * 10, got.stderr
    assert all(n > 0 for n in w.crossed())


@needs("redis-server", "redis-benchmark")
@pytest.mark.parametrize("pipeline", [1, 16])
def test_redis_benchmark(apps, redis, pipeline):
    requests = 20000 * pipeline
    before = sent_total(apps, apps.op.a), sent_total(apps, apps.op.b)
    with Watch(apps) as w:
        got = apps.client(["redis-benchmark", "-h", SERVER, "-p", "7002", "-c", "50",
                           "-n", str(requests), "-P", str(pipeline), "-t", "set,get", "-q"])
    assert got.returncode == 0, got.stderr
    rates = dict(re.findall(r"^(SET|GET): ([\d.]+) requests per second", got.stdout, re.M))
    assert set(rates) == {"SET", "GET"} and all(float(r) > 0 for r in rates.values()), got.stdout
    # A run can be over before the 50 ms watch samples a circuit with bytes on
    # it (it sees them set up), so the bytes are read from the running totals:
    # each request is over 20 bytes out, each reply ("+OK", a bulk string) 5 back.
    assert len(w.seen) >= 10
    wait_crossed(apps, apps.op.a, before[0], 2 * requests * 20)
    wait_crossed(apps, apps.op.b, before[1], 2 * requests * 5)


# ---- nginx, wrk and curl ----------------------------------------------------

@pytest.fixture
def nginx(apps, tmp_path):
    d = tmp_path / "nginx"
    conf = nginx_conf(d, SERVER, 7003)
    (d / "www" / "blob").write_bytes(os.urandom(8 << 20))
    apps.server(["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)])
    return d


@needs("nginx", "wrk")
def test_nginx_two_workers_with_wrk(apps, nginx):
    with Watch(apps) as w:
        got = apps.client(["wrk", "-t2", "-c50", "-d2s", f"http://{SERVER}:7003/"])
    assert got.returncode == 0, got.stderr
    requests = int(re.search(r"(\d+) requests in", got.stdout).group(1))
    assert requests > 100 and "Socket errors" not in got.stdout and "Non-2xx" not in got.stdout, \
        got.stdout
    assert len(w.seen) >= 50 and all(n > 0 for n in w.crossed())


@needs("nginx", "curl")
def test_curl_downloads_from_nginx(apps, nginx, tmp_path):
    before = sent_total(apps, apps.op.b)
    got = apps.client(["curl", "-sS", "-o", str(tmp_path / "got"), f"http://{SERVER}:7003/blob"])
    assert got.returncode == 0, got.stderr
    assert sha256(tmp_path / "got") == sha256(nginx / "www" / "blob")  # sendfile, by the library
    wait_crossed(apps, apps.op.b, before, 8 << 20)


# ---- nginx as a reverse proxy ------------------------------------------------

UPSTREAM, PROXY = "192.0.2.3", SERVER  # guest c, guest b

# The benchmark's nginx.conf, its server a reverse proxy to c with upstream keepalive.
SERVES_FILES = """    server {{
        listen {addr}:{port};
        root {d}/www;
    }}
"""
PROXY_CONF = NGINX_CONF.replace(SERVES_FILES, """    upstream up {{
        server {upstream}:7007;
        keepalive 16;
    }}
    server {{
        listen {addr}:{port};
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
""")
assert PROXY_CONF != NGINX_CONF


def setups(apps: Apps, guest: str) -> int:
    """circuits_setups_total of guest: the connects the operator set up for it."""
    m = re.search(rf'^circuits_setups_total{{guest="{guest}"}} (\d+)$', apps.admin("metrics"),
                  re.M)
    return int(m.group(1)) if m else 0


@needs("nginx", "curl", "wrk")
def test_nginx_reverse_proxy_to_an_upstream_in_another_guest(proxy_apps, tmp_path):
    """nginx connects to its upstreams as event loops do: the socket goes into
    its epoll set first (EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET), then a
    non-blocking connect, EPOLLOUT, SO_ERROR; with upstream keepalive it
    reuses those circuits for many requests."""
    apps = proxy_apps
    up = tmp_path / "upstream"
    conf = nginx_conf(up, UPSTREAM, 7007)
    (up / "www" / "blob").write_bytes(os.urandom(8 << 20))
    apps.server(["nginx", "-p", str(up), "-e", str(up / "error.log"), "-c", str(conf)],
                guest=apps.op.c)
    px = tmp_path / "proxy"
    px.mkdir()
    (px / "nginx.conf").write_text(PROXY_CONF.format(d=px, addr=PROXY, port=7006,
                                                     upstream=UPSTREAM))
    apps.server(["nginx", "-p", str(px), "-e", str(px / "error.log"), "-c", str(px / "nginx.conf")])

    before = sent_total(apps, apps.op.c), sent_total(apps, apps.op.b)
    got = apps.client(["curl", "-sS", "-o", str(tmp_path / "got"), f"http://{PROXY}:7006/blob"])
    assert got.returncode == 0, got.stderr + (px / "error.log").read_text()
    assert sha256(tmp_path / "got") == sha256(up / "www" / "blob")
    wait_crossed(apps, apps.op.c, before[0], 8 << 20)  # upstream -> proxy, through a circuit
    wait_crossed(apps, apps.op.b, before[1], 8 << 20)  # proxy -> client, through another

    connects = setups(apps, apps.op.b)
    with Watch(apps) as w:
        got = apps.client(["wrk", "-t1", "-c10", "-d2s", f"http://{PROXY}:7006/"], timeout=60)
    assert got.returncode == 0, got.stderr
    requests = int(re.search(r"(\d+) requests in", got.stdout).group(1))
    assert requests > 100 and "Socket errors" not in got.stdout and "Non-2xx" not in got.stdout, \
        got.stdout + (px / "error.log").read_text()
    assert all(n > 0 for n in w.crossed())
    upstream_connects = setups(apps, apps.op.b) - connects
    print(f"{requests} requests through the proxy, {upstream_connects} upstream circuits")
    # keepalive: the proxy's upstream circuits serve many requests each
    assert 0 < upstream_connects <= requests // 10, (upstream_connects, requests)


# ---- iperf3 -----------------------------------------------------------------

@needs("iperf3")
@pytest.mark.parametrize("reverse", [False, True], ids=["upload", "download"])
def test_iperf3(apps, reverse):
    apps.server(["iperf3", "-s", "-B", SERVER, "-p", "7004", "-1"])
    with Watch(apps) as w:
        got = apps.client(["iperf3", "-c", SERVER, "-p", "7004", "-t", "2", "--json",
                           *(["-R"] if reverse else [])])
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr
    end = json.loads(got.stdout)["end"]
    assert end["sum_received"]["bytes"] > 1 << 20
    up, down = w.crossed()
    assert (down if reverse else up) > 1 << 20


# ---- socat and nc relaying stdin ---------------------------------------------

@pytest.mark.parametrize("relay", [
    pytest.param(["socat", "-u", "-", f"TCP:{SERVER}:7005"], marks=needs("socat"), id="socat"),
    pytest.param(["nc", "-N", SERVER, "7005"], marks=needs("nc"), id="nc")])
def test_relay_stdin_to_a_hashing_server(apps, relay):
    blob = os.urandom(4 << 20)
    server = apps.server([sys.executable, APP, "hash-server", SERVER, "7005"])
    with Watch(apps) as w:
        client = subprocess.Popen(apps.argv(apps.op.a, relay), stdin=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        for i in range(0, len(blob), 256 << 10):  # paced (~1 s): the watch sees the circuit
            client.stdin.write(blob[i:i + (256 << 10)])
            client.stdin.flush()
            time.sleep(0.06)
        client.stdin.close()
        err = client.stderr.read()
        assert client.wait(30) == 0, err
    out, err = server.communicate(timeout=30)
    assert out.split()[-1] == hashlib.sha256(blob).hexdigest(), err
    assert w.crossed()[0] > 1 << 20


# ---- circuits bench apps --------------------------------------------------------

@needs("iperf3", "redis-server", "redis-benchmark", "nginx", "wrk")
def test_bench_apps_quick_prints_every_figure():
    out = subprocess.run([sys.executable, "-m", "circuits", "bench", "apps", "--quick",
                          "--rounds", "1", "--json"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    figures = {f["name"]: f for f in json.loads(out.stdout)["figures"]}
    assert set(figures) == {"iperf3 Gbit/s", "redis SET req/s", "redis GET req/s",
                            "nginx+wrk req/s"}
    for f in figures.values():
        assert f["circuits"] > 0 and f["tcp"] > 0 and f["ratio"] > 0, f
        assert f["target"] in (1.5, 3.0)
