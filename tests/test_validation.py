"""Every validation rule of generateTask at its boundaries, through real HTTP.

One simulator and one gateway serve the whole module (starting a gateway per case
would cost a second each); every rejection checks that nothing reached upstream
by comparing the simulator's submit_attempts before and after.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from tests.conftest import Client, GatewayProcess, SimulatorProcess, t2i, team

MAX_BODY = 65536  # the shipped default, kept so the boundary test covers the real number
CJK = "猫"  # one code point, three UTF-8 bytes: "characters" must not mean bytes


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimulatorProcess, str]]:
    workdir = tmp_path_factory.mktemp("validation")
    sim = SimulatorProcess(workdir)
    sim.start()
    gw = GatewayProcess(
        workdir, sim.base_url, [team("alpha")],
        pricing={"grok-image": 0.1, "nano-banana": 0.05},
        server={"max_body_bytes": MAX_BODY},
        # Accepted requests in this module repeat prompts; no dedupe keeps every
        # accepted case visible upstream as its own task.
        cache={"enabled": False},
    )
    try:
        gw.start()
        yield sim, gw.url
    finally:
        gw.stop()
        sim.stop()


@pytest.fixture
def sim(stack: tuple[SimulatorProcess, str]) -> SimulatorProcess:
    return stack[0]


@pytest.fixture
def client(stack: tuple[SimulatorProcess, str], http: aiohttp.ClientSession) -> Client:
    return Client(http, stack[1], "key-alpha")


@asynccontextmanager
async def nothing_upstream(sim: SimulatorProcess) -> AsyncIterator[None]:
    before = (await sim.stats())["submit_attempts"]
    yield
    assert (await sim.stats())["submit_attempts"] == before, "a rejected request reached upstream"


async def forwarded_input(sim: SimulatorProcess, client: Client, body: Any,
                          model: str = "grok-image") -> dict[str, Any]:
    """Submit an accepted body; return the `input` the simulator received for it."""
    before = set((await sim.stats())["tasks"])
    code, reply, _ = await client.submit(body, model=model)
    assert code == 200, reply
    assert reply["code"] == 200 and reply["data"]["taskId"].startswith("gw_")
    new = {k: v for k, v in (await sim.stats())["tasks"].items() if k not in before}
    assert len(new) == 1, new
    (task,) = new.values()
    assert task["model"] == model
    forwarded: dict[str, Any] = task["input"]
    return forwarded


def assert_envelope(code: int, body: dict[str, Any], status: int, *needles: str) -> str:
    """An APIXO error envelope whose data.error names what is wrong."""
    assert code == status, body
    assert body["code"] == status
    assert isinstance(body["message"], str) and body["message"]
    error = body["data"]["error"]
    assert isinstance(error, str)
    for needle in needles:
        assert needle in error, f"{needle!r} not in {error!r}"
    return error


def i2i(prompt: str = "make it cinematic", **extra: Any) -> dict[str, Any]:
    return {"request_type": "async",
            "input": {"mode": "image-to-image", "prompt": prompt, **extra}}


REJECTED: list[tuple[str, Any, list[str]]] = [
    ("mode missing", {"input": {"prompt": "a cat"}}, ["input.mode"]),
    ("mode invalid", {"input": {"mode": "text-to-video", "prompt": "a cat"}},
     ["input.mode", "text-to-video"]),
    ("mode not a string", {"input": {"mode": 1, "prompt": "a cat"}}, ["input.mode"]),
    ("prompt missing", {"input": {"mode": "text-to-image"}}, ["input.prompt"]),
    ("prompt null", {"input": {"mode": "text-to-image", "prompt": None}}, ["input.prompt"]),
    ("prompt empty", t2i(""), ["input.prompt"]),
    ("prompt blank", t2i(" \t\n\u3000 "), ["input.prompt"]),
    ("prompt not a string", t2i(42), ["input.prompt"]),  # type: ignore[arg-type]
    ("prompt 5001 chars", t2i("a" * 5001), ["input.prompt", "5000", "5001"]),
    ("CJK prompt 5001 chars", t2i(CJK * 5001), ["input.prompt", "5000"]),
    ("aspect_ratio invalid", t2i("a cat", aspect_ratio="16:9"), ["input.aspect_ratio", "16:9"]),
    ("aspect_ratio not a string", t2i("a cat", aspect_ratio=1.5), ["input.aspect_ratio"]),
    ("image-to-image without image_urls", i2i(), ["input.image_urls"]),
    ("image_urls a string", i2i(image_urls="https://example.com/ref.png"), ["input.image_urls"]),
    ("image_urls not strings", i2i(image_urls=[7]), ["input.image_urls"]),
    ("image_urls empty", i2i(image_urls=[]), ["input.image_urls"]),
    ("image_urls two urls",
     i2i(image_urls=["https://example.com/a.png", "https://example.com/b.png"]),
     ["input.image_urls", "2"]),
    ("image_urls not http", i2i(image_urls=["ftp://example.com/a.png"]), ["input.image_urls"]),
    # The notes hold whenever the field is given, in either mode.
    ("image-to-image aspect_ratio invalid", i2i(aspect_ratio="16:9"),
     ["input.aspect_ratio", "16:9"]),
    ("image-to-image aspect_ratio a number", i2i(aspect_ratio=42), ["input.aspect_ratio", "42"]),
    ("text-to-image image_urls a number", t2i("a cat", image_urls=5), ["input.image_urls"]),
    ("text-to-image image_urls two urls",
     t2i("a cat", image_urls=["https://example.com/a.png", "https://example.com/b.png"]),
     ["input.image_urls", "2"]),
    ("request_type invalid", t2i("a cat") | {"request_type": "sync"}, ["request_type", "sync"]),
    ("callback without callback_url", t2i("a cat") | {"request_type": "callback"},
     ["callback_url"]),
    ("callback_url not a string",
     t2i("a cat") | {"request_type": "callback", "callback_url": 5}, ["callback_url"]),
    ("provider empty", t2i("a cat") | {"provider": ""}, ["provider"]),
    ("input missing", {"request_type": "async"}, ["input"]),
    ("input not an object", {"input": "text-to-image: a cat"}, ["input", "object"]),
    ("body an array", [t2i("a cat")], ["body", "object"]),
    ("body a string", "a cat", ["body", "object"]),
]


@pytest.mark.parametrize(("case", "body", "needles"), REJECTED, ids=[c[0] for c in REJECTED])
async def test_grok_image_rejections_name_the_field(
    sim: SimulatorProcess, client: Client, case: str, body: Any, needles: list[str]
) -> None:
    async with nothing_upstream(sim):
        code, reply, _ = await client.submit(body)
    assert_envelope(code, reply, 400, *needles)


async def test_invalid_json_is_400(sim: SimulatorProcess, client: Client) -> None:
    async with nothing_upstream(sim):
        for raw in (b'{"input": {"mode": "text-to-image",', b"", b"\xff\xfe{}"):
            code, reply, _ = await client.submit(None, raw=raw)
            assert_envelope(code, reply, 400, "JSON")


async def test_prompt_of_exactly_5000_chars_is_accepted_unchanged(
    sim: SimulatorProcess, client: Client
) -> None:
    prompt = "b" * 4999 + "!"
    forwarded = await forwarded_input(sim, client, t2i(prompt, aspect_ratio="2:3"))
    assert forwarded["prompt"] == prompt
    assert forwarded["aspect_ratio"] == "2:3"


async def test_cjk_prompt_of_5000_chars_is_accepted_unchanged(
    sim: SimulatorProcess, client: Client
) -> None:
    # 15,000 UTF-8 bytes and (as \u escapes) 30,000 bytes of JSON: still 5000 characters.
    prompt = CJK * 5000
    forwarded = await forwarded_input(sim, client, t2i(prompt))
    assert forwarded["prompt"] == prompt


async def test_default_aspect_ratio_is_filled_in_and_forwarded(
    sim: SimulatorProcess, client: Client
) -> None:
    forwarded = await forwarded_input(sim, client, t2i("a lighthouse at dusk"))
    assert forwarded == {"mode": "text-to-image", "prompt": "a lighthouse at dusk",
                         "aspect_ratio": "1:1"}


async def test_every_listed_aspect_ratio_and_single_reference_image_pass(
    sim: SimulatorProcess, client: Client
) -> None:
    for ratio in ("1:1", "3:2", "2:3"):
        forwarded = await forwarded_input(sim, client, t2i(f"ratio {ratio}", aspect_ratio=ratio))
        assert forwarded["aspect_ratio"] == ratio
    urls = ["https://example.com/ref.png"]
    forwarded = await forwarded_input(sim, client, i2i(image_urls=urls))
    assert forwarded["image_urls"] == urls and forwarded["mode"] == "image-to-image"
    # A valid aspect_ratio in image-to-image is passed on as given, no default added.
    forwarded = await forwarded_input(sim, client, i2i("with a ratio", image_urls=urls,
                                                       aspect_ratio="3:2"))
    assert forwarded["aspect_ratio"] == "3:2"
    assert "aspect_ratio" not in await forwarded_input(sim, client, i2i("no ratio",
                                                                        image_urls=urls))
    # request_type may be omitted: async is the default.
    forwarded = await forwarded_input(
        sim, client, {"input": {"mode": "text-to-image", "prompt": "no request_type"}}
    )
    assert forwarded["prompt"] == "no request_type"
    # An explicit null for an optional field is the same as leaving it out.
    forwarded = await forwarded_input(sim, client, {
        "request_type": None, "provider": None,
        "input": {"mode": "text-to-image", "prompt": "nulls", "aspect_ratio": None},
    })
    assert forwarded == {"mode": "text-to-image", "prompt": "nulls", "aspect_ratio": "1:1"}


async def test_body_of_exactly_max_body_bytes_is_accepted_one_more_is_413(
    sim: SimulatorProcess, client: Client
) -> None:
    body = json.dumps(t2i("padded to the limit")).encode()
    exact = body + b" " * (MAX_BODY - len(body))  # JSON allows trailing whitespace
    assert len(exact) == MAX_BODY
    code, reply, _ = await client.submit(None, raw=exact)
    assert code == 200, reply
    async with nothing_upstream(sim):
        code, reply, _ = await client.submit(None, raw=exact + b" ")
        assert_envelope(code, reply, 413, str(MAX_BODY))


async def test_chunked_body_over_max_body_bytes_is_413(
    sim: SimulatorProcess, client: Client, stack: tuple[SimulatorProcess, str]
) -> None:
    # No Content-Length: the limit must hold while reading, not only from the header.
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"input": {"mode": "text-to-image", "prompt": "'
        for _ in range(20):
            yield b"x" * 4096
        yield b'"}}'

    async with nothing_upstream(sim), client.session.post(
        f"{stack[1]}/api/v1/generateTask/grok-image", data=chunks(),
        headers={"Authorization": "Bearer key-alpha"},
    ) as r:
        assert_envelope(r.status, await r.json(), 413, "max_body_bytes")


async def test_model_not_in_pricing_is_404_even_if_upstream_knows_it(
    sim: SimulatorProcess, client: Client
) -> None:
    async with nothing_upstream(sim):
        # gpt-image-2 exists upstream (the simulator serves it) but is not priced here.
        for model in ("gpt-image-2", "no-such-model"):
            code, reply, _ = await client.submit(t2i("a cat"), model=model)
            assert_envelope(code, reply, 404, model)
            code, reply = await client.status("gw_0", model=model)
            assert_envelope(code, reply, 404, model)


async def test_other_priced_models_get_generic_checks_only(
    sim: SimulatorProcess, client: Client
) -> None:
    # nano-banana's inputs are not grok-image's: no mode, no prompt rules.
    body = {"input": {"prompt": "", "image_size": "16:9", "anything": [1, 2]}}
    forwarded = await forwarded_input(sim, client, body, model="nano-banana")
    assert forwarded == body["input"]  # nothing filled in: defaults are grok-image's
    async with nothing_upstream(sim):
        for bad, needles in (
            ({"request_type": "async"}, ["input"]),
            ({"input": ["not", "an", "object"]}, ["input", "object"]),
            ({"input": {}, "request_type": "sync"}, ["request_type"]),
            ({"input": {}, "request_type": "callback"}, ["callback_url"]),
        ):
            code, reply, _ = await client.submit(bad, model="nano-banana")
            assert_envelope(code, reply, 400, *needles)


DEEP = (b'{"input": {"mode": "text-to-image", "prompt": "p", "x": '
        + b"[" * 1000 + b"]" * 1000 + b"}}")


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"[" * 60000, "nested"),  # under max_body_bytes, but json.loads recurses
        (b'{"input": {"mode": "text-to-image", "prompt": "bad \\ud800"}}', "surrogate"),
        (b"\xff\xfe{}", "JSON"),
        # Python reads NaN, APIXO would not: refused before any money is reserved.
        (b'{"input": {"mode": "text-to-image", "prompt": "p", "seed": NaN}}',
         "NaN is not a JSON number"),
        # Deep enough to read (orjson reads 1,024 levels) but not to hash
        # canonically; with a surrogate pair escape, not to check either.
        (DEEP, "nested too deeply"),
        (DEEP.replace(b'"p"', b'"\\ud83d\\ude00"'), "nested too deeply"),
    ],
    ids=["deeply-nested", "lone-surrogate", "not-utf8", "nan", "deep-input", "deep-emoji"],
)
@pytest.mark.parametrize("idempotent", [False, True], ids=["", "idempotency-key"])
async def test_hostile_bodies_are_400_not_500(
    sim: SimulatorProcess, client: Client, raw: bytes, needle: str, idempotent: bool
) -> None:
    headers = {"Content-Type": "application/json"}
    if idempotent:
        headers["Idempotency-Key"] = f"hostile-{needle}"
    async with nothing_upstream(sim):
        code, body, _ = await client.submit(None, raw=raw, headers=headers)
    assert_envelope(code, body, 400, needle)


async def test_non_utf8_headers_are_client_errors(
    stack: tuple[SimulatorProcess, str], sim: SimulatorProcess
) -> None:
    """Header bytes that are not UTF-8: an unknown key is 401, a bad Idempotency-Key 400."""
    import asyncio

    async def raw_request(headers: bytes) -> tuple[int, dict[str, Any]]:
        port = int(stack[1].rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = json.dumps(t2i("headers")).encode()
        writer.write(
            b"POST /api/v1/generateTask/grok-image HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n" + headers
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await writer.drain()
        response = await reader.read()
        writer.close()
        head, _, payload = response.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(payload)

    async with nothing_upstream(sim):
        code, body = await raw_request(b"Authorization: Bearer \xff\xfe\r\n")
        assert_envelope(code, body, 401)
        code, body = await raw_request(
            b"Authorization: Bearer key-alpha\r\nIdempotency-Key: caf\xe9\xff\r\n"
        )
        assert_envelope(code, body, 400, "Idempotency-Key")
