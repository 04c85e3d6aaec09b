"""Structured logs: one JSON object per line, or a human-readable line for local use."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from typing import Any, TextIO

import orjson
from aiohttp.http_exceptions import HttpProcessingError

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
# One encoder for every line: json.dumps with options builds a new one per call.
_stdlib_encode = json.JSONEncoder(default=str, ensure_ascii=False).encode


def _encode(value: Any) -> str:
    """A log line's JSON: orjson, about a fifth of the stdlib encoder's cost.

    The request line is written for every request, and encoding it was most of
    its cost: about a tenth of a status poll. The stdlib encoder takes what
    orjson refuses (an int beyond 64 bits, a string that is not valid UTF-8).
    """
    try:
        # Without OPT_NON_STR_KEYS first: it slows every dict down by half, and
        # only an extra field holding a dict with other keys needs it.
        return orjson.dumps(value, default=str).decode()
    except TypeError:
        pass
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return _stdlib_encode(value)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and v is not None}


class Event:
    """A structured line that skipped LogRecord: see log_event().

    A plain class: a frozen dataclass's __init__ costs several times as much.
    """

    __slots__ = ("created", "fields", "levelname", "msg", "name")

    def __init__(
        self, created: float, levelname: str, name: str, msg: str, fields: dict[str, Any]
    ) -> None:
        self.created = created
        self.levelname = levelname
        self.name = name
        self.msg = msg
        self.fields = fields


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        line = self.format_event(Event(
            record.created, record.levelname, record.name, record.getMessage(), _extras(record)
        ))
        if record.exc_info:
            line = line[:-1] + ", \"exc\": " + _encode(self.formatException(record.exc_info)) + "}"
        return line

    def format_event(self, event: Event) -> str:
        second = int(event.created)
        if second != self._second:  # one strftime per second, not one per line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        millis = int((event.created - second) * 1000)
        fields = event.fields
        if None in fields.values():  # a scan in C; the request line leaves out its Nones
            fields = {k: v for k, v in fields.items() if v is not None}
        return _encode({
            "ts": f"{self._stamp}.{millis:03d}Z",
            "level": event.levelname.lower(),
            "logger": event.name,
            "msg": event.msg,
            **fields,
        })


# A client controls some of a line's values (the path, decoded): a newline in
# one would start a line of the client's making in the text format.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _text_value(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if _CONTROL.search(text) else text


class UnparsableRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse with a traceback that quotes the
    offending line, which can be an Authorization header (a key saved with a
    Windows line ending, say). Keys are never logged: the line keeps only what
    went wrong, not the bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "a request could not be parsed: %s (HTTP %s); its bytes are not logged"
            record.args = (type(exc).__name__, exc.code)
            record.exc_info = None
            record.exc_text = None
        return True


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = self.format_event(Event(
            record.created, record.levelname, record.name, record.getMessage(), _extras(record)
        ))
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line

    def format_event(self, event: Event) -> str:
        extras = " ".join(
            f"{k}={_text_value(v)}" for k, v in event.fields.items() if v is not None
        )
        clock = time.strftime("%H:%M:%S", time.localtime(event.created))
        line = f"{clock} {event.levelname:<7} {_text_value(event.msg)}"
        if extras:
            line += "  " + extras
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
        self._pending: list[logging.LogRecord | Event] = []

    def emit(self, record: logging.LogRecord) -> None:
        self._enqueue(record)

    def emit_event(self, event: Event) -> None:
        """Queue a line that needs no LogRecord; written in order with the records."""
        self._enqueue(event)

    def _enqueue(self, item: logging.LogRecord | Event) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write([*self._take(), item])
            return
        if not self._pending:
            loop.call_soon(self._drain)
        self._pending.append(item)

    def flush(self) -> None:
        self._write(self._take())

    def _drain(self) -> None:
        self.acquire()
        try:
            self._write(self._take())
        finally:
            self.release()

    def _take(self) -> list[logging.LogRecord | Event]:
        pending, self._pending = self._pending, []
        return pending

    def _write(self, records: list[logging.LogRecord | Event]) -> None:
        formatter = self.formatter
        # log_event() hands Events only to a handler with one of these formatters.
        format_event = (
            formatter.format_event
            if isinstance(formatter, JsonFormatter | TextFormatter) else None
        )
        lines: list[str] = []
        for record in records:
            try:
                if isinstance(record, Event):
                    if format_event is not None:
                        lines.append(format_event(record))
                else:
                    lines.append(self.format(record))
            except Exception:
                if isinstance(record, logging.LogRecord):
                    self.handleError(record)
        if not lines:
            return
        # One write for the whole turn: sys.stderr writes through, so a write
        # per line was a system call per line.
        lines.append("")
        try:
            try:
                self.stream.write(self.terminator.join(lines))
            except UnicodeEncodeError:
                # A strict stream that cannot encode one line (a lone surrogate
                # from a client) must not lose the turn's other lines.
                for line in lines[:-1]:
                    self._write_line(line)
            self.stream.flush()
        except (OSError, ValueError):  # the stream is gone (shutdown): nothing to do
            pass

    def _write_line(self, line: str) -> None:
        try:
            self.stream.write(line + self.terminator)
        except UnicodeEncodeError:
            # "?" for what the stream cannot hold keeps the line valid JSON.
            encoding = getattr(self.stream, "encoding", None) or "ascii"
            self.stream.write(
                line.encode(encoding, "replace").decode(encoding) + self.terminator
            )


def log_event(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
    """logger.info(msg, extra=fields) for the lines written on every request and task.

    Through logging a line builds a LogRecord and walks loggers, filters and
    handler locks: about 14 µs, then as much again to pull the fields back out
    of the record. When the gateway's own handler is the only one (as
    setup_logging() leaves it), the fields go straight to it instead; with any
    other arrangement (a test's or an embedder's handlers) this is logger.info.
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    root = logging.root
    handler = root.handlers[0] if len(root.handlers) == 1 else None
    plain = (
        type(handler) is DeferredStreamHandler
        and type(handler.formatter) in (JsonFormatter, TextFormatter)
        and not handler.filters and not root.filters
    )
    node: logging.Logger | None = logger
    while plain and node is not None and node is not root:
        plain = not node.handlers and not node.filters and node.propagate
        node = node.parent
    if plain:
        assert isinstance(handler, DeferredStreamHandler)
        handler.emit_event(Event(time.time(), "INFO", logger.name, msg, fields))
        return
    logger.info(msg, extra=fields)


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
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, UnparsableRequestFilter) for f in server_log.filters):
        server_log.addFilter(UnparsableRequestFilter())
