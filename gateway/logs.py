"""Structured logs: one JSON object per line, or a human-readable line for local use."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any, TextIO

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
# One encoder for every line: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(default=str, ensure_ascii=False).encode


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and v is not None}


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime per second, not one per line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        entry: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _encode(entry)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.getMessage()}"
        if extras:
            line += "  " + extras
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class DeferredStreamHandler(logging.StreamHandler[TextIO]):
    """Formats and writes records after the current turn of the event loop, in order.

    A JSON line costs tens of microseconds, and a submit logs two or three:
    written inline they sat on the request's path before its response. On the
    loop's thread, records wait in a list that one callback writes at the next
    turn; without a running loop (startup, commands, other threads) they are
    written at once, after anything still waiting.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write([*self._take(), record])
            return
        if not self._pending:
            loop.call_soon(self._drain)
        self._pending.append(record)

    def flush(self) -> None:
        self._write(self._take())

    def _drain(self) -> None:
        self.acquire()
        try:
            self._write(self._take())
        finally:
            self.release()

    def _take(self) -> list[logging.LogRecord]:
        pending, self._pending = self._pending, []
        return pending

    def _write(self, records: list[logging.LogRecord]) -> None:
        for record in records:
            try:
                self.stream.write(self.format(record) + self.terminator)
            except Exception:
                self.handleError(record)
        try:
            self.stream.flush()
        except (OSError, ValueError):  # the stream is gone (shutdown): nothing to do
            pass


def setup_logging(fmt: str, level: str) -> None:
    handler = DeferredStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The logging HOWTO's "Optimization" switches: no formatter here shows the
    # caller's file and line, thread or process, and finding the caller walks the
    # stack on every call, which cost more than formatting the line itself.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # aiohttp's own access log would duplicate ours.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
