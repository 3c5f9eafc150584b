"""circuits: circuit-switched, zero-copy sockets for co-located guests."""

__version__ = "0.1.0"

from circuits.client import Connection, Listener, connect, listen  # noqa: E402

__all__ = ["Connection", "Listener", "connect", "listen"]
