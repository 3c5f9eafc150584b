"""Control protocol messages, version 1: encoding and strict decoding.

Every message is a 16-byte header and a body, all little-endian; the layout
is specified in docs/protocol.md, which this module follows field by field.
Decoding never trusts its input: any deviation raises ProtocolError, never
another exception.
"""
from __future__ import annotations

import errno
import functools
import ipaddress
import struct
from dataclasses import dataclass, field
from typing import ClassVar

VERSION = 1
MAX_MESSAGE = 4096
TCP, UDP = 6, 17
STREAM, DGRAM = 1, 2
FDS_PER_CIRCUIT = 4  # memfd, bell, self_bell, peer_bell (docs/circuit-format.md)

HEADER = struct.Struct("<HHIIBBH")  # version, type, length, request, nfds, flags, reserved
ENDPOINT = struct.Struct("<16sHBB")  # address (IPv6 form), port, proto, reserved
TEXT_LEN = struct.Struct("<H")
V4_MAPPED = b"\0" * 10 + b"\xff\xff"  # ::ffff:a.b.c.d carries an IPv4 address


class ProtocolError(Exception):
    """A message that breaks the protocol; ``errno`` is what to answer with,
    ``request`` the offending request (0 if its header could not be read)."""

    def __init__(self, reason: str, code: int = errno.EPROTO, request: int = 0):
        super().__init__(reason)
        self.errno = code
        self.request = request
        self.type = 0  # the header's message type, once the header could be read


