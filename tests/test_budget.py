"""Team budgets through real HTTP: reserve, charge, release, periods, the 402, SIGHUP, restarts.

Money is checked twice: through what users see (/admin/teams, current-balance,
the 402 message) and against the append-only ledger in the SQLite file, whose
rows must add up to the tasks they settle.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway.budget import period_start, utc_today
from tests.conftest import ADMIN_TOKEN, Client, SimulatorProcess, t2i, team

PRICE = 100_000  # grok-image, micro-dollars


# -- helpers shared with the other budget/limits test files ---------------------


def read_db(db: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A read-only look at the gateway's SQLite file (WAL: safe while it runs)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def check_ledger(db: Path, team_name: str | None = None) -> dict[str, int]:
    """Assert the ledger is consistent with the tasks it settles; return its totals.

    Every figure the gateway shows is derived from these rows, so this is the
    one place where "accounted to the cent" is checked. One read transaction:
    a task settling between two of the queries must not look like a mismatch.
    """
    where, args = ("WHERE team = ?", (team_name,)) if team_name else ("", ())
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5, isolation_level=None)
    try:
        conn.execute("BEGIN")
        rows = conn.execute(
            f"SELECT task_id, kind, amount_micros, images FROM ledger {where}", args
        ).fetchall()
        tasks = {
            r[0]: r for r in conn.execute(
                "SELECT id, state, cache, leader_id, price_micros, reserved_micros, "
                f"charged_micros, images, saved_micros FROM tasks {where}", args,
            ).fetchall()
        }
        daily = conn.execute(
            "SELECT COALESCE(SUM(spent_micros), 0), COALESCE(SUM(reserved_micros), 0) "
            f"FROM usage_daily {where}", args,
        ).fetchone()
        conn.execute("COMMIT")
    finally:
        conn.close()
    by_task: dict[str, dict[str, tuple[int, int]]] = {}
    for task_id, kind, amount, images in rows:
        kinds = by_task.setdefault(task_id, {})
        assert kind not in kinds, f"task {task_id} has two {kind!r} ledger rows"
        kinds[kind] = (amount, images)
    unknown = set(by_task) - set(tasks)
    assert not unknown, f"ledger rows for unknown tasks {unknown}"
    for task_id, row in tasks.items():
        _, state, cache, leader, price, reserved, charged, images, saved = row
        kinds = by_task.get(task_id, {})
        assert kinds.get("charge", (0, 0))[0] == charged, (task_id, kinds, charged)
        assert kinds.get("saving", (0, 0))[0] == saved, (task_id, kinds, saved)
        upstream = leader is None and cache in ("miss", "bypass")
        if not upstream:
            assert "reserve" not in kinds and charged == 0, (task_id, kinds)
            continue
        assert kinds["reserve"][0] == reserved == price, (task_id, kinds)
        if state in ("success", "failed"):
            assert kinds.get("release", (None,))[0] == reserved, f"{task_id} not released once"
        else:
            assert "release" not in kinds and "charge" not in kinds, (task_id, kinds)
        if state == "success":
            assert charged == price * images and images >= 1, (task_id, charged, images)
            assert kinds["charge"][1] == images
        else:
            assert charged == 0, (task_id, state, charged)
    totals = {"reserve": 0, "release": 0, "charge": 0, "saving": 0, "images": 0}
    for kinds in by_task.values():
        for kind, (amount, images) in kinds.items():
            totals[kind] += amount
            if kind == "charge":
                totals["images"] += images
    totals["spent"] = totals["charge"]
    totals["reserved"] = totals["reserve"] - totals["release"]
    assert totals["charge"] == sum(t[6] for t in tasks.values())
    # The per-day projection the budget check reads must equal the ledger it mirrors.
    assert daily == (totals["spent"], totals["reserved"]), (daily, totals)
    return totals


async def admin_team(http: aiohttp.ClientSession, url: str, name: str) -> dict[str, Any]:
    async with http.get(
        f"{url}/admin/teams", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    (row,) = [t for t in body["teams"] if t["name"] == name]
    assert isinstance(row, dict)
    return row


async def metric_samples(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], float]:
    """{(sample name, sorted labels as k=v,...): value} from /metrics."""
    async with http.get(f"{url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[(s.name, labels)] = s.value
    return out


async def wait_quiet(
    http: aiohttp.ClientSession, url: str, name: str, db: Path, within: float = 15.0
) -> dict[str, Any]:
    """Wait until the team has nothing reserved and no task in flight."""
    deadline = time.monotonic() + within
    while True:
        row = await admin_team(http, url, name)
        active = read_db(
            db, "SELECT COUNT(*) FROM tasks WHERE team = ? AND state NOT IN "
            "('success', 'failed')", (name,),
        )[0][0]
        if row["reserved_usd"] == 0 and row["in_flight"] == 0 and active == 0:
            return row
        assert time.monotonic() < deadline, f"team {name} not quiet: {row}, {active} active"
        await asyncio.sleep(0.05)


async def until(predicate: Any, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def reload_team(http: aiohttp.ClientSession, gw: Any, field: str, value: Any) -> None:
    """Set the first team's `field` in config.toml, SIGHUP, wait until /admin/teams shows it."""
    entry = gw.config["teams"][0]
    entry[field] = value
    gw.write_config()
    gw.hup()

    async def applied() -> bool:
        return bool((await admin_team(http, gw.url, entry["name"]))[field] == value)

    await until(applied)


