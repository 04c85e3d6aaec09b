"""Core proxy behaviour through real HTTP: the reference page's quickstart, unchanged, works."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from gateway.tracker import completed_at
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


async def test_complete_time_is_when_upstream_finished_not_when_the_gateway_polled(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    # The gateway first asks 1.5 s after the submit; the task was done after 0.2 s.
    gw = gateways(upstream={"first_poll_seconds": 1.5})
    client = Client(http, gw.url, "key-alpha")
    task_id = await client.submit_ok(t2i("[latency:0.2] done long before the first poll"))
    data = await client.wait_final(task_id)
    assert data["state"] == "success"
    assert 200 <= data["costTime"] < 1000, data
    assert data["costTime"] == data["completeTime"] - data["createTime"]


def test_complete_time_from_a_skewed_upstream_clock_stays_within_the_task_life() -> None:
    created, now = 1_000_000, 1_005_000
    assert completed_at({"completeTime": 1_002_000}, created, now) == 1_002_000
    assert completed_at({"completeTime": 2_000_000}, created, now) == now  # clock ahead
    assert completed_at({"completeTime": 10}, created, now) == created  # clock behind
    for missing in ({}, {"completeTime": None}, {"completeTime": "soon"},
                    {"completeTime": True}, {"completeTime": 1_002_000.5}):
        assert completed_at(missing, created, now) == now
