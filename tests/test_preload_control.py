"""The preload library's control client against a hostile operator.

A fake operator in this process answers HELLO properly, then answers CONNECT
with something malformed.  The program under the library must get an errno
from connect() (EPROTO for a broken reply), and neither crash nor hang.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from circuits import protocol as p
from circuits.protocol.messages import HEADER
from circuits.preload import library_path

APP = Path(__file__).with_name("preload_app.py")
EP = p.Endpoint.parse("10.0.0.2", 80)


def raw(type_: int, body: bytes, request: int, nfds: int = 0, length: int | None = None) -> bytes:
    return HEADER.pack(1, type_, length or 16 + len(body), request, nfds, 0, 0) + body


def circuit(request: int, **kw) -> p.Circuit:
    fields = dict(circuit_id=1, kind=p.STREAM, side=0, size0=65536, size1=65536, local=EP,
                  remote=EP)
    return p.Circuit(**{**fields, **kw}, request=request)


# Each answer: (packet bytes for a CONNECT of `request`, fds to send with it).
ANSWERS = {
    "garbage": lambda r: (b"\x01\x00\x06", []),
    "wrong request": lambda r: (p.encode(p.Error(errno.EACCES, "no", request=r + 1)), []),
    "errno out of range": lambda r: (raw(9, struct.pack("<IH", 0, 0), r), []),
    "text length lies": lambda r: (raw(9, struct.pack("<IH", 13, 50) + b"x", r), []),
    "circuit without fds": lambda r: (p.encode(circuit(r)), []),
    "circuit of pipes": lambda r: (p.encode(circuit(r), 4), list(os.pipe() + os.pipe())),
    "datagram for tcp": lambda r: (p.encode(circuit(r, kind=p.DGRAM), 4),
                                   list(os.pipe() + os.pipe())),
    "oversized": lambda r: (raw(6, b"\0" * 5000, r), []),
    "nfds lies": lambda r: (raw(8, b"", r, nfds=2), []),
}


def serve(srv: socket.socket, answer) -> None:
    """Answer every connection: WELCOME to HELLO, `answer` to anything else."""
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            for _ in range(2):
                data = conn.recv(4096)
                if len(data) < 16:
                    break
                msg = p.decode(data)
                if isinstance(msg, p.Hello):
                    conn.send(p.encode(p.Welcome(1, "web", request=msg.request)))
                    continue
                packet, fds = answer(msg.request)
                try:
                    if fds:
                        socket.send_fds(conn, [packet], fds)
                    else:
                        conn.send(packet)
                finally:
                    for fd in fds:
                        os.close(fd)


@pytest.mark.parametrize("case", sorted(ANSWERS))
def test_malformed_replies_give_eproto(tmp_path, case):
    path = str(tmp_path / "fake.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(4)
    threading.Thread(target=serve, args=(srv, ANSWERS[case]), daemon=True).start()
    env = {**os.environ, "LD_PRELOAD": library_path(), "CIRCUITS_CONTROL": path}
    try:
        proc = subprocess.run([sys.executable, str(APP), "connect", "10.0.0.2", "80"], env=env,
                              capture_output=True, text=True, timeout=30)
    finally:
        srv.close()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "EPROTO", proc.stderr


def test_the_operators_errno_reaches_the_program(tmp_path):
    path = str(tmp_path / "fake.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(4)
    answer = lambda r: (p.encode(p.Error(errno.EHOSTUNREACH, "far away", request=r)), [])  # noqa: E731
    threading.Thread(target=serve, args=(srv, answer), daemon=True).start()
    env = {**os.environ, "LD_PRELOAD": library_path(), "CIRCUITS_CONTROL": path}
    try:
        out = subprocess.run([sys.executable, str(APP), "connect", "10.0.0.2", "80"], env=env,
                             capture_output=True, text=True, timeout=30).stdout
    finally:
        srv.close()
    assert out.strip() == "EHOSTUNREACH"


LEAVES = """
import errno, os, socket
s = socket.socket()
before = len(os.listdir("/proc/self/fd"))
try:
    s.connect(("10.0.0.2", 80))
    print("connected")
except OSError as e:
    print(errno.errorcode[e.errno], len(os.listdir("/proc/self/fd")) - before)
"""


def test_the_operator_leaving_mid_connect_leaves_no_dead_connection(tmp_path):
    """ENETUNREACH, and the control connection it left dead is closed, not
    kept in the library's pool for the next connect."""
    path = str(tmp_path / "fake.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(4)
    leave = lambda r: (b"", [])  # noqa: E731 - an empty packet: the library reads end of file
    threading.Thread(target=serve, args=(srv, leave), daemon=True).start()
    env = {**os.environ, "LD_PRELOAD": library_path(), "CIRCUITS_CONTROL": path}
    try:
        proc = subprocess.run([sys.executable, "-c", LEAVES], env=env, capture_output=True,
                              text=True, timeout=30)
    finally:
        srv.close()
    assert proc.stdout.split() == ["ENETUNREACH", "0"], proc.stdout + proc.stderr
