"""An echo server on circuits: run it as a guest.

    circuits run --guest db --config examples/policy.toml -- \
        python examples/echo_server.py 10.0.0.2 5432
"""
from __future__ import annotations

import sys
import threading

import circuits


def echo(conn) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    with circuits.listen((host, port)) as listener:
        print(f"echo server on {host}:{port}", flush=True)
        while True:
            conn, peer = listener.accept()
            threading.Thread(target=echo, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
