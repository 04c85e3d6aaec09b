"""ParsedBodies: the same bytes reuse one request identity; nothing else is shared or kept."""

from __future__ import annotations

import json

import pytest

from gateway.apixo_api import ParsedBodies
from gateway.cache import request_identity
from gateway.errors import APIError


def body(prompt: str, **extra: object) -> bytes:
    return json.dumps({"input": {"mode": "text-to-image", "prompt": prompt}, **extra}).encode()


def test_same_bytes_reuse_the_identity_and_nothing_else() -> None:
    memo = ParsedBodies()
    raw = body("a red fox")
    first_body, first = memo.parse("grok-image", raw)
    again_body, again = memo.parse("grok-image", bytes(raw))  # equal bytes, another object
    assert again == first and again.identity is first.identity
    # Every request gets its own decoded objects: nothing it holds is shared.
    assert again_body is not first_body and again.input is not first.input
    assert first.identity == request_identity("grok-image", first.input, first.provider)
    assert first.input == {"mode": "text-to-image", "prompt": "a red fox", "aspect_ratio": "1:1"}
    # Other bytes for the same request: its own entry, the same identity.
    _, spaced = memo.parse("grok-image", raw.replace(b": ", b":  "))
    assert spaced.identity == first.identity


def test_the_model_is_part_of_the_key() -> None:
    memo = ParsedBodies()
    raw = json.dumps({"input": {"prompt": "no mode"}}).encode()
    _, other = memo.parse("other-model", raw)  # generic checks only: valid
    assert other.identity == request_identity("other-model", {"prompt": "no mode"}, "auto")
    with pytest.raises(APIError, match=r"input\.mode"):
        memo.parse("grok-image", raw)


def test_refused_and_large_bodies_are_not_kept() -> None:
    memo = ParsedBodies()
    for _ in range(2):  # refused every time, never served from the memo
        with pytest.raises(APIError, match="not valid JSON"):
            memo.parse("grok-image", b"{nope")
    large = body("a red fox", note="x" * ParsedBodies.MAX_BYTES)
    _, first = memo.parse("grok-image", large)
    _, again = memo.parse("grok-image", large)
    assert again == first
    assert len(memo._identities) == 0


def test_bounded_by_entries_and_bytes() -> None:
    memo = ParsedBodies()
    for i in range(ParsedBodies.ENTRIES + 10):
        memo.parse("grok-image", body(f"prompt {i}"))
    assert len(memo._identities) == ParsedBodies.ENTRIES
    assert all(len(raw) <= ParsedBodies.MAX_BYTES and len(identity) == 64
               for (_, raw), identity in memo._identities.items())
