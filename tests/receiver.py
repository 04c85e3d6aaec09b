"""A webhook receiver on loopback: records every request and answers as scripted.

`serve_receiver()` starts one for a block of code; conftest's `receiver` fixture
starts one for a whole test.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Reply:
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """Records every request; answers from `script`, then 200."""

    def __init__(self) -> None:
        self.script: list[Reply] = []
        self.hits: list[Hit] = []
        self.active = 0
        self.max_active = 0
        self.port = 0
        self._arrived = asyncio.Event()
        self._closing = asyncio.Event()

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.Response:
        reply = self.script.pop(0) if self.script else Reply()
        body = await request.read()
        self.hits.append(Hit(request.path, dict(request.headers), body, reply.status))
        self._arrived.set()
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if reply.delay:
                try:
                    # A long delay stands for a receiver that hangs; closing ends it early.
                    await asyncio.wait_for(self._closing.wait(), reply.delay)
                except TimeoutError:
                    pass
            return web.Response(status=reply.status, headers=reply.headers, text="ok")
        finally:
            self.active -= 1

    async def wait_hits(self, n: int, within: float = 5.0) -> None:
        """Until at least `n` requests have arrived; TimeoutError after `within` seconds."""
        async with asyncio.timeout(within):
            while len(self.hits) < n:
                self._arrived.clear()
                await self._arrived.wait()

    def close(self) -> None:
        self._closing.set()


@asynccontextmanager
async def serve_receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/{path:.*}", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    receiver.port = runner.addresses[0][1]
    try:
        yield receiver
    finally:
        receiver.close()
        await runner.cleanup()
