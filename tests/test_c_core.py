"""The C core's own tests (tests/c), built and run under AddressSanitizer and UBSan."""
from __future__ import annotations

import subprocess
from pathlib import Path

HERE = Path(__file__).parent / "c"


def test_c_core_under_asan_and_ubsan():
    run = subprocess.run(["make", "-s", "-C", str(HERE), "check"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "all" in run.stdout and "tests passed" in run.stdout
    assert "FAIL" not in run.stdout
