"""The switch operator daemon: control sockets, listen table, circuit setup.

One control socket per guest (SOCK_SEQPACKET); the socket a request arrives
on is the guest.  A CONNECT is judged by the policy, matched to a listener,
and answered with one side of a new circuit; the other side waits in the
listener's backlog for its ACCEPT.  Once both sides hold their descriptors
the operator keeps none: it is out of the data path, and a circuit outlives
it.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field

from circuits import protocol as p
from circuits.operator import guests as guestnet
from circuits.operator.config import PROXY_IDENTITY, Config, ConfigError, Guest, Limits, load
from circuits.operator.policy import Policy
from circuits.operator.proxy import ProxyLink, Supervisor
from circuits.operator.published import PublishReport
from circuits.operator.table import Record, Table
from circuits.ring import DATA_OFFSET, CircuitSpec, Made, make

log = logging.getLogger("circuits.operator")
EPHEMERAL = range(49152, 65536)
MAX_CONNECTIONS = 256  # control connections per guest
MAX_ACCEPTS = 64  # ACCEPT requests waiting per listener
REAP_AFTER = 0.2  # seconds from a first hang-up to the sweep that collects it and those after
REAP_BATCH = 64  # hung-up sides collected between other work


class Refused(Exception):
    """A request the operator answers with an errno."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code


@dataclass
class Pending:
    """A circuit waiting in a backlog: the listening side's Circuit message
    (its fields, less the request it will answer), its fds, and which of them
    is its bell (ours to close once handed over; the others are the record's)."""

    fields: tuple
    fds: list[int]
    bell: int


@dataclass
class Listener:
    guest: str
    conn: GuestConn
    local: p.Endpoint
    backlog: int
    ring_size: int
    queue: deque[Pending] = field(default_factory=deque)
    accepts: deque[int] = field(default_factory=deque)  # ACCEPT requests waiting

    def drop(self) -> None:
        """Close every circuit still waiting: its connector sees the hang-up."""
        while self.queue:
            os.close(self.queue.popleft().bell)


class GuestConn:
    """One control connection; every request on it is the guest's."""

    def __init__(self, op: Operator, guest: Guest, sock: socket.socket):
        self.op, self.guest, self.sock = op, guest, sock
        self.listeners: set[tuple] = set()

    def on_readable(self) -> None:
        """One message per call: the loop calls again while more wait (asking
        for a next message that is not there cost a system call and an
        exception per request), and other guests get their turn in between."""
        try:
            msg, fds = p.receive(self.sock)
        except BlockingIOError:
            return
        except (EOFError, ConnectionError):
            self.op.drop(self)
            return
        except p.ProtocolError as e:
            log.warning("guest %s: bad message: %s", self.guest.name, e)
            self.refuse(e)
            return
        self.dispatch(msg, fds)

    def refuse(self, e: p.ProtocolError) -> None:
        """A bad message is answered ERROR (docs/protocol.md, section 5)."""
        self.reply(p.Error(e.errno, str(e), request=e.request))

    def dispatch(self, msg: p.Message, fds: list[int]) -> None:
        handler = self.op.handlers.get(type(msg))
        try:
            if handler is None:
                raise Refused(errno.EPROTO, f"{type(msg).__name__} is not a request")
            handler(self, msg)
        except Refused as e:
            self.reply(p.Error(e.code, str(e), request=msg.request))
        except OSError as e:  # out of fds or memory: say so, never leave a request hanging
            log.error("guest %s: %s failed: %s", self.guest.name, type(msg).__name__, e)
            self.reply(p.Error(e.errno or errno.EIO, str(e), request=msg.request))
        finally:
            p.close_all(fds)

    def reply(self, msg: p.Message, fds: list[int] = ()) -> None:
        if self.sock.fileno() < 0:
            # Gone before its answer (a connect to the outside it gave up on):
            # nobody to tell.  The circuit's unsent side ends with its bell.
            log.debug("guest %s: gone before the answer to request %d", self.guest.name,
                      msg.request)
            return
        try:
            p.send(self.sock, msg, fds)
        except (BlockingIOError, OSError) as e:
            # A guest that does not read its control socket loses it.
            log.warning("guest %s: cannot reply (%s): dropping the connection", self.guest.name, e)
            self.op.drop(self)


