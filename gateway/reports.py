"""PLACEHOLDER: usage and keys commands (being written)."""

from __future__ import annotations

from typing import Any


def add_commands(sub: Any) -> None:
    return None
