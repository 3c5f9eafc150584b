"""The control protocol codec: round trips, and nothing but ProtocolError for bad input."""
from __future__ import annotations

import errno
import ipaddress
import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from circuits.protocol import (
    DGRAM, MAX_MESSAGE, STREAM, TCP, UDP, Accept, Circuit, Close, Connect, Egress, Endpoint, Error,
    Hello, Ingress, Listen, Ok, ProtocolError, StreamDecoder, Unlisten, Welcome, decode, encode, receive, send)

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
text = st.text(max_size=200)
addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6).filter(
    lambda a: a.ipv4_mapped is None))
endpoints = st.builds(Endpoint, addresses, u16, st.sampled_from([TCP, UDP]))
requests = u32.map(lambda r: {"request": r})

messages = st.one_of(
    st.builds(lambda lo, hi, k: Hello(min(lo, hi), max(lo, hi), **k), u16, u16, requests),
    st.builds(lambda v, g, k: Welcome(v, g, **k), u16, text, requests),
    st.builds(lambda e, b, r, k: Listen(e, b, r, **k), endpoints, u32, u32, requests),
    st.builds(lambda e, k: Unlisten(e, **k), endpoints, requests),
    st.builds(lambda e, k: Accept(e, **k), endpoints, requests),
    st.builds(lambda e, r, k: Connect(e, r, **k), endpoints, u32, requests),
    st.builds(lambda c, k: Close(c, **k), u64, requests),
    st.builds(lambda k: Ok(**k), requests),
    st.builds(lambda c, t, k: Error(c, t, **k), st.integers(1, 4095), text, requests),
)
circuits = st.builds(
    lambda i, kind, side, s0, s1, a, b, k: Circuit(i, kind, side, s0, s1, a, b, **k),
    u64, st.sampled_from([STREAM, DGRAM]), st.sampled_from([0, 1]), u64, u64,
    endpoints, endpoints, requests)


congestions = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=15)
egresses = st.builds(
    lambda i, kind, s0, s1, a, b, c, m, sb, rb, ka, to, cc, g, k: Egress(
        i, kind, 1, s0, s1, Endpoint(a.address, a.port, TCP if kind == STREAM else UDP), b, c,
        m, sb, rb, ka, to, cc, g, **k),
    u64, st.sampled_from([STREAM, DGRAM]), u64, u64, endpoints, endpoints, endpoints, u32, u32,
    u32, u32, u32, congestions, text, requests)
ingresses = st.builds(
    lambda a, b, r, g, k: Ingress(a, Endpoint(b.address, b.port, a.proto), r, g, **k),
    endpoints, endpoints, u32, text, requests)


@given(egresses)
def test_egress_round_trips_with_its_descriptors(msg):
    assert decode(encode(msg, 4), 4) == msg


@given(ingresses)
def test_ingress_round_trips(msg):
    assert decode(encode(msg)) == msg


def _egress(**kw) -> Egress:
    ep = Endpoint.parse("198.18.0.2", 80)
    return Egress(**{"circuit_id": 1, "kind": STREAM, "side": 1, "size0": 4096, "size1": 4096,
                     "remote": ep, "local": ep, "source": Endpoint.parse("::", 0), **kw})


@pytest.mark.parametrize("patch,why", [
    (lambda b: b[:16 + 108] + b"x" * 16 + b[16 + 124:], "congestion"),  # no NUL at its end
    (lambda b: b[:16 + 108] + b"b\0r" + b"\0" * 13 + b[16 + 124:], "congestion"),  # NUL inside
    (lambda b: b[:16 + 10] + b"\0\0" + b[16 + 12:], "side"),  # side 0 is the guest's
    (lambda b: b[:16 + 8] + b"\2\0" + b[16 + 10:], "stream"),  # a datagram circuit to TCP
])
def test_bad_egress_is_refused(patch, why):
    good = encode(_egress(congestion="bbr", guest="web"), 4)
    assert decode(good, 4).congestion == "bbr"
    with pytest.raises(ProtocolError, match=why):
        decode(patch(good), 4)
    with pytest.raises(ProtocolError):  # and never without its 4 descriptors
        decode(good, 0)


def test_ingress_needs_one_protocol():
    a, b = Endpoint.parse("198.18.0.2", 5000), Endpoint.parse("::", 80, UDP)
    with pytest.raises(ProtocolError):
        encode(Ingress(a, b, 0, "web"))


@given(messages)
def test_every_message_round_trips(msg):
    assert decode(encode(msg)) == msg


@given(circuits)
def test_circuit_round_trips_with_its_descriptors(msg):
    assert decode(encode(msg, 4), 4) == msg


@given(st.builds(lambda c, t, o, n: Circuit(c, STREAM, 0, 4096, 4096,
                                               Endpoint.parse("10.0.0.1", 1),
                                               Endpoint.parse("10.0.0.2", 2), t, o, n),
                 u64, st.integers(1, 2**32 - 1), u64, u64))
def test_vm_circuit_names_memory_instead_of_fds(msg):
    assert decode(encode(msg)) == msg


@settings(max_examples=2000)
@given(st.binary(max_size=300), st.integers(0, 5))
def test_random_bytes_are_refused_cleanly(data, nfds):
    try:
        decode(data, nfds)
    except ProtocolError as e:
        assert e.errno == errno.EPROTO


