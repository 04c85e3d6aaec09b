"""The simulator as a real server on loopback, driven through aiohttp.ClientSession."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.simulator import create_simulator_app
from tests.receiver import serve_receiver

KEY = "sim-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Sim:
    base: str
    http: aiohttp.ClientSession

    async def submit(
        self, body: Any, model: str = "grok-image", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        async with self.http.post(
            f"{self.base}/api/v1/generateTask/{model}",
            json=body,
            headers=AUTH if headers is None else headers,
        ) as resp:
            return resp.status, await resp.json()

    async def status(self, task_id: str | None, model: str = "grok-image") -> tuple[int, Any]:
        params = {"taskId": task_id} if task_id is not None else {}
        async with self.http.get(
            f"{self.base}/api/v1/statusTask/{model}", params=params, headers=AUTH
        ) as resp:
            return resp.status, await resp.json()

    async def sim(self, path: str, body: Any = None) -> Any:
        method = self.http.get if body is None and path == "stats" else self.http.post
        async with method(f"{self.base}/_sim/{path}", json=body) as resp:
            assert resp.status == 200
            return await resp.json()

    async def wait_final(self, task_id: str) -> dict[str, Any]:
        async with asyncio.timeout(5):
            while True:
                code, body = await self.status(task_id)
                assert code == 200
                if body["data"]["state"] in ("success", "failed"):
                    return dict(body["data"])
                await asyncio.sleep(0.02)


async def start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    runner, base = await start(create_simulator_app(latency=0.2, api_key=KEY, seed=1))
    async with aiohttp.ClientSession() as http:
        yield Sim(base, http)
    await runner.cleanup()


def grok(prompt: str = "a cozy cafe", **extra: Any) -> dict[str, Any]:
    return {"input": {"mode": "text-to-image", "prompt": prompt, **extra}}


async def test_happy_path_pending_then_success_with_png(sim: Sim) -> None:
    code, body = await sim.submit(grok("a cozy cafe [latency:0.5]"))  # 100 ms of "pending"
    assert code == 200
    assert body["code"] == 200 and body["message"] == "success"
    task_id = body["data"]["taskId"]
    assert task_id.startswith("task_")

    code, body = await sim.status(task_id)
    assert code == 200
    assert body["data"]["state"] == "pending"
    assert "resultJson" not in body["data"]

    data = await sim.wait_final(task_id)
    assert data["state"] == "success"
    assert data["costTime"] == 500
    assert data["completeTime"] == data["createTime"] + 500
    urls = json.loads(data["resultJson"])["resultUrls"]
    assert len(urls) == 1 and urls[0].startswith(sim.base + "/files/")
    assert task_id not in urls[0]  # like APIXO's: nothing of the task id to pass on
    async with sim.http.get(urls[0]) as resp:
        assert resp.status == 200
        assert resp.content_type == "image/png"
        assert (await resp.read()).startswith(PNG_SIGNATURE)


async def test_processing_between_pending_and_final(sim: Sim) -> None:
    _, body = await sim.submit(grok("slow [latency:0.5]"))
    task_id = body["data"]["taskId"]
    await asyncio.sleep(0.2)
    _, body = await sim.status(task_id)
    assert body["data"]["state"] == "processing"


async def test_fail_marker(sim: Sim) -> None:
    _, body = await sim.submit(grok("nsfw [fail:SensitiveContent] [latency:0.05]"))
    data = await sim.wait_final(body["data"]["taskId"])
    assert data["state"] == "failed"
    assert data["failCode"] == "SensitiveContent"
    assert data["failMsg"] == "Content violates provider policy, please adjust the prompt"
    assert "resultJson" not in data
    assert data["costTime"] == 50


async def test_images_marker(sim: Sim) -> None:
    _, body = await sim.submit(grok("three [images:3] [latency:0.05]"))
    data = await sim.wait_final(body["data"]["taskId"])
    urls = json.loads(data["resultJson"])["resultUrls"]
    assert len(set(urls)) == 3
    for url in urls:
        async with sim.http.get(url) as resp:
            assert resp.status == 200


async def test_fail_rate_one_fails_with_reference_code() -> None:
    runner, base = await start(create_simulator_app(latency=0.0, fail_rate=1.0, seed=7))
    try:
        async with aiohttp.ClientSession() as http:
            s = Sim(base, http)
            _, body = await s.submit(grok(), headers={"Authorization": "Bearer anything"})
            data = await s.wait_final(body["data"]["taskId"])
            assert data["state"] == "failed"
            assert data["failCode"] in {
                "PromptInvalid", "SensitiveContent", "ImageFormatIncorrect",
                "RateLimited", "Timeout", "Unknown error",
            }
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("input_", "fragment"),
    [
        ({"mode": "text-to-image", "prompt": "   "}, "blank"),
        ({"mode": "text-to-image", "prompt": "x" * 5001}, "5000"),
        ({"mode": "text-to-image", "prompt": "p", "aspect_ratio": "16:9"}, "aspect_ratio"),
        ({"mode": "image-to-image", "prompt": "p"}, "image_urls"),
        (
            {"mode": "image-to-image", "prompt": "p", "image_urls": ["https://a/1.png", "https://a/2.png"]},
            "more than 1",
        ),
        ({"prompt": "p"}, "input.mode"),
    ],
)
async def test_validation_errors(sim: Sim, input_: dict[str, Any], fragment: str) -> None:
    code, body = await sim.submit({"input": input_})
    assert code == 400
    assert body["code"] == 400 and body["message"] == "Invalid request"
    assert fragment in body["data"]["error"]


async def test_invalid_json_and_generic_model_input(sim: Sim) -> None:
    async with sim.http.post(
        f"{sim.base}/api/v1/generateTask/grok-image", data=b"{nope", headers=AUTH
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["code"] == 400
    code, body = await sim.submit({"input": "a string"}, model="nano-banana")
    assert code == 400 and "input must be an object" in body["data"]["error"]
    code, body = await sim.submit({"input": {"prompt": "anything goes"}}, model="veo-3-1")
    assert code == 200


async def test_unauthorized(sim: Sim) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sim-key"}):
        code, body = await sim.submit(grok(), headers=headers)
        assert code == 401
        assert body == {"code": 401, "message": "Invalid or missing API key"}


async def test_unknown_model_and_task(sim: Sim) -> None:
    code, body = await sim.submit(grok(), model="dall-e-9")
    assert code == 404 and body["code"] == 404
    code, body = await sim.status("task_doesnotexist")
    assert code == 404 and body["code"] == 404
    code, body = await sim.status(None)
    assert code == 400 and "taskId" in body["data"]["error"]
    async with sim.http.get(f"{sim.base}/files/task_nope-0.png") as resp:
        assert resp.status == 404


async def test_submit_fault_queue_then_success(sim: Sim) -> None:
    await sim.sim("faults", {"submit_errors": [503, 429]})
    code, body = await sim.submit(grok())
    assert code == 503 and body["code"] == 503
    async with sim.http.post(
        f"{sim.base}/api/v1/generateTask/grok-image", json=grok(), headers=AUTH
    ) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "0"
    code, body = await sim.submit(grok())
    assert code == 200
    stats = await sim.sim("stats")
    assert stats["submit_attempts"] == 3 and stats["submits"] == 1


async def test_drop_and_status_faults(sim: Sim) -> None:
    _, body = await sim.submit(grok())
    task_id = body["data"]["taskId"]
    # aiohttp's client retries an idempotent GET once after a dropped connection,
    # so it takes two drops in a row for the status caller to see one.
    await sim.sim("faults", {"submit_errors": ["drop"], "status_errors": [500, "drop", "drop"]})
    with pytest.raises(aiohttp.ClientConnectionError):
        await sim.submit(grok())
    code, _ = await sim.status(task_id)
    assert code == 500
    with pytest.raises(aiohttp.ClientConnectionError):
        await sim.status(task_id)
    code, _ = await sim.status(task_id)
    assert code == 200
    stats = await sim.sim("stats")
    assert stats["submit_attempts"] == 2 and stats["submits"] == 1
    assert stats["status_polls"] == 4


async def test_reject_submits_until_reset(sim: Sim) -> None:
    await sim.sim("faults", {"reject_submits_with": 402})
    for _ in range(2):
        code, body = await sim.submit(grok())
        assert code == 402 and body["code"] == 402
    await sim.sim("reset", {})
    code, _ = await sim.submit(grok())
    assert code == 200
    stats = await sim.sim("stats")
    assert stats["submit_attempts"] == 1 and stats["submits"] == 1


async def test_stats_and_balance(sim: Sim) -> None:
    async with sim.http.get(f"{sim.base}/api/v1/apikeys/current-balance", headers=AUTH) as resp:
        assert await resp.json() == {"code": 200, "message": "success", "data": 1000.0}

    _, ok = await sim.submit(grok("two [images:2] [latency:0.05]"))
    _, bad = await sim.submit(grok("[fail:Timeout] [latency:0.05]"))
    await sim.wait_final(ok["data"]["taskId"])
    await sim.wait_final(bad["data"]["taskId"])

    stats = await sim.sim("stats")
    assert stats["submits"] == 2 and stats["submit_attempts"] == 2
    assert stats["images"] == 2
    assert stats["status_polls"] >= 2
    entry = stats["tasks"][ok["data"]["taskId"]]
    assert entry["model"] == "grok-image"
    assert entry["input"]["prompt"] == "two [images:2] [latency:0.05]"
    assert entry["state_final"] == "success" and entry["images"] == 2
    assert stats["tasks"][bad["data"]["taskId"]]["state_final"] == "failed"

    async with sim.http.get(f"{sim.base}/api/v1/apikeys/current-balance", headers=AUTH) as resp:
        assert (await resp.json())["data"] == pytest.approx(999.8)
    async with sim.http.get(f"{sim.base}/api/v1/apikeys/current-balance") as resp:
        assert resp.status == 401


async def test_latency_fault_applies_to_new_tasks(sim: Sim) -> None:
    await sim.sim("faults", {"latency": 0.0})
    _, body = await sim.submit(grok())
    _, status = await sim.status(body["data"]["taskId"])
    assert status["data"]["state"] == "success"


async def test_callback_delivery(sim: Sim) -> None:
    async with serve_receiver() as receiver:
        body = {**grok("[latency:0.05]"), "request_type": "callback",
                "callback_url": receiver.url()}
        code, resp = await sim.submit(body)
        assert code == 200
        await receiver.wait_hits(1)
        delivered = receiver.hits[0].json()
        assert delivered["code"] == 200
        assert delivered["data"]["taskId"] == resp["data"]["taskId"]
        assert delivered["data"]["state"] == "success"

    code, body = await sim.submit({**grok(), "request_type": "callback"})
    assert code == 400 and "callback_url" in body["data"]["error"]