# -- periods --------------------------------------------------------------------


def test_period_start_on_utc_calendar_edges() -> None:
    # 2024-03-31 is a Sunday, 2024-04-01 a Monday; 2024 is a leap year.
    cases = [
        ("daily", date(2024, 3, 31), date(2024, 3, 31)),
        ("daily", date(2024, 1, 1), date(2024, 1, 1)),
        ("weekly", date(2024, 4, 1), date(2024, 4, 1)),  # Monday starts its own week
        ("weekly", date(2024, 3, 31), date(2024, 3, 25)),  # Sunday ends the week
        ("weekly", date(2025, 1, 1), date(2024, 12, 30)),  # a week spans the new year
        ("monthly", date(2024, 2, 29), date(2024, 2, 1)),
        ("monthly", date(2024, 3, 1), date(2024, 3, 1)),
        ("monthly", date(2024, 12, 31), date(2024, 12, 1)),
        ("total", date(2024, 6, 15), None),
    ]
    for period, today, expected in cases:
        assert period_start(period, today) == expected, (period, today)
    # The calendar is UTC's, not the caller's: 01:30 on April 1st at UTC+2 is
    # still March 31st, so it belongs to March and to the week of March 25th.
    east = datetime(2024, 4, 1, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    assert utc_today(east) == date(2024, 3, 31)
    assert period_start("monthly", utc_today(east)) == date(2024, 3, 1)
    assert period_start("weekly", utc_today(east)) == date(2024, 3, 25)
    west = datetime(2024, 3, 31, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
    assert utc_today(west) == date(2024, 4, 1)
    assert period_start("weekly", utc_today(west)) == date(2024, 4, 1)
    assert utc_today(datetime(2024, 3, 31, 23, 59, 59, tzinfo=UTC)) == date(2024, 3, 31)


def insert_settled_task(db: Path, team_name: str, day: date, images: int) -> None:
    """A success from an earlier period, written the way the gateway writes one."""
    conn = sqlite3.connect(db)
    try:
        task_id = f"gw_old_{team_name}_{day.isoformat()}"
        ts = int(datetime(day.year, day.month, day.day, 12, tzinfo=UTC).timestamp() * 1000)
        charged = PRICE * images
        with conn:
            conn.execute(
                "INSERT INTO tasks (id, team, model, identity, state, cache, request_json, "
                "result_json, create_ms, complete_ms, price_micros, reserved_micros, "
                "charged_micros, images, budget_day) VALUES (?, ?, 'grok-image', ?, 'success', "
                "'miss', '{}', '{\"resultUrls\": []}', ?, ?, ?, ?, ?, ?, ?)",
                (task_id, team_name, task_id, ts, ts + 1000, PRICE, PRICE, charged, images,
                 day.isoformat()),
            )
            for kind, amount, n in (("reserve", PRICE, 0), ("release", PRICE, 0),
                                    ("charge", charged, images)):
                conn.execute(
                    "INSERT INTO ledger (ts_ms, team, model, task_id, kind, amount_micros, "
                    "images, day) VALUES (?, ?, 'grok-image', ?, ?, ?, ?, ?)",
                    (ts, team_name, task_id, kind, amount, n, day.isoformat()),
                )
    finally:
        conn.close()


async def test_spend_from_a_previous_period_does_not_count(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    today = utc_today()
    teams = {
        "daily": team("daily", budget_usd=0.2, budget_period="daily"),
        "weekly": team("weekly", budget_usd=0.2, budget_period="weekly"),
        "monthly": team("monthly", budget_usd=0.2, budget_period="monthly"),
        "total": team("total", budget_usd=0.2, budget_period="total"),
    }
    gw = gateways(teams=list(teams.values()))
    assert gw.terminate() == 0  # the schema now exists; write history while it is stopped
    starts = {p: period_start(p, today) for p in ("daily", "weekly", "monthly")}
    for name in teams:
        # A big spend the day before this period started: outside it for every
        # calendar period, inside it for "total".
        before = (starts.get(name) or today) - timedelta(days=1)
        insert_settled_task(gw.db, name, before, images=20)
    # The first day of the weekly period is inside it: $0.10 already spent this week.
    insert_settled_task(gw.db, "weekly", starts["weekly"], images=1)
    gw.start()

    for name, expected_start in (("daily", today), ("weekly", starts["weekly"]),
                                 ("monthly", today.replace(day=1)), ("total", None)):
        row = await admin_team(http, gw.url, name)
        assert row["period_start"] == (expected_start.isoformat() if expected_start else None)
        assert row["budget_period"] == name
    assert (await admin_team(http, gw.url, "daily"))["spent_usd"] == 0
    assert (await admin_team(http, gw.url, "monthly"))["spent_usd"] == 0
    assert (await admin_team(http, gw.url, "weekly"))["spent_usd"] == 0.1
    total = await admin_team(http, gw.url, "total")
    assert total["spent_usd"] == 2.0 and total["remaining_usd"] == 0

    # Daily and monthly have their whole $0.20; weekly has $0.10 left; total has nothing.
    for name, fits in (("daily", 2), ("monthly", 2), ("weekly", 1), ("total", 0)):
        client = Client(http, gw.url, f"key-{name}")
        codes = []
        for i in range(3):
            code, body, _ = await client.submit(t2i(f"period {name} {i}"))
            codes.append(code)
            if code == 402:
                assert "over budget" in body["data"]["error"]
        assert codes == [200] * fits + [402] * (3 - fits), (name, codes)
    for name in ("daily", "weekly", "monthly"):
        row = await wait_quiet(http, gw.url, name, gw.db)
        assert (row["spent_usd"], row["reserved_usd"], row["remaining_usd"]) == (0.2, 0, 0)
    # The ledger keeps all history: the old images are there, only not in the period.
    assert check_ledger(gw.db, "daily")["images"] == 22
    assert check_ledger(gw.db, "weekly")["images"] == 22
    assert check_ledger(gw.db, "total")["images"] == 20  # never got past its budget


# -- the money path ---------------------------------------------------------------


async def test_burst_of_50_on_a_budget_for_5_accepts_exactly_5(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(teams=[team("alpha", budget_usd=0.5, budget_period="total")])
    client = Client(http, gw.url, "key-alpha")
    results = await asyncio.gather(
        *(client.submit(t2i(f"burst {i}")) for i in range(50))
    )
    codes = [code for code, _, _ in results]
    assert codes.count(200) == 5 and codes.count(402) == 45, codes
    accepted = [body["data"]["taskId"] for code, body, _ in results if code == 200]
    for task_id in accepted:
        assert (await client.wait_final(task_id))["state"] == "success"
    row = await wait_quiet(http, gw.url, "alpha", gw.db)
    assert row["spent_usd"] == 0.5 and row["reserved_usd"] == 0 and row["remaining_usd"] == 0
    totals = check_ledger(gw.db)
    assert totals["spent"] == 500_000 and totals["reserved"] == 0
    assert totals["reserve"] == 5 * PRICE  # refused submits never reserved anything
    stats = await sim.stats()
    assert stats["submits"] == 5 and stats["images"] == 5
    samples = await metric_samples(http, gw.url)
    assert samples[("apixo_gateway_rejections_total", "reason=budget,team=alpha")] == 45
    assert samples[("apixo_gateway_spend_usd_total", "model=grok-image,team=alpha")] == 0.5
    assert samples[("apixo_gateway_budget_remaining_usd", "team=alpha")] == 0


async def test_a_budget_removed_by_reload_leaves_the_budget_metrics(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(teams=[team("alpha", budget_usd=1.0), team("beta", budget_usd=2.0)])
    samples = await metric_samples(http, gw.url)
    assert samples[("apixo_gateway_budget_usd", "team=alpha")] == 1.0
    assert samples[("apixo_gateway_budget_remaining_usd", "team=alpha")] == 1.0
    # The operator lifts alpha's limit: its budget series must go, or the
    # "budget used up" alert would keep firing on the last value.
    del gw.config["teams"][0]["budget_usd"]
    gw.write_config()
    gw.hup()

    async def lifted() -> bool:
        return (await admin_team(http, gw.url, "alpha"))["budget_usd"] is None

    await until(lifted)
    samples = await metric_samples(http, gw.url)
    assert ("apixo_gateway_budget_usd", "team=alpha") not in samples
    assert ("apixo_gateway_budget_remaining_usd", "team=alpha") not in samples
    assert samples[("apixo_gateway_budget_usd", "team=beta")] == 2.0


async def test_402_states_budget_spent_reserved_and_remaining(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(teams=[team("alpha", budget_usd=0.25, budget_period="monthly")])
    client = Client(http, gw.url, "key-alpha")
    code, body, _ = await client.submit(t2i("first, fast"))
    assert code == 200
    await client.wait_final(body["data"]["taskId"])
    code, body, _ = await client.submit(t2i("second, still running [latency:5]"))
    assert code == 200
    assert await client.balance() == 0.05
    code, body, _ = await client.submit(t2i("third does not fit"))
    assert code == 402
    assert body["code"] == 402 and body["message"] == "Insufficient budget"
    error = body["data"]["error"]
    for part in ("'alpha'", "budget $0.25", "monthly", "spent $0.10", "reserved $0.10",
                 "remaining $0.05", "needs $0.10"):
        assert part in error, (part, error)
    assert body["data"]["budget_usd"] == 0.25
    assert body["data"]["spent_usd"] == 0.1
    assert body["data"]["reserved_usd"] == 0.1
    assert body["data"]["remaining_usd"] == 0.05
    row = await admin_team(http, gw.url, "alpha")
    assert (row["budget_usd"], row["spent_usd"], row["reserved_usd"], row["remaining_usd"]) == (
        0.25, 0.1, 0.1, 0.05
    )
    assert row["period_start"] == utc_today().replace(day=1).isoformat()
    totals = check_ledger(gw.db)
    assert (totals["spent"], totals["reserved"]) == (PRICE, PRICE)


async def test_charge_is_price_times_result_urls(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(teams=[team("alpha", budget_usd=5.0)], pricing={"grok-image": 0.07})
    client = Client(http, gw.url, "key-alpha")
    code, body, _ = await client.submit(t2i("three at once [images:3]"))
    assert code == 200
    data = await client.wait_final(body["data"]["taskId"])
    assert len(json.loads(data["resultJson"])["resultUrls"]) == 3
    row = await wait_quiet(http, gw.url, "alpha", gw.db)
    assert row["spent_usd"] == 0.21 and row["images"] == 3
    assert row["remaining_usd"] == 4.79  # exact: integer micro-dollars, no float drift
    totals = check_ledger(gw.db)
    assert totals["spent"] == 210_000 and totals["images"] == 3 == (await sim.stats())["images"]
    # The budget check saw one image's price: the operator is told about the rest.
    lines = [json.loads(x) for x in gw.log.read_text().splitlines() if x.startswith("{")]
    (warning,) = [x for x in lines if x["msg"] == "task charged more than it reserved"]
    assert warning["level"] == "warning" and warning["team"] == "alpha"
    assert (warning["charged_usd"], warning["reserved_usd"], warning["images"]) == (0.21, 0.07, 3)


async def test_failed_timed_out_and_refused_tasks_are_refunded(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(
        teams=[team("alpha", budget_usd=0.3, budget_period="total")],
        upstream={"task_timeout_seconds": 1.0, "max_retries": 1},
    )
    client = Client(http, gw.url, "key-alpha")
    code, failed, _ = await client.submit(t2i("unsafe [fail:SensitiveContent]"))
    assert code == 200
    code, slow, _ = await client.submit(t2i("never finishes in time [latency:30]"))
    assert code == 200
    # Upstream refuses one submit outright (400 passes through) and fails
    # another with 503s until the gateway gives up (502).
    await sim.faults(submit_errors=[400])
    code, body, _ = await client.submit(t2i("refused by APIXO"))
    assert code == 400, body
    await sim.faults(submit_errors=[503, 503])
    code, body, _ = await client.submit(t2i("APIXO is down"))
    assert code == 502, body
    assert "APIXO is unavailable" in body["data"]["error"]
    # The three in-flight reservations never blocked the budget forever:
    data = await client.wait_final(failed["data"]["taskId"])
    assert data["failCode"] == "SensitiveContent"
    data = await client.wait_final(slow["data"]["taskId"], within=10)
    assert data["failCode"] == "Timeout"
    row = await wait_quiet(http, gw.url, "alpha", gw.db)
    assert row["spent_usd"] == 0 and row["remaining_usd"] == 0.3
    totals = check_ledger(gw.db)
    assert totals["spent"] == 0 and totals["reserved"] == 0
    assert totals["reserve"] == totals["release"] == 4 * PRICE
    refused = read_db(gw.db, "SELECT fail_code FROM tasks WHERE state = 'failed' "
                      "AND upstream_id IS NULL")
    assert sorted(r[0] for r in refused) == ["UpstreamRejected", "UpstreamRejected"]
    # Three full-price submits fit again now that everything was refunded.
    codes = [(await client.submit(t2i(f"after refunds {i}")))[0] for i in range(4)]
    assert codes == [200, 200, 200, 402]


async def test_client_disconnect_mid_submit_leaks_no_reservation(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(teams=[team("alpha", budget_usd=0.2, budget_period="total")],
                  upstream={"max_retries": 3})
    client = Client(http, gw.url, "key-alpha")
    short = aiohttp.ClientTimeout(total=0.3)

    async def abandon(prompt: str) -> None:
        try:
            async with http.post(
                f"{gw.url}/api/v1/generateTask/grok-image", json=t2i(prompt),
                headers={"Authorization": "Bearer key-alpha"}, timeout=short,
            ) as r:
                raise AssertionError(f"answered before the client gave up: {r.status}")
        except (TimeoutError, aiohttp.ServerTimeoutError):
            pass

    async def settled(n: int) -> bool:
        rows = read_db(gw.db, "SELECT state FROM tasks")
        return len(rows) == n and all(r[0] in ("success", "failed") for r in rows)

    # Upstream answers 503 three times, then accepts: the submit takes ~1 s of
    # backoff, the client hangs up at 0.3 s, the gateway carries on.
    await sim.faults(submit_errors=[503, 503, 503])
    await abandon("accepted after the client left")
    await until(lambda: settled(1), within=10)
    # This one exhausts every retry while nobody is listening.
    await sim.faults(submit_errors=[503] * 4)
    await abandon("refused after the client left")
    await until(lambda: settled(2), within=10)
    row = await wait_quiet(http, gw.url, "alpha", gw.db)
    states = sorted(read_db(gw.db, "SELECT state, fail_code FROM tasks"), key=str)
    assert states == [("failed", "UpstreamRejected"), ("success", None)], states
    assert row["spent_usd"] == 0.1 and row["reserved_usd"] == 0
    totals = check_ledger(gw.db)
    assert totals["spent"] == PRICE * (await sim.stats())["images"] == PRICE
    code, _, _ = await client.submit(t2i("the last $0.10 is still there"))
    assert code == 200


async def test_sigterm_mid_submit_finishes_the_request_and_keeps_the_books(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(teams=[team("alpha", budget_usd=1.0)], upstream={"max_retries": 3})
    client = Client(http, gw.url, "key-alpha")
    await sim.faults(submit_errors=[503, 503])
    pending = asyncio.create_task(client.submit(t2i("in the middle of a retry")))
    await asyncio.sleep(0.15)
    assert not pending.done()
    gw.proc.send_signal(signal.SIGTERM)
    code, body, _ = await pending
    assert code == 200, body
    assert gw.proc.wait(30) == 0
    gw.start()
    await client.wait_final(body["data"]["taskId"])
    await wait_quiet(http, gw.url, "alpha", gw.db)
    totals = check_ledger(gw.db)
    assert totals["spent"] == PRICE * (await sim.stats())["images"] == PRICE


async def test_cache_hit_is_served_to_a_team_out_of_budget(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(teams=[team("alpha", budget_usd=0.1, budget_period="daily"),
                         team("beta", budget_usd=0.0)])
    alpha = Client(http, gw.url, "key-alpha")
    code, body, _ = await alpha.submit(t2i("a lighthouse at dusk"))
    assert code == 200
    first = await alpha.wait_final(body["data"]["taskId"])
    code, body, _ = await alpha.submit(t2i("something new"))
    assert code == 402
    for client in (alpha, Client(http, gw.url, "key-beta")):
        code, body, headers = await client.submit(t2i("a lighthouse at dusk"))
        assert code == 200, body
        assert headers["X-Gateway-Cache"] == "hit"
        data = await client.wait_final(body["data"]["taskId"])
        assert data["state"] == "success" and data["resultJson"] == first["resultJson"]
    a = await admin_team(http, gw.url, "alpha")
    b = await admin_team(http, gw.url, "beta")
    assert (a["spent_usd"], a["cache_hits"], a["saved_usd"]) == (0.1, 1, 0.1)
    assert (b["spent_usd"], b["cache_hits"], b["saved_usd"]) == (0, 1, 0.1)
    assert (await sim.stats())["submits"] == 1
    check_ledger(gw.db)


# -- SIGHUP and restarts -------------------------------------------------------------


async def test_sighup_lowered_budget_applies_to_next_submit_without_dropping_work(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(teams=[team("alpha", budget_usd=1.0, budget_period="weekly")])
    client = Client(http, gw.url, "key-alpha")
    in_flight = await client.submit_ok(t2i("long job survives the reload [latency:1.5]"))
    await client.wait_final(await client.submit_ok(t2i("quick job")))

    await reload_team(http, gw, "budget_usd", 0.2)
    code, body, _ = await client.submit(t2i("no longer fits"))
    assert code == 402
    assert "budget $0.20" in body["data"]["error"] and "spent $0.10" in body["data"]["error"]
    assert (await client.wait_final(in_flight))["state"] == "success"
    row = await wait_quiet(http, gw.url, "alpha", gw.db)
    assert row["spent_usd"] == 0.2 and row["remaining_usd"] == 0
    # Raised again: the next submit fits.
    await reload_team(http, gw, "budget_usd", 0.3)
    assert (await client.submit(t2i("fits again")))[0] == 200
    check_ledger(gw.db)


async def test_sighup_removed_key_stops_working_at_once(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    import hashlib

    old, new = "key-alpha-old", "key-alpha-new"
    entry = team("alpha", key=old)
    entry["api_keys"].append("sha256:" + hashlib.sha256(new.encode()).hexdigest())
    gw = gateways(teams=[entry, team("beta")])
    old_client, new_client = Client(http, gw.url, old), Client(http, gw.url, new)
    assert await old_client.balance() is None
    code, body, _ = await old_client.submit(t2i("submitted with the old key [latency:1]"))
    assert code == 200
    task_id = body["data"]["taskId"]

    gw.config["teams"][0]["api_keys"] = gw.config["teams"][0]["api_keys"][1:]
    gw.write_config()
    gw.hup()

    async def revoked() -> bool:
        code, _, _ = await old_client.submit(t2i("probe"))
        return bool(code == 401)

    await until(revoked, within=2.0)
    for _ in range(5):  # and stays revoked: nothing cached the old key
        code, body, _ = await old_client.submit(t2i("after revocation"))
        assert code == 401 and body["message"] == "Invalid or missing API key"
        code, _ = await old_client.status(task_id)
        assert code == 401
    # The team's other key still works and sees the task the old key started.
    assert (await new_client.wait_final(task_id))["state"] == "success"
    assert (await new_client.submit(t2i("with the new key")))[0] == 200
    samples = await metric_samples(http, gw.url)
    assert samples[("apixo_gateway_rejections_total", "reason=unauthorized,team=none")] >= 10


async def test_sighup_keeps_startup_settings_and_names_them(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    # The body limit is enforced by the listening server, set up at start: a
    # reload that quoted a new limit while the old one still applied would
    # answer "exceeds 200000" to a 70,000-byte body.
    gw = gateways(teams=[team("alpha")], server={"max_body_bytes": 65536})
    client = Client(http, gw.url, "key-alpha")
    gw.config["server"]["max_body_bytes"] = 200_000
    gw.config["upstream"]["max_concurrent"] = 7  # reloadable, and applied
    gw.write_config()
    gw.hup()

    async def reloaded() -> bool:
        samples = await metric_samples(http, gw.url)
        return samples.get(("apixo_gateway_upstream_max_concurrent", "")) == 7

    await until(reloaded)
    code, body, _ = await client.submit(t2i("x" * 70_000))
    assert code == 413
    assert "65536" in body["data"]["error"] and "200000" not in body["data"]["error"]
    warnings = [line for line in gw.log_lines() if line.get("level") == "warning"
                and "next restart" in line.get("msg", "")]
    assert len(warnings) == 1, warnings
    assert warnings[0]["settings"] == ["server.max_body_bytes (65536 -> 200000)"]
    assert (await client.submit(t2i("small bodies still work")))[0] == 200


async def test_kill9_with_tasks_in_flight_settles_each_once_and_matches_upstream(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(teams=[team("alpha", budget_usd=10.0), team("beta", budget_usd=10.0)],
                  upstream={"max_retries": 3})
    alpha, beta = Client(http, gw.url, "key-alpha"), Client(http, gw.url, "key-beta")
    prompts = (
        [f"done while the gateway is down {i} [latency:0.3]" for i in range(4)]
        + [f"done after the restart {i} [latency:2]" for i in range(4)]
        + [f"two images [images:2] {i} [latency:1]" for i in range(2)]
        + [f"fails while down {i} [fail:NSFW_DETECTED] [latency:0.3]" for i in range(2)]
        + [f"fails after restart {i} [fail:GENERATION_FAILED] [latency:2]" for i in range(2)]
    )
    results = await asyncio.gather(*(
        (alpha if i % 2 else beta).submit(t2i(p)) for i, p in enumerate(prompts)
    ))
    assert all(code == 200 for code, _, _ in results), results
    # One more submit is stuck in upstream retries when the process dies: it
    # never reached APIXO, so after the restart it must be refunded, not lost.
    await sim.faults(submit_errors=[503, 503, 503])
    stuck = asyncio.create_task(alpha.submit(t2i("submitting when killed")))
    await asyncio.sleep(0.1)
    gw.kill9()
    try:
        await stuck
    except aiohttp.ClientError:
        pass
    await asyncio.sleep(0.6)  # some tasks finish upstream while nobody watches
    active = read_db(gw.db, "SELECT COUNT(*) FROM tasks WHERE state NOT IN "
                     "('success', 'failed')")[0][0]
    assert active == len(prompts) + 1
    gw.start()
    for name in ("alpha", "beta"):
        await wait_quiet(http, gw.url, name, gw.db, within=20)
    totals = check_ledger(gw.db)
    stats = await sim.stats()
    assert stats["submits"] == len(prompts)
    assert totals["images"] == stats["images"] == 4 + 4 + 2 * 2
    assert totals["spent"] == PRICE * stats["images"]
    assert totals["reserved"] == 0
    assert totals["reserve"] == totals["release"] == PRICE * (len(prompts) + 1)
    restarted = read_db(gw.db, "SELECT COUNT(*) FROM tasks WHERE fail_code = 'GatewayRestart'")
    assert restarted[0][0] == 1
    # Each upstream task maps to exactly one gateway task, settled the way upstream ended.
    for upstream_id, state, images in read_db(
        gw.db, "SELECT upstream_id, state, images FROM tasks WHERE upstream_id IS NOT NULL"
    ):
        truth = stats["tasks"][upstream_id]
        assert (state, images) == (truth["state_final"], truth["images"] if
                                   truth["state_final"] == "success" else 0)
    # A second restart settles nothing again, and the money counters come back from the ledger.
    gw.kill9()
    gw.start()
    await asyncio.sleep(0.3)
    assert check_ledger(gw.db) == totals
    samples = await metric_samples(http, gw.url)
    spent = sum(v for (name, _), v in samples.items() if name == "apixo_gateway_spend_usd_total")
    images = sum(v for (name, _), v in samples.items() if name == "apixo_gateway_images_total")
    assert round(spent, 6) == totals["spent"] / 1e6 and images == totals["images"]
