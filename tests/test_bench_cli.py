"""The benchmark command's outputs (figures are checked by people, not here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_bench_ring_json_and_plot(tmp_path):
    chart = tmp_path / "ring.png"
    run = subprocess.run(
        [sys.executable, "-m", "circuits.bench", "ring", "--quick", "--rounds", "1",
         "--size", "65536", "--json", "--plot", str(chart)],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    seen = {(f["transport"], f["test"]) for f in out["figures"]}
    for t in ("circuit", "circuit-zerocopy", "unix", "tcp"):
        assert (t, "stream") in seen
    for t in ("circuit", "unix", "tcp"):
        assert (t, "rtt") in seen
    assert all(f["median"] > 0 for f in out["figures"])
    assert any("circuit / tcp" in name for name in out["ratios"])
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_example_two_processes_runs():
    run = subprocess.run([sys.executable, "examples/two_processes.py", "16"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("16 MiB in ")


def test_bench_setup_json():
    run = subprocess.run([sys.executable, "-m", "circuits.bench", "setup", "--rounds", "1",
                          "--count", "50", "--clients", "2", "--json"],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    seen = {(f["transport"], f["clients"]) for f in out["figures"]}
    assert seen == {(t, k) for t in ("circuit", "preload", "tcp") for k in (1, 2)}
    for f in out["figures"]:
        assert f["per_second"] > 0 and f["p99_us"] >= f["p50_us"]
        assert f["cpu_us"]["client"] > 0 and f["cpu_us"]["server"] > 0
        # the operator works for every circuit setup, and for no TCP one
        assert (f["cpu_us"]["operator"] > 0) == (f["transport"] != "tcp")
    assert len(out["ratios"]) == 2


def test_operator_demo_runs():
    run = subprocess.run([sys.executable, "examples/demo.py"], capture_output=True, text=True,
                         timeout=180, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "hello" in run.stdout and "Permission denied" in run.stderr
    assert "1073741824 bytes from 10.0.0.1" in run.stdout
    assert "open, open" in run.stdout  # the ctl circuits table, mid-transfer


def test_bench_egress_json():
    run = subprocess.run([sys.executable, "-m", "circuits.bench", "egress", "--rounds", "1",
                          "--mib", "16", "--connects", "20", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    seen = {(f["transport"], f["direction"]) for f in out["figures"]}
    transports = ("tcp", "worker", "operator")
    assert seen == {(t, d) for t in transports for d in ("upload", "download")}
    assert all(f["gbytes_per_s"] > 0 for f in out["figures"])
    assert len(out["ratios"]) == 4 and set(out["cpu_s_per_gb"]) == {"worker", "operator"}
    assert [f["transport"] for f in out["latency"]] == \
        [*transports, "worker, while downloading", "operator, while downloading"]
    assert all(0 < f["p50_us"] <= f["p99_us"] for f in out["latency"])