@dataclass(frozen=True)
class Endpoint:
    """An address, port and transport protocol: what applications connect to."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    proto: int = TCP

    # Endpoints are immutable and a guest names the same few again and again:
    # each conversion is cached, saving address objects on every setup.

    def pack(self) -> bytes:
        return _pack_endpoint(self)

    @classmethod
    def unpack(cls, raw: bytes) -> Endpoint:
        return _unpack_endpoint(raw)

    @classmethod
    def parse(cls, address: str, port: int, proto: int = TCP) -> Endpoint:
        """From text, as applications give it ("10.0.0.2", "fd00::2")."""
        if type(address) is not str or type(port) is not int:  # the cache wants these
            return cls(ipaddress.ip_address(address), port, proto)
        return _parse_endpoint(address, port, proto)

    def __str__(self) -> str:
        name = "tcp" if self.proto == TCP else "udp"
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{name}://{host}:{self.port}"


@functools.lru_cache(maxsize=4096)
def _pack_endpoint(ep: Endpoint) -> bytes:
    addr = ep.address
    packed = V4_MAPPED + addr.packed if addr.version == 4 else addr.packed
    return ENDPOINT.pack(packed, ep.port, ep.proto, 0)


@functools.lru_cache(maxsize=4096)  # a bad one raises, and exceptions are not cached
def _unpack_endpoint(raw: bytes) -> Endpoint:
    packed, port, proto, reserved = ENDPOINT.unpack(raw)
    if proto not in (TCP, UDP) or reserved:
        raise ProtocolError(f"bad endpoint: proto {proto}, reserved {reserved}")
    if packed[:12] == V4_MAPPED:  # the IPv4 form: most endpoints, decoded cheaply
        return Endpoint(ipaddress.IPv4Address(packed[12:]), port, proto)
    return Endpoint(ipaddress.IPv6Address(packed), port, proto)


@functools.lru_cache(maxsize=4096)
def _parse_endpoint(address: str, port: int, proto: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address(address), port, proto)


@dataclass(frozen=True)
class Message:
    """Base of all messages: a type code, a fixed body, an optional text tail."""

    TYPE: ClassVar[int]
    BODY: ClassVar[struct.Struct]
    HAS_TEXT: ClassVar[bool] = False
    # Records of this layout fill the rest of the body (a table), instead of a
    # text; from_body then gets the list of their unpacked fields as `text`.
    ITEM: ClassVar[struct.Struct | None] = None
    NFDS: ClassVar[tuple[int, ...]] = (0,)  # how many fds may come with it

    request: int = field(default=0, kw_only=True)

    def body_fields(self) -> tuple:
        raise NotImplementedError

    def item_fields(self) -> list[tuple]:
        """The fields of each ITEM record, for messages that carry a table."""
        return []

    @classmethod
    def from_body(cls, values: tuple, text: str, request: int) -> Message:
        raise NotImplementedError

    def check(self) -> None:
        """Semantic checks beyond the layout; raise ProtocolError."""


@dataclass(frozen=True)
class Hello(Message):
    """Client -> operator, first: the versions the client speaks."""

    TYPE = 1
    BODY = struct.Struct("<HHI")  # min_version, max_version, reserved
    min_version: int = VERSION
    max_version: int = VERSION

    def body_fields(self):
        return (self.min_version, self.max_version, 0)

    @classmethod
    def from_body(cls, v, text, request):
        _reserved(v[2])
        return cls(v[0], v[1], request=request)

    def check(self):
        if self.min_version > self.max_version:
            raise ProtocolError("hello: min_version above max_version")


@dataclass(frozen=True)
class Welcome(Message):
    """Operator -> client: the version chosen, and who the client is."""

    TYPE = 2
    BODY = struct.Struct("<HH")  # version, reserved
    HAS_TEXT = True
    version: int = VERSION
    guest: str = ""

    def body_fields(self):
        return (self.version, 0)

    def text(self) -> str:
        return self.guest

    @classmethod
    def from_body(cls, v, text, request):
        _reserved(v[1])
        return cls(v[0], text, request=request)


@dataclass(frozen=True)
class Listen(Message):
    """Client -> operator: accept circuits to this endpoint."""

    TYPE = 3
    BODY = struct.Struct(f"<{ENDPOINT.size}sII")  # endpoint, backlog, ring_size
    local: Endpoint
    backlog: int = 128
    ring_size: int = 0  # 0: the operator's default

    def body_fields(self):
        return (self.local.pack(), self.backlog, self.ring_size)

    @classmethod
    def from_body(cls, v, text, request):
        return cls(Endpoint.unpack(v[0]), v[1], v[2], request=request)


@dataclass(frozen=True)
class _LocalEndpoint(Message):
    """A request that names one of the client's listening endpoints."""

    BODY = struct.Struct(f"<{ENDPOINT.size}s")
    local: Endpoint

    def body_fields(self):
        return (self.local.pack(),)

    @classmethod
    def from_body(cls, v, text, request):
        return cls(Endpoint.unpack(v[0]), request=request)


@dataclass(frozen=True)
class Unlisten(_LocalEndpoint):
    """Client -> operator: stop accepting circuits to this endpoint."""

    TYPE = 4


@dataclass(frozen=True)
class Connect(Message):
    """Client -> operator: a circuit to this endpoint, please."""

    TYPE = 5
    BODY = struct.Struct(f"<{ENDPOINT.size}sI")  # endpoint, ring_size
    remote: Endpoint
    ring_size: int = 0

    def body_fields(self):
        return (self.remote.pack(), self.ring_size)

    @classmethod
    def from_body(cls, v, text, request):
        return cls(Endpoint.unpack(v[0]), v[1], request=request)


