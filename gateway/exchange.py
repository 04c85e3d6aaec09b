"""What one request's log line and metrics say about it, filled in while it is handled."""

from __future__ import annotations

from aiohttp import web

# The request-storage key observe() puts each request's Exchange under.
EXCHANGE = "gateway.exchange"


class Exchange:
    """The request line's fields, on one object in the request's storage.

    Not a key per field in the request's mapping: its get() answers a missing
    key by raising and catching KeyError, and most requests leave most of these
    unset (a status poll has no cache result, no error, no prompt).
    """

    __slots__ = ("cache", "error", "model", "prompt", "request_id", "task_id", "team")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.team = "none"
        self.model = "none"
        self.cache: str | None = None
        self.task_id: str | None = None
        self.error: str | None = None
        self.prompt: str | None = None


def exchange(request: web.Request) -> Exchange:
    """The request's Exchange; observe() puts one on every request before its handler runs."""
    found: Exchange = request[EXCHANGE]
    return found