@settings(max_examples=1000)
@given(messages, st.data())
def test_mutated_messages_decode_or_are_refused(msg, data):
    raw = bytearray(encode(msg))
    cut = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if cut == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    elif cut == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=20))
    try:
        decode(bytes(raw))
    except ProtocolError:
        pass


@pytest.mark.parametrize("raw,why", [
    (b"", "truncated"),
    (encode(Ok())[:10], "truncated"),
    (b"\x02\x00" + encode(Ok())[2:], "version 2"),
    (encode(Ok()) + b"\0", "length field"),
    (b"\x01\x00\x63\x00" + encode(Ok())[4:], "unknown message type 99"),
])
def test_specific_refusals_say_why(raw, why):
    with pytest.raises(ProtocolError, match=why):
        decode(raw)


def test_oversized_and_unknown_fields_are_refused():
    with pytest.raises(ValueError):
        encode(Error(5, "x" * MAX_MESSAGE))
    raw = bytearray(encode(Listen(Endpoint.parse("10.0.0.1", 80))))
    raw[16 + 18] = 99  # the endpoint's protocol: neither tcp nor udp
    with pytest.raises(ProtocolError, match="proto 99"):
        decode(bytes(raw))


def test_descriptors_only_where_they_belong():
    with pytest.raises(ProtocolError, match="descriptors"):
        decode(encode(Ok()), 1)
    with pytest.raises(ProtocolError, match="trunk 0 needs"):
        decode(encode(Circuit(1, STREAM, 0, 4096, 4096, Endpoint.parse("::1", 1),
                              Endpoint.parse("::1", 2))))


def test_ipv4_travels_mapped_and_comes_back_as_ipv4():
    e = Endpoint.parse("192.0.2.7", 443)
    assert decode(encode(Connect(e))).remote.address == ipaddress.IPv4Address("192.0.2.7")
    assert str(Endpoint.parse("fd00::1", 53, UDP)) == "udp://[fd00::1]:53"


# -- the wire: SOCK_SEQPACKET and SCM_RIGHTS ---------------------------------

def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def seqpacket():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


def test_circuit_with_its_four_descriptors(seqpacket):
    a, b = seqpacket
    msg = Circuit(3, DGRAM, 1, 8192, 4096, Endpoint.parse("10.0.0.1", 9),
                  Endpoint.parse("10.0.0.2", 10), request=42)
    r, w = os.pipe()
    os.set_inheritable(r, True)
    os.set_inheritable(w, True)
    send(a, msg, [r, w, r, w])
    got, fds = receive(b)
    assert got == msg and len(fds) == 4
    os.write(fds[1], b"!")
    assert os.read(fds[0], 1) == b"!"
    # Received descriptors never leak into programs the guest executes.
    assert all(not os.get_inheritable(fd) for fd in fds)
    for fd in fds + [r, w]:
        os.close(fd)


@pytest.mark.parametrize("nfds", [1, 5, 8])
def test_stray_descriptors_are_refused_and_closed(seqpacket, nfds):
    a, b = seqpacket
    r, w = os.pipe()
    before = open_fds()
    socket.send_fds(a, [encode(Ok())[:12] + bytes([nfds % 256]) + encode(Ok())[13:]], [r] * nfds)
    with pytest.raises(ProtocolError):
        receive(b)
    assert open_fds() == before  # nothing leaked into this process
    os.close(r)
    os.close(w)


def test_oversized_packet_is_refused(seqpacket):
    a, b = seqpacket
    a.send(b"\x01" * (MAX_MESSAGE + 100))
    with pytest.raises(ProtocolError, match="longer than"):
        receive(b)
    send(a, Ok(request=1))
    assert receive(b)[0] == Ok(request=1)  # the socket goes on after a bad message


def test_closed_peer_is_eof(seqpacket):
    a, b = seqpacket
    a.close()
    with pytest.raises(EOFError):
        receive(b)


# -- the wire: byte streams for VM guests ------------------------------------

@given(st.lists(messages, max_size=20), st.integers(1, 64))
def test_stream_decoder_reassembles_any_split(msgs, step):
    raw = b"".join(encode(m) for m in msgs)
    dec = StreamDecoder()
    got = []
    for i in range(0, len(raw), step):
        got += dec.feed(raw[i:i + step])
    assert got == msgs


def test_stream_decoder_refuses_an_impossible_length():
    with pytest.raises(ProtocolError, match="frame"):
        StreamDecoder().feed(b"\x01\x00\x08\x00" + (10**6).to_bytes(4, "little") + b"\0" * 8)


def test_stream_decoder_goes_on_after_a_bad_frame():
    bad = bytearray(encode(Ok(request=2)))
    bad[13] = 1  # header flags
    out = StreamDecoder().feed(encode(Ok(request=1)) + bytes(bad) + encode(Ok(request=3)))
    assert out[0] == Ok(request=1) and out[2] == Ok(request=3)
    assert isinstance(out[1], ProtocolError) and out[1].request == 2


def test_refusal_names_the_offending_request():
    raw = bytearray(encode(Listen(Endpoint.parse("10.0.0.1", 80), request=77)))
    raw[16 + 18] = 3
    with pytest.raises(ProtocolError) as e:
        decode(bytes(raw))
    assert e.value.request == 77
