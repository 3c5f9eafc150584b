"""Carrying messages: SOCK_SEQPACKET with SCM_RIGHTS for local guests, and
length-framed byte streams for VM guests (docs/protocol.md, "Transports")."""
from __future__ import annotations

import array
import os
import socket

from circuits.protocol.messages import HEADER, MAX_MESSAGE, Message, ProtocolError, decode, encode

MAX_FDS = 4  # the most any message carries; more is a protocol error
# Plain ints: testing an int against socket's IntFlag members goes through enum code.
_TRUNC, _CTRUNC = int(socket.MSG_TRUNC), int(socket.MSG_CTRUNC)
_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_FDS_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def send(sock: socket.socket, msg: Message, fds: list[int] | tuple[int, ...] = (),
         request: int | None = None) -> None:
    """Send one message, with its descriptors, as one packet (numbered
    ``request`` if given, see encode)."""
    data = encode(msg, len(fds), request)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def receive(sock: socket.socket, flags: int = 0) -> tuple[Message, list[int]]:
    """Receive one message and the descriptors that came with it.

    Raises EOFError when the other side has closed, BlockingIOError on a
    non-blocking socket with nothing to read, and ProtocolError for a bad
    message, after closing any descriptors that came with it: a bad message
    never leaks descriptors into this process.  `flags` go to recvmsg
    (MSG_DONTWAIT: BlockingIOError rather than waiting).
    """
    try:
        data, fds, flags = _recv_fds(sock, flags)
    except ConnectionResetError:  # closed with our messages unread: gone all the same
        raise EOFError("the other side closed the control socket") from None
    try:
        if flags & _CTRUNC:
            raise ProtocolError(f"more than {MAX_FDS} descriptors")
        if flags & _TRUNC or len(data) > MAX_MESSAGE:
            raise ProtocolError(f"message longer than {MAX_MESSAGE} bytes")
        if not data and not fds:
            raise EOFError("the other side closed the control socket")
        return decode(data, len(fds)), fds
    except BaseException:
        close_all(fds)
        raise


def _recv_fds(sock: socket.socket, flags: int = 0) -> tuple[bytes, list[int], int]:
    """recvmsg with close-on-exec descriptors (socket.recv_fds of Python 3.11
    drops its flags argument, so it cannot give MSG_CMSG_CLOEXEC)."""
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE + 1, _FDS_SPACE, _CLOEXEC | flags)
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, fds.tolist(), flags


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class StreamDecoder:
    """Split a byte stream (a VM guest's control channel) into messages.

    Feed it bytes as they come; it returns what the whole frames they finish
    hold: a Message, or a ProtocolError for a frame that is bad inside (the
    stream goes on after it).  A length field out of range raises
    ProtocolError: the stream cannot be resynchronised; drop the channel.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message | ProtocolError]:
        self._buf += data
        out: list[Message | ProtocolError] = []
        while len(self._buf) >= HEADER.size:
            length = int.from_bytes(self._buf[4:8], "little")
            if not HEADER.size <= length <= MAX_MESSAGE:
                raise ProtocolError(f"stream frame of {length} bytes")
            if len(self._buf) < length:
                break
            frame = bytes(self._buf[:length])
            del self._buf[:length]
            try:
                out.append(decode(frame))
            except ProtocolError as e:
                out.append(e)
        return out
