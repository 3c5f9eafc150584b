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
    DGRAM, MAX_MESSAGE, MAX_PUBLISH, STREAM, TCP, UDP, Accept, Circuit, Close, Connect, Egress,
    Endpoint, Error, Hello, Ingress, Joiner, Listen, Ok, ProtocolError, Publish, Published,
    PublishEntry, StreamDecoder, Unlisten, Welcome, decode, encode, parts, receive, send)

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


guest_names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                      max_size=32)
publish_entries = st.builds(
    PublishEntry, st.builds(Endpoint, addresses, st.integers(1, 2**16 - 1),
                            st.sampled_from([TCP, UDP])),
    st.integers(1, 2**16 - 1), guest_names)
timeouts_ms = st.integers(1, 3_600_000)
publishes = st.builds(
    lambda es, first, more, idle, grace, k: Publish(first, first + len(es) + more, idle, grace,
                                                    tuple(es), **k),
    st.lists(publish_entries, min_size=1, max_size=72), st.integers(0, MAX_PUBLISH - 82),
    st.integers(0, 10), timeouts_ms, timeouts_ms, requests)
publisheds = st.builds(
    lambda fs, k: Published(tuple(fs), **k),
    st.lists(st.tuples(st.integers(0, MAX_PUBLISH - 1), st.integers(1, 4095)),
             max_size=MAX_PUBLISH), requests)


@given(publishes)
def test_publish_round_trips(msg):
    assert decode(encode(msg)) == msg


@given(publisheds)
def test_published_round_trips(msg):
    assert decode(encode(msg)) == msg


@settings(max_examples=50)
@given(st.lists(publish_entries, max_size=MAX_PUBLISH), timeouts_ms, timeouts_ms)
def test_a_publish_table_of_any_size_goes_in_parts_and_comes_back_whole(entries, idle, grace):
    joiner, whole = Joiner(), None
    sent = parts(entries, idle, grace)
    for i, part in enumerate(sent):
        raw = encode(part, request=i + 1)
        assert len(raw) <= MAX_MESSAGE
        assert whole is None  # nothing is applied before the last part
        whole = joiner.add(decode(raw))
    assert whole == Publish(0, len(entries), idle, grace, tuple(entries), request=len(sent))


def test_a_table_too_long_for_one_answer_is_refused():
    entry = PublishEntry(Endpoint.parse("198.18.0.1", 80), 80, "web")
    with pytest.raises(ValueError, match="at most 1000"):
        parts([entry] * (MAX_PUBLISH + 1), 1000, 1000)
    with pytest.raises(ProtocolError, match="at most 1000"):
        encode(Publish(0, MAX_PUBLISH + 1, 1000, 1000, (entry,)))


def test_parts_out_of_order_are_refused_and_the_next_table_starts_afresh():
    entries = [PublishEntry(Endpoint.parse("198.18.0.1", 1000 + i), 80, "web") for i in range(150)]
    first, second, third = parts(entries, 1000, 2000)
    joiner = Joiner()
    assert joiner.add(first) is None
    with pytest.raises(ProtocolError, match="follow no part"):
        joiner.add(third)  # the second went missing: that table is dropped
    with pytest.raises(ProtocolError, match="follow no part"):
        joiner.add(second)
    other = parts(entries, 3000, 2000)
    assert joiner.add(other[0]) is None
    with pytest.raises(ProtocolError, match="follow no part"):  # another table's settings
        joiner.add(second)
    for part in parts(entries[:10], 1000, 2000):
        whole = joiner.add(part)
    assert whole.entries == tuple(entries[:10])


def _publish_raw(**kw) -> bytes:
    entry = PublishEntry(Endpoint.parse("198.18.0.1", 8080), 80, "web")
    return encode(Publish(**{"first": 0, "total": 1, "udp_idle_timeout_ms": 1000,
                             "orphan_grace_ms": 1000, "entries": (entry,), **kw}))


@pytest.mark.parametrize("patch,why", [
    (lambda b: b[:16 + 2] + b"\2\0" + b[16 + 4:], "count 2"),  # count says 2, one entry
    (lambda b: b[:16 + 12] + b"\0\0\0\0" + b[16 + 16:], "timeout of 0 ms"),
    (lambda b: b[:16 + 16 + 24] + b"w\0b" + b"\0" * 29, "NUL-padded"),  # NUL inside the name
    (lambda b: b[:16 + 16 + 24] + b"\0" * 32, "NUL-padded"),  # no name at all
    (lambda b: b[:16 + 16 + 16] + b"\0\0" + b[16 + 16 + 18:], "entry"),  # host port 0
    (lambda b: b[:16 + 16 + 22] + b"\1\0" + b[16 + 16 + 24:], "reserved"),
    (lambda b: b[:4] + (len(b) + 10).to_bytes(4, "little") + b[8:] + b"\0" * 10,
     "records of 56"),
])
def test_bad_publish_is_refused(patch, why):
    good = _publish_raw()
    assert decode(good).entries[0].guest == "web"
    with pytest.raises(ProtocolError, match=why):
        decode(patch(good))


def test_an_older_peer_refuses_publish_with_eproto():
    """A peer that does not know a type refuses it: EPROTO, with its request and type."""
    raw = bytearray(_publish_raw(request=9))
    raw[2] = 99  # a type this side does not know, as PUBLISH is to an older proxy stack
    with pytest.raises(ProtocolError, match="unknown message type 99") as e:
        decode(bytes(raw))
    assert (e.value.errno, e.value.request, e.value.type) == (errno.EPROTO, 9, 99)


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
@given(st.one_of(messages, publishes, publisheds), st.data())
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
