"""A peer process for the tests: takes one circuit endpoint and plays a role.

Run as ``python tests/peer.py ROLE JSON`` with the endpoint's descriptors
inherited (see conftest.spawn_peer).  JSON holds the spec and role arguments.
Each role reports on stdout, one line per fact, and exits 0 when its own
checks passed.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import sys
import time

from circuits.ring import Circuit, CircuitSpec


def pattern_block(seed: int, size: int = 1 << 20) -> bytes:
    """The deterministic bytes a writer cycles through."""
    return random.Random(seed).randbytes(size)


def chunk_sizes(rng: random.Random, limit: int):
    """Chunk sizes, log-uniform from 1 byte to `limit`."""
    while True:
        yield max(1, int(2 ** rng.uniform(0, limit.bit_length() - 1)))


def say(*words) -> None:
    print(*words, flush=True)


def write_stream(ep: Circuit, a: dict) -> None:
    """Write `total` bytes of the seed's pattern in random chunks; print the sha256."""
    block = memoryview(pattern_block(a["seed"]))
    rng = random.Random(a["seed"] ^ 0x5EED)
    h, done, total = hashlib.sha256(), 0, a["total"]
    for size in chunk_sizes(rng, 1 << 18):
        if done >= total:
            break
        off = done % len(block)
        n = min(size, total - done, len(block) - off)
        chunk = block[off : off + n]
        if rng.random() < 0.3:
            view = ep.write_view(1)
            n = min(n, len(view))
            view[:n] = chunk[:n]
            ep.commit(n)
        else:
            ep.sendall(chunk)
        h.update(chunk[:n])
        done += n
    ep.close()
    say("sha256", h.hexdigest())


def write_until_killed(ep: Circuit, a: dict) -> None:
    """Write the pattern forever, printing how much has been published."""
    block = memoryview(pattern_block(a["seed"]))
    done = 0
    while True:
        off = done % len(block)
        n = min(a["chunk"], len(block) - off)
        ep.sendall(block[off : off + n])
        done += n
        say("sent", done)


def send_dgrams(ep: Circuit, a: dict) -> None:
    """Send datagrams of the given sizes, each filled from (seed, index)."""
    for i, size in enumerate(a["lengths"]):
        ep.send(random.Random(a["seed"] * 1_000_003 + i).randbytes(size))
    ep.close()
    say("sent", len(a["lengths"]))


def block_in(ep: Circuit, a: dict) -> None:
    """Block in recv or in sendall on a full ring; report how it ended."""
    say("ready")
    try:
        if a["op"] == "recv":
            data = ep.recv(1024)
            say("eof" if data == b"" else f"data {len(data)}")
        else:
            while True:
                ep.sendall(b"x" * 65536)
    except OSError as e:
        say("error", type(e).__name__)


def trickle(ep: Circuit, a: dict) -> None:
    """Send `count` small messages at random moments, then close."""
    rng = random.Random(a["seed"])
    total = 0
    for _ in range(a["count"]):
        if rng.random() < 0.3:
            time.sleep(rng.random() * 0.002)
        n = rng.randint(1, 300)
        ep.sendall(b"t" * n)
        total += n
    ep.close()
    say("sent", total)


def drain_slowly(ep: Circuit, a: dict) -> None:
    """After a pause, read everything to the end."""
    time.sleep(a["pause"])
    total = 0
    while data := ep.recv(65536):
        total += len(data)
    say("read", total)


def echo(ep: Circuit, a: dict) -> None:
    """Echo everything back until end of data."""
    while data := ep.recv(65536):
        ep.sendall(data)
    ep.close()
    say("done")


def scribble(memfd: int, a: dict) -> None:
    """Write random values over the header, control lines and data records."""
    size = os.fstat(memfd).st_size
    mem = mmap.mmap(memfd, size)
    rng = random.Random(a["seed"])
    stop = time.monotonic() + a["seconds"]
    ctrl_words = [4096 + d * 384 + off for d in (0, 1) for off in (0, 128, 256, 260)]
    while time.monotonic() < stop:
        what = rng.random()
        if what < 0.4:
            off = rng.choice(ctrl_words)
            value = rng.choice([0, 1, 2**64 - 1, rng.getrandbits(64), rng.getrandbits(12)])
            mem[off : off + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")
            if off % 8 == 0 and rng.random() < 0.5:
                mem[off : off + 8] = value.to_bytes(8, "little")
        elif what < 0.6:
            off = rng.choice([0, 4, 8, 16, 24, 32, 40, 48, 56, 128, 256])
            mem[off : off + 4] = rng.getrandbits(32).to_bytes(4, "little")
        else:
            off = rng.randrange(8192, size - 8) & ~7
            mem[off : off + 8] = rng.getrandbits(64).to_bytes(8, "little")
        if rng.random() < 0.01:
            time.sleep(0.001)
    say("scribbled")


def victim(ep: Circuit, a: dict) -> None:
    """Send and receive through a circuit under attack; check every result."""
    say("attached")
    rng = random.Random(a["seed"])
    stop = time.monotonic() + a["seconds"]
    ring_max = max(ep.spec.sizes)
    buf = bytearray(ring_max * 2)
    try:
        while time.monotonic() < stop:
            ep.settimeout(rng.choice([0, 0.01]))
            op = rng.randrange(4)
            try:
                if op == 0:
                    n = rng.randrange(0, 4096)
                    sent = ep.send(b"v" * n)
                    assert 0 <= sent <= n, sent
                elif op == 1:
                    n = rng.randrange(1, len(buf))
                    got = ep.recv_into(buf, n)
                    assert 0 <= got <= n, (got, n)
                elif op == 2:
                    view = ep.read_view()
                    if view is not None:
                        assert len(view) <= ring_max, len(view)
                        bytes(view[:64])
                        ep.consume()
                else:
                    view = ep.write_view(rng.randrange(1, 64))
                    assert len(view) <= ring_max, len(view)
                    view[:1] = b"w"
                    ep.commit(1)
            except (BlockingIOError, TimeoutError):
                pass
            except ValueError as e:  # a datagram bigger than the ring asked for
                assert "larger than the ring" in str(e), e
            except OSError as e:
                if ep.spec.kind == "dgram" and e.errno == 90:  # EMSGSIZE
                    continue
                raise
    except (ConnectionResetError, BrokenPipeError) as e:
        say("ended", type(e).__name__)
        return
    say("ended", "time")


ROLES = {f.__name__: f for f in (write_stream, write_until_killed, send_dgrams,
                                   block_in, trickle, drain_slowly, echo, victim)}


def main() -> None:
    role, args = sys.argv[1], json.loads(sys.argv[2])
    if role == "scribble":
        scribble(args["memfd"], args)
        return
    spec = CircuitSpec(args["kind"], args["side"], tuple(args["sizes"]))
    ep = Circuit(*args["fds"], spec)
    ROLES[role](ep, args)


if __name__ == "__main__":
    main()
