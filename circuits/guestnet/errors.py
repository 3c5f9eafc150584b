"""The one exception of the guestnet layer, and the root check."""
from __future__ import annotations

import os


class GuestNetError(RuntimeError):
    """Something about guests' namespaces or rulesets that cannot be done;
    the message says what and, where it can, what to do."""


def require_root(what: str) -> None:
    """Namespaces and nftables need root: say so instead of failing deep inside."""
    if os.geteuid() != 0:
        raise GuestNetError(f"{what} needs root (network namespaces and nftables);"
                            f" run it as root")
