"""The DNS relay of `circuits run`: the guest's resolv.conf points here.

Why a relay: glibc's resolver (res_send.c, inside libc since 2.34) calls
libc's own internal socket, connect, sendmmsg, poll and recvfrom, which no
LD_PRELOAD library can interpose.  So an unmodified program's DNS never
reaches the preload library's UDP circuits.  Instead, `circuits run` binds,
for each of the guest's resolvers, a UDP socket on a loopback address of
its own choosing (127.X.Y.Z port 53, in the guest's network namespace) and
names those in the resolv.conf it gives the program; this relay, a process
of the guest's identity, takes each query and sends it through a datagram
circuit (the client API: CONNECT with proto UDP on the guest's control
socket) to the real resolver.  The operator's policy decides, as for any
UDP connect of the guest, and the proxy stack carries it; nothing reaches
the resolver but through them.

One circuit per query (each is audited); queries over TCP (glibc asks again
over TCP when an answer came truncated) go through a stream circuit per
connection, which needs a TCP rule for port 53 too.  A refused query (no rule allows
UDP port 53 to the resolver) is answered REFUSED at once, a failed one
SERVFAIL, so the program's resolver moves on without waiting out its
timeout.  The relay lives as long as the program `circuits run` became
(it watches its pid through a pidfd) and holds no descriptor of the
program's.
"""
from __future__ import annotations

import os
import random
import select
import socket
import struct
import threading
import time
from ipaddress import IPv4Address, IPv6Address

import circuits

DNS_PORT = 53
MAX_QUERY = 65535
MAX_IN_FLIGHT = 64  # queries relayed at once; more are dropped (the client retries)
ANSWER_TIMEOUT = 5.0  # seconds a resolver has to answer one query
REFUSED, SERVFAIL = 5, 2


def local_addresses(n: int) -> list[str]:
    """n loopback addresses, random in 127.0.0.0/8 past 127.0.x (which hosts
    use, as systemd-resolved's 127.0.0.53 does), so two runs rarely meet."""
    base = random.randrange(1 << 16, (1 << 24) - 8)
    return [str(IPv4Address((127 << 24) | (base + i))) for i in range(n)]


def bind_all(addresses: list[str]) -> list[socket.socket]:
    """The relay's sockets, bound before the program starts: its first query
    finds them there.  For each address a UDP socket, then a TCP listener
    (glibc asks again over TCP when an answer came truncated)."""
    socks = []
    try:
        for a in addresses:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                s = socket.socket(socket.AF_INET, kind)
                socks.append(s)
                s.bind((a, DNS_PORT))
                if kind == socket.SOCK_STREAM:
                    s.listen(16)
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks


def error_reply(query: bytes, rcode: int) -> bytes | None:
    """The query's header and question as an answer with rcode; None if the
    query is too malformed to answer."""
    if len(query) < 12 or struct.unpack("!H", query[4:6])[0] != 1:
        return None
    end = 12
    while end < len(query) and query[end]:  # the question's name: labels up to a 0
        if query[end] & 0xC0:
            return None  # a query's name is never compressed
        end += 1 + query[end]
    end += 1 + 4  # the 0, QTYPE and QCLASS
    if end > len(query):
        return None
    flags = (struct.unpack("!H", query[2:4])[0] | 0x8000 | 0x0080) & ~0x000F | rcode
    return query[:2] + struct.pack("!HHHHH", flags, 1, 0, 0, 0) + query[12:end]


