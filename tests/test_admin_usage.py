"""Operators' views of the money: /admin/*, /metrics, and the `usage` and `keys new` commands.

Every figure is compared with the ledger in the SQLite file it is derived from.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.budget import utc_today
from gateway.cli import main
from tests.conftest import ADMIN_TOKEN, Client, SimulatorProcess, t2i, team
from tests.test_budget import (
    PRICE,
    admin_team,
    check_ledger,
    insert_settled_task,
    metric_samples,
    until,
    wait_quiet,
)

SPEC_TEAM_FIELDS = {
    "name", "budget_usd", "budget_period", "period_start", "spent_usd", "reserved_usd",
    "remaining_usd", "in_flight", "max_concurrent", "images", "cache_hits", "saved_usd",
}


async def _admin(
    http: aiohttp.ClientSession, url: str, path: str, token: str | None = ADMIN_TOKEN,
    **params: Any,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(f"{url}{path}", params=params, headers=headers) as r:
        return r.status, await r.json()


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=cwd,
        timeout=30,
    )


async def _activity(gw: Any, http: aiohttp.ClientSession) -> dict[str, str]:
    """alpha: 2 images, 1 failure, 1 cache hit, 1 still running; beta: 1 image."""
    alpha, beta = Client(http, gw.url, "key-alpha"), Client(http, gw.url, "key-beta")
    ids: dict[str, str] = {}
    for name, client, prompt in (
        ("beta_shared", beta, "a shared prompt"),
        ("alpha_two", alpha, "two images [images:2]"),
        ("alpha_failed", alpha, "refused [fail:CONTENT_VIOLATION]"),
    ):
        code, body, _ = await client.submit(t2i(prompt))
        assert code == 200, body
        ids[name] = body["data"]["taskId"]
        await client.wait_final(ids[name])
    code, body, headers = await alpha.submit(t2i("a shared prompt"))
    assert headers["X-Gateway-Cache"] == "hit"
    ids["alpha_hit"] = body["data"]["taskId"]
    code, body, _ = await alpha.submit(t2i("still running [latency:30]"))
    ids["alpha_running"] = body["data"]["taskId"]
    return ids


async def test_admin_auth_and_disabled_admin(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways()
    for path in ("/admin/teams", "/admin/usage", "/admin/tasks"):
        for token in (None, "wrong", "key-alpha"):
            code, body = await _admin(http, gw.url, path, token)
            assert code == 401 and body["code"] == 401, (path, token, body)
            assert "admin token" in body["data"]["error"]
        assert (await _admin(http, gw.url, path))[0] == 200
    off = gateways(admin={"token_env": "NO_SUCH_ADMIN_TOKEN_VARIABLE"})
    code, body = await _admin(http, off.url, "/admin/teams")
    assert code == 404 and "NO_SUCH_ADMIN_TOKEN_VARIABLE" in body["data"]["error"]


async def test_admin_teams_and_metrics_agree_with_the_ledger(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(teams=[team("alpha", budget_usd=1.0, max_concurrent=4, requests_per_minute=100),
                         team("beta")])
    await _activity(gw, http)
    alpha = await admin_team(http, gw.url, "alpha")
    assert SPEC_TEAM_FIELDS <= set(alpha)
    assert alpha == {**alpha, **{
        "budget_usd": 1.0, "budget_period": "monthly",
        "period_start": utc_today().replace(day=1).isoformat(),
        "spent_usd": 0.2, "reserved_usd": 0.1, "remaining_usd": 0.7, "in_flight": 1,
        "max_concurrent": 4, "images": 2, "cache_hits": 1, "saved_usd": 0.1,
    }}
    beta = await admin_team(http, gw.url, "beta")
    assert beta == {**beta, **{
        "budget_usd": None, "remaining_usd": None, "max_concurrent": None, "spent_usd": 0.1,
        "reserved_usd": 0, "in_flight": 0, "images": 1, "cache_hits": 0, "saved_usd": 0,
    }}
    for name, row in (("alpha", alpha), ("beta", beta)):
        totals = check_ledger(gw.db, name)
        assert row["spent_usd"] * 1e6 == totals["spent"]
        assert row["reserved_usd"] * 1e6 == totals["reserved"]
        assert row["images"] == totals["images"]
        assert row["saved_usd"] * 1e6 == totals["saving"]
    money = {
        ("apixo_gateway_spend_usd_total", "model=grok-image,team=alpha"): 0.2,
        ("apixo_gateway_images_total", "model=grok-image,team=alpha"): 2,
        ("apixo_gateway_saved_usd_total", "model=grok-image,team=alpha"): 0.1,
    }
    samples = await metric_samples(http, gw.url)
    assert {key: samples[key] for key in money} == money
    assert samples[("apixo_gateway_spend_usd_total", "model=grok-image,team=beta")] == 0.1
    assert samples[("apixo_gateway_budget_usd", "team=alpha")] == 1.0
    assert samples[("apixo_gateway_budget_remaining_usd", "team=alpha")] == 0.7
    assert samples[("apixo_gateway_tasks_in_flight", "team=alpha")] == 1
    assert await Client(http, gw.url, "key-alpha").balance() == 0.7
    # The same figures after a crash: the dashboards' money counters come from the ledger.
    gw.kill9()
    gw.start()
    after = await admin_team(http, gw.url, "alpha")
    assert after == alpha
    samples = await metric_samples(http, gw.url)
    assert {key: samples[key] for key in money} == money


async def test_admin_usage_rows_filters_and_history(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(teams=[team("alpha", budget_usd=50.0), team("beta")])
    assert gw.terminate() == 0
    today = utc_today()
    old = today - timedelta(days=40)
    insert_settled_task(gw.db, "alpha", old, images=3)
    gw.start()
    await _activity(gw, http)
    code, body = await _admin(http, gw.url, "/admin/usage")
    assert code == 200
    rows = {r["team"]: r for r in body["rows"]}
    assert rows["alpha"] == {
        "team": "alpha", "spent_usd": 0.5, "images": 5, "cache_hits": 1, "saved_usd": 0.1,
        "upstream_tasks": 4, "failures": 1, "reserved_usd": 0.1,
    }
    assert (rows["beta"]["spent_usd"], rows["beta"]["images"], rows["beta"]["failures"]) == (
        0.1, 1, 0
    )
    code, body = await _admin(http, gw.url, "/admin/usage", team="alpha", by="day")
    assert [(r["day"], r["spent_usd"], r["images"]) for r in body["rows"]] == [
        (old.isoformat(), 0.3, 3), (today.isoformat(), 0.2, 2)
    ]
    assert all(r["team"] == "alpha" for r in body["rows"])
    code, body = await _admin(http, gw.url, "/admin/usage", since=(old + timedelta(1)).isoformat())
    assert {r["team"]: r["spent_usd"] for r in body["rows"]} == {"alpha": 0.2, "beta": 0.1}
    code, body = await _admin(http, gw.url, "/admin/usage", until=old.isoformat(), by="day")
    assert [(r["team"], r["day"]) for r in body["rows"]] == [("alpha", old.isoformat())]
    for bad in ({"since": "yesterday"}, {"until": "2024-13-01"}, {"by": "week"},
                {"since": "20261125"}, {"since": "2026-W48-3"},
                {"since": "2026-11-26", "until": "2026-11-01"}):
        code, body = await _admin(http, gw.url, "/admin/usage", **bad)
        assert code == 400 and body["code"] == 400, bad
        assert any(name in body["data"]["error"] for name in bad), body


async def test_admin_tasks_newest_first_with_filters(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways()
    ids = await _activity(gw, http)
    code, body = await _admin(http, gw.url, "/admin/tasks")
    assert code == 200
    order = [t["taskId"] for t in body["tasks"]]
    assert order == [ids[k] for k in ("alpha_running", "alpha_hit", "alpha_failed",
                                      "alpha_two", "beta_shared")]
    by_id = {t["taskId"]: t for t in body["tasks"]}
    assert by_id[ids["alpha_two"]]["charged_usd"] == 0.2
    assert by_id[ids["alpha_two"]]["images"] == 2
    assert by_id[ids["alpha_failed"]]["failCode"] == "CONTENT_VIOLATION"
    assert by_id[ids["alpha_failed"]]["charged_usd"] == 0
    assert by_id[ids["alpha_hit"]]["cache"] == "hit"
    assert by_id[ids["alpha_hit"]]["saved_usd"] == 0.1
    assert by_id[ids["alpha_running"]]["reserved_usd"] == 0.1
    code, body = await _admin(http, gw.url, "/admin/tasks", team="beta")
    assert [t["taskId"] for t in body["tasks"]] == [ids["beta_shared"]]
    code, body = await _admin(http, gw.url, "/admin/tasks", state="failed")
    assert [t["taskId"] for t in body["tasks"]] == [ids["alpha_failed"]]
    code, body = await _admin(http, gw.url, "/admin/tasks", team="alpha", state="success",
                              limit="1")
    assert [t["taskId"] for t in body["tasks"]] == [ids["alpha_hit"]]
    # The 30 s task reads "pending" upstream for its first 6 s.
    code, body = await _admin(http, gw.url, "/admin/tasks", state="pending")
    assert [(t["taskId"], t["state"]) for t in body["tasks"]] == [
        (ids["alpha_running"], "pending")
    ]
    for bad in ({"state": "done"}, {"limit": "0"}, {"limit": "many"}, {"limit": "100000"},
                {"limit": "+5"}, {"limit": " 5 "}, {"limit": "1_0"}):
        code, body = await _admin(http, gw.url, "/admin/tasks", **bad)
        assert code == 400, bad


async def test_usage_command_reads_the_live_database(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(teams=[team("alpha", budget_usd=50.0), team("beta"), team("idle")],
                  start=False)
    # storage.path relative to the working directory, as an operator would write it.
    gw.config["storage"]["path"] = "gateway.db"
    gw.start()
    assert gw.terminate() == 0
    old = utc_today() - timedelta(days=40)
    insert_settled_task(gw.db, "alpha", old, images=3)
    gw.start()
    await _activity(gw, http)
    await wait_quiet(http, gw.url, "beta", gw.db)
    config = str(gw.config_path)
    loop = asyncio.get_running_loop()

    async def run(*args: str) -> str:
        # Run beside the live gateway (another process reading the WAL database).
        done = await loop.run_in_executor(None, lambda: cli("usage", "--config", config, *args,
                                                             cwd=gw.workdir))
        assert done.returncode == 0, done.stderr
        return done.stdout

    table, data_json, by_day_csv, recent_csv, old_table = await asyncio.gather(
        run(),
        run("--format", "json"),
        run("--format", "csv", "--by-day", "--team", "alpha"),
        run("--format", "csv", "--since", (old + timedelta(days=1)).isoformat(),
            "--until", utc_today().isoformat()),
        run("--by-day", "--until", old.isoformat()),
    )
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["TEAM", "SPENT"]
    alpha_line = next(line for line in lines if line.startswith("alpha"))
    assert alpha_line.split() == ["alpha", "$0.50", "5", "1", "$0.10", "4", "1", "$0.10"]
    assert next(line for line in lines if line.startswith("idle")).split()[1] == "$0.00"
    assert next(line for line in lines if line.startswith("TOTAL")).split()[1] == "$0.60"

    data = json.loads(data_json)
    rows = {r["team"]: r for r in data["rows"]}
    assert rows["alpha"] == {
        "team": "alpha", "spent_usd": 0.5, "images": 5, "cache_hits": 1, "saved_usd": 0.1,
        "upstream_tasks": 4, "failures": 1, "reserved_usd": 0.1,
    }
    assert rows["idle"]["spent_usd"] == 0 and rows["beta"]["spent_usd"] == 0.1
    assert data["total"]["spent_usd"] == 0.6 and data["total"]["images"] == 6
    _, admin = await _admin(http, gw.url, "/admin/usage")
    for row in admin["rows"]:
        assert rows[row["team"]] == row

    by_day = list(csv.DictReader(io.StringIO(by_day_csv)))
    assert [(r["team"], r["day"], r["spent_usd"], r["images"]) for r in by_day] == [
        ("alpha", old.isoformat(), "0.3", "3"),
        ("alpha", utc_today().isoformat(), "0.2", "2"),
    ]
    assert by_day[1]["failures"] == "1" and by_day[1]["cache_hits"] == "1"
    recent = list(csv.DictReader(io.StringIO(recent_csv)))
    assert {r["team"]: r["spent_usd"] for r in recent} == {"alpha": "0.2", "beta": "0.1",
                                                           "idle": "0"}
    assert [line.split()[:3] for line in old_table.splitlines()[1:]] == [
        ["alpha", old.isoformat(), "$0.30"]
    ]
    assert check_ledger(gw.db, "alpha")["spent"] == 500_000  # the report changed nothing


def test_usage_command_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[storage]\npath = "missing.db"\n')
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> tuple[int, str]:
        try:
            code = main(["usage", "--config", str(config), *args])
        except SystemExit as exc:  # argparse's own errors
            code = int(exc.code or 0)
        return code, capsys.readouterr().err

    code, err = run()
    assert code == 1 and "no database at missing.db" in err
    assert not (tmp_path / "missing.db").exists()  # a report never creates a database
    for bad in ("last week", "20250201", "2025-W05-3"):
        code, err = run("--since", bad)
        assert code == 2 and "YYYY-MM-DD" in err, bad
    code, err = run("--since", "2025-02-01", "--until", "2025-01-01")
    assert code == 2 and "after --until" in err
    code, err = run("--format", "xml")
    assert code == 2 and "invalid choice" in err
    config.write_text('[storage]\npath = "missing.db"\nbudget = 5\n')
    code, err = run()
    assert code == 2 and "budget: unknown key" in err


async def test_keys_new_prints_a_key_that_works_once_pasted(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(teams=[team("design", budget_usd=3.0)])
    outputs = [cli("keys", "new", "--team", "design") for _ in range(2)]
    keys, entries = [], []
    for done in outputs:
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        (key,) = [line.strip() for line in lines if line.strip().startswith("apx_")]
        (paste,) = [line for line in lines if line.startswith("api_keys = ")]
        entry = json.loads(paste.removeprefix("api_keys = "))[0]
        assert entry == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
        assert len(key) >= 4 + 43 and "design" in done.stdout
        keys.append(key)
        entries.append(entry)
    assert keys[0] != keys[1]
    assert cli("keys", "new").returncode == 2  # --team is required
    client = Client(http, gw.url, keys[0])
    assert (await client.submit(t2i("before the key is pasted")))[0] == 401
    gw.config["teams"][0]["api_keys"].append(entries[0])
    gw.write_config()
    gw.hup()

    async def accepted() -> bool:
        async with http.get(f"{gw.url}/api/v1/apikeys/current-balance",
                            headers={"Authorization": f"Bearer {keys[0]}"}) as r:
            return r.status == 200

    await until(accepted)
    assert await client.balance() == 3.0
    code, body, _ = await client.submit(t2i("with the new key"))
    assert code == 200
    await client.wait_final(body["data"]["taskId"])
    assert (await admin_team(http, gw.url, "design"))["spent_usd"] == PRICE / 1e6


async def test_refused_submits_are_neither_upstream_tasks_nor_failures(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    # The client got an error and no task id: as in the metrics, such a submit
    # is not an upstream task and not a failed one.
    gw = gateways(upstream={"max_retries": 0})
    alpha = Client(http, gw.url, "key-alpha")
    for prompt in ("fine", "failed upstream [fail:CONTENT_VIOLATION]"):
        await alpha.wait_final(await alpha.submit_ok(t2i(prompt)))
    await sim.faults(submit_errors=[400, 503])
    assert (await alpha.submit(t2i("refused")))[0] == 400
    assert (await alpha.submit(t2i("unavailable")))[0] == 502
    code, body = await _admin(http, gw.url, "/admin/usage", team="alpha")
    assert code == 200
    (row,) = body["rows"]
    assert (row["upstream_tasks"], row["failures"]) == (2, 1), row
    result = cli("usage", "--config", str(gw.config_path), "--format", "json")
    assert result.returncode == 0, result.stderr
    (cli_row,) = [r for r in json.loads(result.stdout)["rows"] if r["team"] == "alpha"]
    assert (cli_row["upstream_tasks"], cli_row["failures"]) == (2, 1), cli_row


async def test_a_model_priced_at_zero_still_counts_images_and_hits(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(pricing={"grok-image": 0})
    alpha = Client(http, gw.url, "key-alpha")
    await alpha.wait_final(await alpha.submit_ok(t2i("free of charge")))
    code, _, headers = await alpha.submit(t2i("free of charge"))
    assert code == 200 and headers["X-Gateway-Cache"] == "hit"
    row = await admin_team(http, gw.url, "alpha")
    assert (row["images"], row["cache_hits"], row["spent_usd"]) == (1, 1, 0)
    samples = await metric_samples(http, gw.url)
    assert samples["apixo_gateway_images_total", "model=grok-image,team=alpha"] == 1


async def test_admin_teams_counts_images_hits_and_savings_over_the_budget_period(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(teams=[team("alpha", budget_usd=5.0, budget_period="daily")])
    assert gw.terminate() == 0
    insert_settled_task(gw.db, "alpha", utc_today() - timedelta(days=2), images=3)
    gw.start()
    client = Client(http, gw.url, "key-alpha")
    await client.wait_final(await client.submit_ok(t2i("today's picture")))
    assert (await client.submit(t2i("today's picture")))[2]["X-Gateway-Cache"] == "hit"
    row = await admin_team(http, gw.url, "alpha")
    # All of it today's, like spent_usd: images x price is what was spent.
    assert (row["spent_usd"], row["images"], row["cache_hits"], row["saved_usd"]) == (
        0.1, 1, 1, 0.1
    )


async def test_a_failed_join_is_a_failure_of_its_own_team(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(teams=[team("alpha"), team("beta")])
    alpha, beta = Client(http, gw.url, "key-alpha"), Client(http, gw.url, "key-beta")
    body = t2i("doomed [latency:1] [fail:Timeout]")
    leader = await alpha.submit_ok(body)
    code, reply, headers = await beta.submit(body)
    assert code == 200 and headers["X-Gateway-Cache"] == "joined"
    follower = reply["data"]["taskId"]
    assert (await beta.wait_final(follower))["state"] == "failed"
    await alpha.wait_final(leader)
    code, report = await _admin(http, gw.url, "/admin/usage")
    rows = {r["team"]: r for r in report["rows"]}
    # beta has no ledger rows at all (a join reserves nothing), yet it saw a failure.
    assert rows["beta"]["failures"] == 1 and rows["beta"]["upstream_tasks"] == 0
    assert rows["alpha"]["failures"] == 1 and rows["alpha"]["upstream_tasks"] == 1
    samples = await metric_samples(http, gw.url)
    assert samples[
        "apixo_gateway_task_failures_total", "fail_code=Timeout,model=grok-image,team=beta"
    ] == 1
