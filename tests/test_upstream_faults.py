"""Upstream misbehaving: retries, error mapping, status errors, task timeouts.

Faults are injected into the real simulator process through /_sim/faults; the
gateway sees real HTTP errors and dropped connections.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.errors import APIError
from gateway.metrics import Metrics
from gateway.tracker import outcome_from_status
from gateway.upstream import TransientUpstreamError, Upstream
from tests.conftest import Client, GatewayProcess, SimulatorProcess, t2i, team
from tests.test_restart import wait_for_attempts

BUDGET = 1.0


async def team_row(client: Client, name: str = "alpha") -> dict[str, Any]:
    rows = (await client.admin("/admin/teams"))["teams"]
    (row,) = [r for r in rows if r["name"] == name]
    return row  # type: ignore[no-any-return]


async def assert_nothing_held(client: Client) -> None:
    """No money spent or reserved, no lease left: the team is as it started."""
    assert await client.balance() == BUDGET
    row = await team_row(client)
    assert row["spent_usd"] == 0 and row["reserved_usd"] == 0, row
    assert row["in_flight"] == 0, row


Generate = Callable[[web.Request], Awaitable[web.Response]]


@asynccontextmanager
async def fake_apixo(generate: Generate) -> AsyncIterator[str]:
    """A one-route aiohttp app on loopback standing in for APIXO; yields its base URL."""
    app = web.Application()
    app.router.add_post("/api/v1/generateTask/{model}", generate)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/api/v1"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def fake_upstream(
    generate: Generate, *, api_key: str = "k", max_retries: int = 2,
) -> AsyncIterator[Upstream]:
    """The gateway's APIXO client pointed at fake_apixo(generate)."""
    async with fake_apixo(generate) as base_url:
        upstream = Upstream(
            base_url=base_url, api_key=api_key,
            timeout_seconds=2, max_retries=max_retries, metrics=Metrics(),
        )
        try:
            yield upstream
        finally:
            await upstream.close()


