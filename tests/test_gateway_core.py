"""Core proxy behaviour through real HTTP: the reference page's quickstart, unchanged, works."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tests.conftest import Client, SimulatorProcess, t2i


async def test_quickstart_reaches_success_with_fetchable_png(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    code, body, headers = await client.submit(t2i("a cozy cyberpunk cafe with neon lights",
                                                  aspect_ratio="3:2"))
    assert code == 200 and body["code"] == 200 and body["message"] == "success"
    task_id = body["data"]["taskId"]
    assert task_id.startswith("gw_")
    assert headers["X-Gateway-Cache"] == "miss"
    data = await client.wait_final(task_id)
    assert data["state"] == "success"
    assert data["taskId"] == task_id
    assert data["costTime"] == data["completeTime"] - data["createTime"]
    urls = json.loads(data["resultJson"])["resultUrls"]
    async with http.get(urls[0]) as r:
        assert r.status == 200
        assert (await r.read()).startswith(b"\x89PNG\r\n\x1a\n")
    stats = await sim.stats()
    assert stats["submits"] == 1
    upstream_ids = set(stats["tasks"])
    assert task_id not in upstream_ids
    # What went upstream is the client's input with defaults filled in.
    (forwarded,) = stats["tasks"].values()
    assert forwarded["input"]["prompt"] == "a cozy cyberpunk cafe with neon lights"
