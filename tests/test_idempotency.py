"""Idempotency-Key: one key, one team, 24 hours -> one task, whatever the retries."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import Client, SimulatorProcess, t2i

DAY_MS = 24 * 3600 * 1000


async def task_ids(client: Client) -> list[str]:
    return [t["taskId"] for t in (await client.admin("/admin/tasks"))["tasks"]]


def age_keys(db: Path, ms: int) -> None:
    """Move every stored Idempotency-Key back in time, as if `ms` had passed."""
    conn = sqlite3.connect(db, timeout=5)
    try:
        with conn:
            conn.execute("UPDATE idempotency SET created_ms = created_ms - ?", (ms,))
    finally:
        conn.close()


async def test_same_key_same_body_returns_the_first_task_and_creates_nothing(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    key = {"Idempotency-Key": "order-1"}
    code, body, headers = await client.submit(t2i("an idempotent tree"), headers=key)
    assert code == 200
    first = body["data"]["taskId"]
    assert headers["X-Gateway-Cache"] == "miss"

    # A retry while the task is in flight, and another after it is done.
    code, body, headers = await client.submit(t2i("an idempotent tree"), headers=key)
    assert code == 200 and body["data"]["taskId"] == first
    assert headers["X-Gateway-Cache"] == "miss"  # the first answer's, replayed
    await client.wait_final(first)
    # The same body in another JSON formatting and key order is the same body.
    raw = (b'{ "input": { "prompt": "an idempotent tree", "mode": "text-to-image" },\n'
           b'  "request_type": "async" }')
    code, body, headers = await client.submit(None, raw=raw, headers=key)
    assert code == 200 and body["data"]["taskId"] == first
    assert headers["X-Gateway-Idempotent-Replay"] == "true"

    assert await task_ids(client) == [first]
    assert (await sim.stats())["submits"] == 1
    row = {t["name"]: t for t in (await client.admin("/admin/teams"))["teams"]}["alpha"]
    assert row["spent_usd"] == 0.10  # charged once, not once per retry
    assert row["cache_hits"] == 0


async def test_same_key_different_body_is_409_and_creates_nothing(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    key = {"Idempotency-Key": "order-2"}
    first = await client.submit_ok(t2i("the first body"), headers=key)

    for other in (
        t2i("a different body"),
        t2i("the first body", aspect_ratio="3:2"),
        {**t2i("the first body"), "provider": "official"},
    ):
        code, body, _ = await client.submit(other, headers=key)
        assert code == 409, body
        assert body["code"] == 409
        assert "order-2" in body["data"]["error"]
        assert "different request body" in body["data"]["error"]

    await client.wait_final(first)
    assert await task_ids(client) == [first]
    assert (await sim.stats())["submits"] == 1


async def test_keys_belong_to_one_team(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    alpha = Client(http, gw.url, "key-alpha")
    beta = Client(http, gw.url, "key-beta")
    key = {"Idempotency-Key": "shared-name"}
    alpha_task = await alpha.submit_ok(t2i("alpha's picture"), headers=key)
    # Another team using the same key string is a different key: its own task, no 409.
    beta_task = await beta.submit_ok(t2i("beta's picture"), headers=key)
    assert beta_task != alpha_task
    code, _ = await beta.status(alpha_task)
    assert code == 404  # and it never sees alpha's task
    await alpha.wait_final(alpha_task)
    await beta.wait_final(beta_task)
    assert (await sim.stats())["submits"] == 2


async def test_concurrent_retries_with_one_key_make_one_task(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    key = {"Idempotency-Key": "burst"}
    results = await asyncio.gather(
        *(client.submit(t2i("a burst of retries"), headers=key) for _ in range(20))
    )
    assert {code for code, _, _ in results} == {200}
    ids = {body["data"]["taskId"] for _, body, _ in results}
    assert len(ids) == 1
    (only,) = ids
    assert (await client.wait_final(only))["state"] == "success"
    assert await task_ids(client) == [only]
    assert (await sim.stats())["submits"] == 1


async def test_key_survives_a_restart(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    key = {"Idempotency-Key": "durable"}
    first = await client.submit_ok(t2i("a durable request"), headers=key)
    await client.wait_final(first)
    gw.kill9()
    gw.start()
    async with aiohttp.ClientSession() as session:
        client = Client(session, gw.url, "key-alpha")
        assert await client.submit_ok(t2i("a durable request"), headers=key) == first
        code, _, _ = await client.submit(t2i("another request"), headers=key)
        assert code == 409
        assert await task_ids(client) == [first]
    assert (await sim.stats())["submits"] == 1


async def test_key_is_free_again_after_24_hours(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    key = {"Idempotency-Key": "daily-report"}
    monday = await client.submit_ok(t2i("monday's report"), headers=key)
    await client.wait_final(monday)

    age_keys(gw.db, DAY_MS - 60_000)  # 23 h 59 min later: still the same key
    code, _, _ = await client.submit(t2i("tuesday's report"), headers=key)
    assert code == 409

    age_keys(gw.db, 120_000)  # now past 24 h
    tuesday = await client.submit_ok(t2i("tuesday's report"), headers=key)
    assert tuesday != monday
    # The key now stands for the new request.
    assert await client.submit_ok(t2i("tuesday's report"), headers=key) == tuesday
    await client.wait_final(tuesday)
    assert (await sim.stats())["submits"] == 2


async def test_key_on_a_cache_hit_replays_the_hit(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    await client.wait_final(await client.submit_ok(t2i("an often asked picture")))

    key = {"Idempotency-Key": "hit-1"}
    code, body, headers = await client.submit(t2i("an often asked picture"), headers=key)
    assert code == 200 and headers["X-Gateway-Cache"] == "hit"
    hit = body["data"]["taskId"]
    code, body, headers = await client.submit(t2i("an often asked picture"), headers=key)
    assert code == 200 and body["data"]["taskId"] == hit
    assert headers["X-Gateway-Cache"] == "hit"
    assert len(await task_ids(client)) == 2
    row = {t["name"]: t for t in (await client.admin("/admin/teams"))["teams"]}["alpha"]
    assert row["cache_hits"] == 1  # the replay created no second hit
    assert (await sim.stats())["submits"] == 1


async def test_upstream_refusal_lets_the_same_key_try_again(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(upstream={"max_retries": 0})
    client = Client(http, gw.url, "key-alpha")
    key = {"Idempotency-Key": "retry-me"}
    await sim.faults(reject_submits_with=503)
    code, body, _ = await client.submit(t2i("a picture upstream refuses"), headers=key)
    assert code == 502, body
    await sim.faults(reject_submits_with=None)

    # The client was told it failed, so a retry with the key must really run.
    task_id = await client.submit_ok(t2i("a picture upstream refuses"), headers=key)
    assert (await client.wait_final(task_id))["state"] == "success"
    assert await client.submit_ok(t2i("a picture upstream refuses"), headers=key) == task_id


async def test_invalid_keys_are_refused(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    for bad in ("   ", "k" * 256):
        code, body, _ = await client.submit(t2i("a picture"), headers={"Idempotency-Key": bad})
        assert code == 400, body
        assert "Idempotency-Key" in body["data"]["error"]
    assert (await sim.stats())["submits"] == 0


async def test_same_body_to_another_model_is_a_different_request(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(pricing={"grok-image": 0.10, "nano-banana": 0.05})
    client = Client(http, gw.url, "key-alpha")
    key = {"Idempotency-Key": "which-model"}
    body = t2i("the same input for two models")
    code, first, _ = await client.submit(body, model="nano-banana", headers=key)
    assert code == 200, first
    code, second, _ = await client.submit(body, model="grok-image", headers=key)
    # Replaying nano-banana's taskId here would hand out an id that grok-image's
    # statusTask answers with 404; the request is not the same one.
    assert code == 409, second
    code, again, _ = await client.submit(body, model="nano-banana", headers=key)
    assert code == 200 and again["data"]["taskId"] == first["data"]["taskId"]
    assert (await sim.stats())["submits"] == 1
