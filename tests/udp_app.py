"""A plain UDP program for the preload tests: it knows nothing of circuits.

    python udp_app.py echo HOST PORT          connect(), then the checks below
    python udp_app.py sendto HOST PORT        the same without connect(): sendto
    python udp_app.py reconnect HOST PORT1 PORT2
    python udp_app.py idle HOST PORT          an echo, 2.5 s idle, an echo
    python udp_app.py send-one HOST PORT      one datagram, no answer awaited
    python udp_app.py serve HOST PORT         a UDP echo server (bind and recvfrom)
    python udp_app.py reconnects HOST PORT1 PORT2   many connects, the socket in an epoll
    python udp_app.py many-peers HOST PORT N  N sockets in turn, one echo each
    python udp_app.py threads-serve HOST PORT N   a threaded echo server for N datagrams
    python udp_app.py socketserver HOST PORT N    socketserver.UDPServer for N, then shutdown
    python udp_app.py fork-serve HOST PORT    a datagram, a fork whose child closes, the answer
    python udp_app.py shutdown HOST PORT      shutdown() wakes receivers of a server, a client
    python udp_app.py vector-race HOST PORT   two threads receive into two buffers each
    python udp_app.py unspec-serve HOST PORT  bind, connect(AF_UNSPEC), serve one datagram
    python udp_app.py dup-poll HOST PORT1 PORT2   poll on a dup across a re-connect

The peer is an echo that answers each datagram with the datagram, "|" and
the sender's address (tests/outside.py udp-echo, or the test's own echo).
Each role prints one JSON object of what it saw; the test judges it.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import select
import socket
import struct
import sys
import termios
import time

SIZES = [1, 100, 1500, 9000, 60000]


def echoed(s: socket.socket, data: bytes, sendto: tuple | None = None) -> dict:
    """Send one datagram and take its echo: what came back, and from where."""
    if sendto:
        s.sendto(data, sendto)
    else:
        s.send(data)
    ready = select.select([s], [], [], 10)[0]
    waiting = struct.unpack("i", fcntl.ioctl(s, termios.FIONREAD, b"\0" * 4))[0]
    reply, peer = s.recvfrom(65536)
    return {"ok": reply.startswith(data + b"|"), "len": len(reply), "fionread": waiting,
            "peer": list(peer), "selected": bool(ready)}


def errno_of(fn) -> int:
    try:
        fn()
    except OSError as e:
        return e.errno
    return 0


def truncation(s: socket.socket) -> dict:
    """A short buffer truncates, and MSG_TRUNC tells the datagram's real size."""
    s.send(b"x" * 1000)
    select.select([s], [], [], 10)
    data, _, flags, _ = s.recvmsg(10)
    s.send(b"y" * 1000)
    select.select([s], [], [], 10)
    buf = bytearray(10)
    full = s.recv_into(buf, 10, socket.MSG_TRUNC)
    return {"data": data.decode(), "msg_trunc": bool(flags & socket.MSG_TRUNC),
            "full": full, "buf": buf.decode()}


def vectors(s: socket.socket) -> dict:
    """sendmsg's buffers are one datagram; recvmsg_into scatters one."""
    s.sendmsg([b"ab", b"cd", b"ef"])
    select.select([s], [], [], 10)
    a, b = bytearray(3), bytearray(64)
    n, _, _, _ = s.recvmsg_into([a, b])
    return {"n": n, "first": a.decode(), "rest": bytes(b[: n - 3]).decode()}


def epoll_readiness(s: socket.socket) -> list:
    """epoll: writable at once, readable once the echo is back, not before."""
    ep = select.epoll()
    ep.register(s.fileno(), select.EPOLLIN | select.EPOLLOUT)
    first = [e for _, e in ep.poll(5)]
    ep.modify(s.fileno(), select.EPOLLIN)
    idle = ep.poll(0.05)
    s.send(b"e")
    later = [e for _, e in ep.poll(10)]
    s.recv(100)
    ep.close()
    return [first == [select.EPOLLOUT], idle == [], later == [select.EPOLLIN]]


