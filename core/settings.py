"""The one answer to "do these settings differ?", used by the store, extract, detect and eval."""
from __future__ import annotations

from typing import Any


def differing_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two settings dicts (missing counts as None), sorted."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
