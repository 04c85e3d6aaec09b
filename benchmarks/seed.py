"""Fill a gateway database with N final tasks and their ledger rows, fast.

The schema comes from the gateway itself (Store.open runs the migrations); the
rows are what the gateway would have written for them: a miss that succeeded
has reserve + release + charge ledger rows and a cache entry while its TTL
lasts, a failed miss has reserve + release, a cache hit has a saving row.
usage_daily and ledger_totals are the triggers' projections of the ledger; for
speed the triggers (and the indexes) are dropped during the bulk insert, the
projections computed once with the same arithmetic, then everything is put back.

    python benchmarks/seed.py PATH N
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.cache import cache_key, request_identity
from gateway.store import Store

PRICE_MICROS = 100_000  # grok-image at $0.10
DAY_MS = 86_400_000
SPREAD_DAYS = 90
CACHE_TTL_MS = 14 * DAY_MS
BENCH_TEAM = "bench"
OTHER_TEAMS = ("design", "marketing", "research")
FAIL_MSG = "Content violates provider policy, please adjust the prompt"
SAMPLE_IDS = 20_000  # task ids handed to the status load, drawn across the whole table
BATCH = 50_000


@dataclass(frozen=True)
class Seeded:
    tasks: int
    seconds: float
    final_task_id: str  # a bench-team success, for status polls of one task
    sample_ids: list[str]  # bench-team tasks spread over the table, for random status polls
    hit_prompt: str  # a prompt whose result is in the cache, for cache-hit submits


async def _create_schema(path: Path) -> None:
    store = Store(str(path))
    await store.open()
    await store.close()


def hit_body(prompt: str) -> dict[str, object]:
    return {"request_type": "async", "input": {"mode": "text-to-image", "prompt": prompt}}


def seed(path: Path, n: int, *, seed_value: int = 7) -> Seeded:
    started = time.perf_counter()
    asyncio.run(_create_schema(path))
    now = int(time.time() * 1000)
    db = sqlite3.connect(path, isolation_level=None)
    # A throwaway build: no journal, no syncs, a large page cache; WAL is put back at the end.
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-1048576")
    derived = db.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL AND ("
        "type = 'trigger' OR (type = 'index' AND tbl_name IN ('tasks', 'ledger', 'cache')))"
    ).fetchall()
    db.execute("BEGIN")
    # Indexes built once after the load (a sort) are far cheaper than a million
    # random B-tree inserts; the trigger's projection is computed once below.
    for kind, name, _ in derived:
        db.execute(f"DROP {kind.upper()} {name}")
    # Everything below runs inside SQLite (a million rows bound from Python
    # would take minutes). base is MATERIALIZED so each random value is drawn once.
    step = SPREAD_DAYS * DAY_MS // max(n, 1)
    params = {
        "n": n, "start": now - SPREAD_DAYS * DAY_MS, "step": max(step, 1), "now": now,
        "price": PRICE_MICROS, "ttl": CACHE_TTL_MS, "fail_msg": FAIL_MSG,
    }
    teams_case = "CASE i % 4 WHEN 0 THEN 'bench' " + " ".join(
        f"WHEN {k} THEN '{team}'" for k, team in enumerate(OTHER_TEAMS, start=1)
    ) + " END"
    db.execute(
        f"""
        WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i + 1 < :n),
        base AS MATERIALIZED (
            SELECT i, 'gw_' || lower(hex(randomblob(12))) AS id, {teams_case} AS team,
                   :start + i * :step + abs(random()) % :step AS create_ms,
                   3000 + abs(random()) % 27000 AS took, i % 20 AS roll,
                   lower(hex(randomblob(32))) AS identity
            FROM seq
        )
        INSERT INTO tasks (id, team, model, identity, state, cache, leader_id, upstream_id,
            request_json, result_json, fail_code, fail_msg, create_ms, complete_ms,
            price_micros, reserved_micros, charged_micros, saved_micros, images, budget_day,
            no_store, callback_url)
        SELECT id, team, 'grok-image', identity,
            CASE roll WHEN 1 THEN 'failed' ELSE 'success' END,
            CASE roll WHEN 0 THEN 'hit' ELSE 'miss' END,
            NULL,
            CASE roll WHEN 0 THEN NULL ELSE 'up_' || substr(id, 4) END,
            '{{"request_type": "async", "input": {{"mode": "text-to-image", "prompt": '
                || '"seeded prompt ' || i || '", "aspect_ratio": "1:1"}}, "provider": "auto"}}',
            CASE roll WHEN 1 THEN NULL
                ELSE '{{"resultUrls": ["https://files.example/' || id || '-0.png"]}}' END,
            CASE roll WHEN 1 THEN 'SensitiveContent' END,
            CASE roll WHEN 1 THEN :fail_msg END,
            create_ms,
            CASE roll WHEN 0 THEN create_ms ELSE create_ms + took END,
            :price,
            CASE roll WHEN 0 THEN 0 ELSE :price END,
            CASE WHEN roll >= 2 THEN :price ELSE 0 END,
            CASE roll WHEN 0 THEN :price ELSE 0 END,
            CASE roll WHEN 1 THEN 0 ELSE 1 END,
            strftime('%Y-%m-%d', create_ms / 1000, 'unixepoch'),
            0, NULL
        FROM base ORDER BY i
        """,
        params,
    )
    ledger = (
        "INSERT INTO ledger (ts_ms, team, model, task_id, kind, amount_micros, images, day) "
    )
    db.execute(ledger + "SELECT create_ms, team, model, id, 'reserve', reserved_micros, 0, "
               "budget_day FROM tasks WHERE reserved_micros > 0")
    db.execute(ledger + "SELECT complete_ms, team, model, id, 'release', reserved_micros, 0, "
               "budget_day FROM tasks WHERE reserved_micros > 0")
    db.execute(ledger + "SELECT complete_ms, team, model, id, 'charge', charged_micros, images, "
               "budget_day FROM tasks WHERE charged_micros > 0")
    db.execute(ledger + "SELECT complete_ms, team, model, id, 'saving', saved_micros, images, "
               "budget_day FROM tasks WHERE saved_micros > 0")
    db.execute(
        "INSERT INTO cache (key, result_json, images, task_id, created_ms, expires_ms) "
        "SELECT 'global:' || identity, result_json, images, id, complete_ms, complete_ms + :ttl "
        "FROM tasks WHERE cache = 'miss' AND state = 'success' AND complete_ms + :ttl > :now",
        params,
    )
    (final_task_id,) = db.execute(
        "SELECT id FROM tasks WHERE team = ? AND state = 'success' AND cache = 'miss' "
        "ORDER BY rowid DESC LIMIT 1", (BENCH_TEAM,)
    ).fetchone()
    hit_prompt = f"a cached bench cat {seed_value}"
    identity = request_identity(
        "grok-image", {"mode": "text-to-image", "prompt": hit_prompt, "aspect_ratio": "1:1"}, "auto"
    )
    db.execute(
        "INSERT INTO cache (key, result_json, images, task_id, created_ms, expires_ms) "
        "SELECT ?, result_json, images, id, ?, ? FROM tasks WHERE id = ?",
        (cache_key(identity, "global", BENCH_TEAM), now, now + CACHE_TTL_MS, final_task_id),
    )
    db.execute(
        "INSERT INTO usage_daily (team, day, reserved_micros, spent_micros, saved_micros, images) "
        "SELECT team, day, "
        "SUM(CASE kind WHEN 'reserve' THEN amount_micros WHEN 'release' THEN -amount_micros "
        "ELSE 0 END), "
        "SUM(CASE kind WHEN 'charge' THEN amount_micros ELSE 0 END), "
        "SUM(CASE kind WHEN 'saving' THEN amount_micros ELSE 0 END), "
        "SUM(CASE kind WHEN 'charge' THEN images ELSE 0 END) "
        "FROM ledger GROUP BY team, day"
    )
    db.execute(
        "INSERT INTO ledger_totals (team, model, kind, amount_micros, images) "
        "SELECT team, model, kind, SUM(amount_micros), SUM(images) FROM ledger "
        "GROUP BY team, model, kind"
    )
    every = max(1, n // 4 // SAMPLE_IDS)
    samples = [
        str(r[0]) for r in db.execute(
            "SELECT id FROM tasks WHERE team = ? AND rowid % ? = 1", (BENCH_TEAM, every * 4)
        )
    ]
    for _, _, sql in derived:
        db.execute(sql)
    db.execute("COMMIT")
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    random.Random(seed_value).shuffle(samples)
    return Seeded(n, time.perf_counter() - started, final_task_id, samples, hit_prompt)


def main() -> None:
    path, n = Path(sys.argv[1]), int(float(sys.argv[2]))
    if path.exists():
        sys.exit(f"{path} exists; seed an empty path")
    result = seed(path, n)
    print(f"{path}: {result.tasks} tasks in {result.seconds:.1f} s "
          f"({path.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