def unspec(s: socket.socket) -> int:
    """connect(AF_UNSPEC) through libc, as glibc's getaddrinfo does: 0 or errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    sa = struct.pack("H14x", socket.AF_UNSPEC)
    rc = libc.connect(s.fileno(), sa, len(sa))
    return 0 if rc == 0 else ctypes.get_errno()


def role_echo(host: str, port: int, use_sendto: bool) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    to = (host, port) if use_sendto else None
    if not use_sendto:
        s.connect((host, port))
    out = {"so_type": s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE),
           "echo": [echoed(s, bytes([65 + i % 26]) * n, to) for i, n in enumerate(SIZES)],
           "sockname": list(s.getsockname()),
           "peername": errno_of(s.getpeername) or list(s.getpeername()),
           "too_big": errno_of(lambda: s.sendto(b"z" * 70000, (host, port))),
           "other_peer": errno_of(lambda: s.sendto(b"q", (host, port + 1)))}
    if not use_sendto:
        out["truncation"] = truncation(s)
        out["vectors"] = vectors(s)
        out["epoll"] = epoll_readiness(s)
    s.setblocking(False)
    out["empty"] = errno_of(lambda: s.recv(100))
    out["unspec"] = unspec(s)
    out["after_unspec"] = errno_of(lambda: s.send(b"q"))
    s.close()
    return out


def role_reconnect(host: str, port1: int, port2: int) -> dict:
    """One socket connected to one echo, then another: the second answers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, port1))
    first = echoed(s, b"one")
    s.connect((host, port2))
    second = echoed(s, b"two")
    return {"first": first, "second": second, "peer": list(s.getpeername())}


def role_idle(host: str, port: int) -> dict:
    """The peer ends an idle flow (the proxy stack's udp_idle_timeout): a
    receive says so, and the next send connects again."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, port))
    first = echoed(s, b"before")
    time.sleep(2.5)
    ended = errno_of(lambda: s.recv(100))
    return {"first": first["ok"], "ended": ended, "again": echoed(s, b"after")["ok"]}


def role_serve(host: str, port: int) -> None:
    """A UDP echo server: bind, then answer each datagram with it, "|" and its
    sender, as outside.py's udp-echo; waits in select on a non-blocking socket
    and reports FIONREAD and SO_ACCEPTCONN once, on stderr.  Dies of
    BlockingIOError if select says readable when no datagram waits."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, port))
    s.setblocking(False)
    print("ready", flush=True)
    told = False
    while True:
        select.select([s], [], [])
        waiting = struct.unpack("i", fcntl.ioctl(s, termios.FIONREAD, b"\0" * 4))[0]
        data, peer = s.recvfrom(65536)  # readable means a datagram waits: never EAGAIN
        if not told:
            print(json.dumps({"fionread": waiting, "len": len(data), "sockname": s.getsockname(),
                              "acceptconn": s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
                              "peername": errno_of(s.getpeername)}), file=sys.stderr, flush=True)
            told = True
        s.sendto(data + f"|{peer[0]}:{peer[1]}".encode(), peer)


