"""Running the operator: its event loop, signals, control and admin sockets."""
from __future__ import annotations

import asyncio
import logging
import signal

from circuits.operator.admin import AdminServer
from circuits.operator.config import Config, ConfigError
from circuits.operator.daemon import Operator

log = logging.getLogger("circuits.operator")


def run(config: Config) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads the configuration."""
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        loop = asyncio.new_event_loop()
    op = Operator(config)
    try:
        op.start(loop)
    except BaseException:  # e.g. namespaces that cannot be made: undo what was
        op.stop()
        loop.close()
        raise
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    loop.add_signal_handler(signal.SIGHUP, _reload_quietly, op)
    admin = AdminServer(op)
    admin.start(loop)
    log.info("serving %d guests", len(config.guests))
    try:
        loop.run_until_complete(stop)
    finally:
        admin.stop()
        op.stop()
        loop.close()
        log.info("stopped")


def _reload_quietly(op: Operator) -> None:
    try:
        op.reload()
    except ConfigError:
        pass  # logged; the running policy stays

