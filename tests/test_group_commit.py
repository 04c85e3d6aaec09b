"""Group commit in the store: changes share a transaction but succeed, fail and persist alone.

These drive gateway.store.Store on a real SQLite file and read the result back
through a separate connection, as another process (or the gateway after a
kill -9) would see it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.store import BudgetExceeded, IdempotencyConflict, Outcome, Store, TaskRecord
from gateway.tasks import now_ms

PRICE = 100_000


def reserved_task(task_id: str, **changes: Any) -> TaskRecord:
    values: dict[str, Any] = {
        "id": task_id, "team": "alpha", "model": "grok-image", "identity": f"id-{task_id}",
        "state": "submitting", "cache": "miss", "leader_id": None, "upstream_id": None,
        "request_json": "{}", "result_json": None, "fail_code": None, "fail_msg": None,
        "create_ms": now_ms(), "complete_ms": None, "price_micros": PRICE,
        "reserved_micros": PRICE, "charged_micros": 0, "saved_micros": 0, "images": 0,
        "budget_day": "2026-11-24", "no_store": 0, "callback_url": None,
    }
    values.update(changes)
    return TaskRecord(**values)


def committed(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(str(tmp_path / "gateway.db"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def reserve(
    store: Store, task_id: str, *, budget: int | None = None, key: str | None = None
) -> None:
    await store.create_reserved_task(
        reserved_task(task_id), budget=budget, period_start_day="2026-11-01",
        idempotency=(key, "body-hash") if key else None, now_ms=now_ms(),
    )


async def test_concurrent_changes_all_commit_and_a_failing_one_rolls_back_alone(
    store: Store, tmp_path: Path
) -> None:
    await reserve(store, "taken", key="key-1")
    # Started together, these make their changes in the same turns of the loop,
    # so they share transactions; one fails half-way (its task row is written
    # before the idempotency key turns out to be taken).
    names = [f"t{i}" for i in range(40)]
    results = await asyncio.gather(
        *(reserve(store, n, key="key-1" if n == "t20" else None) for n in names),
        return_exceptions=True,
    )
    assert isinstance(results[20], IdempotencyConflict)
    assert all(r is None for i, r in enumerate(results) if i != 20)
    db = tmp_path / "gateway.db"
    stored = {r[0] for r in committed(db, "SELECT id FROM tasks")}
    assert stored == {"taken", *names} - {"t20"}
    ledger = committed(db, "SELECT task_id FROM ledger WHERE kind = 'reserve'")
    assert sorted(r[0] for r in ledger) == sorted(stored)


async def test_a_change_that_makes_sqlite_roll_back_everything_fails_its_whole_group(
    store: Store, tmp_path: Path
) -> None:
    # A full disk (here: max_page_count) makes SQLite roll back the whole
    # transaction, not just the failing change. Every caller must then be told
    # exactly what is in the database: committed if and only if its row is there.
    db = store._w  # the test fills the disk through the writer connection itself
    db.run("CREATE TABLE t (name TEXT, blob BLOB)")
    async with db.execute("PRAGMA page_count") as cur:
        row = await cur.fetchone()
    assert row is not None
    db.run(f"PRAGMA max_page_count={row[0] + 20}")

    async def change(name: str, size: int) -> bool:
        try:
            async with store._transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (?, ?)", (name, b"x" * size))
        except sqlite3.Error:
            return False
        return True

    told = {"W": await change("W", 10)}
    results = await asyncio.gather(change("A", 10), change("B", 400_000), change("C", 10))
    told.update(zip("ABC", results, strict=True))
    told["D"] = await change("D", 10)  # the store keeps working afterwards
    rows = {name for (name,) in committed(tmp_path / "gateway.db", "SELECT name FROM t")}
    assert told["B"] is False
    assert told["W"] and told["D"], told
    assert {name for name, ok in told.items() if ok} == rows, (told, rows)


async def test_budget_checks_in_one_group_see_each_others_reservations(
    store: Store, tmp_path: Path
) -> None:
    results = await asyncio.gather(
        *(reserve(store, f"b{i}", budget=5 * PRICE) for i in range(20)),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 5
    assert all(isinstance(r, BudgetExceeded) for r in results if r is not None)
    rows = committed(tmp_path / "gateway.db", "SELECT SUM(amount_micros) FROM ledger")
    assert rows == [(5 * PRICE,)]


async def test_a_caller_cancelled_while_its_change_commits_learns_of_it_after(
    store: Store, tmp_path: Path
) -> None:
    # The first change commits at once (the store was idle); the second, made
    # in the same turn, waits a turn for its group's commit and is cancelled
    # while it waits. Its change is part of the group and commits regardless,
    # so the cancellation must reach the caller only after that: a caller told
    # "cancelled" must not believe its reservation was never made.
    outcome: list[str] = []

    async def caller() -> None:
        try:
            await reserve(store, "second")
        except asyncio.CancelledError:
            outcome.append("cancelled without knowing")
            raise
        outcome.append("reserved")
        await asyncio.sleep(0)  # the cancellation lands at the caller's next await
        outcome.append("never cancelled")

    first = asyncio.create_task(reserve(store, "first"))
    second = asyncio.create_task(caller())
    await asyncio.sleep(0)
    second.cancel()
    await first
    with pytest.raises(asyncio.CancelledError):
        await second
    assert outcome == ["reserved"]
    stored = {r[0] for r in committed(tmp_path / "gateway.db", "SELECT id FROM tasks")}
    assert stored == {"first", "second"}


async def test_the_lifecycle_updates_reach_the_database(store: Store, tmp_path: Path) -> None:
    await reserve(store, "p1")
    await store.mark_submitted("p1", "up-1")
    await store.mark_processing("p1")
    db = tmp_path / "gateway.db"
    for _ in range(100):
        if committed(db, "SELECT state FROM tasks WHERE id = 'p1'") == [("processing",)]:
            break
        await asyncio.sleep(0.01)
    assert committed(db, "SELECT state, upstream_id FROM tasks") == [("processing", "up-1")]


def hit_task(task_id: str, **changes: Any) -> TaskRecord:
    created = now_ms()
    return reserved_task(
        task_id, state="success", cache="hit", result_json='{"resultUrls":["u"]}',
        complete_ms=created, create_ms=created, reserved_micros=0, saved_micros=PRICE,
        images=1, **changes,
    )


async def hit(store: Store, task_id: str, db: Path, **changes: Any) -> bool:
    """Create a cache hit; True once its rows are visible to another connection."""
    await store.create_task(hit_task(task_id, **changes), idempotency=None, now_ms=now_ms())
    # Another connection, right as the caller returns: the answer goes out now.
    return committed(db, f"SELECT count(*) FROM tasks WHERE id = '{task_id}'") == [(1,)]


async def test_hits_are_committed_with_their_saving_before_their_callers_return(
    store: Store, tmp_path: Path
) -> None:
    # Hits are inserted at their group's commit, after the changes made with
    # them; every one must still be durable when its caller returns.
    db = tmp_path / "gateway.db"
    calls = []
    for i in range(30):
        if i % 3 == 0:
            calls.append(reserve(store, f"r{i}"))
        else:
            url = "http://127.0.0.1:9/hook" if i % 5 == 0 else None
            calls.append(hit(store, f"h{i}", db, callback_url=url))
    results = await asyncio.gather(*calls)
    assert all(r in (None, True) for r in results), results
    hits = {f"h{i}" for i in range(30) if i % 3}
    assert {r[0] for r in committed(db, "SELECT id FROM tasks WHERE cache = 'hit'")} == hits
    savings = committed(db, "SELECT task_id, amount_micros, images FROM ledger "
                            "WHERE kind = 'saving'")
    assert sorted(savings) == sorted((h, PRICE, 1) for h in hits)
    assert committed(db, "SELECT saved_micros FROM usage_daily") == [(len(hits) * PRICE,)]
    assert committed(db, "SELECT amount_micros, images FROM ledger_totals "
                         "WHERE kind = 'saving'") == [(len(hits) * PRICE, len(hits))]
    outbox = {r[0] for r in committed(db, "SELECT task_id FROM outbox")}
    assert outbox == {f"h{i}" for i in range(30) if i % 3 and i % 5 == 0}


async def test_hits_in_a_group_that_sqlite_rolls_back_are_told_so(
    store: Store, tmp_path: Path
) -> None:
    # As in the full-disk test above: a change that makes SQLite roll back the
    # whole transaction takes the hits waiting for that transaction with it,
    # and each hit's caller must hear it.
    db = store._w
    db.run("CREATE TABLE t (name TEXT, blob BLOB)")
    async with db.execute("PRAGMA page_count") as cur:
        row = await cur.fetchone()
    assert row is not None
    db.run(f"PRAGMA max_page_count={row[0] + 20}")
    path = tmp_path / "gateway.db"

    async def filler() -> bool:
        try:
            async with store._transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (?, ?)", ("big", b"x" * 400_000))
        except sqlite3.Error:
            return False
        return True

    async def told(task_id: str) -> bool:
        try:
            return await hit(store, task_id, path)
        except sqlite3.Error:
            return False

    await told("warm")  # the store is busy from here on: later changes share groups
    results = await asyncio.gather(told("h1"), filler(), told("h2"), told("h3"))
    after = await told("after")
    stored = {r[0] for r in committed(path, "SELECT id FROM tasks")}
    assert results[1] is False
    assert after and "after" in stored
    said = {name for name, ok in zip(["h1", "big", "h2", "h3"], results, strict=True) if ok}
    assert said == stored & {"h1", "h2", "h3"}, (results, stored)
    # h1 shared the filler's transaction (so the failure path ran); the hits
    # after it began the next one.
    assert results[0] is False and "h1" not in stored, (results, stored)


async def test_hits_of_a_group_sqlite_rolled_back_between_changes_are_not_written(
    store: Store, tmp_path: Path
) -> None:
    # SQLite can roll the transaction back outside any change (an I/O error in
    # a read on the writer connection). The hits waiting for that group's
    # commit must then fail with it, not be inserted one by one outside it.
    path = tmp_path / "gateway.db"
    await reserve(store, "warm")  # busy: the hit below waits a turn for company

    async def told(task_id: str) -> str:
        try:
            await store.create_task(hit_task(task_id), idempotency=None, now_ms=now_ms())
        except sqlite3.Error:
            return "failed"
        return "committed"

    waiting = asyncio.create_task(told("h1"))
    await asyncio.sleep(0)  # h1 is in the open group
    store._w.run("ROLLBACK")  # what SQLite does by itself on such an error
    assert await waiting == "failed"
    assert committed(path, "SELECT id FROM tasks WHERE id = 'h1'") == []
    assert committed(path, "SELECT task_id FROM ledger WHERE task_id = 'h1'") == []
    assert await told("h2") == "committed"  # and the store goes on


async def test_a_settle_that_loses_the_race_leaves_the_idempotency_key_alone(
    store: Store, tmp_path: Path
) -> None:
    await reserve(store, "t1", key="key-1")
    await store.mark_submitted("t1", "up-1")
    won = await store.finish("t1", Outcome("success", now_ms(), result_json='{"resultUrls":["u"]}',
                                           images=1), cache_key=None, cache_ttl_ms=0)
    assert [t.id for t in won] == ["t1"]
    # An unannounced failure arriving second changes nothing, the key included:
    # its client was answered with t1, and a retry must replay t1.
    lost = await store.finish("t1", Outcome("failed", now_ms(), fail_code="GatewayRestart",
                                            fail_msg="late"), cache_key=None, cache_ttl_ms=0)
    assert lost == []
    assert await store.idempotency_get("alpha", "key-1", 0) == ("body-hash", "t1")
    assert committed(tmp_path / "gateway.db", "SELECT state FROM tasks") == [("success",)]


async def test_a_task_settled_under_its_submit_is_not_marked_submitted(store: Store) -> None:
    await reserve(store, "t1")
    await store.finish("t1", Outcome("failed", now_ms(), fail_code="GatewayRestart",
                                     fail_msg="x"), cache_key=None, cache_ttl_ms=0)
    with pytest.raises(RuntimeError, match="settled while its submit was in flight"):
        await store.mark_submitted("t1", "up-1")
    task = await store.get_task("t1")
    assert task is not None and task.state == "failed" and task.upstream_id is None
