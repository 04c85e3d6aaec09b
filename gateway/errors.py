"""One exception type for every client-facing error; the app turns it into an APIXO envelope."""

from __future__ import annotations

from typing import Any

_MESSAGES = {
    400: "Invalid request",
    401: "Invalid or missing API key",
    402: "Insufficient budget",
    404: "Not found",
    409: "Conflict",
    413: "Request body too large",
    429: "Too many requests",
    500: "Internal error",
    502: "Upstream error",
    503: "Service unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        code: int,
        error: str,
        *,
        message: str | None = None,
        reason: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(error)
        self.code = code
        self.error = error
        self.message = message or _MESSAGES.get(code, "Error")
        # reason feeds apixo_gateway_rejections_total; None means "not a rejection".
        self.reason = reason
        self.headers = headers or {}
        self.extra = extra or {}

    def envelope(self) -> dict[str, Any]:
        data = {"error": self.error, **self.extra}
        return {"code": self.code, "message": self.message, "data": data}


def envelope(code: int, message: str, data: Any = None) -> dict[str, Any]:
    return {"code": code, "message": message, "data": data}
