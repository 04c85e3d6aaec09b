"""Request identity: model + input with defaults filled in + provider, nothing else.

The unit tests call the real identity functions; the HTTP tests show that what
the functions decide is what the gateway does, byte formatting included.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from gateway.cache import cache_key, canonical_json, request_identity
from gateway.validation import validate_submit
from tests.conftest import Client, SimulatorProcess, t2i
from tests.receiver import Receiver


def identity_of(body: dict[str, Any], model: str = "grok-image") -> str:
    sub = validate_submit(model, body)
    return request_identity(sub.model, sub.input, sub.provider)


# -- unit: the canonical form ---------------------------------------------------------


def test_key_order_does_not_change_identity() -> None:
    a = request_identity("grok-image", {"mode": "text-to-image", "prompt": "p",
                                        "aspect_ratio": "3:2"}, "auto")
    b = request_identity("grok-image", {"aspect_ratio": "3:2", "prompt": "p",
                                        "mode": "text-to-image"}, "auto")
    assert a == b
    assert canonical_json({"b": [1, {"y": 2, "x": 1}], "a": "é"}) == (
        '{"a":"é","b":[1,{"x":1,"y":2}]}'
    )


def test_default_aspect_ratio_is_part_of_identity() -> None:
    omitted = identity_of(t2i("a red fox"))
    assert identity_of(t2i("a red fox", aspect_ratio="1:1")) == omitted
    assert identity_of(t2i("a red fox", aspect_ratio="3:2")) != omitted
    # image-to-image has no aspect_ratio default to fill in.
    i2i = {"input": {"mode": "image-to-image", "prompt": "a red fox",
                     "image_urls": ["https://example.com/fox.png"]}}
    assert "aspect_ratio" not in validate_submit("grok-image", i2i).input
    assert identity_of(i2i) != omitted


def test_provider_is_part_of_identity_with_auto_as_default() -> None:
    omitted = identity_of(t2i("a red fox"))
    assert identity_of({**t2i("a red fox"), "provider": "auto"}) == omitted
    assert identity_of({**t2i("a red fox"), "provider": "official"}) != omitted


def test_explicit_null_optional_fields_equal_omitted() -> None:
    # Many clients serialise unset fields as null; that means "not given".
    omitted = identity_of(t2i("a red fox"))
    nulls = {**t2i("a red fox", aspect_ratio=None, image_urls=None),
             "request_type": None, "provider": None}
    assert identity_of(nulls) == omitted
    sub = validate_submit("grok-image", nulls)
    assert sub.input == {"mode": "text-to-image", "prompt": "a red fox", "aspect_ratio": "1:1"}
    assert (sub.request_type, sub.provider) == ("async", "auto")


def test_request_type_and_callback_url_are_not_part_of_identity() -> None:
    plain = identity_of(t2i("a red fox"))
    callback = {**t2i("a red fox"), "request_type": "callback",
                "callback_url": "https://hooks.example.com/a"}
    other_url = {**callback, "callback_url": "https://hooks.example.com/b"}
    no_type = {"input": t2i("a red fox")["input"]}
    assert identity_of(callback) == identity_of(other_url) == identity_of(no_type) == plain


def test_model_and_every_input_field_are_part_of_identity() -> None:
    base = identity_of(t2i("a red fox"))
    assert identity_of(t2i("a red fox ")) != base  # prompt text is content, spaces included
    assert identity_of(t2i("a red fox"), model="other-model") != base
    assert identity_of(t2i("a red fox", seed=1)) != base


def test_cache_key_scopes() -> None:
    ident = identity_of(t2i("a red fox"))
    assert cache_key(ident, "global", "alpha") == cache_key(ident, "global", "beta")
    assert cache_key(ident, "team", "alpha") != cache_key(ident, "team", "beta")
    # Switching scope never reuses the other scope's entries.
    assert cache_key(ident, "team", "alpha") != cache_key(ident, "global", "alpha")


# -- through the gateway --------------------------------------------------------------


async def submit_raw(client: Client, raw: bytes) -> tuple[str, str]:
    code, body, headers = await client.submit(None, raw=raw)
    assert code == 200, body
    return body["data"]["taskId"], headers["X-Gateway-Cache"]


async def test_json_formatting_and_key_order_do_not_matter(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    compact = (
        b'{"request_type":"async","input":{"mode":"text-to-image","prompt":"caf\xc3\xa9 sign"}}'
    )
    first, kind = await submit_raw(client, compact)
    assert kind == "miss"
    original = await client.wait_final(first)

    # Reordered keys, indentation, a \u escape instead of UTF-8 bytes, CRLF line ends.
    pretty = (
        b'{\r\n  "input" : {\r\n    "prompt" : "caf\\u00e9 sign",\r\n'
        b'    "mode" : "text-to-image"\r\n  },\r\n  "request_type" : "async"\r\n}\r\n'
    )
    second, kind = await submit_raw(client, pretty)
    assert kind == "hit"
    assert (await client.wait_final(second))["resultJson"] == original["resultJson"]
    assert (await sim.stats())["submits"] == 1


async def hit_then_miss(
    client: Client, sim: SimulatorProcess, first: Any, same: Any, different: Any
) -> list[dict[str, Any]]:
    """Run `first` to the end; then `same` must be a cache hit and `different` a miss.
    Returns the two tasks upstream got."""
    await client.wait_final(await client.submit_ok(first))
    code, _, headers = await client.submit(same)
    assert code == 200 and headers["X-Gateway-Cache"] == "hit"
    code, body, headers = await client.submit(different)
    assert code == 200 and headers["X-Gateway-Cache"] == "miss"
    await client.wait_final(body["data"]["taskId"])
    stats = await sim.stats()
    assert stats["submits"] == 2
    return list(stats["tasks"].values())


async def test_explicit_default_aspect_ratio_equals_omitted(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    upstream = await hit_then_miss(
        client, sim, t2i("a square garden"),
        same=t2i("a square garden", aspect_ratio="1:1"),
        different=t2i("a square garden", aspect_ratio="3:2"),
    )
    # Upstream got the defaults filled in, so what was cached is what was asked.
    assert sorted(t["input"]["aspect_ratio"] for t in upstream) == ["1:1", "3:2"]


async def test_provider_auto_equals_omitted_but_official_differs(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    upstream = await hit_then_miss(
        client, sim, t2i("a provider test"),
        same={**t2i("a provider test"), "provider": "auto"},
        different={**t2i("a provider test"), "provider": "official"},
    )
    assert sorted(t["provider"] for t in upstream) == ["auto", "official"]


async def test_request_type_and_callback_url_do_not_change_identity(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess, receiver: Receiver
) -> None:
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    first = await client.submit_ok(
        {**t2i("a callback fox"), "request_type": "callback", "callback_url": receiver.url("/a")}
    )
    original = await client.wait_final(first)

    # Async mode, no callback_url: the same identity.
    code, body, headers = await client.submit(t2i("a callback fox"))
    assert code == 200 and headers["X-Gateway-Cache"] == "hit"
    # Callback mode to another URL: still the same identity, and the hit is delivered at once.
    code, body, headers = await client.submit(
        {**t2i("a callback fox"), "request_type": "callback", "callback_url": receiver.url("/b")}
    )
    assert code == 200 and headers["X-Gateway-Cache"] == "hit"
    hit = body["data"]["taskId"]
    assert (await sim.stats())["submits"] == 1

    await receiver.wait_hits(2, within=10)
    by_path = {h.path: h.json()["data"] for h in receiver.hits}
    assert by_path["/a"]["taskId"] == first
    assert by_path["/b"]["taskId"] == hit
    assert by_path["/b"]["state"] == "success"
    assert by_path["/b"]["resultJson"] == original["resultJson"]
