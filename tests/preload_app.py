"""A plain-socket program for the preload tests: it knows nothing of circuits.

    preload_app.py echo-server HOST PORT [COUNT]   echo COUNT connections, each in a thread
    preload_app.py echo-client HOST PORT MODE SIZE [CONNS]
        MODE: blocking | select (non-blocking) | timeout (socket timeouts: poll)
        sends SIZE random bytes on each of CONNS connections (one thread
        each), checks the echo by sha256, prints "ok", then waits for a line
        on stdin before closing (so a test can look at the live circuits)
        after that line: shuts down writing on each, prints "eof" if each then reads end of data
    preload_app.py fork-server HOST PORT COUNT      accept, fork a child per connection that runs
        /bin/true by fork+exec, then echoes; the parent closes its copy at once
    preload_app.py prefork-server HOST PORT WORKERS listen, then fork workers that each accept one
    preload_app.py connect HOST PORT [nonblock]    print the errno name connect gives
    preload_app.py recv-interrupted HOST PORT       block in recv until SIGALRM's handler raises
    preload_app.py unix                             AF_UNIX socketpair and listener round trips
    preload_app.py execl-client HOST PORT           connect, send "hello", fork a child that
        execl()s /bin/true, wait for it, close
    preload_app.py rcvtimeo HOST PORT               SO_RCVTIMEO 0.3 s, then a blocking recv that
        nobody answers: prints "timed out SECONDS" and the option as read back
    preload_app.py accept-timeout HOST PORT         listen with SO_RCVTIMEO 0.3 s, then a blocking
        accept that nobody connects to: prints "timed out SECONDS"
    preload_app.py hash-server HOST PORT            read one connection to its end, print its sha256
    preload_app.py aio-server HOST PORT COUNT LOOP       asyncio echo server for COUNT clients
    preload_app.py aio-client HOST PORT SIZE CONNS LOOP  asyncio echo clients, checked by sha256
        LOOP: asyncio (epoll through the selectors module) | uvloop (libuv's epoll)
"""
import asyncio
import errno
import hashlib
import os
import select
import signal
import socket
import sys
import threading


def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def echo_server(host, port, count=1):
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, int(port)))
        srv.listen(16)
        print("listening", srv.getsockname()[1], flush=True)
        workers = []
        for _ in range(int(count)):
            conn, _ = srv.accept()
            workers.append(threading.Thread(target=echo, args=(conn,)))
            workers[-1].start()
        for w in workers:
            w.join()


def listener(host, port):
    srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, int(port)))
    srv.listen(16)
    return srv


def fork_server(host, port, count):
    srv = listener(host, port)
    children = []
    for _ in range(int(count)):
        conn, _ = srv.accept()
        pid = os.fork()
        if pid == 0:  # the child: fork+exec a helper, then serve
            srv.close()
            helper = os.fork()
            if helper == 0:
                os.execv("/bin/true", ["true"])
            os.waitpid(helper, 0)
            echo(conn)
            os._exit(0)
        conn.close()  # the parent's copy: the child's goes on
        children.append(pid)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        assert status == 0, status


def prefork_server(host, port, workers):
    srv = listener(host, port)
    pids = []
    for _ in range(int(workers)):
        pid = os.fork()
        if pid == 0:
            conn, _ = srv.accept()
            echo(conn)
            os._exit(0)
        pids.append(pid)
    srv.close()
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert status == 0, status


def pump_blocking(sock, data):
    got = bytearray()
    sender = threading.Thread(target=sock.sendall, args=(data,))
    sender.start()
    while len(got) < len(data):
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    sender.join()
    return bytes(got)


def pump_select(sock, data):
    sock.setblocking(False)
    view, sent, got = memoryview(data), 0, bytearray()
    while len(got) < len(data):
        want_w = [sock] if sent < len(data) else []
        r, w, _ = select.select([sock], want_w, [], 10)
        if not r and not w:
            raise TimeoutError("select: nothing ready in 10 s")
        if w:
            try:
                sent += sock.send(view[sent:sent + 262144])
            except BlockingIOError:
                pass
        if r:
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                break
            got += chunk
    return bytes(got)


def one_client(host, port, mode, size, results):
    data = os.urandom(size)
    sock = socket.create_connection((host, int(port)))
    if mode == "timeout":
        sock.settimeout(10)
    got = (pump_select if mode == "select" else pump_blocking)(sock, data)
    results.append((sock, hashlib.sha256(got).digest() == hashlib.sha256(data).digest()))