@dataclass(frozen=True)
class Circuit(Message):
    """Operator -> client: one side of a new circuit.

    The reply to Connect, or to Accept (request echoed).  Memory is given either as
    four descriptors with the message (trunk 0) or, for VM guests on a byte
    stream, as (trunk, offset, length) in shared memory both already map.
    """

    TYPE = 6
    BODY = struct.Struct(f"<QHHIQQ{ENDPOINT.size}s{ENDPOINT.size}sIIQQ")
    NFDS = (0, FDS_PER_CIRCUIT)
    circuit_id: int
    kind: int
    side: int
    size0: int
    size1: int
    local: Endpoint
    remote: Endpoint
    trunk: int = 0
    offset: int = 0
    length: int = 0

    def body_fields(self):
        return (self.circuit_id, self.kind, self.side, 0, self.size0, self.size1,
                self.local.pack(), self.remote.pack(), self.trunk, 0, self.offset, self.length)

    @classmethod
    def from_body(cls, v, text, request):
        _reserved(v[3], v[9])
        return cls(v[0], v[1], v[2], v[4], v[5], Endpoint.unpack(v[6]),
                   Endpoint.unpack(v[7]), v[8], v[10], v[11], request=request)

    def check(self):
        if self.kind not in (STREAM, DGRAM) or self.side not in (0, 1):
            raise ProtocolError(f"circuit: kind {self.kind}, side {self.side}")
        if self.trunk == 0 and (self.offset or self.length):
            raise ProtocolError("circuit: an fd-backed circuit has no offset or length")


@dataclass(frozen=True)
class Close(Message):
    """Client -> operator: this side of the circuit is done."""

    TYPE = 7
    BODY = struct.Struct("<Q")
    circuit_id: int = 0

    def body_fields(self):
        return (self.circuit_id,)

    @classmethod
    def from_body(cls, v, text, request):
        return cls(v[0], request=request)


@dataclass(frozen=True)
class Ok(Message):
    """Operator -> client: the request succeeded."""

    TYPE = 8
    BODY = struct.Struct("<")

    def body_fields(self):
        return ()

    @classmethod
    def from_body(cls, v, text, request):
        return cls(request=request)


@dataclass(frozen=True)
class Error(Message):
    """Operator -> client: the request failed with an errno, and why."""

    TYPE = 9
    BODY = struct.Struct("<I")
    HAS_TEXT = True
    code: int = errno.EPROTO
    reason: str = ""

    def body_fields(self):
        return (self.code,)

    def text(self) -> str:
        return self.reason

    @classmethod
    def from_body(cls, v, text, request):
        return cls(v[0], text, request=request)

    def check(self):
        if not 0 < self.code < 4096:
            raise ProtocolError(f"error: errno {self.code} out of range")


@dataclass(frozen=True)
class Accept(_LocalEndpoint):
    """Client -> operator: hand me the next circuit to this listening endpoint.

    Answered by a Circuit (same request) as soon as a connection is waiting
    in the listener's backlog, possibly much later."""

    TYPE = 10


CONGESTION_LEN = 16  # TCP_CA_NAME_MAX: the kernel's longest congestion control name


@dataclass(frozen=True)
class Egress(Message):
    """Operator -> proxy stack: open a host connection for a guest's circuit.

    Carries side 1 of a new circuit (4 descriptors), the destination, and the
    guest's stack options.  Answered OK once the host socket is connected (the
    proxy stack then moves bytes), or ERROR with the kernel's errno; either way
    the proxy stack owns the descriptors that came with it.
    """

    TYPE = 11
    BODY = struct.Struct(f"<QHHIQQ{ENDPOINT.size}s{ENDPOINT.size}s{ENDPOINT.size}s"
                         f"IIII{CONGESTION_LEN}s")
    NFDS = (FDS_PER_CIRCUIT,)
    HAS_TEXT = True
    circuit_id: int
    kind: int
    side: int
    size0: int
    size1: int
    remote: Endpoint  # where to connect
    local: Endpoint  # the guest's end, as the guest's getsockname shows it
    source: Endpoint  # the host address to bind; unspecified: the kernel chooses
    mark: int = 0  # SO_MARK; 0: none
    sndbuf: int = 0  # SO_SNDBUF / SO_RCVBUF in bytes; 0: the kernel's default
    rcvbuf: int = 0
    keepalive: int = 0  # TCP keepalive idle time in seconds; 0: off
    connect_timeout_ms: int = 0  # 0: the kernel's own
    congestion: str = ""  # TCP_CONGESTION; "": the kernel's default
    guest: str = ""

    def body_fields(self):
        return (self.circuit_id, self.kind, self.side, self.mark, self.size0, self.size1,
                self.remote.pack(), self.local.pack(), self.source.pack(), self.sndbuf,
                self.rcvbuf, self.keepalive, self.connect_timeout_ms,
                self.congestion.encode("ascii"))

    def text(self) -> str:
        return self.guest

    @classmethod
    def from_body(cls, v, text, request):
        raw = v[13]
        name = raw.rstrip(b"\0")
        if b"\0" in name or not all(0x21 <= c < 0x7F for c in name):
            raise ProtocolError("egress: congestion is not NUL-padded printable ASCII")
        return cls(v[0], v[1], v[2], v[4], v[5], Endpoint.unpack(v[6]), Endpoint.unpack(v[7]),
                   Endpoint.unpack(v[8]), v[3], v[9], v[10], v[11], v[12], name.decode(),
                   text, request=request)

    def check(self):
        if self.kind not in (STREAM, DGRAM) or self.side != 1:
            raise ProtocolError(f"egress: kind {self.kind}, side {self.side}"
                                " (the proxy stack's is 1)")
        if len(self.congestion.encode("ascii", "replace")) >= CONGESTION_LEN:
            raise ProtocolError(f"egress: congestion name {self.congestion!r} too long")
        if (self.kind == STREAM) != (self.remote.proto == TCP):
            raise ProtocolError("egress: a stream circuit goes to TCP, a datagram one to UDP")


