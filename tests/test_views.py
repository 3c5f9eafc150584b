"""Zero-copy views: read and write in place, and no use after consume/commit/close."""
from __future__ import annotations

import pytest

from circuits.ring import ViewError, pair


def test_read_view_is_everything_readable_in_place():
    a, b = pair("stream", 4096)
    a.sendall(b"hello world")
    view = b.read_view()
    assert bytes(view) == b"hello world"
    b.consume(6)
    assert bytes(b.read_view()) == b"world"
    b.consume()
    a.close()
    assert b.read_view() is None  # end of data


def test_views_are_contiguous_across_the_wrap():
    a, b = pair("stream", 4096)
    a.sendall(b"x" * 3000)
    assert len(b.recv(3000)) == 3000
    view = a.write_view(4096)  # starts 3000 bytes in: crosses the end of the ring
    assert len(view) == 4096
    view[:] = bytes(range(256)) * 16
    a.commit(4096)
    assert bytes(b.read_view()) == bytes(range(256)) * 16
    b.consume()


def test_use_after_consume_or_commit_raises():
    a, b = pair()
    w = a.write_view(10)
    w[:2] = b"ok"
    a.commit(2)
    with pytest.raises(ValueError, match="released"):
        w[0] = 1
    r = b.read_view()
    b.consume(1)
    with pytest.raises(ValueError, match="released"):
        bytes(r)


def test_use_after_close_raises():
    a, b = pair()
    a.sendall(b"data")
    r = b.read_view()
    b.close()
    with pytest.raises(ValueError, match="released"):
        r[0]


def test_a_copying_call_cancels_an_open_view():
    a, b = pair()
    w = a.write_view(10)
    a.sendall(b"copied")
    with pytest.raises(ValueError, match="released"):
        w[0] = 1
    with pytest.raises(ViewError):
        a.commit(1)
    assert b.recv(10) == b"copied"


def test_exported_view_refuses_consume():
    """A view lent out (here to cffi) cannot be invalidated, so consume refuses."""
    from cffi import FFI

    ffi = FFI()
    a, b = pair()
    a.sendall(b"abc")
    r = b.read_view()
    held = ffi.from_buffer(r)
    with pytest.raises(ViewError, match="still exported"):
        b.consume()
    ffi.release(held)
    assert bytes(b.read_view()) == b"abc"  # nothing was consumed
    b.consume()


def test_bad_counts_are_value_errors():
    a, b = pair("stream", 4096)
    w = a.write_view(1)
    with pytest.raises(ValueError):
        a.commit(len(w) + 1)
    with pytest.raises(ValueError):
        a.write_view(8192)
    with pytest.raises(ViewError):
        b.consume(1)


def test_datagram_views():
    a, b = pair("dgram", 4096)
    w = a.write_view(100)
    assert len(w) >= 100
    w[:5] = b"hello"
    a.commit(5)
    a.send(b"")
    r = b.read_view()
    assert bytes(r) == b"hello"
    with pytest.raises(ValueError):
        b.consume(3)  # a datagram is consumed whole
    b.consume()
    assert bytes(b.read_view()) == b""  # an empty datagram, not the end
    b.consume()
