"""The proxy stack as a worker process: `python -m circuits.proxystack --config FILE`.

The operator starts it; it does not die with the operator.  When its link
to the operator closes (the operator stopped, crashed, or was killed), it
goes on carrying its established connections and keeps its published
listening sockets (new outside connections there are reset at once, no
INGRESS can be asked), and reaches for the control socket again every
quarter second until a restarted operator welcomes it.  Each operator gives
it the publish table and timeouts to serve (PUBLISH) when it links and when
it reloads; the worker applies the difference (ports.py).  It gives up only
once it has carried no connection and had no operator for `[proxystack]
orphan_grace` seconds.  SIGTERM or SIGINT stops it for good: every connection is reset.

One worker per control socket: it holds an exclusive lock on its pidfile
for life (docs/proxystack.md, "Running it"); a second one exits at once,
and a restarted operator adopts the one holding the lock.
"""
from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import signal
import sys
import time

from circuits.operator.config import Config, ConfigError, load
from circuits.proxystack.link import OperatorGone, RETRY_MAX, reach
from circuits.proxystack.service import ProxyStack

log = logging.getLogger("circuits.proxystack")
ALREADY_RUNNING = 3  # exit status when another worker holds the pidfile
HELLO_TIMEOUT = 5.0  # seconds an operator may take to welcome us before we try again


def lock_pidfile(path: str) -> int | None:
    """Hold `path` locked and write our pid in it; None if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd  # kept open: the lock lives as long as we do


def enter_namespace(config: Config) -> None:
    """The worker's whole thread moves to [operator] host_netns, when one is set."""
    if config.host_netns:
        from circuits.guestnet.within import netns_path, setns

        setns(netns_path(config.host_netns))


def patience(stack: ProxyStack):
    """give_up() for `reach`: true after the stack's orphan_grace (the last
    operator's) with no connection."""
    alone_since: float | None = None

    def give_up() -> bool:
        nonlocal alone_since
        if stack.connections:
            alone_since = None
            return False
        now = time.monotonic()
        alone_since = alone_since or now
        return now - alone_since >= stack.orphan_grace

    return give_up


async def serve(stack: ProxyStack, path: str) -> None:
    """Serve one operator after another until there is none to serve."""
    give_up = patience(stack)
    while True:
        sock = await reach(path, give_up)
        if sock is None:
            log.warning("no operator and no connection for %.0f s: exiting", stack.orphan_grace)
            return
        try:
            link = await asyncio.wait_for(stack.attach(sock), HELLO_TIMEOUT)
        except (OperatorGone, OSError, asyncio.TimeoutError) as e:
            # e.g. a dying operator's socket, another protocol version, a stopped process
            log.warning("the operator did not welcome us: %s", str(e) or "no answer to HELLO")
            stack.link.close()
            await asyncio.sleep(RETRY_MAX)
            continue
        log.info("linked to the operator (%d connections carried)", stack.connections)
        await link.gone
        stack.operator_gone()
        log.warning("the operator is gone; carrying %d connections meanwhile",
                    stack.connections)


def run(config: Config) -> None:
    """Serve until told to stop, or until nobody needs us (orphan_grace)."""
    if lock_pidfile(config.proxystack.pidfile) is None:
        log.error("another proxy stack holds %s: exiting", config.proxystack.pidfile)
        sys.exit(ALREADY_RUNNING)
    enter_namespace(config)
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        loop = asyncio.new_event_loop()
    stack = ProxyStack(config, loop)
    serving = loop.create_task(serve(stack, config.proxystack.control))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, serving.cancel)
    try:
        loop.run_until_complete(serving)
    except asyncio.CancelledError:
        pass
    finally:
        stack.stop()
        loop.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="circuits.proxystack")
    parser.add_argument("--config", required=True)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"%(asctime)s proxystack[{os.getpid()}] %(levelname)s %(message)s")
    try:
        config = load(args.config)
    except ConfigError as e:
        sys.exit(f"proxystack: {e}")
    run(config)
