"""The demo behind `make demo`: an operator, three guests, their policy.

Starts the operator on examples/policy.toml (its sockets and audit log in a
temporary directory), runs db's echo server and zero-copy reader as guests,
then shows an allowed and a denied connection, a transfer, the
`circuits ctl circuits` table while a circuit is open, and an unmodified
program (curl, from Debian) fetching from another (python3 -m http.server)
over a circuit, under the preload library.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from circuits.operator import child as operator_child

HERE = Path(__file__).parent
CIRCUITS = [sys.executable, "-m", "circuits"]


def config_in(tmp: Path) -> Path:
    """examples/policy.toml with its sockets and audit log under tmp."""
    text = (HERE / "policy.toml").read_text().replace(
        "[operator]\n",
        f'[operator]\ncontrol_dir = "{tmp}/guests"\nadmin_socket = "{tmp}/admin.sock"\n'
        f'audit_log = "{tmp}/audit.jsonl"\n', 1)
    path = tmp / "policy.toml"
    path.write_text(text)
    return path


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def guest(cfg: Path, name: str, *cmd: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([*CIRCUITS, "run", "--guest", name, "--config", str(cfg), "--",
                             sys.executable, *cmd], **kw)


def wait_for(proc: subprocess.Popen, text: str) -> None:
    line = proc.stdout.readline()
    if text not in line:
        raise SystemExit(f"expected {text!r}, got {line!r}")
    print(line, end="", flush=True)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="circuits-demo-") as tmp:
        cfg = config_in(Path(tmp))
        step("the operator, with examples/policy.toml (web, db, batch)")
        children = [operator_child.start(str(cfg), "-v")]
        try:
            echo = guest(cfg, "db", str(HERE / "echo_server.py"), "10.0.0.2", "5432",
                         stdout=subprocess.PIPE, text=True)
            children.append(echo)
            wait_for(echo, "echo server")
            step("allowed: web -> db:5432 (rule 1)")
            subprocess.run([*CIRCUITS, "run", "--guest", "web", "--config", str(cfg), "--",
                            sys.executable, str(HERE / "echo_client.py"), "10.0.0.2", "5432",
                            "hello", "db"], check=True)
            step("denied: batch -> db:5432 (rule 2)")
            subprocess.run([*CIRCUITS, "run", "--guest", "batch", "--config", str(cfg), "--",
                            sys.executable, str(HERE / "echo_client.py"), "10.0.0.2", "5432",
                            "hello"])
            step("a transfer: web streams 1 GiB to db's zero-copy reader")
            reader = guest(cfg, "db", str(HERE / "zero_copy_reader.py"), "10.0.0.2", "5433",
                           stdout=subprocess.PIPE, text=True)
            children.append(reader)
            wait_for(reader, "zero-copy reader")
            sender = guest(cfg, "web", "-c", SEND_GIB)
            children.append(sender)
            time.sleep(0.3)
            step("circuits ctl circuits, while the transfer runs")
            subprocess.run([*CIRCUITS, "ctl", "--config", str(cfg), "circuits"])
            sender.wait(120)
            print(reader.stdout.readline(), end="", flush=True)
            reader.wait(30)
            unmodified_programs(cfg, Path(tmp), children)
        finally:
            for child in reversed(children):
                if child.poll() is None:
                    child.terminate()
                    child.wait(10)


def unmodified_programs(cfg: Path, tmp: Path, children: list) -> None:
    step("unmodified programs: db's curl fetches 64 MiB from web's http.server (rule 3)")
    site = tmp / "site"
    site.mkdir()
    (site / "blob").write_bytes(os.urandom(64 << 20))
    server = subprocess.Popen([*CIRCUITS, "run", "--guest", "web", "--config", str(cfg), "--",
                               sys.executable, "-u", "-m", "http.server", "8000", "--bind",
                               "10.0.0.1", "--directory", str(site)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    children.append(server)
    wait_for(server, "Serving HTTP")
    out = tmp / "blob.fetched"
    subprocess.run([*CIRCUITS, "run", "--guest", "db", "--config", str(cfg), "--",
                    "curl", "-sS", "-o", str(out), "-w",
                    "curl: %{size_download} bytes at %{speed_download} bytes/s\n",
                    "http://10.0.0.1:8000/blob"], check=True)
    same = hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(
        (site / "blob").read_bytes()).digest()
    print(f"sha256 of what curl got {'matches' if same else 'DIFFERS FROM'} the file served")


SEND_GIB = """
import circuits
conn = circuits.connect(("10.0.0.2", 5433))
chunk = b"\\x42" * (1 << 20)
for _ in range(1024):
    conn.sendall(chunk)
conn.close()
"""

if __name__ == "__main__":
    main()
