"""A guest's stack options, set on the host socket opened for it."""
from __future__ import annotations

import socket

from circuits import protocol as p

KEEPALIVE_INTERVAL = 10  # seconds between probes once idle
KEEPALIVE_PROBES = 6


def host_address(ep: p.Endpoint) -> tuple:
    """The sockaddr tuple of an endpoint, for connect and bind."""
    if ep.address.version == 4:
        return (str(ep.address), ep.port)
    return (str(ep.address), ep.port, 0, 0)


def family_of(ep: p.Endpoint) -> int:
    return socket.AF_INET if ep.address.version == 4 else socket.AF_INET6


def apply(sock: socket.socket, msg: p.Egress) -> None:
    """SO_MARK, buffer sizes, congestion control, keepalive and source
    address; an OSError here is the guest's connect error."""
    if msg.mark:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, msg.mark)
    if msg.sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, msg.sndbuf)
    if msg.rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, msg.rcvbuf)
    if msg.remote.proto == p.TCP:
        _tcp_options(sock, msg)
    if not msg.source.address.is_unspecified:
        # The kernel picks the port at connect; binding it now would use one
        # per socket even before the connect (IP_BIND_ADDRESS_NO_PORT).
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind(host_address(p.Endpoint(msg.source.address, 0, msg.source.proto)))


def _tcp_options(sock: socket.socket, msg: p.Egress) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the guest batches its writes
    if msg.congestion:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, msg.congestion.encode())
    if msg.keepalive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, msg.keepalive)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