@dataclass(frozen=True)
class Ingress(Message):
    """Proxy stack -> operator: connect an accepted outside connection to a
    guest's listener.  ``remote`` is the outside peer: the guest's accept and
    getpeername show it.  Answered by CIRCUIT (side 0, the proxy stack's) or ERROR."""

    TYPE = 12
    BODY = struct.Struct(f"<{ENDPOINT.size}s{ENDPOINT.size}sI")  # remote, local, ring_size
    HAS_TEXT = True
    remote: Endpoint  # the outside peer
    local: Endpoint  # the guest's listening endpoint (unspecified address: any of the guest's)
    ring_size: int = 0
    guest: str = ""

    def body_fields(self):
        return (self.remote.pack(), self.local.pack(), self.ring_size)

    def text(self) -> str:
        return self.guest

    @classmethod
    def from_body(cls, v, text, request):
        return cls(Endpoint.unpack(v[0]), Endpoint.unpack(v[1]), v[2], text, request=request)

    def check(self):
        if self.remote.proto != self.local.proto:
            raise ProtocolError("ingress: remote and local differ in protocol")


GUEST_LEN = 32  # a guest's name in a fixed field: at most 32 bytes (docs/policy.md)
MAX_PUBLISH = 1000  # entries in a publish table: every failure fits in one PUBLISHED
MAX_TIMEOUT_MS = 3_600_000  # the configuration's bound on a timeout: an hour


@dataclass(frozen=True)
class PublishEntry:
    """One published port of a PUBLISH table: the host socket's address, port
    and protocol, and the guest listener it serves."""

    host: Endpoint
    guest_port: int
    guest: str


PUBLISH_ENTRY = struct.Struct(f"<{ENDPOINT.size}sHH{GUEST_LEN}s")  # host, guest_port, 0, guest


