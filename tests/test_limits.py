"""Concurrency leases, the sliding request-rate window and the global upstream cap.

The arithmetic of Retry-After and of the sliding window is checked on
gateway.limits.Limits directly with explicit clocks (a minute is too long for
a test); everything else goes through real HTTP.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from gateway.config import TeamConfig
from gateway.errors import APIError
from gateway.limits import Limits
from tests.conftest import Client, t2i, team
from tests.test_budget import (
    admin_team,
    check_ledger,
    metric_samples,
    reload_team,
    until,
    wait_quiet,
)


def _team(name: str, **limits: Any) -> TeamConfig:
    return TeamConfig(name=name, key_hashes=(), **limits)


def _refused(call: Any) -> APIError:
    with pytest.raises(APIError) as info:
        call()
    assert info.value.code == 429
    return info.value


# -- the arithmetic ---------------------------------------------------------------


def test_rate_window_slides_and_retry_after_counts_down() -> None:
    limits = Limits(global_max=100, expected_task_seconds=15)
    alpha = _team("alpha", requests_per_minute=3)
    for now in (0.0, 30.0, 45.0):
        limits.check_rate(alpha, now=now)
    err = _refused(lambda: limits.check_rate(alpha, now=50.0))
    assert err.reason == "rate_limit" and err.headers["Retry-After"] == "10"
    assert "3 requests per minute" in err.error
    assert _refused(lambda: limits.check_rate(alpha, now=59.5)).headers["Retry-After"] == "1"
    # Refused requests take no place in the window: at 60 s the first submit has
    # slid out and exactly one more fits; a fixed minute would have let in three.
    limits.check_rate(alpha, now=60.0)
    err = _refused(lambda: limits.check_rate(alpha, now=61.0))
    assert err.headers["Retry-After"] == "29"  # until the 30 s submit slides out
    limits.check_rate(alpha, now=90.0)
    # Another team has its own window.
    for now in (61.0, 61.0, 61.0):
        limits.check_rate(_team("beta", requests_per_minute=3), now=now)
    limits.check_rate(_team("unlimited"), now=61.0)


def test_concurrency_retry_after_follows_in_flight_tasks_and_their_durations() -> None:
    limits = Limits(global_max=3, expected_task_seconds=20)
    alpha = _team("alpha", max_concurrent=1)
    limits.acquire(alpha, now=100.0)
    err = _refused(lambda: limits.acquire(alpha, now=105.0))
    assert err.reason == "concurrency" and err.headers["Retry-After"] == "15"
    assert "max_concurrent is 1" in err.error
    assert _refused(lambda: limits.acquire(alpha, now=118.5)).headers["Retry-After"] == "2"
    # Overdue: the slot may free any moment, so the client is told the minimum.
    assert _refused(lambda: limits.acquire(alpha, now=150.0)).headers["Retry-After"] == "1"
    # A finished task teaches the estimate: 0.8 * 20 + 0.2 * 10 = 18 s.
    limits.release("alpha", duration=10.0)
    limits.acquire(alpha, now=200.0)
    assert _refused(lambda: limits.acquire(alpha, now=205.0)).headers["Retry-After"] == "13"
    # The global cap counts every team's leases; Retry-After follows the oldest.
    beta = _team("beta")
    limits.acquire(beta, now=201.0)
    limits.acquire(beta, now=202.0)
    err = _refused(lambda: limits.acquire(_team("gamma"), now=210.0))
    assert err.reason == "busy" and "upstream.max_concurrent is 3" in err.error
    assert err.headers["Retry-After"] == "8"  # 200 + 18 - 210
    assert limits.global_in_flight == 3 and limits.in_flight("beta") == 2
    limits.release("beta")
    limits.acquire(_team("gamma"), now=211.0)
    # Releasing more than was taken never drives a count negative.
    for _ in range(3):
        limits.release("gamma")
    assert limits.in_flight("gamma") == 0 and limits.global_in_flight == 2


# -- through HTTP -------------------------------------------------------------------


async def test_max_concurrent_counts_upstream_tasks_until_they_are_final(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(teams=[team("alpha", max_concurrent=2)])
    client = Client(http, gw.url, "key-alpha")
    code, body, _ = await client.submit(t2i("warm the cache"))
    await client.wait_final(body["data"]["taskId"])
    slow = []
    for i in range(2):
        code, body, _ = await client.submit(t2i(f"slow {i} [latency:1.5]"))
        assert code == 200
        slow.append(body["data"]["taskId"])
    code, body, headers = await client.submit(t2i("one too many"))
    assert code == 429 and body["code"] == 429
    assert "2 tasks in flight" in body["data"]["error"]
    assert "max_concurrent is 2" in body["data"]["error"]
    assert int(headers["Retry-After"]) >= 1
    # Work that does not go upstream needs no slot: a cache hit and a join.
    code, _, headers = await client.submit(t2i("warm the cache"))
    assert (code, headers["X-Gateway-Cache"]) == (200, "hit")
    code, _, headers = await client.submit(t2i("slow 0 [latency:1.5]"))
    assert (code, headers["X-Gateway-Cache"]) == (200, "joined")
    assert (await admin_team(http, gw.url, "alpha"))["in_flight"] == 2
    samples = await metric_samples(http, gw.url)
    assert samples[("apixo_gateway_tasks_in_flight", "team=alpha")] == 2
    assert samples[("apixo_gateway_rejections_total", "reason=concurrency,team=alpha")] == 1
    # Still refused after a second: a lease lasts as long as the task, not a window.
    await asyncio.sleep(1.0)
    assert (await client.submit(t2i("still too many")))[0] == 429
    for task_id in slow:
        await client.wait_final(task_id)
    await wait_quiet(http, gw.url, "alpha", gw.db)
    assert (await client.submit(t2i("a slot is free")))[0] == 200


async def test_submits_refused_for_concurrency_do_not_use_up_the_rate_limit(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(teams=[team("alpha", max_concurrent=1, requests_per_minute=2)])
    client = Client(http, gw.url, "key-alpha")
    first = await client.submit_ok(t2i("first [latency:1]"))
    # A client honouring Retry-After keeps asking while the slot is taken.
    for _ in range(3):
        code, body, _ = await client.submit(t2i("waits for the slot"))
        assert code == 429 and "max_concurrent is 1" in body["data"]["error"], body
    await client.wait_final(first)
    await wait_quiet(http, gw.url, "alpha", gw.db)
    # The refusals did no work: the minute still has room for the second submit.
    await client.submit_ok(t2i("waits for the slot"))
    code, body, _ = await client.submit(t2i("a third in the minute"))
    assert code == 429 and "2 requests per minute" in body["data"]["error"], body


async def test_retry_after_is_computed_from_current_state(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    # first_poll_seconds seeds the task-duration estimate: 2 s until a slot frees.
    gw = gateways(teams=[team("alpha", max_concurrent=1), team("beta", requests_per_minute=2)],
                  upstream={"first_poll_seconds": 2.0})
    alpha = Client(http, gw.url, "key-alpha")
    assert (await alpha.submit(t2i("holds the only slot")))[0] == 200
    code, _, headers = await alpha.submit(t2i("waits"))
    assert code == 429 and headers["Retry-After"] == "2"
    beta = Client(http, gw.url, "key-beta")
    assert (await beta.submit(t2i("beta one")))[0] == 200
    assert (await beta.submit(t2i("beta two")))[0] == 200
    code, body, headers = await beta.submit(t2i("beta three"))
    assert code == 429 and "2 requests per minute" in body["data"]["error"]
    first = int(headers["Retry-After"])
    assert 58 <= first <= 60
    await asyncio.sleep(1.2)
    code, _, headers = await alpha.submit(t2i("waits"))
    assert code == 429 and headers["Retry-After"] == "1"
    code, _, headers = await beta.submit(t2i("beta three"))
    assert code == 429 and int(headers["Retry-After"]) <= first - 1
    samples = await metric_samples(http, gw.url)
    assert samples[("apixo_gateway_rejections_total", "reason=concurrency,team=alpha")] == 2
    assert samples[("apixo_gateway_rejections_total", "reason=rate_limit,team=beta")] == 2


async def test_every_rejection_reason_is_counted(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(
        teams=[team("solo", max_concurrent=1), team("slow", requests_per_minute=1),
               team("broke", budget_usd=0.0), team("other")],
        upstream={"max_concurrent": 2},
    )
    solo, slow = Client(http, gw.url, "key-solo"), Client(http, gw.url, "key-slow")
    broke, other = Client(http, gw.url, "key-broke"), Client(http, gw.url, "key-other")
    expected = {
        ("none", "unauthorized"): (await Client(http, gw.url, "nope").submit(t2i("x")))[0],
        ("solo", "invalid"): (await solo.submit(t2i("   ")))[0],
        ("broke", "budget"): (await broke.submit(t2i("costs money")))[0],
    }
    assert (await solo.submit(t2i("solo [latency:2]")))[0] == 200
    expected["solo", "concurrency"] = (await solo.submit(t2i("solo again")))[0]
    assert (await slow.submit(t2i("slow [latency:2]")))[0] == 200
    expected["slow", "rate_limit"] = (await slow.submit(t2i("slow again")))[0]
    code, body, headers = await other.submit(t2i("the gateway is full"))
    expected["other", "busy"] = code
    assert "upstream.max_concurrent is 2" in body["data"]["error"]
    assert int(headers["Retry-After"]) >= 1
    assert list(expected.values()) == [401, 400, 402, 429, 429, 429]
    samples = await metric_samples(http, gw.url)
    rejections = {
        labels: value for (name, labels), value in samples.items()
        if name == "apixo_gateway_rejections_total"
    }
    assert {k: v for k, v in rejections.items() if v} == {
        f"reason={r},team={t}": 1.0 for t, r in expected
    }
    # Every reason of every team was exported at 0 before its first rejection,
    # so that first one shows in increase() and rate().
    reasons = ("unauthorized", "invalid", "budget", "concurrency", "rate_limit", "busy")
    for who in ("solo", "slow", "broke", "other"):
        for reason in reasons:
            assert f"reason={reason},team={who}" in rejections


async def test_sighup_lowers_limits_and_a_restart_restores_leases(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(teams=[team("alpha", max_concurrent=3)])
    client = Client(http, gw.url, "key-alpha")
    tasks = [await client.submit_ok(t2i(f"long {i} [latency:2.5]")) for i in range(2)]
    await reload_team(http, gw, "max_concurrent", 2)
    assert (await client.submit(t2i("over the lowered limit")))[0] == 429
    # The leases are the tasks themselves: a crash does not hand out free slots.
    gw.kill9()
    gw.start()
    assert (await admin_team(http, gw.url, "alpha"))["in_flight"] == 2
    code, body, _ = await client.submit(t2i("still over after restart"))
    assert code == 429 and "2 tasks in flight" in body["data"]["error"]
    started = time.monotonic()
    for task_id in tasks:
        assert (await client.wait_final(task_id))["state"] == "success"
    assert time.monotonic() - started < 5
    await wait_quiet(http, gw.url, "alpha", gw.db)
    assert (await client.submit(t2i("free again")))[0] == 200
    check_ledger(gw.db)


async def test_sighup_with_the_config_file_missing_keeps_the_running_config(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(teams=[team("alpha", max_concurrent=3), team("beta")])
    client = Client(http, gw.url, "key-alpha")
    assert (await client.submit(t2i("before the reload")))[0] == 200
    # A deploy tool rewriting the file: it is gone for a moment when the HUP lands.
    gw.config_path.rename(gw.config_path.with_suffix(".away"))
    gw.hup()
    async def refused() -> bool:
        return "config not reloaded" in gw.log.read_text()

    await until(refused, within=10)
    assert "not found" in gw.log.read_text()
    # Not the built-in defaults (no teams): the keys still work.
    assert (await client.submit(t2i("after the reload")))[0] == 200
    assert (await admin_team(http, gw.url, "alpha"))["max_concurrent"] == 3


async def test_sighup_lifting_a_limit_removes_it_from_the_metrics(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(teams=[team("alpha", max_concurrent=3), team("beta", max_concurrent=2)])
    samples = await metric_samples(http, gw.url)
    assert samples["apixo_gateway_team_max_concurrent", "team=alpha"] == 3
    del gw.config["teams"][0]["max_concurrent"]
    await reload_team(http, gw, "budget_usd", 5.0)
    samples = await metric_samples(http, gw.url)
    # The panel's limit line goes away with the limit; beta's stays.
    assert ("apixo_gateway_team_max_concurrent", "team=alpha") not in samples
    assert samples["apixo_gateway_team_max_concurrent", "team=beta"] == 2


async def test_concurrency_retry_after_counts_until_the_gateway_sees_the_outcome(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    # APIXO finishes in 0.1 s but the gateway first looks after 1.5 s: a slot is
    # busy for 1.5 s, and Retry-After must not learn APIXO's 0.1 s instead.
    gw = gateways(teams=[team("alpha"), team("beta", max_concurrent=1)],
                  upstream={"first_poll_seconds": 1.5})
    alpha, beta = Client(http, gw.url, "key-alpha"), Client(http, gw.url, "key-beta")
    warm = [await alpha.submit_ok(t2i(f"quick {i} [latency:0.1]")) for i in range(6)]
    for task_id in warm:
        data = await alpha.wait_final(task_id)
        assert data["costTime"] < 1000  # APIXO's time, shown to the client
    await beta.submit_ok(t2i("holds the only slot [latency:0.1]"))
    code, _, headers = await beta.submit(t2i("waits for it"))
    assert code == 429
    assert headers["Retry-After"] == "2"
