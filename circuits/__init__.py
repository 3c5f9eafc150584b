"""circuits: circuit-switched, zero-copy sockets for co-located guests.

The client API (``connect``, ``listen``, ``Connection``, ``Listener``) is
loaded on first use, so that importing the operator or the ring never loads
it: layers point one way.
"""

__version__ = "0.1.0"
__all__ = ["Connection", "Listener", "connect", "listen"]


def __getattr__(name: str):
    if name in __all__:
        from circuits import client

        return getattr(client, name)
    raise AttributeError(f"module 'circuits' has no attribute {name!r}")