@dataclass(frozen=True)
class Publish(Message):
    """Operator -> proxy stack: the published ports and timeouts to serve from
    now on, a part of the table (entries first .. first + len(entries) - 1 of
    total).  The proxy stack answers OK to every part but the last, and the
    last with PUBLISHED once it has applied the whole table."""

    TYPE = 13
    BODY = struct.Struct("<HHHHII")  # first, count, total, reserved, udp idle ms, orphan grace ms
    ITEM = PUBLISH_ENTRY
    first: int
    total: int
    udp_idle_timeout_ms: int
    orphan_grace_ms: int
    entries: tuple[PublishEntry, ...] = ()

    def body_fields(self):
        return (self.first, len(self.entries), self.total, 0, self.udp_idle_timeout_ms,
                self.orphan_grace_ms)

    def item_fields(self):
        return [(e.host.pack(), e.guest_port, 0, e.guest.encode("ascii", "replace"))
                for e in self.entries]

    @classmethod
    def from_body(cls, v, items, request):
        _reserved(v[3])
        if v[1] != len(items):
            raise ProtocolError(f"publish: count {v[1]}, {len(items)} entries")
        return cls(v[0], v[2], v[4], v[5], tuple(_publish_entry(i) for i in items),
                   request=request)

    @property
    def last(self) -> bool:
        """Whether this part ends its table."""
        return self.first + len(self.entries) == self.total

    def check(self):
        if self.total > MAX_PUBLISH or self.first + len(self.entries) > self.total:
            raise ProtocolError(f"publish: entries {self.first}+{len(self.entries)} of"
                                f" {self.total} (at most {MAX_PUBLISH})")
        if not self.entries and self.total:
            raise ProtocolError("publish: a part of a table with no entries")
        for ms in (self.udp_idle_timeout_ms, self.orphan_grace_ms):
            if not 0 < ms <= MAX_TIMEOUT_MS:
                raise ProtocolError(f"publish: timeout of {ms} ms")
        for e in self.entries:
            if not (0 < e.host.port and 0 < e.guest_port) or not _guest_name(e.guest):
                raise ProtocolError(f"publish: entry {e.host} -> {e.guest!r}:{e.guest_port}")


def _publish_entry(fields: tuple) -> PublishEntry:
    host, guest_port, reserved, raw = fields
    _reserved(reserved)
    name = raw.rstrip(b"\0")
    if b"\0" in name or not _guest_name(name.decode("latin-1")):
        raise ProtocolError("publish: guest is not a NUL-padded printable ASCII name")
    return PublishEntry(Endpoint.unpack(host), guest_port, name.decode())


def _guest_name(name: str) -> bool:
    return 0 < len(name) <= GUEST_LEN and all(0x21 <= ord(c) < 0x7F for c in name)


@dataclass(frozen=True)
class Published(Message):
    """Proxy stack -> operator: the answer to a table's last PUBLISH.  Every
    entry listens but the failures, each (its index in the table, errno)."""

    TYPE = 14
    BODY = struct.Struct("<HH")  # failed, reserved
    ITEM = struct.Struct("<HH")  # index, errno
    failures: tuple[tuple[int, int], ...] = ()

    def body_fields(self):
        return (len(self.failures), 0)

    def item_fields(self):
        return list(self.failures)

    @classmethod
    def from_body(cls, v, items, request):
        _reserved(v[1])
        if v[0] != len(items):
            raise ProtocolError(f"published: failed {v[0]}, {len(items)} failures")
        return cls(tuple(items), request=request)

    def check(self):
        if len(self.failures) > MAX_PUBLISH:
            raise ProtocolError(f"published: {len(self.failures)} failures")
        for index, code in self.failures:
            if index >= MAX_PUBLISH or not 0 < code < 4096:
                raise ProtocolError(f"published: entry {index}, errno {code}")


TYPES: dict[int, type[Message]] = {m.TYPE: m for m in (
    Hello, Welcome, Listen, Unlisten, Connect, Circuit, Close, Ok, Error, Accept, Egress,
    Ingress, Publish, Published)}
# The replies (docs/protocol.md, section 5): on the proxy stack's socket, where both
# sides make requests, a bad one fails its receiver's own request instead of being
# answered (an answer would read as a reply to the other side's request of that number).
REPLIES = frozenset(m.TYPE for m in (Welcome, Circuit, Ok, Error, Published))


def _reserved(*values: int) -> None:
    if any(values):
        raise ProtocolError("reserved field is not zero")


