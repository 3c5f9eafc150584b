"""An event-loop program connecting to the outside, for tests/test_proxystack_preload.py.

It knows nothing of circuits: plain non-blocking sockets and the selectors
module, run under `circuits run` (the preload library), so each connect is a
CONNECT to the operator that the proxy stack answers once the host's TCP
connection is up.

    egress_app.py serve HOST FAST SLOW SELECTOR
        connect to FAST and keep echoing with it while a connect to SLOW is
        in flight: prints "connecting", then "served N while connecting"
        once N round trips went by, "slow connected ERRNO", then
        "slow echo ok" once SLOW echoed a line
    egress_app.py connect HOST PORT SELECTOR
        a non-blocking connect: prints what connect said and, once writable,
        what SO_ERROR says ("EINPROGRESS ECONNREFUSED")
    egress_app.py close HOST WARM PORT WHEN
        a connect to WARM that settles (the library's pool then holds a
        control connection), then a non-blocking one to PORT, closed in
        flight; WHEN: "at-once" (before the
        operator's answer can have come: the test holds the handshake back)
        or "answered" (once the answer waits on a control connection of the
        library's, never looked at by the socket).  Prints "closed", the
        descriptors the process held before the socket and after the close,
        then waits for a line on stdin
    egress_app.py fork HOST PORT
        a non-blocking connect, then fork while it is in flight (prints
        "forking" first); the child prints what SO_ERROR and getpeername say,
        and closes its copy; the parent waits for it, then sends a line on
        the circuit and prints its echo (one process at a time uses a
        circuit: docs/preload.md)
    egress_app.py interrupt HOST PORT
        a blocking connect that SIGALRM's handler interrupts after 0.5 s
        (prints "interrupted", with the seconds it took); the connect goes on
        as the kernel's does: once writable, prints "connected ERRNO"
SELECTOR: epoll (the library's epoll_*) or select (its poll and select).
"""
import errno
import fcntl
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import termios
import time

SELECTORS = {"epoll": selectors.EpollSelector, "select": selectors.SelectSelector}
WAIT_S = 30  # a wake-up that never comes fails the test instead of hanging it
ROUNDS = 50


def name(code: int) -> str:
    return errno.errorcode.get(code, str(code)) if code else "0"


def start(host: str, port: int) -> tuple[socket.socket, int]:
    """A non-blocking connect: the socket and what connect said."""
    s = socket.socket()
    s.setblocking(False)
    return s, s.connect_ex((host, port))


def wait(sel: selectors.BaseSelector, what: str) -> list:
    events = sel.select(WAIT_S)
    if not events:
        sys.exit(f"nothing happened for {WAIT_S} s while waiting for {what}")
    return events


def writable(s: socket.socket, kind: str) -> int:
    """Wait until s is writable; SO_ERROR then."""
    with SELECTORS[kind]() as sel:
        sel.register(s, selectors.EVENT_WRITE)
        wait(sel, "a connect's outcome")
    return s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def echo_line(s: socket.socket, kind: str, line: bytes) -> bytes:
    s.sendall(line)
    got = b""
    with SELECTORS[kind]() as sel:
        sel.register(s, selectors.EVENT_READ)
        while not got.endswith(b"\n"):
            wait(sel, "an echo")
            more = s.recv(4096)
            if not more:
                break
            got += more
    return got


def serve(host: str, fast: str, slow: str, kind: str) -> None:
    f, rc = start(host, int(fast))
    assert rc in (0, errno.EINPROGRESS), name(rc)
    assert writable(f, kind) == 0
    s, rc = start(host, int(slow))
    print("connecting", name(rc), flush=True)
    sel = SELECTORS[kind]()
    sel.register(s, selectors.EVENT_WRITE, "slow")
    sel.register(f, selectors.EVENT_READ, "fast")
    rounds, pending = 0, b""
    f.sendall(b"ping 0\n")
    while True:
        for key, _ in wait(sel, "the fast echo or the slow connect"):
            if key.data == "slow":
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                print("slow connected", name(err), flush=True)
                sel.close()
                s.setblocking(True)
                s.settimeout(WAIT_S)
                print("slow echo", "ok" if echo_line(s, kind, b"slow\n") == b"slow\n" else "bad",
                      flush=True)
                return
            pending += f.recv(4096)
            while b"\n" in pending:
                _, pending = pending.split(b"\n", 1)
                rounds += 1
                if rounds == ROUNDS:
                    print(f"served {ROUNDS} while connecting", flush=True)
                f.sendall(b"ping %d\n" % rounds)


def connect(host: str, port: str, kind: str) -> None:
    s, rc = start(host, int(port))
    outcome = writable(s, kind) if rc == errno.EINPROGRESS else rc
    print(name(rc), name(outcome), flush=True)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def answer_queued() -> bool:
    """Does one of our sockets hold unread bytes?  The program's own socket
    is connecting (the library's FIONREAD says 0): only a control connection
    of the library's can, when the operator's answer is in."""
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            if struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0] > 0:
                return True
        except OSError:
            continue
    return False


def close(host: str, warm_port: str, port: str, when: str) -> None:
    warm, rc = start(host, int(warm_port))
    assert writable(warm, "epoll") == 0
    warm.close()
    before = open_fds()
    s, rc = start(host, int(port))
    assert rc == errno.EINPROGRESS, name(rc)
    deadline = time.monotonic() + WAIT_S
    while when == "answered" and not answer_queued():
        if time.monotonic() > deadline:
            sys.exit("the operator's answer never came")
        time.sleep(0.01)
    s.close()
    print("closed", before, open_fds(), flush=True)
    sys.stdin.readline()  # the test looks at the outside and the operator meanwhile


def fork(host: str, port: str) -> None:
    s, rc = start(host, int(port))
    assert rc == errno.EINPROGRESS, name(rc)
    print("forking", flush=True)
    pid = os.fork()
    if pid == 0:
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        print("child: SO_ERROR", name(err), "peer", s.getpeername()[1], flush=True)
        s.close()  # the parent's copy goes on
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    s.setblocking(True)
    s.settimeout(WAIT_S)
    got = echo_line(s, "epoll", b"parent\n")
    print("parent: child exited", status, "echo", got.decode().strip(), flush=True)


class Alarm(Exception):
    pass


def alarm(signum, frame):
    raise Alarm


def interrupt(host: str, port: str) -> None:
    signal.signal(signal.SIGALRM, alarm)
    s = socket.socket()
    start = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        s.connect((host, int(port)))
        sys.exit("connected before the alarm: the test holds the handshake back")
    except Alarm:
        print(f"interrupted {time.monotonic() - start:.1f}", flush=True)
    print("connected", name(writable(s, "select")), flush=True)


if __name__ == "__main__":
    role, args = sys.argv[1], sys.argv[2:]
    {"serve": serve, "connect": connect, "close": close, "fork": fork,
     "interrupt": interrupt}[role](*args)
