"""circuits: circuit-switched, zero-copy sockets for co-located guests."""

__version__ = "0.1.0"