async def test_submit_is_retried_on_429_503_and_dropped_connection(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways([team("alpha", budget_usd=BUDGET)])
    alpha = Client(http, gw.url, "key-alpha")
    await sim.faults(submit_errors=[429, 503, "drop"])
    code, body, _ = await alpha.submit(t2i("third time lucky"))
    assert code == 200, body
    stats = await sim.stats()
    assert stats["submit_attempts"] == 4  # three failures, then the one that worked
    assert stats["submits"] == 1
    data = await alpha.wait_final(body["data"]["taskId"])
    assert data["state"] == "success"
    assert round(await alpha.balance(), 6) == BUDGET - 0.1  # charged once, not per attempt


async def test_submit_still_failing_after_max_retries_is_502_and_refunded(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways([team("alpha", budget_usd=BUDGET, max_concurrent=1)],
                  upstream={"max_retries": 2})
    alpha = Client(http, gw.url, "key-alpha")
    await sim.faults(submit_errors=[503, 500, "drop"])
    code, body, _ = await alpha.submit(t2i("upstream is down"))
    assert code == 502 and body["code"] == 502, body
    assert "3 attempts" in body["data"]["error"]
    stats = await sim.stats()
    assert stats["submit_attempts"] == 3 and stats["submits"] == 0  # 1 + max_retries
    await assert_nothing_held(alpha)
    # The failed submit left no concurrency lease behind: with max_concurrent = 1
    # the next submit goes through.
    code, body, _ = await alpha.submit(t2i("upstream is back"))
    assert code == 200, body
    assert (await alpha.wait_final(body["data"]["taskId"]))["state"] == "success"


async def test_a_refusal_whose_refund_cannot_be_written_yet_is_refunded_later(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways([team("alpha", budget_usd=BUDGET, max_concurrent=1)],
                  upstream={"max_retries": 2, "poll_interval_seconds": 0.2})
    alpha = Client(http, gw.url, "key-alpha")
    await sim.faults(submit_errors=[503, 503, 503])
    submit = asyncio.create_task(alpha.submit(t2i("refused while the database is locked")))
    await wait_for_attempts(sim, 1)
    # Another process holds the write lock while upstream refuses, so the
    # refund's first write fails (after the store's 5 s lock timeout).
    locker = sqlite3.connect(gw.db, isolation_level=None, timeout=10)
    try:
        locker.execute("BEGIN IMMEDIATE")
        code, body, _ = await submit
        # The client still learns what upstream said, not that a write failed.
        assert code == 502 and "3 attempts" in body["data"]["error"], body
        locker.execute("ROLLBACK")
    finally:
        locker.close()
    deadline = time.monotonic() + 10
    while (await alpha.balance()) != BUDGET:
        assert time.monotonic() < deadline, "the reservation was never released"
        await asyncio.sleep(0.1)
    await assert_nothing_held(alpha)
    # ... and the lease came back with it: max_concurrent = 1 lets the next one in.
    code, body, _ = await alpha.submit(t2i("after the lock"))
    assert code == 200, body


async def test_upstream_400_passes_through_and_is_not_retried(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways([team("alpha", budget_usd=BUDGET)])
    alpha = Client(http, gw.url, "key-alpha")
    await sim.faults(reject_submits_with=400)
    code, body, _ = await alpha.submit(t2i("upstream dislikes this"))
    assert code == 400, body
    assert body == {"code": 400, "message": "Invalid request",
                    "data": {"error": "Simulated fault: HTTP 400"}}
    assert (await sim.stats())["submit_attempts"] == 1
    await assert_nothing_held(alpha)


async def test_upstream_auth_and_balance_errors_blame_the_gateway(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways([team("alpha", budget_usd=BUDGET)])
    alpha = Client(http, gw.url, "key-alpha")
    # What upstream said, and what the operator must hear about: the gateway's own
    # key or account, never the team's (the team's key was fine).
    expected = {401: ("key", "api_key_env"), 403: ("key", "api_key_env"),
                402: ("balance", "top it up")}
    attempts = 0
    for status, needles in expected.items():
        await sim.faults(reject_submits_with=status)
        code, body, _ = await alpha.submit(t2i(f"refused with {status}"))
        assert code == 502 and body["code"] == 502, body
        error = body["data"]["error"]
        assert "gateway" in error, error
        for needle in needles:
            assert needle in error, error
        assert str(status) in error, error  # upstream's words are kept for the operator
        attempts += 1
        # Not retried: another attempt cannot fix a key or a balance.
        assert (await sim.stats())["submit_attempts"] == attempts
    await assert_nothing_held(alpha)


async def test_model_unknown_upstream_is_502(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    # Priced here by mistake, unknown to APIXO: the operator's config is at fault.
    gw = gateways([team("alpha", budget_usd=BUDGET)],
                  pricing={"grok-image": 0.1, "imaginary-model": 0.2})
    alpha = Client(http, gw.url, "key-alpha")
    code, body, _ = await alpha.submit({"input": {"prompt": "x"}}, model="imaginary-model")
    assert code == 502 and body["code"] == 502, body
    assert "model" in body["data"]["error"]
    await assert_nothing_held(alpha)


async def test_status_errors_never_fail_a_task(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways([team("alpha", budget_usd=BUDGET)])
    alpha = Client(http, gw.url, "key-alpha")
    faults: list[int | str] = [500, 502, 503, 429, "drop", 503]
    await sim.faults(status_errors=faults)
    code, body, _ = await alpha.submit(t2i("[latency:0.1] flaky status endpoint"))
    assert code == 200
    data = await alpha.wait_final(body["data"]["taskId"])
    assert data["state"] == "success", data
    stats = await sim.stats()
    assert stats["status_polls"] >= len(faults) + 1  # every fault consumed, then the answer
    assert stats["submits"] == 1
    assert round(await alpha.balance(), 6) == BUDGET - 0.1


async def test_task_not_final_by_task_timeout_fails_with_timeout_and_is_refunded(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways([team("alpha", budget_usd=BUDGET)], upstream={"task_timeout_seconds": 1})
    alpha = Client(http, gw.url, "key-alpha")
    code, body, _ = await alpha.submit(t2i("[latency:30] a very slow render"))
    assert code == 200
    task_id = body["data"]["taskId"]
    code, reply = await alpha.status(task_id)
    assert reply["data"]["state"] in ("pending", "processing")
    data = await alpha.wait_final(task_id, within=10)
    assert data["state"] == "failed"
    assert data["failCode"] == "Timeout"
    assert data["failMsg"]
    assert "resultJson" not in data or not data["resultJson"]
    assert data["completeTime"] - data["createTime"] >= 1000
    await assert_nothing_held(alpha)
    # The gateway stops polling a task it gave up on (poll_interval is 0.1 s).
    polls = (await sim.stats())["status_polls"]
    await asyncio.sleep(0.5)
    assert (await sim.stats())["status_polls"] == polls
    # A normal task within the timeout still succeeds.
    code, body, _ = await alpha.submit(t2i("a quick one"))
    assert code == 200
    assert (await alpha.wait_final(body["data"]["taskId"]))["state"] == "success"
    assert (await sim.stats())["submits"] == 2


async def test_a_submit_upstream_never_answers_is_a_502_and_not_sent_again(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    # A real socket that accepts and reads but never answers: only
    # request_timeout_seconds ends the call. APIXO may be working on a request
    # it has not answered, so a copy sent after a timeout could become a second
    # task it bills; the client hears after one timeout, not max_retries of them.
    seen: list[bytes] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))  # the request head
        await reader.read()  # until the gateway gives up and closes
        writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        gw = gateways([team("alpha", budget_usd=BUDGET)], upstream={
            "base_url": f"http://127.0.0.1:{port}/api/v1",
            "request_timeout_seconds": 0.3, "max_retries": 3,
        })
        alpha = Client(http, gw.url, "key-alpha")
        started = time.monotonic()
        code, body, _ = await alpha.submit(t2i("into the void"))
        elapsed = time.monotonic() - started
        assert code == 502 and body["code"] == 502, body
        assert body["data"]["error"] == (
            "no answer from APIXO within 0.3 s; the task may exist upstream, "
            "so it was not sent again"
        )
        assert len(seen) == 1 and seen[0].startswith(b"POST /api/v1/generateTask/grok-image")
        assert b"upstream-test-key" in seen[0]  # the gateway's own key, not the team's
        assert b"key-alpha" not in seen[0]
        assert 0.3 <= elapsed < 2, elapsed
        await assert_nothing_held(alpha)


async def test_a_status_poll_upstream_never_answers_is_transient() -> None:
    calls = 0

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        await reader.read()
        writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = Upstream(
        base_url=f"http://127.0.0.1:{port}/api/v1", api_key="k",
        timeout_seconds=0.2, max_retries=2, metrics=Metrics(),
    )
    async with server:
        try:
            # Transient, so the tracker asks again at its next poll (see
            # test_status_errors_never_fail_a_task); a poll changes nothing upstream.
            with pytest.raises(TransientUpstreamError, match=r"from APIXO within 0\.2 s"):
                await upstream.status("grok-image", "up-1")
            assert calls == 1
        finally:
            await upstream.close()


def test_a_malformed_upstream_url_is_refused_before_serving(tmp_path: Path) -> None:
    """A base URL that parses as no URL at all (port 99999) is a config problem named
    by check-config, and the client refuses it rather than failing every call."""
    with pytest.raises(ValueError, match="Port out of range"):
        Upstream(base_url="http://127.0.0.1:99999/api/v1", api_key="k",
                 timeout_seconds=1, max_retries=0, metrics=Metrics())
    config = tmp_path / "config.toml"
    config.write_text('[upstream]\nbase_url = "http://127.0.0.1:99999/api/v1"\n')
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert "upstream.base_url: Port out of range" in result.stdout, result.stdout


async def test_an_upstream_answer_with_nan_in_a_field_is_still_read() -> None:
    """Clients may not send NaN (400), but an APIXO answer is read as json.loads would:
    refusing a field the gateway never looks at would retry a submit APIXO accepted."""
    calls = 0

    async def generate(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(
            text='{"code": 200, "message": "success", "data": {"taskId": "up-1", "cost": NaN}}',
            content_type="application/json",
        )

    async with fake_upstream(generate) as upstream:
        assert await upstream.submit("grok-image", "{}") == "up-1"
    assert calls == 1


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"code\": 200, \"data\"",
    b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\n{}",
], ids=["cut-short", "unreadable-encoding"])
async def test_a_submit_whose_200_answer_is_lost_midway_is_not_sent_again(
    answer: bytes,
) -> None:
    """APIXO said 200 (it created, and bills, the task) but the rest of its answer is
    lost: sending the submit again would create and bill a second task."""
    posts = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal posts
        await reader.readuntil(b"\r\n\r\n")
        posts += 1
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = Upstream(base_url=f"http://127.0.0.1:{port}/api/v1", api_key="k",
                        timeout_seconds=2, max_retries=2, metrics=Metrics())
    try:
        async with server:
            with pytest.raises(APIError) as caught:
                await upstream.submit("grok-image", "{}")
    finally:
        await upstream.close()
    assert caught.value.code == 502
    assert "not sent again" in caught.value.error
    assert posts == 1


@pytest.mark.parametrize(("fault", "status", "needle"), [
    # APIXO created the task and answered 200, but the body was cut short: a
    # second submit would be a second billed task.
    ("garbled", 502, "not sent again"),
    # A proxy in front of APIXO answering 400 with a page: the same request would
    # be refused again, so it is the client's 400 at once, not a 502 after retries.
    ("html", 400, "not a JSON object"),
])
async def test_an_unreadable_answer_to_a_submit_is_not_retried(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess,
    fault: str, status: int, needle: str,
) -> None:
    gw = gateways([team("alpha", budget_usd=BUDGET)])
    alpha = Client(http, gw.url, "key-alpha")
    await sim.faults(submit_errors=[fault])
    code, body, _ = await alpha.submit(t2i(f"answered with {fault}"))
    assert code == status, body
    assert needle in body["data"]["error"]
    stats = await sim.stats()
    assert (stats["submit_attempts"], stats["submits"]) == (1, 1 if fault == "garbled" else 0)
    await assert_nothing_held(alpha)


async def test_status_polls_wait_as_long_as_retry_after_says(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    # poll_interval_seconds is 0.1 here; APIXO's 429 asks for 1.5 s of quiet.
    gw = gateways([team("alpha", budget_usd=BUDGET)])
    alpha = Client(http, gw.url, "key-alpha")
    await sim.faults(status_errors=[429], retry_after_seconds=1.5)
    started = time.monotonic()
    task_id = await alpha.submit_ok(t2i("[latency:0.05] asked to wait"))
    data = await alpha.wait_final(task_id)
    assert data["state"] == "success"
    assert time.monotonic() - started >= 1.5
    assert (await sim.stats())["status_polls"] == 2


async def test_the_upstream_key_never_reaches_a_client() -> None:
    """Whatever an error page echoes back, the gateway's own key is not passed on."""
    async def generate(request: web.Request) -> web.Response:
        echoed = request.headers["Authorization"]
        status = 400 if "bad" in await request.text() else 500
        return web.json_response(
            {"code": status, "message": "Error", "data": {"error": f"you sent {echoed}"}},
            status=status,
        )

    async with fake_upstream(
        generate, api_key="sk-secret-upstream-key", max_retries=0
    ) as upstream:
        for body in ('{"bad": 1}', "{}"):
            try:
                await upstream.submit("grok-image", body)
            except APIError as exc:
                assert "sk-secret-upstream-key" not in exc.error, exc.error
                assert "[upstream key]" in exc.error
            else:
                raise AssertionError("an error answer was accepted")


async def test_a_long_retry_after_ends_the_submit_with_a_502_that_says_when(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    # APIXO asks for 30 s of quiet; the client is not kept waiting that long
    # (request_timeout_seconds is 5 here): it gets the 502 at once, with when.
    gw = gateways([team("alpha", budget_usd=BUDGET)])
    alpha = Client(http, gw.url, "key-alpha")
    await sim.faults(submit_errors=[503, 503], retry_after_seconds=30)
    started = time.monotonic()
    code, body, headers = await alpha.submit(t2i("during an outage"))
    assert code == 502, body
    assert time.monotonic() - started < 3
    assert headers["Retry-After"] == "30"
    assert (await sim.stats())["submit_attempts"] == 1
    await assert_nothing_held(alpha)


async def test_resumed_polls_are_spread_not_fired_at_once(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    # 30 tasks in flight, all overdue for a poll when the gateway comes back:
    # APIXO sees them over an interval (2 s here), not in one burst.
    gw = gateways([team("alpha", budget_usd=10.0)], upstream={"poll_interval_seconds": 2})
    alpha = Client(http, gw.url, "key-alpha")
    for i in range(30):
        await alpha.submit_ok(t2i(f"[latency:60] long render {i}"))
    gw.kill9()
    await asyncio.sleep(0.3)
    gw.start()
    seen = [(await sim.stats())["status_polls"]]
    for _ in range(12):  # 2.4 s in 0.2 s steps
        await asyncio.sleep(0.2)
        seen.append((await sim.stats())["status_polls"])
    steps = [b - a for a, b in itertools.pairwise(seen)]
    assert sum(steps) >= 26, steps  # (almost) every task polled once in the interval
    assert max(steps) <= 12, steps  # and no step carries most of them


def test_a_success_keeps_upstreams_own_result_json() -> None:
    # Other models may put more than resultUrls in it, spaced their own way.
    raw = '{"resultUrls": ["https://cdn.example/a.png", "https://cdn.example/b.png"], ' \
          '"seed": 42, "revisedPrompt": "a cat, watercolour"}'
    outcome = outcome_from_status(
        {"state": "success", "resultJson": raw, "completeTime": 1_500}, 2_000, created_ms=1_000
    )
    assert outcome is not None
    assert (outcome.state, outcome.result_json, outcome.images) == ("success", raw, 2)
    assert outcome.complete_ms == 1_500


@pytest.mark.parametrize("result_json", [
    None, {"resultUrls": ["https://cdn.example/a.png"]}, "not json", "[]", '{"resultUrls": []}',
    '{"resultUrls": "https://cdn.example/a.png"}', '{"urls": ["https://cdn.example/a.png"]}',
])
def test_a_success_without_usable_result_urls_is_a_failure_that_says_so(
    result_json: Any,
) -> None:
    outcome = outcome_from_status(
        {"state": "success", "resultJson": result_json}, 2_000, created_ms=1_000
    )
    assert outcome is not None
    assert outcome.state == "failed" and outcome.fail_code == "InvalidUpstreamResult"
    assert outcome.images == 0 and outcome.result_json is None
    assert "resultUrls" in (outcome.fail_msg or "")


def test_what_upstream_says_is_always_storable_even_with_a_lone_surrogate() -> None:
    # "\ud83d" in upstream's JSON decodes to a lone surrogate, which SQLite
    # refuses: stored as given, the settle failed on every retry and the task,
    # its reservation and its slot stayed stuck.
    raw = '{"resultUrls": ["https://cdn.example/a.png"], "revisedPrompt": "a cat \ud83d"}'
    outcome = outcome_from_status({"state": "success", "resultJson": raw}, 2_000, created_ms=1)
    assert outcome is not None and outcome.state == "success"
    assert outcome.result_json is not None
    outcome.result_json.encode()  # no UnicodeEncodeError
    assert json.loads(outcome.result_json) == json.loads(raw)

    failed = outcome_from_status(
        {"state": "failed", "failCode": "Odd\udc00", "failMsg": "broken \ud83d text"},
        2_000, created_ms=1,
    )
    assert failed is not None
    assert (failed.fail_code, failed.fail_msg) == ("Odd\\udc00", "broken \\ud83d text")


async def test_an_upstream_refusal_quoting_a_lone_surrogate_is_refunded(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # Upstream quotes the prompt back; its "\ud83d" decodes to a lone surrogate,
    # which SQLite refused: the refund failed on every retry, holding the
    # reservation and the slot until a restart.
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response(
            {"code": 400, "message": "Invalid request", "data": {"error": "bad prompt \ud83d"}},
            status=400,
        )

    async with fake_apixo(refuse) as base_url:
        gw = GatewayProcess(tmp_path, base_url,
                            [team("alpha", budget_usd=BUDGET, max_concurrent=1)])
        try:
            await asyncio.to_thread(gw.start)
            alpha = Client(http, gw.url, "key-alpha")
            code, body, _ = await alpha.submit(t2i("bad prompt"))
            assert code == 400, body
            await assert_nothing_held(alpha)
            assert not [line for line in gw.log_lines() if "settling" in line.get("msg", "")]
        finally:
            gw.stop()
