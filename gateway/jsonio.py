"""JSON on the request path: orjson where it gives the stdlib's answer, the stdlib where not."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

# orjson reads an integer beyond 64 bits as a float; the stdlib keeps it exact.
# Any run of 19 digits (in a number or in a string) sends the body to the stdlib.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")
_stdlib_text = json.JSONEncoder(ensure_ascii=False).encode


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text} is out of range")
    return value


def _stdlib_loads(raw: bytes) -> Any:
    return json.loads(raw, parse_constant=_no_constant, parse_float=_finite)


def loads(raw: bytes, *, strict: bool = True) -> Any:
    """JSON as RFC 8259 has it: json.loads's answer, without NaN and Infinity.

    NaN, Infinity and numbers too large for a double are refused: RFC 8259
    has no such numbers, and a strict upstream would refuse the body only
    after the budget was reserved. strict=False reads them as json.loads
    does: for answers from upstream, where refusing a field the gateway never
    looks at would turn a created task into a retried submit.

    orjson reads the rest several times faster; what it refuses (UTF-16 and
    UTF-32 bodies, escapes of lone surrogates) or would read differently
    (integers beyond 64 bits) is read by the stdlib.
    """
    stdlib = _stdlib_loads if strict else json.loads
    if _LONG_DIGITS.search(raw):
        return stdlib(raw)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return stdlib(raw)


def dumps(value: Any) -> bytes:
    """Compact JSON; the stdlib (ASCII escapes) for what orjson cannot encode."""
    try:
        return orjson.dumps(value)
    except TypeError:  # an int beyond 64 bits, a str with a lone surrogate
        return json.dumps(value).encode()


def dumps_text(value: Any) -> str:
    """Compact JSON text of what loads() returned; UTF-8 characters unescaped."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # an int beyond 64 bits
        return _stdlib_text(value)


def json_response(
    data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """web.json_response with dumps(): the same headers, a third of the encoding cost."""
    return web.Response(
        body=dumps(data), status=status, headers=headers,
        content_type="application/json", charset="utf-8",
    )
