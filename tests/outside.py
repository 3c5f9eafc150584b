"""Servers of the test's "outside world", run inside its outside namespace.

    python outside.py ROLE PORT

Roles: http (GET /download/N streams N bytes of a fixed pattern; POST
/upload answers the sha256 of its body), echo, reset (sends 1 MiB, then a
RST), halfclose (reads to EOF, then answers the sha256 of what it read),
greet (sends a greeting and a FIN, then reads to EOF and prints the count),
hold (reads nothing for 2 s, then all, and prints the count), flood (sends 64 MiB,
then prints "sent"), ends (reads to the connection's end, a FIN or a reset, then
prints "ended"), udp-echo (answers each datagram with it and the sender's address).
Prints "ready" once listening; the test kills it at the end.
"""
from __future__ import annotations

import hashlib
import socket
import socketserver
import struct
import sys
import time

BLOCK = bytes(range(256)) * 4096  # 1 MiB of the pattern


def pattern(n: int):
    """The download's bytes, in blocks (its sha256 is computed the same way)."""
    while n > 0:
        chunk = BLOCK[: min(n, len(BLOCK))]
        yield chunk
        n -= len(chunk)


def pattern_sha256(n: int) -> str:
    h = hashlib.sha256()
    for chunk in pattern(n):
        h.update(chunk)
    return h.hexdigest()


def read_head(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(4096)
        if not more:
            raise EOFError
        data += more
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], {k.lower(): v for k, v in headers.items()}, rest


class Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        getattr(self, ROLE)(self.request)

    def http(self, s: socket.socket) -> None:
        line, headers, rest = read_head(s)
        method, path, _ = line.split(" ")
        if method == "GET":
            n = int(path.rsplit("/", 1)[1])
            s.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n".encode())
            for chunk in pattern(n):
                s.sendall(chunk)
            return
        length, h = int(headers["content-length"]), hashlib.sha256(rest)
        got = len(rest)
        buf = bytearray(1 << 20)
        while got < length:
            n = s.recv_into(buf)
            if not n:
                return
            h.update(memoryview(buf)[:n])
            got += n
        body = h.hexdigest().encode()
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    def echo(self, s: socket.socket) -> None:
        while data := s.recv(65536):
            s.sendall(data)

    def echoend(self, s: socket.socket) -> None:
        """Echo; print how the connection ended: "eof" (a FIN) or the error."""
        try:
            self.echo(s)
            print("eof", flush=True)
        except OSError as e:
            print(type(e).__name__, flush=True)

    def talk(self, s: socket.socket) -> None:
        """Send until the peer stops it; print the error that did."""
        try:
            while True:
                s.sendall(BLOCK)
        except OSError as e:
            print(type(e).__name__, flush=True)

    def reset(self, s: socket.socket) -> None:
        s.recv(100)
        s.sendall(BLOCK)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()

    def halfclose(self, s: socket.socket) -> None:
        h = hashlib.sha256()
        while data := s.recv(65536):
            h.update(data)
        s.sendall(h.hexdigest().encode())

    def hold(self, s: socket.socket) -> None:
        """Read nothing for 2 s, then everything; print the count."""
        time.sleep(2)
        n = 0
        while data := s.recv(1 << 20):
            n += len(data)
        print(f"read {n}", flush=True)

    def flood(self, s: socket.socket) -> None:
        """Send 64 MiB; say when the last of it is in the kernel's hands."""
        for _ in range(64):
            s.sendall(BLOCK)
        print("sent", flush=True)

    def ends(self, s: socket.socket) -> None:
        """Read to the end, however it comes; say so."""
        try:
            while s.recv(65536):
                pass
        except ConnectionResetError:
            pass
        print("ended", flush=True)

    def greet(self, s: socket.socket) -> None:
        s.sendall(b"hello from outside")
        s.shutdown(socket.SHUT_WR)
        n = 0
        while data := s.recv(65536):
            n += len(data)
        print(f"read {n}", flush=True)


class Server(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6  # "::" takes IPv4 too (as ::ffff:a.b.c.d)
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 512


def udp_echo(port: int) -> None:
    """Echo each datagram with the sender's address appended after a '|'."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data + f"|{peer[0]}:{peer[1]}".encode(), peer)


if __name__ == "__main__":
    ROLE, port = sys.argv[1], int(sys.argv[2])
    if ROLE == "udp-echo":
        udp_echo(port)
    with Server(("::", port), Handler) as server:
        print("ready", flush=True)
        server.serve_forever()
