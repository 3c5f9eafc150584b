"""A zero-copy reader: hashes what arrives in place, never copying it out.

    circuits run --guest db --config examples/policy.toml -- \
        python examples/zero_copy_reader.py 10.0.0.2 5433

Accepts one circuit, reads it through read views to the end, and prints the
byte count, the sha256 and the rate.
"""
from __future__ import annotations

import hashlib
import sys
import time

import circuits


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    with circuits.listen((host, port)) as listener:
        print(f"zero-copy reader on {host}:{port}", flush=True)
        conn, peer = listener.accept()
        digest, total, t0 = hashlib.sha256(), 0, time.perf_counter()
        with conn:
            while (view := conn.read_view()) is not None:
                digest.update(view)  # hashed where it lies, in the ring
                total += len(view)
                conn.consume()
        rate = total / (time.perf_counter() - t0) / 1e9
        print(f"{total} bytes from {peer[0]}:{peer[1]}, sha256 {digest.hexdigest()[:16]}...,"
              f" {rate:.2f} GB/s", flush=True)


if __name__ == "__main__":
    main()
