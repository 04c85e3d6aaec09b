"""Restart safety: kill -9 and SIGTERM with work in flight, then start again on the same DB."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    Client,
    GatewayProcess,
    SimulatorProcess,
    free_port,
    render_toml,
    t2i,
    team,
)

BUDGET = 5.0
PRICE = 0.1


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # No keep-alive: a pooled connection to the killed process would fail the first
    # request after the restart, which says nothing about the gateway.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def submit_all(client: Client, prompts: list[str]) -> list[str]:
    ids = []
    for prompt in prompts:
        code, body, _ = await client.submit(t2i(prompt))
        assert code == 200, body
        ids.append(body["data"]["taskId"])
    return ids


async def wait_for_attempts(sim: SimulatorProcess, n: int) -> None:
    async with asyncio.timeout(10):
        while True:
            if (await sim.stats())["submit_attempts"] >= n:
                return
            await asyncio.sleep(0.02)


async def kill9_mid_submit(
    gw: Any, http: aiohttp.ClientSession, sim: SimulatorProcess, client: Client, prompt: str,
    *, attempts: int, headers: dict[str, str] | None = None,
) -> None:
    """Kill the gateway while upstream keeps answering 503 to a submit, then start it again.

    The gateway sits in its retry backoff with the money reserved and no
    upstream id yet; the client's connection dies with the process, as it
    would for a real client. The simulator forgets the remaining 503s first.
    """
    await sim.faults(submit_errors=[503] * 8)
    caught = asyncio.create_task(client.submit(t2i(prompt), headers=headers))
    await wait_for_attempts(sim, attempts)
    gw.kill9()
    with pytest.raises(aiohttp.ClientError):
        await caught
    async with http.post(sim.root + "/_sim/reset") as r:
        assert r.status == 200
    gw.start()


async def retry_is_a_new_attempt(
    client: Client, sim: SimulatorProcess, prompt: str, headers: dict[str, str]
) -> None:
    """The same Idempotency-Key again: a fresh task that succeeds and is paid once."""
    code, body, reply_headers = await client.submit(t2i(prompt), headers=headers)
    assert code == 200, body
    assert "X-Gateway-Idempotent-Replay" not in reply_headers
    data = await client.wait_final(body["data"]["taskId"])
    assert data["state"] == "success", data
    assert (await sim.stats())["submits"] == 1
    assert round(await client.balance(), 6) == BUDGET - PRICE


async def test_kill9_with_tasks_in_flight_resumes_without_resubmitting(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways([team("alpha", budget_usd=BUDGET)])
    alpha = Client(http, gw.url, "key-alpha")
    # Two finish upstream while the gateway is down, two only after it is back.
    ids = await submit_all(alpha, [
        "[latency:0.3] done while down 1", "[latency:0.3] done while down 2",
        "[latency:2.5] done after restart 1", "[latency:2.5] done after restart 2",
    ])
    assert round(await alpha.balance(), 6) == BUDGET - 4 * PRICE  # reserved
    before = await sim.stats()
    assert before["submits"] == before["submit_attempts"] == 4
    gw.kill9()
    await asyncio.sleep(0.5)  # the short tasks finish upstream while nobody watches
    gw.start()
    # Every task is known again as soon as the new process answers.
    for task_id in ids:
        code, reply = await alpha.status(task_id)
        assert code == 200 and reply["data"]["taskId"] == task_id
    for task_id in ids:
        data = await alpha.wait_final(task_id)
        assert data["state"] == "success", data
    after = await sim.stats()
    assert after["submit_attempts"] == 4 and after["submits"] == 4  # never resubmitted
    assert round(await alpha.balance(), 6) == BUDGET - 4 * PRICE  # charged once each
    row = next(r for r in (await alpha.admin("/admin/teams"))["teams"] if r["name"] == "alpha")
    assert row["reserved_usd"] == 0 and row["in_flight"] == 0, row
    assert round(row["spent_usd"], 6) == 4 * PRICE and row["images"] == 4


async def test_kill9_before_upstream_accepted_refunds_and_never_resubmits(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways([team("alpha", budget_usd=BUDGET)], upstream={"max_retries": 8})
    alpha = Client(http, gw.url, "key-alpha")
    # Upstream keeps answering 503, so the gateway sits in its retry backoff with
    # the money reserved and no upstream id yet when it is killed.
    await kill9_mid_submit(gw, http, sim, alpha, "caught mid-submit", attempts=2)
    tasks = (await alpha.admin("/admin/tasks", team="alpha"))["tasks"]
    assert len(tasks) == 1, tasks
    (task,) = tasks
    assert task["state"] == "failed" and task["failCode"] == "GatewayRestart", task
    assert task["charged_usd"] == 0
    assert await alpha.balance() == BUDGET  # the reservation came back
    await asyncio.sleep(0.3)
    stats = await sim.stats()
    assert stats["submit_attempts"] == 0 and stats["status_polls"] == 0  # not resubmitted


async def test_kill9_mid_submit_leaves_running_tasks_their_concurrency_slots(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways([team("alpha", max_concurrent=2)], upstream={"max_retries": 8})
    alpha = Client(http, gw.url, "key-alpha")
    running = await alpha.submit_ok(t2i("[latency:30] still running upstream"))
    await kill9_mid_submit(gw, http, sim, alpha, "caught mid-submit", attempts=3)
    # The task refunded at startup held no slot in the new process; the one
    # still running upstream holds one of the two.
    row = next(r for r in (await alpha.admin("/admin/teams"))["teams"] if r["name"] == "alpha")
    assert row["in_flight"] == 1, row
    code, reply = await alpha.status(running)
    assert code == 200 and reply["data"]["state"] in ("pending", "processing"), reply
    await alpha.submit_ok(t2i("[latency:30] the second slot"))
    code, body, _ = await alpha.submit(t2i("[latency:30] one too many"))
    assert code == 429 and "max_concurrent is 2" in body["data"]["error"], body


async def test_kill9_mid_submit_lets_the_idempotent_retry_submit_again(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways([team("alpha", budget_usd=BUDGET)], upstream={"max_retries": 8})
    alpha = Client(http, gw.url, "key-alpha")
    headers = {"Idempotency-Key": "order-17"}
    await kill9_mid_submit(
        gw, http, sim, alpha, "caught mid-submit", attempts=2, headers=headers
    )
    # The client never had an answer, so its retry is a new attempt, not a
    # replay of the task the restart failed.
    await retry_is_a_new_attempt(alpha, sim, "caught mid-submit", headers)


async def test_sigterm_finishes_the_request_in_flight_exits_0_and_resumes(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways([team("alpha", budget_usd=BUDGET)])
    alpha = Client(http, gw.url, "key-alpha")
    ids = await submit_all(alpha, ["[latency:2] in flight at shutdown"])
    # A submit that is still being retried when SIGTERM arrives must be finished,
    # not cut off: two 503s keep it busy for a few hundred milliseconds.
    await sim.faults(submit_errors=[503, 503])
    pending = asyncio.create_task(alpha.submit(t2i("[latency:2] submitted during shutdown")))
    await wait_for_attempts(sim, 2)
    started = time.monotonic()
    assert await asyncio.to_thread(gw.terminate) == 0
    assert time.monotonic() - started < 10
    code, body, _ = await pending
    assert code == 200, body
    ids.append(body["data"]["taskId"])
    assert "apixo-gateway stopped" in gw.log.read_text()
    # Stopped for good: nothing listens any more.
    try:
        async with http.get(gw.url + "/healthz") as r:
            raise AssertionError(f"still answering after exit: {r.status}")
    except aiohttp.ClientConnectionError:
        pass
    submits = (await sim.stats())["submits"]
    assert submits == 2
    gw.start()
    for task_id in ids:
        data = await alpha.wait_final(task_id)
        assert data["state"] == "success", data
    assert (await sim.stats())["submits"] == submits
    assert round(await alpha.balance(), 6) == BUDGET - 2 * PRICE


async def test_health_and_readiness(gateways: Any, http: aiohttp.ClientSession) -> None:
    gw = gateways()
    for path in ("/healthz", "/readyz"):
        async with http.get(gw.url + path) as r:
            assert r.status == 200, await r.text()
    gw.kill9()
    gw.start()  # the same database file, reopened
    async with http.get(gw.url + "/readyz") as r:
        assert r.status == 200
    # A database file deleted under the running process is not usable: every
    # write would go to a file no restart will find.
    gw.db.rename(gw.db.with_name("moved-away.db"))
    async with http.get(gw.url + "/readyz") as r:
        assert r.status == 503
        body = await r.json()
        assert body["code"] == 503 and body["message"] == "Service unavailable"
        assert "The database is not usable" in body["data"]["error"]
        assert "gone" in body["data"]["error"] and body["data"]["status"] == "unavailable"
    async with http.get(gw.url + "/healthz") as r:
        assert r.status == 200  # the process itself still runs


@pytest.mark.parametrize("leader", ["miss", "bypass"])
async def test_kill9_with_joined_tasks_settles_every_follower_once(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess, leader: str
) -> None:
    gw = gateways([team("alpha", budget_usd=BUDGET), team("beta", budget_usd=BUDGET)])
    alpha = Client(http, gw.url, "key-alpha")
    beta = Client(http, gw.url, "key-beta")
    body = t2i("[latency:2] one render, two teams")
    # A no-cache leader does not join, but is joined like a miss.
    code, first, headers = await alpha.submit(
        body, headers={"Cache-Control": "no-cache"} if leader == "bypass" else None
    )
    assert code == 200 and headers["X-Gateway-Cache"] == leader
    code, second, headers = await beta.submit(body)
    assert code == 200 and headers["X-Gateway-Cache"] == "joined"
    gw.kill9()
    gw.start()
    # The leader is still in flight upstream after the restart: joining still works.
    code, third, headers = await alpha.submit(body)
    assert code == 200 and headers["X-Gateway-Cache"] == "joined", headers
    results = set()
    for client, reply in ((alpha, first), (beta, second), (alpha, third)):
        data = await client.wait_final(reply["data"]["taskId"])
        assert data["state"] == "success", data
        results.add(data["resultJson"])
    assert len(results) == 1  # the same images for everyone
    assert (await sim.stats())["submit_attempts"] == 1
    # Only the leader's team pays; joining is free.
    assert round(await alpha.balance(), 6) == BUDGET - PRICE
    assert await beta.balance() == BUDGET


PYTHONPATH = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
# Loaded by the gateway's interpreter at start (sitecustomize): the process dies
# the moment the settlement of an upstream refusal has committed, before the
# client has its answer.
_DIE_AFTER_REFUSAL = '''
import os
import gateway.core

_finish = gateway.core.Gateway.finish


async def finish(self, task_id, outcome, **kwargs):
    finished = await _finish(self, task_id, outcome, **kwargs)
    if outcome.fail_code == "UpstreamRejected":
        os._exit(137)
    return finished


gateway.core.Gateway.finish = finish
'''


async def test_kill9_after_a_refusal_is_settled_lets_the_idempotent_retry_submit_again(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess, tmp_path: Path
) -> None:
    hook = tmp_path / "die-after-refusal"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_DIE_AFTER_REFUSAL)
    gw = gateways([team("alpha", budget_usd=BUDGET)], upstream={"max_retries": 0},
                  env={"PYTHONPATH": os.pathsep.join([str(hook), *PYTHONPATH])})
    alpha = Client(http, gw.url, "key-alpha")
    headers = {"Idempotency-Key": "order-18"}
    await sim.faults(submit_errors=[400])
    with pytest.raises(aiohttp.ClientError):
        await alpha.submit(t2i("refused, then the gateway dies"), headers=headers)
    assert gw.proc is not None and gw.proc.wait(10) == 137
    gw.env["PYTHONPATH"] = os.pathsep.join(PYTHONPATH)
    gw.start()
    # The client never had an answer: its retry is a new attempt, not a
    # replay of the refused task.
    await retry_is_a_new_attempt(alpha, sim, "refused, then the gateway dies", headers)



def serve_again(gw: GatewayProcess, workdir: Path, **sections: dict[str, Any]) -> list[str]:
    """`serve` with gw's config, sections changed; it must exit 2. Returns its stderr lines.

    Lines that are JSON log records (the config's format) are left out: the
    user-facing error is the plain line.
    """
    config = {**gw.config, **{k: {**gw.config[k], **v} for k, v in sections.items()}}
    path = workdir / "second.toml"
    path.write_text(render_toml(config))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
        capture_output=True, text=True, env=gw.env, cwd=workdir, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "apixo-gateway listening" not in result.stderr  # logged only once bound
    return [line for line in result.stderr.splitlines() if not line.startswith("{")]


async def test_a_second_gateway_on_the_same_database_leaves_the_first_alone(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(teams=[team("alpha", budget_usd=BUDGET, max_concurrent=1)])
    client = Client(http, gw.url, "key-alpha")
    # Held in its retry backoff with the money reserved: the state a second
    # gateway's start-up would take for a crash's leftover and fail.
    await sim.faults(submit_errors=[503, 503], retry_after_seconds=1)
    caught = asyncio.create_task(client.submit(t2i("a lantern in fog")))
    await wait_for_attempts(sim, 1)

    lines = await asyncio.to_thread(
        serve_again, gw, gw.workdir, server={"port": free_port()}
    )
    assert lines == [f"error: the database {gw.db} is in use by another apixo-gateway "
                     f"(pid {gw.proc.pid}); one gateway per database"]

    code, body, _ = await caught
    assert code == 200, body
    data = await client.wait_final(body["data"]["taskId"])
    assert data["state"] == "success"
    assert round(await client.balance(), 6) == BUDGET - PRICE
    teams = {t["name"]: t for t in (await client.admin("/admin/teams"))["teams"]}
    assert teams["alpha"]["in_flight"] == 0
    # The slot came back: the team's one concurrent task may start again.
    assert (await client.submit(t2i("a second lantern")))[0] == 200


async def test_a_busy_port_is_one_line_and_exit_2(gateways: Any, tmp_path: Path) -> None:
    gw = gateways()
    other = tmp_path / "other"
    other.mkdir()
    lines = await asyncio.to_thread(
        serve_again, gw, other, storage={"path": str(other / "gateway.db")}
    )
    assert lines == [f"error: cannot listen on 127.0.0.1:{gw.port}: Address already in use"]


async def test_an_unusable_lock_file_is_named_not_taken_for_a_busy_port(
    gateways: Any, tmp_path: Path
) -> None:
    gw = gateways()
    other = tmp_path / "other"
    other.mkdir()
    db = other / "gateway.db"
    # Root ignores file modes; a directory in the lock file's place fails alike.
    os.mkdir(f"{db}.lock")
    lines = await asyncio.to_thread(
        serve_again, gw, other, server={"port": free_port()}, storage={"path": str(db)}
    )
    assert lines == [f"error: cannot open the database's lock file {db}.lock: Is a directory"]


async def test_a_submit_settled_under_it_by_a_foreign_writer_frees_its_slot(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(teams=[team("alpha", budget_usd=BUDGET, max_concurrent=1)])
    client = Client(http, gw.url, "key-alpha")
    await sim.faults(submit_errors=[503], retry_after_seconds=1)
    caught = asyncio.create_task(client.submit(t2i("a kite over dunes")))
    await wait_for_attempts(sim, 1)

    def settle_from_outside() -> None:
        # What the database lock keeps other gateways from doing; a script or
        # an operator with sqlite3 can still do it.
        with sqlite3.connect(gw.db, timeout=5) as conn:
            conn.execute("UPDATE tasks SET state = 'failed', fail_code = 'GatewayRestart' "
                         "WHERE state = 'submitting'")

    await asyncio.to_thread(settle_from_outside)
    code, body, _ = await caught
    # No task id for a task the gateway can no longer track...
    assert code == 500, body
    # ...and the team's one slot is free again.
    code, body, _ = await client.submit(t2i("a second kite"))
    assert code == 200, body
