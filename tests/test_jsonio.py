"""jsonio.loads is json.loads, faster: the same values, the same refusals, for any bytes."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import jsonio

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=20,
)


def outcome(loads: Any, raw: bytes) -> tuple[str, str]:
    # repr: nan != nan, and -0.0 == 0.0; repr tells them apart.
    try:
        return "value", repr(loads(raw))
    except Exception as exc:
        return "error", f"{type(exc).__name__}: {exc}"


@settings(max_examples=500, deadline=None)
@given(JSON_VALUES, st.sampled_from(["utf-8", "utf-16", "utf-32"]))
def test_any_stdlib_document_reads_the_same(value: Any, encoding: str) -> None:
    # What the stdlib writes, it reads: NaN, Infinity, 100-digit integers, lone surrogates.
    raw = json.dumps(value, ensure_ascii=False).encode(encoding, "surrogatepass")
    assert outcome(jsonio.loads, raw) == outcome(json.loads, raw)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64).map(lambda s: s.encode("utf-8", "replace")))
def test_any_bytes_read_or_refused_the_same(raw: bytes) -> None:
    assert outcome(jsonio.loads, raw) == outcome(json.loads, raw)


def test_edges_orjson_alone_would_change() -> None:
    for raw in (b'{"n": 123456789012345678901234567890}', b'{"x": NaN}', b'{"x": 1e400}',
                b'\xef\xbb\xbf{"a": 1}', b'{"s": "\\ud800"}', b"[" * 5000 + b"]" * 5000):
        assert outcome(jsonio.loads, raw) == outcome(json.loads, raw), raw
    assert jsonio.loads(b'{"n": 123456789012345678901234567890}') == {
        "n": 123456789012345678901234567890
    }


def test_dumps_falls_back_for_what_orjson_cannot_encode() -> None:
    assert json.loads(jsonio.dumps({"n": 10**30})) == {"n": 10**30}
    assert jsonio.dumps({"s": "\ud800"}) == b'{"s": "\\ud800"}'
    assert jsonio.dumps({"taskId": "gw_1", "ok": "é"}) == '{"taskId":"gw_1","ok":"é"}'.encode()