class Relay:
    """Queries on each local socket go to the resolver of the same index."""

    def __init__(self, socks: list[socket.socket], resolvers: list[IPv4Address | IPv6Address],
                 control: str):
        pairs = zip(socks[0::2], socks[1::2], resolvers)  # bind_all's order
        self.pairs = {s.fileno(): (s, str(r)) for udp, tcp, r in pairs for s in (udp, tcp)}
        self.control = control
        self.slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)

    def serve(self, pidfd: int) -> None:
        """Relay until the program behind pidfd has exited."""
        while True:
            ready = select.select([pidfd, *self.pairs], [], [])[0]
            if pidfd in ready:
                return
            for fd in ready:
                try:
                    self._take(*self.pairs[fd])
                except OSError:  # out of descriptors or threads, a client gone: not the relay's end
                    time.sleep(0.05)  # a listener still readable must not make us spin

    def _take(self, sock: socket.socket, resolver: str) -> None:
        """One query (UDP) or one client connection (TCP), relayed in a thread."""
        if sock.type == socket.SOCK_STREAM:
            conn, _ = sock.accept()
            work, args = self._stream, (conn, resolver)
        else:
            query, client = sock.recvfrom(MAX_QUERY)
            work, args = self._one, (sock, resolver, query, client)
        if not self.slots.acquire(blocking=False):
            if sock.type == socket.SOCK_STREAM:
                conn.close()  # too many at once: the client tries the next server
            return
        try:
            threading.Thread(target=work, args=args, daemon=True).start()
        except RuntimeError as e:  # no thread to spare
            self.slots.release()
            if sock.type == socket.SOCK_STREAM:
                conn.close()
            raise OSError(f"cannot relay: {e}") from None

    def _one(self, sock: socket.socket, resolver: str, query: bytes, client) -> None:
        try:
            reply = self._ask(resolver, query)
            if reply is not None:
                sock.sendto(reply, client)
        except OSError:
            pass  # the client is gone: nothing to tell it
        finally:
            self.slots.release()

    def _stream(self, client: socket.socket, resolver: str) -> None:
        """DNS over TCP: each length-prefixed query of the client goes through
        a stream circuit to the resolver, and its answer back, in turn."""
        try:
            # A connect the resolver does not answer holds no UDP query up:
            # circuits.connect asks on a control connection of its own then.
            with client, circuits.connect((resolver, DNS_PORT), control=self.control) as conn:
                client.settimeout(ANSWER_TIMEOUT)
                conn.settimeout(ANSWER_TIMEOUT)
                while query := _message(client.recv):
                    conn.sendall(query)
                    answer = _message(conn.recv)
                    if not answer:
                        return
                    client.sendall(answer)
        except OSError:
            pass  # refused by the policy, timed out, or gone: the client sees the close
        finally:
            self.slots.release()

    def _ask(self, resolver: str, query: bytes) -> bytes | None:
        try:
            conn = circuits.connect((resolver, DNS_PORT), kind="dgram", control=self.control)
        except PermissionError:
            return error_reply(query, REFUSED)  # the policy says no: say so at once
        except OSError:
            return error_reply(query, SERVFAIL)
        with conn:
            conn.settimeout(ANSWER_TIMEOUT)
            try:
                conn.send(query)
                return conn.recv(MAX_QUERY) or None
            except TimeoutError:
                return None  # as a lost datagram: the client asks again
            except OSError:
                return error_reply(query, SERVFAIL)


def _message(recv) -> bytes:
    """One DNS-over-TCP message (its 2-byte length, then that much), or b""
    at the end of the stream."""
    data = b""
    for need in (2, None):
        want = struct.unpack("!H", data)[0] + 2 if need is None else need
        while len(data) < want:
            more = recv(want - len(data))
            if not more:
                return b""
            data += more
    return data


def start(socks: list[socket.socket], resolvers, control: str) -> None:
    """Fork the relay for the process calling this (which is about to exec the
    program); its copies of socks are closed.  The relay is a grandchild, so
    the program never sees it as its child."""
    program = os.getpid()
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        for s in socks:
            s.close()
        if os.waitstatus_to_exitcode(status) != 0:
            raise OSError("the guest's DNS relay could not start (no pidfd for the program,"
                          " or no process to spare)")
        return
    code = 1
    try:
        pidfd = os.pidfd_open(program)
        relay = os.fork()
        code = 0  # forked: the relay runs (a failed fork leaves 1, and the program none)
        if relay:
            os._exit(0)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # never hold the program's terminal or pipes open
            os.dup2(devnull, fd)
        _close_all_but({pidfd, *(s.fileno() for s in socks)})
        Relay(socks, resolvers, control).serve(pidfd)
    finally:
        os._exit(code)


def _close_all_but(keep: set[int]) -> None:
    """Close every descriptor from 3 on but `keep`: the relay must hold none of
    the program's (a supervisor waiting for a pipe or a socket to close would
    wait for the relay too)."""
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))
