"""The admin socket: status, guests, circuits, policy checks, reload, metrics.

One JSON request per line over AF_UNIX SOCK_STREAM, one JSON answer per
line (`circuits ctl` speaks it).  Only root may use it: the socket is mode
0600 and every peer's credentials (SO_PEERCRED) are checked.
"""
from __future__ import annotations

import asyncio
import inspect
import ipaddress
import json
import logging
import os
import socket
import struct
import time

from circuits.operator import guests as guestnet
from circuits.operator.config import ConfigError
from circuits.operator.daemon import Operator
from circuits.operator.hosts import hosts_file
from circuits.operator.published import PublishReport

log = logging.getLogger("circuits.operator")
MAX_CLIENTS = 16  # admin connections served at once
MAX_REQUEST = 64 * 1024
CLIENT_TIMEOUT = 2.0  # seconds for a client to ask, and to take its answer


class AdminServer:
    def __init__(self, op: Operator):
        self.op = op
        self.path = op.config.admin_socket
        self.tasks: set[asyncio.Task] = set()

    def start(self, loop) -> None:
        self.loop = loop
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self.sock.listen(16)
        self.sock.setblocking(False)
        loop.add_reader(self.sock, self._accept)

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.loop.remove_reader(self.sock)
        self.sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        if len(self.tasks) >= MAX_CLIENTS:  # a flood of idle clients cannot pile up
            conn.close()
            return
        conn.setblocking(False)
        task = self.loop.create_task(self._serve(conn))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        """One request, one answer; a slow or silent client never stalls the loop."""
        with conn:
            try:
                uid = struct.unpack("3i", conn.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
                if uid != 0:
                    raise PermissionError("the admin socket is for root only")
                line = await asyncio.wait_for(self._read_line(conn), CLIENT_TIMEOUT)
                result = self.handle(json.loads(line))
                if inspect.isawaitable(result):  # an answer that waits for the proxy stack
                    result = await result
                answer = {"ok": True, "result": result}
            except Exception as e:  # an answer for every request, whatever went wrong
                answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            try:
                await asyncio.wait_for(self.loop.sock_sendall(
                    conn, json.dumps(answer).encode() + b"\n"), CLIENT_TIMEOUT)
            except (OSError, asyncio.TimeoutError):
                pass

    async def _read_line(self, conn: socket.socket) -> bytes:
        data = b""
        while b"\n" not in data:
            chunk = await self.loop.sock_recv(conn, 4096)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REQUEST:
                raise ValueError(f"request longer than {MAX_REQUEST} bytes")
        return data.split(b"\n", 1)[0]

    def handle(self, req: dict):
        cmd = req.get("cmd")
        op = self.op
        if cmd == "status":
            return {"config": op.config.path, "uptime_s": round(time.time() - op.started, 1),
                    "guests": len(op.config.guests), "connections": len(op.conns),
                    "listeners": len(op.listeners), "circuits": len(op.live_circuits()),
                    "proxystack": self._proxystack(), "publish": self._publish(op.publishing),
                    "errors": guestnet.problems(op.guestnet) + self._publish_errors(op.publishing)}
        if cmd == "hosts":
            return hosts_file(op.config)
        if cmd == "guests":
            return [self._guest(g) for g in op.config.guests.values()]
        if cmd == "circuits":
            return [r.describe() for r in op.live_circuits().values()]
        if cmd == "check":
            v = op.policy.check(req["from"], ipaddress.ip_address(req["to"]), int(req["port"]),
                                req.get("proto", "tcp"))
            return {"allow": v.allow, "verdict": v.describe(), "to_guest": v.dest_guest}
        if cmd == "reload":
            try:
                text = op.reload()
            except ConfigError as e:
                raise ValueError(f"reload refused, the running policy stays: {e}") from None
            return self._reloaded(text, op.table_sent)
        if cmd == "stop-proxystack":
            if op.supervisor is None:
                raise ValueError("this operator runs no proxy stack")
            return op.supervisor.shut_down()
        if cmd == "metrics":
            return self.metrics()
        raise ValueError(f"unknown command {cmd!r}")

    async def _reloaded(self, text: str, sent: asyncio.Future | None) -> dict:
        """The reload's answer, once the proxy stack has answered this reload's
        publish table (`sent`; at most PUBLISH_TIMEOUT seconds: ProxyLink.publish).
        It tells of that table, whatever a later reload sent meanwhile."""
        if self.op.supervisor is None:
            return {"reloaded": text}
        report = None if sent is None else await asyncio.shield(sent)  # a client gone: no matter
        return {"reloaded": text, "publish": self._publish(report),
                "errors": self._publish_errors(report)}

    def _publish(self, report: PublishReport | None) -> str:
        if self.op.supervisor is None:
            return "off"
        if report is None:
            return "no proxy stack connected: the next one to link gets the table"
        return report.summary()

    @staticmethod
    def _publish_errors(report: PublishReport | None) -> list[str]:
        return report.errors() if report is not None else []

    def _proxystack(self) -> str:
        op = self.op
        if op.supervisor is None:
            return "off"
        pid = op.supervisor.pid
        state = "connected" if op.proxy is not None else "not connected"
        if op.supervisor.inprocess is not None:
            state += ", in the operator"
        return f"{state}, pid {pid}" if pid else f"{state}, not running"

    def _guest(self, g) -> dict:
        op = self.op
        return {"name": g.name, "addresses": [str(a) for a in g.addresses], "control": g.control,
                "connections": sum(c.guest.name == g.name for c in op.conns),
                "listeners": sum(k[0] == g.name for k in op.listeners),
                "circuits": sum(g.name in r.guests for r in op.live_circuits().values())}

    def metrics(self) -> str:
        """Prometheus text format."""
        op = self.op
        out = []

        def family(name: str, kind: str, help_: str, rows: list[tuple[dict, float]]) -> None:
            out.append(f"# HELP circuits_{name} {help_}")
            out.append(f"# TYPE circuits_{name} {kind}")
            for labels, value in rows:
                lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
                out.append(f"circuits_{name}{{{lab}}} {value}")

        guests = list(op.config.guests)
        family("setups_total", "counter", "Connection setups asked for, by source guest.",
               [({"guest": g}, op.counters.get(("setups", g), 0)) for g in guests])
        family("denials_total", "counter", "Setups the policy refused, by source guest.",
               [({"guest": g}, op.counters.get(("denials", g), 0)) for g in guests])
        open_by = {g: 0 for g in guests}
        sent_by = {g: 0 for g in guests}
        for r in op.live_circuits().values():
            snap = r.inspector.snapshot()
            for side in (0, 1):
                if r.guests[side] in open_by:
                    open_by[r.guests[side]] += 1
                    sent_by[r.guests[side]] += snap.sent[side]
        family("open_circuits", "gauge", "Circuits open, by guest (either side).",
               [({"guest": g}, n) for g, n in open_by.items()])
        family("sent_bytes", "gauge", "Bytes sent through open circuits, by sending guest.",
               [({"guest": g}, n) for g, n in sent_by.items()])
        family("bytes_sent_total", "counter",
               "Bytes sent through circuits, open and ended, by sending guest.",
               [({"guest": g}, n + op.counters.get(("sent_bytes", g), 0))
                for g, n in sent_by.items()])
        for name, kind, help_, rows in guestnet.metric_families(op.guestnet):
            family(name, kind, help_, rows)
        return "\n".join(out) + "\n"


def request(path: str, cmd: str, **args) -> dict:
    """Ask the operator one admin question (what `circuits ctl` does)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        return json.loads(s.makefile("r").readline())