class ProxyConn(GuestConn):
    """The proxy stack's control connection: it answers our EGRESS and
    PUBLISH requests (OK, ERROR, PUBLISHED) and asks INGRESS; nothing else."""

    def __init__(self, op: Operator, guest: Guest, sock: socket.socket):
        super().__init__(op, guest, sock)
        self.link = ProxyLink(sock, op.loop)

    def refuse(self, e: p.ProtocolError) -> None:
        """A bad reply fails the request it answers (answering it would look
        like a reply to the proxy stack's own request of that number)."""
        if e.type in p.REPLIES:
            self.link.answered(p.Error(e.errno, f"a bad reply: {e}", request=e.request))
        else:
            super().refuse(e)

    def dispatch(self, msg: p.Message, fds: list[int]) -> None:
        if isinstance(msg, (p.Ok, p.Error, p.Published)):
            p.close_all(fds)
            self.link.answered(msg)
        elif isinstance(msg, (p.Hello, p.Ingress)):
            super().dispatch(msg, fds)
        else:
            p.close_all(fds)
            self.reply(p.Error(errno.EPROTO, f"{type(msg).__name__} is not for the proxy stack",
                               request=msg.request))


class Operator:
    """The daemon's state: guests, their connections, listeners, circuits."""

    def __init__(self, config: Config):
        self.config = config
        self.start_config = config  # what netns, mark, egress_rate and host_netns stay as
        self.policy = Policy(config)
        self.listeners: dict[tuple, Listener] = {}
        self.conns: set[GuestConn] = set()
        self.servers: list[socket.socket] = []
        # Ids stay unique across restarts (circuits outlive an operator): they
        # start from the clock in microseconds, and no operator sets up a
        # circuit per microsecond, so a successor starts above every old id.
        self.next_circuit = time.time_ns() // 1000
        self.next_port: dict[str, int] = {}
        self.setups: dict[str, deque[float]] = {}
        self.table = Table()
        self._reaping: asyncio.Handle | None = None
        self.usage: dict[str, list[int]] = {}  # guest -> [open circuits, circuit memory]
        self.counters: dict[tuple[str, str], int] = {}  # (metric, guest) -> count
        self.started = time.time()
        self.audit = _open_audit(config.audit_log)
        self.guestnet = None  # namespaced guests and the host table, once started
        self.proxy: ProxyConn | None = None  # the proxy stack's connection, once it said HELLO
        self.supervisor: Supervisor | None = None
        self.publishing: PublishReport | None = None  # the last table given to the proxy stack
        self.table_sent: asyncio.Future | None = None  # its report, once answered
        self.handlers = {p.Hello: self.hello, p.Listen: self.listen, p.Unlisten: self.unlisten,
                         p.Connect: self.connect, p.Accept: self.accept, p.Close: self.close,
                         p.Ingress: self.ingress}

    # -- sockets ------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open every guest's control socket and serve it on `loop`."""
        self.loop = loop
        # Namespaces first: `circuits run` waits for the control sockets, then enters them.
        self.guestnet = guestnet.start(self.config)
        os.makedirs(self.config.control_dir, exist_ok=True)
        for guest in self.config.guests.values():
            self._serve_control(guest, 0o660)
        loop.add_reader(self.table.fileno(), self._hung_up)
        if self.config.proxystack.enabled:
            # Root only: whoever connects here may open host sockets.  Served in
            # both placements: a worker left by an earlier operator comes back here.
            proxy = Guest(PROXY_IDENTITY, (), self.config.proxystack.control, Limits())
            self._serve_control(proxy, 0o600)
            self.supervisor = Supervisor(self.config, loop,
                                         lambda sock: self._add_conn(sock, proxy))
            self.supervisor.start()

    def _serve_control(self, guest: Guest, mode: int) -> None:
        path = guest.control
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)  # a leftover of an operator that died
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        srv.bind(path)
        os.chmod(path, mode)
        srv.listen(128)
        srv.setblocking(False)
        self.loop.add_reader(srv, self.on_connection, srv, guest)
        self.servers.append(srv)
        log.info("%s: control socket %s", guest.name, path)

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        for conn in list(self.conns):
            self.drop(conn)
        self.loop.remove_reader(self.table.fileno())
        if self._reaping is not None:
            self._reaping.cancel()
        self.table.close()  # the circuits themselves go on: we only let go
        self.usage.clear()
        if self.audit:
            self.audit.close()
        for srv in self.servers:
            self.loop.remove_reader(srv)
            path = srv.getsockname()
            srv.close()
            if path and os.path.exists(path):
                os.unlink(path)
        self.servers.clear()
        guestnet.stop(self.guestnet)

    def on_connection(self, srv: socket.socket, guest: Guest) -> None:
        try:
            sock, _ = srv.accept()
        except BlockingIOError:
            return
        except OSError as e:  # out of fds: stop accepting a moment instead of spinning
            log.error("guest %s: cannot accept a control connection: %s", guest.name, e)
            self.loop.remove_reader(srv)
            self.loop.call_later(0.1, self.loop.add_reader, srv, self.on_connection, srv, guest)
            return
        if sum(c.guest is guest for c in self.conns) >= MAX_CONNECTIONS:
            log.warning("guest %s: over %d control connections", guest.name, MAX_CONNECTIONS)
            sock.close()
            return
        self._add_conn(sock, guest)

    def _add_conn(self, sock: socket.socket, guest: Guest) -> None:
        """Serve a connected control socket as `guest` (accepted, or the
        in-process proxy stack's end of its socketpair)."""
        sock.setblocking(False)
        conn = (ProxyConn if guest.name == PROXY_IDENTITY else GuestConn)(self, guest, sock)
        self.conns.add(conn)
        self.loop.add_reader(sock, conn.on_readable)

    def drop(self, conn: GuestConn) -> None:
        """A connection is gone: its listeners go, their backlogs close."""
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        if conn is self.proxy:
            self.proxy = None
            conn.link.fail_all("the proxy stack went away")
            self.publishing = None  # what its next link serves is not known yet
        for key in conn.listeners:
            self.listeners.pop(key).drop()
        self.loop.remove_reader(conn.sock)
        conn.sock.close()

    def reload(self) -> str:
        """Read the configuration again; a bad file keeps the running policy
        (and published ports).  A good one applies to every setup from now on,
        and its publish table goes to the proxy stack (table_sent)."""
        try:
            config = load(self.config.path)
        except ConfigError as e:
            log.error("reload refused, keeping the running policy: %s", e)
            raise
        self.config, self.policy = config, Policy(config)
        self.send_table()
        revoked = 0
        if config.revoke:
            for record in list(self.live_circuits().values()):
                if record.guests[0] == PROXY_IDENTITY:
                    continue  # published ingress: allowed by [[publish]], not by rules
                remote = record.endpoints[1]
                verdict = self.policy.check(record.guests[0], remote.address, remote.port,
                                            "tcp" if remote.proto == p.TCP else "udp")
                if not verdict.allow:
                    record.revoke()
                    revoked += 1
        log.info("reloaded %s; %d circuits revoked", config.path, revoked)
        later = _at_next_start(self.start_config, config)
        for line in later:
            log.warning("%s", line)
        return "\n".join([f"reloaded {config.path}; {revoked} circuits revoked", *later])

    def send_table(self) -> None:
        """Give the proxy stack the running configuration's publish table and
        timeouts (it applies the difference); table_sent gets the report once
        it answers.  With none connected, the next one to link gets it."""
        self.table_sent = None
        if self.proxy is None:
            return
        config, report = self.config, PublishReport(self.config.publish)
        done = self.table_sent = self.loop.create_future()

        def answered(reply: p.Message) -> None:
            report.answered(reply)
            if not done.done():
                done.set_result(report)

        self.publishing = report
        self.proxy.link.publish(p.entries_of(config.publish), config.proxystack.udp_idle_timeout,
                                config.proxystack.orphan_grace, answered)

    # -- requests -----------------------------------------------------------

    def hello(self, conn: GuestConn, msg: p.Hello) -> None:
        if not msg.min_version <= p.VERSION <= msg.max_version:
            conn.reply(p.Error(errno.EPROTO, f"this operator speaks version {p.VERSION}",
                               request=msg.request))
            self.drop(conn)  # nothing more can be said on it
            return
        if isinstance(conn, ProxyConn):
            if self.proxy is not None and self.proxy is not conn:
                self.drop(self.proxy)  # a restarted proxy stack replaces the old link
            self.proxy = conn
            log.info("proxy stack: connected")
        conn.reply(p.Welcome(p.VERSION, conn.guest.name, request=msg.request))
        if conn is self.proxy:
            self.send_table()  # on every link: a fresh worker, an adopted one, the in-process one

    def _key(self, guest: str, ep: p.Endpoint) -> tuple:
        wildcard = ep.address.is_unspecified
        return (guest, None if wildcard else ep.address, ep.port, ep.proto)

    def listen(self, conn: GuestConn, msg: p.Listen) -> None:
        if isinstance(conn, ProxyConn):
            raise Refused(errno.EPROTO, "the proxy stack listens on the host, not here")
        guest, ep = conn.guest, msg.local
        if not ep.address.is_unspecified and ep.address not in guest.addresses:
            raise Refused(errno.EACCES, f"{ep.address} is not an address of guest {guest.name}")
        if not 1 <= ep.port <= 65535:
            raise Refused(errno.EINVAL, "listening needs a port")
        key = self._key(guest.name, ep)
        clash = [k for k in self.listeners if k[0] == guest.name and k[2:] == key[2:]
                 and (k[1] is None or key[1] is None or k[1] == key[1])]
        if clash:
            raise Refused(errno.EADDRINUSE, f"{ep} is in use")
        self.listeners[key] = Listener(guest.name, conn, ep, max(1, min(msg.backlog, 4096)),
                                       msg.ring_size)
        conn.listeners.add(key)
        conn.reply(p.Ok(request=msg.request))

    def unlisten(self, conn: GuestConn, msg: p.Unlisten) -> None:
        key = self._key(conn.guest.name, msg.local)
        if key not in conn.listeners:
            raise Refused(errno.ENOENT, f"not listening on {msg.local}")
        conn.listeners.discard(key)
        listener = self.listeners.pop(key)
        listener.drop()
        for request in listener.accepts:  # accepts waiting there get their answer
            conn.reply(p.Error(errno.ENOENT, f"stopped listening on {msg.local}", request=request))
        conn.reply(p.Ok(request=msg.request))

    def accept(self, conn: GuestConn, msg: p.Accept) -> None:
        key = self._key(conn.guest.name, msg.local)
        listener = self.listeners.get(key)
        if listener is None or listener.conn is not conn:
            raise Refused(errno.ENOENT, f"not listening on {msg.local}")
        if len(listener.accepts) >= MAX_ACCEPTS:
            raise Refused(errno.ENOBUFS, f"{MAX_ACCEPTS} accepts already wait on {msg.local}")
        listener.accepts.append(msg.request)
        self._deliver(listener)

    def _deliver(self, listener: Listener) -> None:
        while listener.queue and listener.accepts:
            pending = listener.queue.popleft()
            request = listener.accepts.popleft()
            listener.conn.reply(p.Circuit(*pending.fields, request=request), pending.fds)
            os.close(pending.bell)

    def close(self, conn: GuestConn, msg: p.Close) -> None:
        conn.reply(p.Ok(request=msg.request))

    def _running(self, guest: Guest) -> Guest:
        """The guest as the running file has it: its limits and stack options
        follow reloads (a connection's `guest` is what its control socket was
        served as at start, which keeps its identity and its mark)."""
        return self.config.guests.get(guest.name, guest)

    def connect(self, conn: GuestConn, msg: p.Connect) -> None:
        source, remote = self._running(conn.guest), msg.remote
        self._rate_limit(source)
        verdict = self.policy.check(source.name, remote.address, remote.port,
                                    "tcp" if remote.proto == p.TCP else "udp")
        if log.isEnabledFor(logging.INFO):  # describing costs, logged or not
            log.info("setup %s -> %s: %s", source.name, remote, verdict.describe())
        self._audit(source.name, remote, verdict)
        self._count("setups", source.name)
        if not verdict.allow:
            self._count("denials", source.name)
            raise Refused(errno.EACCES, f"{source.name} -> {remote}: {verdict.describe()}")
        if verdict.dest_guest is None:
            self._egress(conn, msg)
            return
        listener = self._listener_for(verdict.dest_guest, remote)
        if listener is None:
            raise Refused(errno.ECONNREFUSED, f"nobody listens on {remote}")
        if len(listener.queue) >= listener.backlog:
            raise Refused(errno.ECONNREFUSED, f"the backlog of {remote} is full")
        local = self._source_endpoint(conn.guest, msg.remote)
        self._make_circuit(conn, msg.request, msg.ring_size, local, msg.remote, listener,
                           (conn.guest.name, listener.guest))

    def _egress(self, conn: GuestConn, msg: p.Connect) -> None:
        """A connect to the outside: a circuit whose side 1 goes to the proxy
        stack; the guest gets side 0 once the host connection is up."""
        if self.proxy is None:
            raise Refused(errno.ENETUNREACH, f"{msg.remote.address} is outside and no proxy"
                          " stack is running")
        guest, remote = conn.guest, msg.remote
        size = self._ring_size(msg.ring_size, self._running(guest))
        self._check_limits(size, self._running(guest))
        kind = p.STREAM if remote.proto == p.TCP else p.DGRAM
        made = make(CircuitSpec("stream" if kind == p.STREAM else "dgram", 0, (size, size)))
        cid, self.next_circuit = self.next_circuit, self.next_circuit + 1
        local = self._source_endpoint(guest, remote)
        self._track(cid, (guest.name, PROXY_IDENTITY), (local, remote), made,
                    memory=2 * size + DATA_OFFSET)
        mine = p.Circuit(cid, kind, 0, size, size, local, remote, request=msg.request)

        def done(reply: p.Message) -> None:
            try:
                conn.reply(mine if isinstance(reply, p.Ok) else
                           p.Error(reply.code, reply.reason, request=msg.request),
                           made.side(0) if isinstance(reply, p.Ok) else ())
            finally:
                os.close(made.bells[0])
        try:
            self.proxy.link.egress(self._egress_message(guest, cid, kind, size, local, remote),
                                   made.side(1), done)
        except OSError as e:
            os.close(made.bells[0])
            raise Refused(errno.ENETUNREACH, f"the proxy stack cannot be asked: {e}") from None
        finally:
            os.close(made.bells[1])

    def _egress_message(self, guest: Guest, cid: int, kind: int, size: int, local: p.Endpoint,
                        remote: p.Endpoint) -> p.Egress:
        # The running file's stack options, but the start's mark (`guest` is the one
        # its control socket was served as at start): the host table counts by it.
        stack = self._running(guest).stack
        # A source address applies to the connections of its own family.
        address = stack.source if stack.source and stack.source.version == remote.address.version \
            else ipaddress.ip_address("::" if remote.address.version == 6 else "0.0.0.0")
        source = p.Endpoint(address, 0, remote.proto)
        timeout = stack.connect_timeout or self.config.proxystack.connect_timeout
        return p.Egress(cid, kind, 1, size, size, remote, local, source, guest.mark,
                        stack.sndbuf, stack.rcvbuf, stack.keepalive, int(timeout * 1000),
                        stack.congestion, guest.name)

    def ingress(self, conn: GuestConn, msg: p.Ingress) -> None:
        """The proxy stack accepted an outside connection to a published port:
        a circuit to the guest's listener, with the outside peer as connector."""
        if not isinstance(conn, ProxyConn):
            raise Refused(errno.EPERM, "only the proxy stack hands in outside connections")
        guest = self.config.guests.get(msg.guest)
        if guest is None:
            raise Refused(errno.ENOENT, f"no guest {msg.guest!r}")
        listener = self._published_listener(guest, msg.local)
        local = listener.local if listener else msg.local
        if local.address.is_unspecified:
            family = [a for a in guest.addresses if a.version == msg.remote.address.version]
            local = p.Endpoint(family[0] if family else local.address, local.port, local.proto)
        self._audit_line(PROXY_IDENTITY, local, guest.name, True, "publish", peer=str(msg.remote))
        if listener is None:
            raise Refused(errno.ECONNREFUSED, f"guest {guest.name} does not listen on {msg.local}")
        if len(listener.queue) >= listener.backlog:
            raise Refused(errno.ECONNREFUSED, f"the backlog of {listener.local} is full")
        self._make_circuit(conn, msg.request, msg.ring_size, msg.remote, local, listener,
                           (PROXY_IDENTITY, guest.name))

    def _published_listener(self, guest: Guest, ep: p.Endpoint) -> Listener | None:
        if not ep.address.is_unspecified:
            return self._listener_for(guest.name, ep)
        found = self.listeners.get((guest.name, None, ep.port, ep.proto))
        for address in guest.addresses:
            found = found or self.listeners.get((guest.name, address, ep.port, ep.proto))
        return found

    def _audit(self, source: str, remote: p.Endpoint, verdict) -> None:
        self._audit_line(source, remote, verdict.dest_guest, verdict.allow,
                         verdict.rule.index + 1 if verdict.rule else "default")

    def _audit_line(self, source: str, remote: p.Endpoint, dest_guest: str | None, allow: bool,
                    rule, **extra) -> None:
        if self.audit:
            self.audit.write(json.dumps({
                "time": round(time.time(), 6), "from": source, "to": str(remote.address),
                "to_guest": dest_guest, "port": remote.port,
                "proto": "tcp" if remote.proto == p.TCP else "udp",
                "verdict": "allow" if allow else "deny", "rule": rule, **extra}) + "\n")

    def _count(self, metric: str, guest: str, n: int = 1) -> None:
        self.counters[(metric, guest)] = self.counters.get((metric, guest), 0) + n

    def _listener_for(self, guest: str, ep: p.Endpoint) -> Listener | None:
        return (self.listeners.get((guest, ep.address, ep.port, ep.proto))
                or self.listeners.get((guest, None, ep.port, ep.proto)))

    def _rate_limit(self, guest: Guest) -> None:
        now = time.monotonic()
        window = self.setups.setdefault(guest.name, deque())
        while window and window[0] <= now - 1:
            window.popleft()
        if len(window) >= guest.limits.setups_per_second:
            raise Refused(errno.ENOBUFS, f"guest {guest.name}: over"
                          f" {guest.limits.setups_per_second} setups per second")
        window.append(now)

    def _ring_size(self, asked: int, *guests: Guest) -> int:
        size = asked or self.config.default_ring
        cap = min(g.limits.ring_size for g in guests)
        size = min(size, cap)
        if size < 4096 or size & (size - 1):
            raise Refused(errno.EINVAL, f"ring size {asked} is not a power of two from 4 KiB")
        return size

    def _source_endpoint(self, guest: Guest, remote: p.Endpoint) -> p.Endpoint:
        family = [a for a in guest.addresses if a.version == remote.address.version]
        address = family[0] if family else ipaddress.ip_address(
            "0.0.0.0" if remote.address.version == 4 else "::")
        port = self.next_port.get(guest.name, EPHEMERAL.start)
        self.next_port[guest.name] = port + 1 if port + 1 < EPHEMERAL.stop else EPHEMERAL.start
        return p.Endpoint(address, port, remote.proto)

    def _check_limits(self, size: int, *guests: Guest) -> None:
        """Open circuits (EMFILE) and circuit memory (ENOBUFS), for each guest."""
        cost = 2 * size + DATA_OFFSET
        if any(self._over(g, cost) for g in guests):
            self.reap()  # ended circuits not collected yet still count: collect them
        for g in guests:
            count, memory = self.usage.get(g.name, (0, 0))
            if count >= g.limits.circuits:
                raise Refused(errno.EMFILE, f"guest {g.name}: {g.limits.circuits} circuits open")
            if memory + cost > g.limits.memory:
                raise Refused(errno.ENOBUFS, f"guest {g.name}: circuit memory limit reached")

    def _over(self, guest: Guest, cost: int) -> bool:
        count, memory = self.usage.get(guest.name, (0, 0))
        return count >= guest.limits.circuits or memory + cost > guest.limits.memory

    def _make_circuit(self, conn: GuestConn, request: int, ring_size: int, local: p.Endpoint,
                      remote: p.Endpoint, listener: Listener, names: tuple[str, str]) -> None:
        """A circuit from conn (side 0, at `local`) to listener (side 1, `remote`)."""
        ends = (self._running(conn.guest), self._running(listener.conn.guest))
        guests = [g for g in ends if g.name != PROXY_IDENTITY]
        size = self._ring_size(ring_size or listener.ring_size, *guests)
        self._check_limits(size, *guests)
        kind = p.STREAM if remote.proto == p.TCP else p.DGRAM
        made = make(CircuitSpec("stream" if kind == p.STREAM else "dgram", 0, (size, size)))
        cid, self.next_circuit = self.next_circuit, self.next_circuit + 1
        mine = p.Circuit(cid, kind, 0, size, size, local, remote, request=request)
        self._track(cid, names, (local, remote), made, memory=2 * size + DATA_OFFSET)
        listener.queue.append(Pending((cid, kind, 1, size, size, remote, local), made.side(1),
                                      made.bells[1]))
        # The listening side first: it has more to do (wake, attach, read)
        # before the connector's first bytes get an answer.
        self._deliver(listener)
        try:
            conn.reply(mine, made.side(0))
        finally:
            os.close(made.bells[0])

    def _track(self, cid: int, guests: tuple[str, str], endpoints: tuple, made: Made,
               memory: int) -> None:
        """Keep the memory and each side's ringing end for accounting: the
        record owns them from here (the sides are handed the same numbers)."""
        record = Record(cid, guests, endpoints, made.memfd, list(made.rings), memory=memory)
        self.table.add(record)
        self._use(record, +1)

    def _use(self, record: Record, sign: int) -> None:
        """Count a circuit in (or out of) its guests' usage, once per guest."""
        for guest in set(record.guests):
            use = self.usage.setdefault(guest, [0, 0])
            use[0] += sign
            use[1] += sign * record.memory

    def live_circuits(self) -> dict[int, Record]:
        """The circuits with a side still there, by id (ended ones collected first)."""
        self.reap()
        return self.table.records

    def reap(self, most: int = 0) -> bool:
        """Collect the circuits whose two sides are gone (from at most `most`
        hung-up sides; 0: all): out of their guests' usage, their byte counts
        into the running totals, their fds closed.  True if some may remain."""
        ended, more = self.table.sweep(most)
        for record in ended:
            self._use(record, -1)
            for guest, sent in zip(record.guests, record.sent()):
                self._count("sent_bytes", guest, sent)  # totals outlive their circuits
            record.close()
        return more

    def _hung_up(self) -> None:
        """A side hung up: sweep a moment later, with whatever ends by then."""
        self.loop.remove_reader(self.table.fileno())
        self._reaping = self.loop.call_later(REAP_AFTER, self._sweep_and_watch)

    def _sweep_and_watch(self) -> None:
        """A bounded batch at a time, so a storm of endings never stalls setups."""
        self._reaping = None
        if self.reap(REAP_BATCH):
            self._reaping = self.loop.call_soon(self._sweep_and_watch)
        else:
            self.loop.add_reader(self.table.fileno(), self._hung_up)


def _open_audit(path: str):
    """The audit log, JSON lines, flushed per line; None when not configured."""
    if not path:
        return None
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return open(path, "a", buffering=1)


def _at_next_start(start: Config, new: Config) -> list[str]:
    """What a reload to `new` leaves as it was at start (docs/policy.md): one line each."""
    lines = []
    if new.host_netns != start.host_netns:
        lines.append(f"host_netns changes at the operator's next start ({start.host_netns!r}"
                     " until then)")
    for name, guest in new.guests.items():
        was = start.guests.get(name)
        if was is None:
            continue
        for key, old, now in (("netns", was.netns, guest.netns), ("mark", was.mark, guest.mark),
                              ("egress_rate", was.limits.egress_rate, guest.limits.egress_rate)):
            if old != now:
                shown = hex(old) if key == "mark" else old
                lines.append(f"the {key} of guest {name} changes at the operator's next start"
                             f" ({shown} until then)")
    return lines
