"""An echo client on circuits: sends each argument, prints what comes back.

    circuits run --guest web --config examples/policy.toml -- \
        python examples/echo_client.py 10.0.0.2 5432 hello circuits
"""
from __future__ import annotations

import sys

import circuits


def main() -> None:
    host, port, words = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    try:
        conn = circuits.connect((host, port))
    except OSError as e:
        print(f"connect to {host}:{port} failed: {e}", file=sys.stderr)
        sys.exit(1)
    with conn:
        for word in words:
            conn.sendall(word.encode())
            print(conn.recv(65536).decode())


if __name__ == "__main__":
    main()
