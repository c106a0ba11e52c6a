"""Reading phi3lab's environment variables."""

from __future__ import annotations

import os


def flag(name: str) -> bool:
    """Whether the environment variable `name` is set to 1, true or yes (any case).

    Example:
    >>> flag("PHI3LAB_NO_DISK_CACHE")
    False
    """
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")
