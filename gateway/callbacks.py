"""PLACEHOLDER being replaced by the callbacks implementation (helper)."""

from __future__ import annotations

from gateway.config import CallbacksConfig


async def check_callback_url(url: str, cfg: CallbacksConfig) -> None:
    return None


class Callbacks:
    def __init__(self, *args: object) -> None:
        return None

    def apply_config(self, config: CallbacksConfig) -> None:
        return None

    def wake(self) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None
