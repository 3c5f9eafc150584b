"""Two processes, one circuit: a writer streams, a reader reads in place.

    python examples/two_processes.py [MiB]

The parent makes a circuit, forks, and gives the child one end (the parent
detaches it: close() would end the circuit for both).  The child writes
straight into the ring through write views; the parent reads the ring in
place through read views and counts, with no copy out.
"""
from __future__ import annotations

import os
import sys
import time

from circuits.ring import pair


def writer(ep, total: int) -> None:
    source = memoryview(b"\x42" * max(ep.spec.sizes))
    sent = 0
    while sent < total:
        view = ep.write_view(1)
        n = min(len(view), total - sent)
        view[:n] = source[:n]
        ep.commit(n)
        sent += n
    ep.close()


def reader(ep) -> int:
    got = 0
    while (view := ep.read_view()) is not None:
        got += len(view)
        ep.consume()
    return got


def main() -> None:
    total = int(sys.argv[1] if len(sys.argv) > 1 else 256) << 20
    mine, theirs = pair("stream", 1 << 20)
    pid = os.fork()
    if pid == 0:
        mine.detach()
        writer(theirs, total)
        os._exit(0)
    theirs.detach()
    t0 = time.perf_counter()
    got = reader(mine)
    elapsed = time.perf_counter() - t0
    os.waitpid(pid, 0)
    print(f"{got >> 20} MiB in {elapsed * 1e3:.0f} ms: {got / elapsed / 1e9:.2f} GB/s, zero copy")


if __name__ == "__main__":
    main()