def encode(msg: Message, nfds: int = 0, request: int | None = None) -> bytes:
    """The bytes of a message; ``nfds`` descriptors will travel with it.
    ``request`` numbers it instead of ``msg.request`` (a requester numbers
    the requests it sends without making a new message for each)."""
    msg.check()
    if nfds not in msg.NFDS:
        raise ValueError(f"{type(msg).__name__} carries {msg.NFDS} descriptors, not {nfds}")
    body = msg.BODY.pack(*msg.body_fields())
    if msg.ITEM is not None:
        body += b"".join(msg.ITEM.pack(*fields) for fields in msg.item_fields())
    if msg.HAS_TEXT:
        text = msg.text().encode()
        body += TEXT_LEN.pack(len(text)) + text
    length = HEADER.size + len(body)
    if length > MAX_MESSAGE:
        raise ValueError(f"message of {length} bytes exceeds {MAX_MESSAGE}")
    rid = msg.request if request is None else request
    return HEADER.pack(VERSION, msg.TYPE, length, rid, nfds, 0, 0) + body


def decode(data: bytes, nfds: int = 0) -> Message:
    """Decode one whole message that arrived with ``nfds`` descriptors."""
    if len(data) < HEADER.size:
        raise ProtocolError(f"truncated: {len(data)} bytes, the header alone is {HEADER.size}")
    header = HEADER.unpack_from(data)
    try:
        return _decode(header, data, nfds)
    except ProtocolError as e:
        e.type, e.request = header[1], header[3]
        raise


def _decode(header: tuple, data: bytes, nfds: int) -> Message:
    version, kind, length, request, hdr_nfds, flags, reserved = header
    if version != VERSION:
        raise ProtocolError(f"version {version}, this side speaks {VERSION}")
    if length != len(data) or length > MAX_MESSAGE:
        raise ProtocolError(f"length field {length}, message of {len(data)} bytes")
    if flags or reserved:
        raise ProtocolError("header flags or reserved bytes are not zero")
    return _decode_body(TYPES.get(kind), kind, data, request, hdr_nfds, nfds)


def _decode_body(cls: type[Message] | None, kind: int, data: bytes, request: int,
                 hdr_nfds: int, nfds: int) -> Message:
    if cls is None:
        raise ProtocolError(f"unknown message type {kind}")
    if hdr_nfds != nfds or nfds not in cls.NFDS:
        raise ProtocolError(f"{cls.__name__} with {nfds} descriptors (header says {hdr_nfds})")
    values, text = _split_body(cls, memoryview(data)[HEADER.size:])
    msg = cls.from_body(values, text, request)
    msg.check()
    if isinstance(msg, Circuit) and (msg.trunk == 0) != (nfds == FDS_PER_CIRCUIT):
        raise ProtocolError("circuit: trunk 0 needs its 4 descriptors, a trunk none")
    return msg


def _split_body(cls: type[Message], body: memoryview) -> tuple[tuple, str | list[tuple]]:
    fixed = cls.BODY.size
    if len(body) < fixed:
        raise ProtocolError(f"{cls.__name__}: body of {len(body)} bytes, needs {fixed}")
    values = cls.BODY.unpack_from(body)
    rest = body[fixed:]
    if cls.ITEM is not None:
        if len(rest) % cls.ITEM.size:
            raise ProtocolError(f"{cls.__name__}: {len(rest)} bytes of records of"
                                f" {cls.ITEM.size}")
        return values, list(cls.ITEM.iter_unpack(rest))
    if not cls.HAS_TEXT:
        if len(rest):
            raise ProtocolError(f"{cls.__name__}: {len(rest)} bytes after the body")
        return values, ""
    if len(rest) < TEXT_LEN.size:
        raise ProtocolError(f"{cls.__name__}: text length missing")
    (n,) = TEXT_LEN.unpack_from(rest)
    if n != len(rest) - TEXT_LEN.size:
        raise ProtocolError(f"{cls.__name__}: text of {n} bytes in {len(rest) - 2}")
    try:
        return values, bytes(rest[TEXT_LEN.size:]).decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"{cls.__name__}: text is not UTF-8") from None
