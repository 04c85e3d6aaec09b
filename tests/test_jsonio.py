"""jsonio.loads is json.loads without NaN and Infinity, faster: the same values, the same
refusals, for any bytes."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import jsonio

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=20,
)


def strict_stdlib(raw: bytes) -> Any:
    """The reference: the stdlib, refusing what RFC 8259 has no number for."""
    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    def finite(text: str) -> float:
        if math.isinf(float(text)):
            raise ValueError(f"the number {text} is out of range")
        return float(text)

    return json.loads(raw, parse_constant=no_constant, parse_float=finite)


def outcome(loads: Any, raw: bytes) -> tuple[str, str]:
    # repr: -0.0 == 0.0, and repr tells them apart.
    try:
        return "value", repr(loads(raw))
    except Exception as exc:
        return "error", f"{type(exc).__name__}: {exc}"


@settings(max_examples=500, deadline=None)
@given(JSON_VALUES, st.sampled_from(["utf-8", "utf-16", "utf-32"]))
def test_any_stdlib_document_reads_the_same(value: Any, encoding: str) -> None:
    # What the stdlib writes: 100-digit integers, lone surrogates, NaN (refused by both).
    raw = json.dumps(value, ensure_ascii=False).encode(encoding, "surrogatepass")
    assert outcome(jsonio.loads, raw) == outcome(strict_stdlib, raw)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64).map(lambda s: s.encode("utf-8", "replace")))
def test_any_bytes_read_or_refused_the_same(raw: bytes) -> None:
    assert outcome(jsonio.loads, raw) == outcome(strict_stdlib, raw)


def test_edges_orjson_alone_would_change() -> None:
    for raw in (b'\xef\xbb\xbf{"a": 1}', b'{"s": "\\ud800"}', b"[" * 5000 + b"]" * 5000):
        assert outcome(jsonio.loads, raw) == outcome(json.loads, raw), raw
    assert jsonio.loads(b'{"n": 123456789012345678901234567890}') == {
        "n": 123456789012345678901234567890
    }


@pytest.mark.parametrize(
    ("raw", "needle"),
    [(b'{"x": NaN}', "NaN is not a JSON number"),
     (b'{"x": -Infinity}', "-Infinity is not a JSON number"),
     (b'{"x": 1e400}', "1e400 is out of range"),
     (b'{"x": 1e400, "n": 1234567890123456789}', "1e400 is out of range")],
)
def test_numbers_json_has_not_are_refused(raw: bytes, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        jsonio.loads(raw)


def test_dumps_falls_back_for_what_orjson_cannot_encode() -> None:
    assert json.loads(jsonio.dumps({"n": 10**30})) == {"n": 10**30}
    assert jsonio.dumps({"s": "\ud800"}) == b'{"s": "\\ud800"}'
    assert jsonio.dumps({"taskId": "gw_1", "ok": "é"}) == '{"taskId":"gw_1","ok":"é"}'.encode()
    assert jsonio.dumps_text({"n": 10**30, "p": "é"}) == (
        '{"n": 1000000000000000000000000000000, "p": "é"}'
    )
    assert jsonio.dumps_text({"p": "é", "f": 0.1}) == '{"p":"é","f":0.1}'


def test_not_strict_reads_what_json_loads_reads() -> None:
    for raw in (b'{"x": NaN}', b'{"x": -Infinity, "n": 1234567890123456789012}', b'{"x": 1e400}'):
        assert outcome(lambda r: jsonio.loads(r, strict=False), raw) == outcome(json.loads, raw)