def mappings() -> int:
    """This process's memory mappings: each circuit is some; a leak shows."""
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def role_reconnects(host: str, port1: int, port2: int) -> dict:
    """Connect one socket to two echoes in turn, 60 times (50 counted), while it sits in an
    epoll set (a registration is no call in flight: replaced circuits go)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, port2))
    ep = select.epoll()
    ep.register(s.fileno(), select.EPOLLIN)  # connected: the registration is the library's
    ok, counts = True, []
    for i in range(60):
        time.sleep(0.06)  # the guest's setups_per_second (20)
        s.connect((host, (port1, port2)[i % 2]))
        ok = ok and echoed(s, b"r%d" % i)["ok"]
        if i in (9, 59):
            counts.append(mappings())
    return {"ok": ok, "maps": counts}


def role_many_peers(host: str, port: int, n: int) -> dict:
    """n sockets, one after the other: each a new peer of the server, gone
    once closed."""
    ok = 0
    for i in range(n):
        time.sleep(0.06)  # the guest's setups_per_second (20)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(10)
            s.sendto(b"p%d" % i, (host, port))
            ok += s.recvfrom(100)[0].startswith(b"p%d|" % i)
    return {"ok": ok}


def role_threads_serve(host: str, port: int, n: int) -> dict:
    """Two threads blocked in recvfrom and one replying: peers that leave are
    dropped under concurrent receives and sends.  Reports the mappings after
    the first 20 datagrams and after n."""
    import queue
    import threading
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, port))
    print("ready", flush=True)
    todo: queue.Queue = queue.Queue()
    counts, lock, got = [], threading.Lock(), [0]

    def receive() -> None:
        while True:
            data, peer = s.recvfrom(65536)
            with lock:
                got[0] += 1
                if got[0] in (20, n):
                    counts.append(mappings())
            todo.put((data, peer))

    def reply() -> None:
        while True:
            data, peer = todo.get()
            with contextlib.suppress(OSError):  # that peer may have left already
                s.sendto(data + f"|{peer[0]}:{peer[1]}".encode(), peer)

    for fn in (receive, receive, reply):
        threading.Thread(target=fn, daemon=True).start()
    while len(counts) < 2:
        time.sleep(0.05)
    return {"maps": counts}


def role_socketserver(host: str, port: int, n: int) -> dict:
    """socketserver.UDPServer's serve_forever (select, then a blocking
    recvfrom) for n datagrams, then shutdown(): it must not hang."""
    import socketserver
    import threading

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            sock.sendto(data + f"|{self.client_address[0]}:{self.client_address[1]}".encode(),
                        self.client_address)
            handled.release()

    handled = threading.Semaphore(0)
    server = socketserver.UDPServer((host, port), Echo)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                     daemon=True).start()
    print("ready", flush=True)
    for _ in range(n):
        handled.acquire()
    time.sleep(1)  # the last peer leaves meanwhile: that wakes nobody
    start = time.monotonic()
    done = threading.Thread(target=server.shutdown, daemon=True)
    done.start()
    done.join(10)
    return {"shutdown": not done.is_alive(), "seconds": time.monotonic() - start}


def role_fork_serve(host: str, port: int) -> dict:
    """Take a datagram, fork a child that closes its copy of the server and
    exits, then answer: the peer's circuit outlived the child's close."""
    import os
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, port))
    print("ready", flush=True)
    data, peer = s.recvfrom(100)
    pid = os.fork()
    if pid == 0:
        s.close()
        sys.exit(0)  # the library's exit counts the child out too
    _, status = os.waitpid(pid, 0)
    s.sendto(data + f"|{peer[0]}:{peer[1]}".encode(), peer)
    return {"child": status}


def shut_while_blocked(s: socket.socket) -> dict:
    """A thread blocked in recvfrom; shutdown(SHUT_RDWR) from this one: the
    receiver wakes with 0 bytes, as Linux's does (a common way to stop it)."""
    import threading
    got: dict = {}

    def receive() -> None:
        try:
            got["data"] = s.recvfrom(100)[0].decode()
        except OSError as e:
            got["data"] = errno.errorcode[e.errno]

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    time.sleep(0.3)  # asleep in recvfrom by now
    got["shutdown"] = errno_of(lambda: s.shutdown(socket.SHUT_RDWR))
    t.join(5)
    got["woke"] = not t.is_alive()
    got["after"] = errno_of(lambda: s.recv(100)) or s.recv(100).decode()
    return got


