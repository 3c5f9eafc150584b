"""The LD_PRELOAD library that puts unmodified programs on circuits.

The library itself is C (this folder's *.c, with the ring core's sources),
built by the package build; see docs/preload.md.
"""
from __future__ import annotations

from pathlib import Path

LIBRARY = "libcircuits_preload.so"


def library_path() -> str:
    """The built library's path; FileNotFoundError if the build did not make it."""
    path = Path(__file__).with_name(LIBRARY)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the package (make setup)")
    return str(path)


def preload_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with the library appended to LD_PRELOAD."""
    current = env.get("LD_PRELOAD", "")
    return {**env, "LD_PRELOAD": f"{current}:{library_path()}" if current else library_path()}