def echo_client(host, port, mode, size, conns=1):
    results = []
    threads = [threading.Thread(target=one_client, args=(host, port, mode, int(size), results))
               for _ in range(int(conns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    good = len(results) == int(conns) and all(ok for _, ok in results)
    print("ok" if good else f"bad: {len(results)} results", flush=True)
    sys.stdin.readline()
    ends = []
    for sock, _ in results:
        sock.settimeout(10)
        sock.shutdown(socket.SHUT_WR)
        try:
            ends.append(sock.recv(1))
        except OSError as e:
            ends.append(repr(e))
        sock.close()
    print("eof" if all(e == b"" for e in ends) else f"not eof: {ends}", flush=True)


def connect(host, port, mode=""):
    sock = socket.socket()
    try:
        if mode == "nonblock":
            sock.setblocking(False)
            try:
                sock.connect((host, int(port)))
            except BlockingIOError:
                select.select([], [sock], [], 5)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                print("EINPROGRESS", errno.errorcode.get(code, code) if code else "connected")
                return
        else:
            sock.connect((host, int(port)))
        print("connected")
    except OSError as e:
        print(errno.errorcode.get(e.errno, e.errno))


def recv_interrupted(host, port):
    def on_alarm(signum, frame):
        raise InterruptedError("alarm")
    signal.signal(signal.SIGALRM, on_alarm)
    sock = socket.create_connection((host, int(port)))
    signal.alarm(1)
    try:
        sock.recv(10)
        print("recv returned")
    except InterruptedError:
        print("interrupted")


def unix():
    a, b = socket.socketpair()
    a.sendall(b"ping")
    assert b.recv(4) == b"ping"
    path = f"/tmp/preload-app-{os.getpid()}.sock"
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(path)
        srv.listen(1)
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        s, _ = srv.accept()
        c.sendall(b"pong")
        assert s.recv(4) == b"pong"
        assert select.select([s], [], [], 0)[0] == []
    os.unlink(path)
    print("unix ok", a.family.name, srv.family.name)


def run_loop(main, loop):
    if loop == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())


def execl_client(host, port):
    import ctypes
    sock = socket.create_connection((host, int(port)))  # close-on-exec, as Python makes them
    sock.sendall(b"hello")
    pid = os.fork()  # the child holds the circuit too, until its execl counts it out
    if pid == 0:
        ctypes.CDLL(None).execl(b"/bin/true", b"true", None)
        os._exit(1)  # exec failed
    os.waitpid(pid, 0)
    sock.close()  # the last holder: the peer reads end of data


def rcvtimeo(host, port):
    import struct
    import time
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 300000))
    t0 = time.monotonic()
    try:
        sock.recv(10)
        print("recv returned")
    except BlockingIOError:
        print(f"timed out {time.monotonic() - t0:.2f}",
              struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)))
    sock.close()


def accept_timeout(host, port):
    import struct
    import time
    srv = socket.create_server((host, int(port)))
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 300000))
    t0 = time.monotonic()
    try:
        srv.accept()
        print("accept returned")
    except BlockingIOError:
        print(f"timed out {time.monotonic() - t0:.2f}")
    srv.close()


def epoll_park(host, port):
    """Interest deleted and added again (as redis-benchmark does per request),
    and deleted for good while data arrives: no event for it, no spinning."""
    import select
    import time
    sock = socket.create_connection((host, int(port)))
    ep = select.epoll()
    for round_ in range(3):
        ep.register(sock.fileno(), select.EPOLLIN)
        sock.sendall(b"x")
        assert ep.poll(5) == [(sock.fileno(), select.EPOLLIN)], round_
        assert sock.recv(10) == b"x"
        ep.unregister(sock.fileno())
    sock.sendall(b"y")  # its echo comes back while nobody is interested
    cpu = time.process_time()
    quiet = [ep.poll(0.3) for _ in range(3)]
    cpu = time.process_time() - cpu
    ep.register(sock.fileno(), select.EPOLLIN)  # level-triggered: the waiting echo
    back = ep.poll(5)
    print("ok" if quiet == [[], [], []] and back == [(sock.fileno(), select.EPOLLIN)]
          and sock.recv(10) == b"y" else f"bad {quiet} {back}", f"{cpu:.3f}", flush=True)
    sock.close()


def hash_server(host, port):
    with listener(host, port) as srv:
        print("listening", flush=True)
        conn, _ = srv.accept()
        digest = hashlib.sha256()
        with conn:
            while data := conn.recv(65536):
                digest.update(data)
        print(digest.hexdigest(), flush=True)


def aio_server(host, port, count, loop):
    async def main():
        done = asyncio.Event()
        left = [int(count)]

        async def handle(reader, writer):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()
            await writer.wait_closed()  # flushed: the process may exit once the last is done
            left[0] -= 1
            if not left[0]:
                done.set()

        server = await asyncio.start_server(handle, host, int(port))
        print("listening", flush=True)
        await done.wait()
        server.close()
    run_loop(main, loop)


def aio_client(host, port, size, conns, loop):
    async def one():
        data = os.urandom(int(size))
        reader, writer = await asyncio.open_connection(host, int(port))

        async def send():
            writer.write(data)
            await writer.drain()
            writer.write_eof()
        sender = asyncio.create_task(send())
        got = bytearray()
        while chunk := await reader.read(1 << 20):
            got += chunk
        await sender
        writer.close()
        same = hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        return True if same else f"{len(got)} of {len(data)} bytes, first difference at " + str(
            next((i for i, (x, y) in enumerate(zip(got, data)) if x != y), None))

    async def main():
        results = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(int(conns)))), 60)
        print("ok" if all(r is True for r in results) else f"bad: {results}", flush=True)
    run_loop(main, loop)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"echo-server": echo_server, "echo-client": echo_client, "connect": connect,
     "recv-interrupted": recv_interrupted, "unix": unix, "aio-server": aio_server,
     "fork-server": fork_server, "prefork-server": prefork_server,
     "aio-client": aio_client, "hash-server": hash_server,
     "execl-client": execl_client, "rcvtimeo": rcvtimeo, "epoll-park": epoll_park,
     "accept-timeout": accept_timeout}[cmd](*args)
