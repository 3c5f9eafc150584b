"""Egress: a guest's connection to the outside, opened on the host (TCP, or a
connected UDP socket for a datagram circuit).

The operator hands over side 1 of the circuit with the destination and the
guest's options (EGRESS).  The host socket connects first; only then is the
operator told OK, and the guest's connect returns.  A failed connect is
answered with the kernel's errno, which becomes the guest's.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket

from circuits import protocol as p
from circuits.proxystack import options
from circuits.proxystack.sockets import PLAIN, HostSockets
from circuits.ring import Circuit, CircuitSpec

log = logging.getLogger("circuits.proxystack")


def circuit_of(msg: p.Egress | p.Circuit, fds: list[int]) -> Circuit:
    """Attach this side of a circuit from its trusted parameters."""
    kind = "stream" if msg.kind == p.STREAM else "dgram"
    return Circuit(*fds, CircuitSpec(kind, msg.side, (msg.size0, msg.size1)))


async def connect(loop: asyncio.AbstractEventLoop, msg: p.Egress,
                  sockets: HostSockets = PLAIN) -> socket.socket:
    """A connected TCP socket with the guest's options; OSError with the
    kernel's errno (ETIMEDOUT once the connect timeout passes)."""
    kind = socket.SOCK_STREAM if msg.kind == p.STREAM else socket.SOCK_DGRAM
    sock = sockets.socket(options.family_of(msg.remote), kind)
    try:
        sock.setblocking(False)
        options.apply(sock, msg)
        timeout = msg.connect_timeout_ms / 1000 if msg.connect_timeout_ms else None
        await asyncio.wait_for(_established(loop, sock, options.host_address(msg.remote)),
                               timeout)
        return sock
    except asyncio.TimeoutError:
        sock.close()
        raise TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT)) from None
    except BaseException:
        sock.close()
        raise


async def _established(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                       address: tuple) -> None:
    """The loop's own non-blocking connect (OSError with the kernel's errno),
    checked: it trusts one writable wake-up with SO_ERROR 0 as the end of the
    connect, and the OK we answer promises an established connection.  A
    full-suite run once saw a connect to an address nobody answers come back
    OK; a peer name is proof, and without one we wait again (a connect() on a
    socket still connecting is EALREADY: the loop waits for it)."""
    while True:
        await loop.sock_connect(sock, address)
        try:
            sock.getpeername()
            return
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise
        log.warning("a connect to %s woke up unfinished: waiting again", address[0])
        await asyncio.sleep(0.001)  # never a busy loop, whatever wakes us
