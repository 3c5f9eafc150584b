"""An operator as a child process: for benchmarks, tests and demos."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from circuits.operator.config import load


def start(config_path: str, *args: str, timeout: float = 20, **popen) -> subprocess.Popen:
    """Start `circuits operator --config config_path` and return once every
    guest's control socket answers; RuntimeError if it exits or takes too long."""
    sockets = [g.control for g in load(config_path).guests.values()]
    proc = subprocess.Popen([sys.executable, "-m", "circuits", "operator", "--config",
                             str(config_path), *args], **popen)
    deadline = time.monotonic() + timeout
    while not all(_answers(s) for s in sockets):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"the operator did not start (exit {proc.returncode})")
        time.sleep(0.05)
    return proc


def _answers(path: str) -> bool:
    """Whether an operator accepts on path (a file left by a killed one does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it does not end in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