def role_shutdown(host: str, port: int) -> dict:
    """shutdown() of a bound server (ENOTCONN, as the kernel) and of a socket
    connected to HOST:PORT, each with a receiver asleep."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("0.0.0.0", 7099))
    connected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    connected.connect((host, port))
    echoed(connected, b"x")
    connected.send(b"q")
    select.select([connected], [], [], 10)
    errqueue = errno_of(lambda: connected.recvmsg(100, 0, socket.MSG_ERRQUEUE))
    kept = connected.recv(100).startswith(b"q|")  # MSG_ERRQUEUE took no datagram
    return {"errqueue": errqueue, "kept": kept,
            "server": shut_while_blocked(server), "connected": shut_while_blocked(connected),
            "send_after": errno_of(lambda: connected.send(b"y"))}


def role_vector_race(host: str, port: int) -> dict:
    """Two threads receive on one connected socket with two buffers each
    (peek, copy, consume): every datagram reaches one of them, whole."""
    import threading
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, port))
    s.settimeout(3)
    seen: list = []
    errors: list = []

    def receive() -> None:
        a, b = bytearray(100), bytearray(300)
        while True:
            try:
                n = s.recvmsg_into([a, b])[0]
            except TimeoutError:
                return
            except OSError as e:
                errors.append(errno.errorcode[e.errno])
                continue
            data = (bytes(a) + bytes(b))[:n].split(b"|")[0]
            seen.append(data[:4].decode() if data == data[:4] * 50 else "torn")

    threads = [threading.Thread(target=receive) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(400):
        s.send(b"%04d" % i * 50)
        if i % 50 == 49:
            time.sleep(0.05)
    for t in threads:
        t.join()
    return {"count": len(seen), "unique": len(set(seen)), "torn": seen.count("torn"),
            "errors": errors[:5]}


def role_unspec_serve(host: str, port: int) -> dict:
    """connect(AF_UNSPEC) on a bound server (a disconnect of an unconnected
    socket): it keeps its port and serves on."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, port))
    rc = unspec(s)
    print("ready", flush=True)
    data, peer = s.recvfrom(100)
    s.sendto(data + f"|{peer[0]}:{peer[1]}".encode(), peer)
    return {"unspec": rc, "sockname": list(s.getsockname())}


def role_dup_poll(host: str, port1: int, port2: int) -> dict:
    """poll on a dup of a socket re-connected through its first number: it
    sleeps while nothing comes (the old doorbell, ended, would wake it every
    millisecond) and wakes when the new circuit's echo comes."""
    import os
    import threading
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, port1))
    d = os.dup(s.fileno())
    s.connect((host, port2))
    p = select.poll()
    p.register(d, select.POLLIN)
    got: dict = {}

    def wait() -> None:
        start = time.monotonic()
        got["events"] = p.poll(5000)
        got["seconds"] = time.monotonic() - start

    cpu = time.process_time()
    idle = p.poll(1000)  # nothing comes: asleep, not spinning on the old doorbell
    cpu = time.process_time() - cpu
    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.3)  # asleep in poll by now
    s.send(b"d")
    t.join()
    return {"readable": got["events"] == [(d, select.POLLIN)], "seconds": got["seconds"],
            "idle": idle, "cpu": cpu}


def role_send_one(host: str, port: int) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((host, port))
    except OSError as e:
        return {"connect": errno.errorcode[e.errno]}
    s.send(b"hello")
    return {"connect": "ok"}


if __name__ == "__main__":
    role, host = sys.argv[1], sys.argv[2]
    ports = [int(p) for p in sys.argv[3:]]
    roles = {"reconnect": role_reconnect, "reconnects": role_reconnects,
             "many-peers": role_many_peers, "shutdown": role_shutdown,
             "fork-serve": role_fork_serve, "socketserver": role_socketserver,
             "threads-serve": role_threads_serve, "idle": role_idle,
             "send-one": role_send_one, "vector-race": role_vector_race,
             "unspec-serve": role_unspec_serve, "dup-poll": role_dup_poll}
    if role in ("echo", "sendto"):
        result = role_echo(host, ports[0], role == "sendto")
    elif role == "serve":
        role_serve(host, ports[0])
    else:
        result = roles[role](host, *ports)
    print(json.dumps(result), flush=True)
