"""The dedupe cache through real HTTP: hits, joining in-flight work, scope, TTL, the sweep, money.

Every test runs the gateway and the APIXO simulator as real processes on
loopback with a real SQLite file; the simulator's counters say how many tasks
really went upstream.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.cache import ResultCache
from gateway.config import ConfigError, parse_config
from gateway.store import CacheEntry, Store
from tests.conftest import Client, GatewayProcess, SimulatorProcess, t2i, team
from tests.test_budget import until

PRICE = 0.10
# Long enough that requests sent right after the leader's submit answer still
# find it in flight, short enough to keep each test around a second.
IN_FLIGHT = "[latency:0.8]"


# -- helpers ------------------------------------------------------------------------


async def submit_many(
    client: Client, body: dict[str, Any], n: int, headers: dict[str, str] | None = None
) -> list[tuple[int, dict[str, Any], Any]]:
    return list(await asyncio.gather(*(client.submit(body, headers=headers) for _ in range(n))))


async def accepted(
    client: Client, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[str, str]:
    """Submit, insist on 200, return (taskId, X-Gateway-Cache)."""
    code, payload, hdrs = await client.submit(body, headers=headers)
    assert code == 200, payload
    return payload["data"]["taskId"], hdrs["X-Gateway-Cache"]


async def finals(client: Client, task_ids: list[str]) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(client.wait_final(t) for t in task_ids)))


async def scrape(http: aiohttp.ClientSession, gw: GatewayProcess) -> dict[tuple[Any, ...], float]:
    async with http.get(gw.url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    samples: dict[tuple[Any, ...], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric(samples: dict[tuple[Any, ...], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def teams_by_name(client: Client) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in (await client.admin("/admin/teams"))["teams"]}


def db_query(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read the gateway's SQLite file from outside, as an operator would."""
    conn = sqlite3.connect(db, timeout=5)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


async def wait_cache_rows(db: Path, n: int, failure: str, within: float = 5.0) -> None:
    """Until the cache table holds `n` rows: only the background sweep changes it here."""
    deadline = time.monotonic() + within
    while db_query(db, "SELECT COUNT(*) FROM cache") != [(n,)]:
        assert time.monotonic() < deadline, failure
        await asyncio.sleep(0.1)


def urls(data: dict[str, Any]) -> list[str]:
    result: list[str] = json.loads(data["resultJson"])["resultUrls"]
    return result


def test_defaults_match_the_contract() -> None:
    cache = parse_config({}).cache
    assert cache.enabled is True
    assert cache.ttl_seconds == 14 * 24 * 3600
    assert cache.scope == "global"
    assert cache.memory_entries > 0 and cache.max_entries > 0
    assert cache.sweep_interval_seconds == 300
    tuned = parse_config({"cache": {"sweep_interval_seconds": 0.5, "scope": "team"}}).cache
    assert (tuned.sweep_interval_seconds, tuned.scope) == (0.5, "team")
    with pytest.raises(ConfigError) as err:
        parse_config({"cache": {"sweep_interval_seconds": 0, "scope": "teams"}})
    assert any(p.startswith("cache.sweep_interval_seconds:") for p in err.value.problems)
    assert any(p.startswith("cache.scope:") for p in err.value.problems)


async def test_memory_front_is_bounded_and_honours_expiry(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "front.db"))
    await store.open()
    try:
        front = ResultCache(store, memory_entries=2, ttl_ms=3_600_000)
        now = 1_000_000
        for key in ("a", "b", "c"):
            front.remember(CacheEntry(key, '{"resultUrls":["u"]}', 1, f"t-{key}", now + 1000))
        # Least recently used goes first; the bound holds.
        assert front.get_hot("a", now) is None
        assert front.get_hot("b", now) is not None and front.get_hot("c", now) is not None
        # An entry past its expiry is never served, from memory or from SQLite.
        assert front.get_hot("c", now + 1000) is None
        assert await front.get("b", now + 1000) is None
    finally:
        await store.close()


# -- joining and hits ---------------------------------------------------------------


async def test_50_identical_concurrent_submits_make_one_upstream_task(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    results = await submit_many(client, t2i("fifty foxes in the snow"), 50)

    assert [code for code, _, _ in results] == [200] * 50
    task_ids = [body["data"]["taskId"] for _, body, _ in results]
    assert len(set(task_ids)) == 50  # every request gets its own gateway taskId
    kinds = [hdrs["X-Gateway-Cache"] for _, _, hdrs in results]
    assert kinds.count("miss") == 1
    assert set(kinds) <= {"miss", "joined", "hit"}

    done = await finals(client, task_ids)
    assert {d["state"] for d in done} == {"success"}
    assert len({d["resultJson"] for d in done}) == 1
    assert len(urls(done[0])) == 1
    assert (await sim.stats())["submits"] == 1

    # One image bought, 49 given away: the team pays once and saved the rest.
    alpha = (await teams_by_name(client))["alpha"]
    assert alpha["spent_usd"] == PRICE
    assert alpha["reserved_usd"] == 0
    assert alpha["images"] == 1
    assert alpha["cache_hits"] == 49
    assert alpha["saved_usd"] == round(49 * PRICE, 6)


async def test_hit_is_a_new_task_already_successful_with_the_same_result(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    first, kind = await accepted(client, t2i("a lighthouse at dusk [images:2]"))
    assert kind == "miss"
    original = await client.wait_final(first)

    second, kind = await accepted(client, t2i("a lighthouse at dusk [images:2]"))
    assert kind == "hit"
    assert second != first
    # Final on the very first poll: no waiting, no upstream call.
    code, body = await client.status(second)
    assert code == 200
    hit = body["data"]
    assert hit["state"] == "success"
    assert hit["resultJson"] == original["resultJson"]
    assert hit["taskId"] == second
    assert len(urls(hit)) == 2
    assert (await sim.stats())["submits"] == 1

    # Two images charged once; the hit saved the price of both.
    alpha = (await teams_by_name(client))["alpha"]
    assert alpha["spent_usd"] == 2 * PRICE
    assert alpha["images"] == 2
    assert alpha["cache_hits"] == 1
    assert alpha["saved_usd"] == 2 * PRICE
    tasks = {t["taskId"]: t for t in (await client.admin("/admin/tasks"))["tasks"]}
    assert tasks[second]["cache"] == "hit"
    assert tasks[second]["charged_usd"] == 0
    assert tasks[first]["charged_usd"] == 2 * PRICE


async def test_leader_failure_fails_every_joined_task_and_nobody_pays(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(teams=[team("alpha"), team("beta")])
    alpha = Client(http, gw.url, "key-alpha")
    beta = Client(http, gw.url, "key-beta")
    body = t2i(f"a forbidden picture [fail:SensitiveContent] {IN_FLIGHT}")
    leader, kind = await accepted(alpha, body)
    assert kind == "miss"
    joined = await asyncio.gather(
        *(accepted(alpha, body) for _ in range(5)), *(accepted(beta, body) for _ in range(4))
    )
    assert {k for _, k in joined} == {"joined"}

    alpha_ids = [leader] + [t for t, _ in joined[:5]]
    beta_ids = [t for t, _ in joined[5:]]
    done = await finals(alpha, alpha_ids) + await finals(beta, beta_ids)
    assert {d["state"] for d in done} == {"failed"}
    assert {d["failCode"] for d in done} == {"SensitiveContent"}
    assert len({d["failMsg"] for d in done}) == 1
    assert (await sim.stats())["submits"] == 1

    rows = await teams_by_name(alpha)
    for name in ("alpha", "beta"):
        assert rows[name]["spent_usd"] == 0
        assert rows[name]["reserved_usd"] == 0
        assert rows[name]["saved_usd"] == 0
        assert rows[name]["in_flight"] == 0

    # Failures are never cached: the same request goes upstream again.
    again, kind = await accepted(alpha, body)
    assert kind == "miss"
    assert again not in alpha_ids
    assert (await sim.stats())["submits"] == 2


async def test_a_task_joined_after_upstream_finished_never_ends_before_it_began(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    # Upstream is done in 0.1 s, but the gateway only asks after 1.5 s: a join
    # in between follows a leader whose completeTime is before the join's createTime.
    gw = gateways(upstream={"first_poll_seconds": 1.5})
    client = Client(http, gw.url, "key-alpha")
    body = t2i("a kettle on a stove [latency:0.1]")
    leader, kind = await accepted(client, body)
    assert kind == "miss"
    await asyncio.sleep(0.6)
    joined, kind = await accepted(client, body)
    assert kind == "joined"
    first, second = await finals(client, [leader, joined])
    assert first["state"] == second["state"] == "success"
    assert first["completeTime"] < second["createTime"]  # the case at hand
    assert second["completeTime"] == second["createTime"]
    assert second["costTime"] == 0
    assert first["costTime"] >= 0


async def test_failures_are_not_cached(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    body = t2i("an unlucky drawing [fail:GENERATION_FAILED]")
    for attempt in range(1, 3):
        task_id, kind = await accepted(client, body)
        assert kind == "miss"
        data = await client.wait_final(task_id)
        assert data["state"] == "failed" and data["failCode"] == "GENERATION_FAILED"
        assert (await sim.stats())["submits"] == attempt
    assert db_query(gw.db, "SELECT COUNT(*) FROM cache") == [(0,)]
    # Nothing owed for failed work, nothing counted as saved.
    row = (await teams_by_name(client))["alpha"]
    assert (row["spent_usd"], row["reserved_usd"], row["saved_usd"]) == (0, 0, 0)


async def test_identical_requests_share_an_upstream_refusal(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    # Waiting behind a leader whose upstream submit fails must not turn into one
    # upstream attempt (with its retries) per waiting request, one after another.
    gw = gateways(upstream={"max_retries": 1})
    client = Client(http, gw.url, "key-alpha")
    await sim.faults(reject_submits_with=503)
    started = time.monotonic()
    results = await submit_many(client, t2i("refused together"), 10)
    elapsed = time.monotonic() - started
    assert [code for code, _, _ in results] == [502] * 10, [b for _, b, _ in results]
    assert len({body["data"]["error"] for _, body, _ in results}) == 1
    # Every refused submit still says what the cache decided.
    kinds = sorted(hdrs.get("X-Gateway-Cache", "") for _, _, hdrs in results)
    assert kinds == ["joined"] * 9 + ["miss"]
    stats = await sim.stats()
    assert stats["submit_attempts"] == 2  # one request, retried once
    assert elapsed < 5
    row = (await teams_by_name(client))["alpha"]
    assert (row["spent_usd"], row["reserved_usd"], row["in_flight"]) == (0, 0, 0)

    # A refusal is not cached either: once upstream is back, the request goes through.
    await sim.faults(reject_submits_with=None)
    task_id, kind = await accepted(client, t2i("refused together"))
    assert kind == "miss"
    assert (await client.wait_final(task_id))["state"] == "success"


async def test_joined_tasks_do_not_take_concurrency_slots(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(teams=[team("alpha", max_concurrent=1)])
    client = Client(http, gw.url, "key-alpha")
    body = t2i(f"ten identical owls {IN_FLIGHT}")
    results = await submit_many(client, body, 10)
    assert [code for code, _, _ in results] == [200] * 10, [b for _, b, _ in results]
    kinds = sorted(hdrs["X-Gateway-Cache"] for _, _, hdrs in results)
    assert kinds == ["joined"] * 9 + ["miss"]

    # The single slot is held by the one upstream task, not by the nine joins.
    row = (await teams_by_name(client))["alpha"]
    assert row["in_flight"] == 1
    code, refused, headers = await client.submit(t2i("something else entirely"))
    assert code == 429, refused
    assert "max_concurrent" in refused["data"]["error"]
    assert int(headers["Retry-After"]) >= 1

    done = await finals(client, [b["data"]["taskId"] for _, b, _ in results])
    assert {d["state"] for d in done} == {"success"}
    assert len({d["resultJson"] for d in done}) == 1
    assert (await sim.stats())["submits"] == 1
    assert (await teams_by_name(client))["alpha"]["in_flight"] == 0


async def test_hit_served_when_team_is_out_of_budget(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    # The budget fits exactly one image.
    gw = gateways(teams=[team("alpha", budget_usd=PRICE, budget_period="total")])
    client = Client(http, gw.url, "key-alpha")
    first, _ = await accepted(client, t2i("the only picture we can afford"))
    assert (await client.wait_final(first))["state"] == "success"
    assert await client.balance() == 0

    code, body, headers = await client.submit(t2i("the only picture we can afford"))
    assert code == 200, body
    assert headers["X-Gateway-Cache"] == "hit"
    assert (await client.wait_final(body["data"]["taskId"]))["state"] == "success"

    code, body, _ = await client.submit(t2i("a picture we cannot afford"))
    assert code == 402, body
    assert await client.balance() == 0
    assert (await sim.stats())["submits"] == 1


async def test_hit_served_when_team_is_at_its_concurrency_limit(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(teams=[team("alpha", max_concurrent=1)])
    client = Client(http, gw.url, "key-alpha")
    cached, _ = await accepted(client, t2i("a cached cat"))
    await client.wait_final(cached)
    busy, _ = await accepted(client, t2i(f"a slow dog {IN_FLIGHT}"))  # holds the only slot

    task_id, kind = await accepted(client, t2i("a cached cat"))
    assert kind == "hit"
    assert (await client.wait_final(task_id))["state"] == "success"
    code, body, _ = await client.submit(t2i("a third animal"))
    assert code == 429, body
    assert (await client.wait_final(busy))["state"] == "success"
    assert (await sim.stats())["submits"] == 2


# -- scope, money, metrics ------------------------------------------------------------


async def test_global_scope_joined_teams_pay_nothing_and_see_savings(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(teams=[team("alpha"), team("beta"), team("gamma")], cache={"scope": "global"})
    alpha, beta, gamma = (Client(http, gw.url, f"key-{n}") for n in ("alpha", "beta", "gamma"))
    body = t2i(f"a shared mascot {IN_FLIGHT}")
    leader, kind = await accepted(alpha, body)
    assert kind == "miss"
    (b1, bk), (g1, gk) = await asyncio.gather(accepted(beta, body), accepted(gamma, body))
    assert (bk, gk) == ("joined", "joined")
    done = [await alpha.wait_final(leader), await beta.wait_final(b1), await gamma.wait_final(g1)]
    assert {d["state"] for d in done} == {"success"}
    assert len({d["resultJson"] for d in done}) == 1

    # After it finished, a plain hit from another team.
    b2, kind = await accepted(beta, body)
    assert kind == "hit"
    assert (await beta.wait_final(b2))["resultJson"] == done[0]["resultJson"]
    assert (await sim.stats())["submits"] == 1

    rows = await teams_by_name(alpha)
    assert (rows["alpha"]["spent_usd"], rows["alpha"]["images"]) == (PRICE, 1)
    assert (rows["alpha"]["saved_usd"], rows["alpha"]["cache_hits"]) == (0, 0)
    assert (rows["beta"]["spent_usd"], rows["beta"]["images"]) == (0, 0)
    assert (rows["beta"]["saved_usd"], rows["beta"]["cache_hits"]) == (2 * PRICE, 2)
    assert (rows["gamma"]["spent_usd"], rows["gamma"]["images"]) == (0, 0)
    assert (rows["gamma"]["saved_usd"], rows["gamma"]["cache_hits"]) == (PRICE, 1)

    m = await scrape(http, gw)
    spend, saved = "apixo_gateway_spend_usd_total", "apixo_gateway_saved_usd_total"
    assert metric(m, spend, team="alpha", model="grok-image") == PRICE
    assert metric(m, spend, team="beta", model="grok-image") == 0
    assert metric(m, spend, team="gamma", model="grok-image") == 0
    assert metric(m, saved, team="alpha", model="grok-image") == 0
    assert metric(m, saved, team="beta", model="grok-image") == 2 * PRICE
    assert metric(m, saved, team="gamma", model="grok-image") == PRICE
    lookups = "apixo_gateway_cache_lookups_total"
    assert metric(m, lookups, model="grok-image", result="miss") == 1
    assert metric(m, lookups, model="grok-image", result="joined") == 2
    assert metric(m, lookups, model="grok-image", result="hit") == 1
    assert metric(m, lookups, model="grok-image", result="bypass") == 0


async def test_team_scope_isolates_teams(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(teams=[team("alpha"), team("beta")], cache={"scope": "team"})
    alpha = Client(http, gw.url, "key-alpha")
    beta = Client(http, gw.url, "key-beta")

    # Finished work is not shared across teams...
    a1, kind = await accepted(alpha, t2i("our logo"))
    assert kind == "miss"
    await alpha.wait_final(a1)
    b1, kind = await accepted(beta, t2i("our logo"))
    assert kind == "miss"
    await beta.wait_final(b1)
    assert (await sim.stats())["submits"] == 2
    # ...and neither is work in flight.
    body = t2i(f"our slogan {IN_FLIGHT}")
    (a2, ak), (b2, bk) = await asyncio.gather(accepted(alpha, body), accepted(beta, body))
    assert (ak, bk) == ("miss", "miss")
    assert (await sim.stats())["submits"] == 4

    # Within a team the cache still works.
    a3, kind = await accepted(alpha, t2i("our logo"))
    assert kind == "hit"
    assert (await alpha.wait_final(a3))["resultJson"] == (await alpha.wait_final(a1))["resultJson"]
    b3, kind = await accepted(beta, t2i("our logo"))
    assert kind == "hit"
    assert (await beta.wait_final(b3))["resultJson"] == (await beta.wait_final(b1))["resultJson"]
    await finals(alpha, [a2])
    await finals(beta, [b2])
    assert (await sim.stats())["submits"] == 4
    rows = await teams_by_name(alpha)
    assert rows["alpha"]["spent_usd"] == rows["beta"]["spent_usd"] == 2 * PRICE


# -- Cache-Control --------------------------------------------------------------------


async def test_no_cache_skips_lookup_and_joining(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    cached, _ = await accepted(client, t2i("a fresh take"))
    old = await client.wait_final(cached)

    # Skips the lookup although a cached result exists.
    fresh, kind = await accepted(client, t2i("a fresh take"), {"Cache-Control": "no-cache"})
    assert kind == "bypass"
    new = await client.wait_final(fresh)
    assert new["state"] == "success"
    assert new["resultJson"] != old["resultJson"]
    assert (await sim.stats())["submits"] == 2

    # Skips joining although an identical task is in flight.
    body = t2i(f"a fresh slow take {IN_FLIGHT}")
    leader, kind = await accepted(client, body)
    assert kind == "miss"
    own, kind = await accepted(client, body, {"Cache-Control": "max-age=0, no-cache"})
    assert kind == "bypass"
    await finals(client, [leader, own])
    assert (await sim.stats())["submits"] == 4

    m = await scrape(http, gw)
    assert metric(m, "apixo_gateway_cache_lookups_total", model="grok-image",
                  result="bypass") == 2
    # The team paid for every upstream task it asked for.
    assert (await teams_by_name(client))["alpha"]["spent_usd"] == 4 * PRICE


async def test_a_plain_request_joins_a_no_cache_task_in_flight(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    # no-cache is about the request that sends it: the task it starts is as good
    # an answer as a miss's for an identical request without the header.
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    body = t2i(f"asked for fresh {IN_FLIGHT}")
    fresh, kind = await accepted(client, body, {"Cache-Control": "no-cache"})
    assert kind == "bypass"
    joined, kind = await accepted(client, body)
    assert kind == "joined"
    # Another no-cache request still skips joining it.
    own, kind = await accepted(client, body, {"Cache-Control": "no-cache"})
    assert kind == "bypass"
    first, second, third = await finals(client, [fresh, joined, own])
    assert first["state"] == second["state"] == third["state"] == "success"
    assert second["resultJson"] == first["resultJson"]
    assert (await sim.stats())["submits"] == 2
    assert (await teams_by_name(client))["alpha"]["spent_usd"] == 2 * PRICE


async def test_no_cache_result_refreshes_the_cache(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    # no-cache only skips the lookup; without no-store the fresh result is kept.
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    fresh, kind = await accepted(client, t2i("a refreshed view"), {"Cache-Control": "no-cache"})
    assert kind == "bypass"
    data = await client.wait_final(fresh)
    hit, kind = await accepted(client, t2i("a refreshed view"))
    assert kind == "hit"
    assert (await client.wait_final(hit))["resultJson"] == data["resultJson"]
    assert (await sim.stats())["submits"] == 1


async def test_no_store_keeps_the_result_out_of_the_cache(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    secret, kind = await accepted(client, t2i("a private sketch"), {"Cache-Control": "no-store"})
    assert kind == "miss"
    assert (await client.wait_final(secret))["state"] == "success"
    assert db_query(gw.db, "SELECT COUNT(*) FROM cache") == [(0,)]

    again, kind = await accepted(client, t2i("a private sketch"))
    assert kind == "miss"
    stored = await client.wait_final(again)
    assert (await sim.stats())["submits"] == 2
    assert db_query(gw.db, "SELECT COUNT(*) FROM cache") == [(1,)]

    # A no-store request may still be answered from the cache.
    third, kind = await accepted(client, t2i("a private sketch"), {"Cache-Control": "no-store"})
    assert kind == "hit"
    assert (await client.wait_final(third))["resultJson"] == stored["resultJson"]
    assert (await sim.stats())["submits"] == 2


async def test_cache_disabled_bypasses_everything(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(cache={"enabled": False})
    client = Client(http, gw.url, "key-alpha")
    body = t2i(f"no cache here {IN_FLIGHT}")
    both = await asyncio.gather(accepted(client, body), accepted(client, body))
    assert [k for _, k in both] == ["bypass", "bypass"]
    await finals(client, [t for t, _ in both])
    _, kind = await accepted(client, body)
    assert kind == "bypass"
    assert (await sim.stats())["submits"] == 3
    assert db_query(gw.db, "SELECT COUNT(*) FROM cache") == [(0,)]


# -- durability, TTL, sweep -------------------------------------------------------------


async def test_cache_survives_a_restart(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    client = Client(http, gw.url, "key-alpha")
    first, _ = await accepted(client, t2i("a durable monument"))
    original = await client.wait_final(first)

    async def hit_after_restart() -> dict[tuple[Any, ...], float]:
        # A new session: pooled connections to the old process are dead.
        async with aiohttp.ClientSession() as session:
            client = Client(session, gw.url, "key-alpha")
            # The in-memory front is empty now; SQLite answers.
            again, kind = await accepted(client, t2i("a durable monument"))
            assert kind == "hit"
            assert (await client.wait_final(again))["resultJson"] == original["resultJson"]
            assert (await sim.stats())["submits"] == 1
            return await scrape(session, gw)

    assert gw.terminate() == 0
    gw.start()
    await hit_after_restart()
    # Also after a crash (kill -9), not only after a clean stop.
    gw.kill9()
    gw.start()
    m = await hit_after_restart()
    # Savings survive in the dashboards' counters too.
    assert metric(m, "apixo_gateway_saved_usd_total", team="alpha", model="grok-image") == (
        2 * PRICE
    )


async def test_work_in_flight_at_a_crash_is_still_joined_after_restart(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(teams=[team("alpha"), team("beta")])
    body = t2i("a picture that outlives the gateway [latency:2.5]")
    alpha = Client(http, gw.url, "key-alpha")
    leader, kind = await accepted(alpha, body)
    assert kind == "miss"
    before, kind = await accepted(Client(http, gw.url, "key-beta"), body)
    assert kind == "joined"
    gw.kill9()
    gw.start()

    async with aiohttp.ClientSession() as session:
        alpha = Client(session, gw.url, "key-alpha")
        beta = Client(session, gw.url, "key-beta")
        after, kind = await accepted(beta, body)
        assert kind == "joined"
        done = [await alpha.wait_final(leader), await beta.wait_final(before),
                await beta.wait_final(after)]
        assert {d["state"] for d in done} == {"success"}
        assert len({d["resultJson"] for d in done}) == 1
        assert (await sim.stats())["submits"] == 1
        rows = await teams_by_name(alpha)
    assert (rows["alpha"]["spent_usd"], rows["alpha"]["saved_usd"]) == (PRICE, 0)
    assert (rows["beta"]["spent_usd"], rows["beta"]["saved_usd"]) == (0, 2 * PRICE)


async def test_entries_expire_after_ttl(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(cache={"ttl_seconds": 1})
    client = Client(http, gw.url, "key-alpha")
    first, _ = await accepted(client, t2i("a fleeting moment"))
    await client.wait_final(first)
    second, kind = await accepted(client, t2i("a fleeting moment"))
    assert kind == "hit"

    await asyncio.sleep(1.2)
    third, kind = await accepted(client, t2i("a fleeting moment"))
    assert kind == "miss"
    assert (await client.wait_final(third))["state"] == "success"
    assert (await sim.stats())["submits"] == 2
    # The expired hit's task keeps its result: expiry only stops new hits.
    assert (await client.wait_final(second))["state"] == "success"


async def test_background_sweep_deletes_expired_rows_without_any_read(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(cache={"ttl_seconds": 1, "sweep_interval_seconds": 0.2})
    client = Client(http, gw.url, "key-alpha")
    ids = [t for t, _ in await asyncio.gather(
        accepted(client, t2i("ephemeral one")), accepted(client, t2i("ephemeral two"))
    )]
    await finals(client, ids)
    assert db_query(gw.db, "SELECT COUNT(*) FROM cache") == [(2,)]

    # No request touches those keys again; only the background sweep can remove them.
    await wait_cache_rows(gw.db, 0, "expired cache rows were never swept")
    assert (await sim.stats())["submits"] == 2


async def test_background_sweep_keeps_at_most_max_entries(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(cache={"max_entries": 2, "sweep_interval_seconds": 0.2})
    client = Client(http, gw.url, "key-alpha")
    ids = []
    for prompt in ("oldest", "middle", "newest"):
        task_id, _ = await accepted(client, t2i(prompt))
        await client.wait_final(task_id)
        ids.append(task_id)
    await wait_cache_rows(gw.db, 2, "the sweep did not enforce max_entries")
    # The oldest entry went first.
    kept = {task_id for (task_id,) in db_query(gw.db, "SELECT task_id FROM cache")}
    assert kept == set(ids[1:])
    _, kind = await accepted(client, t2i("newest"))
    assert kind == "hit"
    assert (await sim.stats())["submits"] == 3
    # Memory agrees with SQLite, so the answer is the same before and after a
    # restart: the swept entry is a miss.
    _, kind = await accepted(client, t2i("oldest"))
    assert kind == "miss"


async def test_a_lowered_ttl_applies_to_results_already_cached(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(cache={"ttl_seconds": 3600})
    client = Client(http, gw.url, "key-alpha")
    first, kind = await accepted(client, t2i("cached under an hour"))
    assert kind == "miss"
    await client.wait_final(first)
    assert (await accepted(client, t2i("cached under an hour")))[1] == "hit"
    gw.config["cache"]["ttl_seconds"] = 1
    gw.write_config()
    gw.hup()

    async def reloaded() -> bool:
        return "SIGHUP: reloaded" in gw.log.read_text()

    await until(reloaded, within=10)
    await asyncio.sleep(1.5)
    # Older than the TTL now configured: not within ttl_seconds, so not a hit.
    assert (await accepted(client, t2i("cached under an hour")))[1] == "miss"
    assert (await sim.stats())["submits"] == 2
