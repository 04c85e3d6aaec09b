"""Every SQL statement of the gateway, behind a narrow async interface.

One connection writes, each change in its own savepoint of a `BEGIN
IMMEDIATE` transaction shared by the changes around it (group commit, see
_transaction); scans read committed state through another connection so
reports and admin lists never queue behind a write. Money rows go to an
append-only ledger whose UNIQUE(task_id, kind) makes every charge and release
happen at most once even if two code paths race to settle a task.

The writer runs on the event loop's own thread, and so do the point reads (one
task, one cache entry, one idempotency key, a team's usage), through the
writer's connection: a second connection had to throw its page cache away
after every commit and read its pages again. They may see a change of the
group not yet committed; anything they act on is itself written after it, so
commits no earlier. With WAL and
synchronous=NORMAL a commit is a write() into the OS page cache, tens of
microseconds, while handing each statement to a worker thread and back costs
more than the statement, and under load the GIL handoffs between the loop and
the worker dominated the submit path. What can take long stays off the loop:
checkpoints (the only fsyncs) run on their own connection in a thread, sweeps
delete in small batches, and scans (reports, admin lists, the outbox, startup
totals) go through an aiosqlite connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiosqlite

from gateway.money import Micros

log = logging.getLogger("gateway.store")

SCHEMA_VERSION = 4
IDEMPOTENCY_TTL_MS = 24 * 3600 * 1000
CHECKPOINT_INTERVAL_SECONDS = 1.0
# Past this many frames (4 KiB each, 64 MiB) in the WAL a RESTART checkpoint lets
# it start over; it holds writers back for a few milliseconds, so not every round.
CHECKPOINT_RESTART_FRAMES = 16_384
# A RESTART checkpoint holds writers back; past this it gives up until the next
# round rather than keep submits waiting on a long report query.
CHECKPOINT_BUSY_MS = 100
WRITE_LOCK_TIMEOUT_SECONDS = 5.0
WRITER_CACHE_KIB = 64 * 1024  # the writer connection's page cache
# Group commit: how long the first change of a group may wait for others to join;
# and a change commits at once when no other came for this long.
GROUP_COMMIT_MAX_WAIT_SECONDS = 0.002
COMMIT_AT_ONCE_AFTER_IDLE_SECONDS = 0.002
SWEEP_BATCH = 500  # rows per sweep transaction: each holds the loop well under a millisecond

# Failures of tasks whose id the client never received: upstream refused the
# submit (the client got the error), or a restart found a task that never
# reached upstream (the client got no answer). Neither is an upstream task or
# a failed one in the reports and metrics; settling one drops its
# Idempotency-Key, so a retry tries again, and sends no webhook about it.
UNANNOUNCED = ("UpstreamRejected", "GatewayRestart")
_UNANNOUNCED_SQL = ", ".join(f"'{code}'" for code in UNANNOUNCED)
ACTIVE_STATES = ("submitting", "pending", "processing")
FINAL_STATES = ("success", "failed")

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        team TEXT NOT NULL,
        model TEXT NOT NULL,
        identity TEXT NOT NULL,
        state TEXT NOT NULL,
        cache TEXT NOT NULL,
        leader_id TEXT,
        upstream_id TEXT,
        request_json TEXT NOT NULL,
        result_json TEXT,
        fail_code TEXT,
        fail_msg TEXT,
        create_ms INTEGER NOT NULL,
        complete_ms INTEGER,
        price_micros INTEGER NOT NULL,
        reserved_micros INTEGER NOT NULL DEFAULT 0,
        charged_micros INTEGER NOT NULL DEFAULT 0,
        saved_micros INTEGER NOT NULL DEFAULT 0,
        images INTEGER NOT NULL DEFAULT 0,
        budget_day TEXT NOT NULL,
        no_store INTEGER NOT NULL DEFAULT 0,
        callback_url TEXT
    );
    CREATE INDEX tasks_active ON tasks(state) WHERE state IN ('submitting','pending','processing');
    CREATE INDEX tasks_leader ON tasks(leader_id) WHERE leader_id IS NOT NULL;
    CREATE INDEX tasks_team_created ON tasks(team, create_ms);
    CREATE INDEX tasks_created ON tasks(create_ms);

    -- Append-only: rows are never updated or deleted.
    CREATE TABLE ledger (
        id INTEGER PRIMARY KEY,
        ts_ms INTEGER NOT NULL,
        team TEXT NOT NULL,
        model TEXT NOT NULL,
        task_id TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('reserve', 'release', 'charge', 'saving')),
        amount_micros INTEGER NOT NULL CHECK (amount_micros >= 0),
        images INTEGER NOT NULL DEFAULT 0,
        day TEXT NOT NULL
    );
    CREATE UNIQUE INDEX ledger_once ON ledger(task_id, kind);
    CREATE INDEX ledger_team_day ON ledger(team, day);

    -- A per-team, per-UTC-day projection of the ledger, kept by trigger so the
    -- budget check sums at most a period's worth of rows, never the whole ledger.
    CREATE TABLE usage_daily (
        team TEXT NOT NULL,
        day TEXT NOT NULL,
        reserved_micros INTEGER NOT NULL DEFAULT 0,
        spent_micros INTEGER NOT NULL DEFAULT 0,
        saved_micros INTEGER NOT NULL DEFAULT 0,
        images INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (team, day)
    ) WITHOUT ROWID;
    CREATE TRIGGER ledger_to_usage AFTER INSERT ON ledger BEGIN
        INSERT INTO usage_daily (team, day, reserved_micros, spent_micros, saved_micros, images)
        VALUES (
            NEW.team, NEW.day,
            CASE NEW.kind WHEN 'reserve' THEN NEW.amount_micros
                          WHEN 'release' THEN -NEW.amount_micros ELSE 0 END,
            CASE NEW.kind WHEN 'charge' THEN NEW.amount_micros ELSE 0 END,
            CASE NEW.kind WHEN 'saving' THEN NEW.amount_micros ELSE 0 END,
            CASE NEW.kind WHEN 'charge' THEN NEW.images ELSE 0 END)
        ON CONFLICT (team, day) DO UPDATE SET
            reserved_micros = reserved_micros + excluded.reserved_micros,
            spent_micros = spent_micros + excluded.spent_micros,
            saved_micros = saved_micros + excluded.saved_micros,
            images = images + excluded.images;
    END;

    CREATE TABLE cache (
        key TEXT PRIMARY KEY,
        result_json TEXT NOT NULL,
        images INTEGER NOT NULL,
        task_id TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL
    );
    CREATE INDEX cache_expires ON cache(expires_ms);

    CREATE TABLE idempotency (
        team TEXT NOT NULL,
        key TEXT NOT NULL,
        body_hash TEXT NOT NULL,
        task_id TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (team, key)
    );
    CREATE INDEX idempotency_created ON idempotency(created_ms);

    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        task_id TEXT NOT NULL UNIQUE,
        url TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms INTEGER NOT NULL,
        last_error TEXT,
        updated_ms INTEGER NOT NULL
    );
    CREATE INDEX outbox_due ON outbox(next_attempt_ms) WHERE state = 'pending';
    """,
    2: """
    -- All-time totals per (team, model, kind), kept by trigger: restoring the
    -- money counters at startup summed the whole ledger, seconds per million rows.
    CREATE TABLE ledger_totals (
        team TEXT NOT NULL,
        model TEXT NOT NULL,
        kind TEXT NOT NULL,
        amount_micros INTEGER NOT NULL DEFAULT 0,
        images INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (team, model, kind)
    ) WITHOUT ROWID;
    INSERT INTO ledger_totals (team, model, kind, amount_micros, images)
        SELECT team, model, kind, SUM(amount_micros), SUM(images) FROM ledger
        GROUP BY team, model, kind;
    CREATE TRIGGER ledger_to_totals AFTER INSERT ON ledger BEGIN
        INSERT INTO ledger_totals (team, model, kind, amount_micros, images)
        VALUES (NEW.team, NEW.model, NEW.kind, NEW.amount_micros, NEW.images)
        ON CONFLICT (team, model, kind) DO UPDATE SET
            amount_micros = amount_micros + excluded.amount_micros,
            images = images + excluded.images;
    END;
    """,
    3: """
    -- forget_idempotency() looks keys up by task after an upstream refusal.
    CREATE INDEX idempotency_task ON idempotency(task_id);
    """,
    4: """
    -- Only the unfiltered admin task list read it, and rowid order is creation
    -- order; every task insert paid for it (one more page in each commit).
    DROP INDEX tasks_created;
    """,
}


class TaskRecord(NamedTuple):
    """One row of tasks.

    A NamedTuple, not a frozen dataclass: built on every submit and for every
    row read, and a tuple is built in a fraction of the time with one object
    instead of two (the instance and its __dict__). See also core.TaskViews.
    """

    id: str
    team: str
    model: str
    identity: str
    state: str
    cache: str
    leader_id: str | None
    upstream_id: str | None
    request_json: str
    result_json: str | None
    fail_code: str | None
    fail_msg: str | None
    create_ms: int
    complete_ms: int | None
    price_micros: Micros
    reserved_micros: Micros
    charged_micros: Micros
    saved_micros: Micros
    images: int
    budget_day: str
    no_store: int
    callback_url: str | None

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES


_TASK_COLUMNS = list(TaskRecord._fields)
_TASK_SELECT = "SELECT " + ", ".join(_TASK_COLUMNS) + " FROM tasks"
_TASK_INSERT = (
    f"INSERT INTO tasks ({', '.join(_TASK_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _TASK_COLUMNS)})"
)


def _task(row: Sequence[Any]) -> TaskRecord:
    return TaskRecord(*row)


def storable(text: str | None) -> str | None:
    """Text SQLite can store. A lone surrogate (what a \\ud83d escape in
    upstream's JSON decodes to) is refused, and a settle that kept failing on
    one held the task, its reservation and its slot forever; it is written as
    that same escape, which inside a JSON string means the same thing."""
    if text is None:
        return None
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode(errors="backslashreplace").decode()
    return text


@dataclass(frozen=True)
class Outcome:
    """How an upstream task ended; its text, whatever upstream sent, is storable."""

    state: str
    complete_ms: int
    result_json: str | None = None
    images: int = 0
    fail_code: str | None = None
    fail_msg: str | None = None

    def __post_init__(self) -> None:
        for name in ("result_json", "fail_code", "fail_msg"):
            object.__setattr__(self, name, storable(getattr(self, name)))


class CacheEntry(NamedTuple):  # a NamedTuple for the reasons TaskRecord is one
    key: str
    result_json: str
    images: int
    task_id: str
    expires_ms: int


@dataclass(frozen=True)
class Usage:
    spent: Micros
    reserved: Micros


@dataclass(frozen=True)
class OutboxItem:
    id: int
    task_id: str
    url: str
    attempts: int
    next_attempt_ms: int


class BudgetExceeded(Exception):
    def __init__(self, usage: Usage) -> None:
        super().__init__("budget exceeded")
        self.usage = usage


class IdempotencyConflict(Exception):
    def __init__(self, task_id: str, body_hash: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id
        self.body_hash = body_hash


class _Cursor:
    """A sqlite3 cursor that has already run, awaitable like aiosqlite's."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    def __await__(self) -> Generator[None, None, _Cursor]:
        return self
        yield  # a generator that never suspends: the statement has already run

    async def __aenter__(self) -> _Cursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._cursor.close()


class _Connection:
    """A sqlite3 connection used on the loop's thread, with the slice of aiosqlite's API we use."""

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None)
        self._conn.execute("PRAGMA busy_timeout=5000")

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> _Cursor:
        return _Cursor(self._conn.execute(sql, parameters))

    def run(self, sql: str) -> None:
        self._conn.execute(sql)

    def run_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    async def close(self) -> None:
        self._conn.close()


class Store:
    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: _Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._checkpointer: aiosqlite.Connection | None = None
        self._checkpoints: asyncio.Task[None] | None = None
        # Open while no change, transaction start or checkpoint RESTART is under
        # way: see _exclusive().
        self._gate = asyncio.Event()
        self._gate.set()
        self._group: _Group | None = None
        self._group_changes = 0
        self._group_opened = 0.0
        self._last_change = 0.0
        # Final tasks of the open group inserted at its COMMIT: see create_task().
        self._group_inserts: list[tuple[TaskRecord, int]] = []

    # -- lifecycle -------------------------------------------------------

    async def open(self) -> None:
        self._writer = _Connection(self.path)
        await self._writer.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives process crashes (kill -9); only an OS
        # crash may lose the last commits, a trade the 1 ms submit path needs.
        await self._writer.execute("PRAGMA synchronous=NORMAL")
        # A checkpoint fsyncs: never on the loop's thread (see _checkpoint_loop).
        await self._writer.execute("PRAGMA wal_autocheckpoint=0")
        # The writer also serves the point reads; SQLite's default 2 MiB cache
        # held only a sliver of the indexes of a large database, and every miss
        # is a read() on the submit path. A fixed size: memory does not grow
        # with the number of tasks.
        await self._writer.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
        await self._writer.execute("PRAGMA foreign_keys=ON")
        await self._migrate()
        # From here on, waiting for the write lock must not freeze the event
        # loop: _begin() waits by sleeping instead.
        self._writer.run("PRAGMA busy_timeout=0")
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        await self._reader.execute("PRAGMA busy_timeout=5000")
        await self._reader.execute("PRAGMA query_only=ON")
        self._checkpointer = await aiosqlite.connect(self.path, isolation_level=None)
        await self._checkpointer.execute(f"PRAGMA busy_timeout={CHECKPOINT_BUSY_MS}")
        self._checkpoints = asyncio.create_task(self._checkpoint_loop(), name="wal-checkpoint")

    async def close(self) -> None:
        async with self._exclusive():
            self._commit_open()
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            await asyncio.gather(self._checkpoints, return_exceptions=True)
            self._checkpoints = None
        for conn in (self._reader, self._checkpointer, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._checkpointer = None
        self._writer = None

    async def _checkpoint_loop(self) -> None:
        """Copy the WAL back into the database from a thread, so the WAL stays small.

        PASSIVE copies without holding anyone back; when writes pause it catches
        up and the next write starts the WAL over. Under steady writes it never
        catches up, and without a RESTART now and then the WAL grew by every
        write (and every page lookup searched it). A RESTART needs the write lock,
        which group commit hands from one turn's transaction to the next without
        a gap another connection could take, so it takes the store's own lock
        first: changes wait while it copies what was written since the PASSIVE
        pass and fsyncs, a few milliseconds, so it runs only once the WAL is large.
        """
        ckpt = self._checkpointer
        assert ckpt is not None
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL_SECONDS)
            try:
                async with ckpt.execute("PRAGMA wal_checkpoint(PASSIVE)") as cur:
                    row = await cur.fetchone()
                if row is not None and row[1] >= CHECKPOINT_RESTART_FRAMES:
                    async with self._exclusive():
                        self._commit_open()
                        await ckpt.execute("PRAGMA wal_checkpoint(RESTART)")
            except sqlite3.Error:
                log.exception("WAL checkpoint failed; will retry")

    async def _migrate(self) -> None:
        db = self._w
        await db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        async with db.execute("SELECT value FROM meta WHERE key = 'schema_version'") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path}: schema version {version} is newer than this gateway "
                f"({SCHEMA_VERSION}); upgrade apixo-gateway"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            await db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _split_sql(_MIGRATIONS[target]):
                    await db.execute(statement)
                await db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(target),),
                )
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise

    @property
    def _w(self) -> _Connection:
        if self._writer is None:
            raise RuntimeError("store is not open")
        return self._writer

    @property
    def _r(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise RuntimeError("store is not open")
        return self._reader

    def _transaction(self) -> _Change:
        """One atomic change, made durable together with the changes around it.

        Group commit: changes share one write transaction, each inside its own
        SAVEPOINT, so a change that fails is rolled back alone. A commit writes
        every page it touched to the WAL, and a submit touches about ten (the
        task, its indexes, the ledger, the usage rows): sixty concurrent submits
        write the pages they share once instead of sixty times.

        When it commits: at once if no other change came in the last 2 ms (a
        lone submit gains nothing by waiting); otherwise once a turn of the loop
        brings no new change, at most 2 ms after the first. The caller returns
        only once its change is committed.
        """
        return _Change(self)

    @asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """Keep other coroutines off the writer connection: they share it.

        Not an asyncio.Lock: a change never awaits (its statements run on this
        thread), so a lock was only ever contended while a transaction waited to
        start or a checkpoint ran, but from then on its FIFO handoff admitted one
        waiter per turn of the loop, and under steady load the queue never
        drained: one change per turn, one change per group commit. When the gate
        opens, every waiter goes through in the same turn.
        """
        await self._close_gate()
        try:
            yield
        finally:
            self._gate.set()

    async def _close_gate(self) -> None:
        while not self._gate.is_set():
            await self._gate.wait()
        self._gate.clear()

    async def _open_change(self, savepoint: bool = True) -> tuple[_Group, bool]:
        """Start a change (the caller holds the gate): join the open group or begin one.

        Returns the group and whether this change must commit it as soon as it
        is made; see _transaction(). A change that runs no statement of its
        own (an insert left for the commit) needs no savepoint.
        """
        commit_now = False
        if self._group is not None and not self._w.in_transaction:
            self._fail_group(self._group, None)  # rolled back under it
        if self._group is None:
            await self._begin()
            loop = asyncio.get_running_loop()
            self._group = _Group(loop=loop)
            self._group_changes = 0
            self._group_opened = now = time.monotonic()
            # Nobody else has written lately: waiting a turn for company
            # would cost this caller two turns of the loop for nothing.
            commit_now = now - self._last_change >= COMMIT_AT_ONCE_AFTER_IDLE_SECONDS
            if not commit_now:
                loop.call_soon(self._commit_group, self._group, 1)
        group = self._group
        self._group_changes += 1
        self._last_change = time.monotonic()
        if commit_now or not savepoint:
            # Alone in its transaction: a failure rolls the transaction back,
            # so the savepoint (two statements on the lone submit's path) is not needed.
            return group, commit_now
        self._w.run("SAVEPOINT change")
        return group, commit_now

    def _commit_group(self, group: _Group, seen: int) -> None:
        """Commit once a turn of the loop brought no new change (or the group is old).

        Committing at the first turn after the group opened made groups of one
        under load: each commit answered one request, whose client's next request
        arrived a turn later and opened the next group. Waiting while changes keep
        arriving lets the answers go out together and the requests come back together.
        """
        if self._group is not group:
            return  # committed already
        growing = self._group_changes > seen
        young = time.monotonic() - self._group_opened < GROUP_COMMIT_MAX_WAIT_SECONDS
        # A change still being made (the gate is closed) is always waited for.
        if not self._gate.is_set() or (growing and young):
            asyncio.get_running_loop().call_soon(
                self._commit_group, group, self._group_changes
            )
            return
        self._commit(group)

    def _commit_open(self) -> None:
        """Commit the open group now (the caller holds the gate)."""
        if self._group is not None:
            self._commit(self._group)

    def _fail_group(self, group: _Group, exc: BaseException | None) -> None:
        """Tell every change of a group SQLite rolled back that it did not happen."""
        if self._group is group:
            self._end_group()
        if not group.done():
            group.set_exception(sqlite3.OperationalError(
                f"the transaction was rolled back by an error in another change: {exc!r}"
            ))
            # Its waiters, if any, get the error; with none the failing change's
            # own exception already says it, so no "never retrieved" noise.
            group.exception()

    def _abandon(self, group: _Group) -> None:
        """Roll back a group whose only change failed; nobody else waits on it."""
        self._end_group()
        try:
            # Some errors (a full disk) make SQLite roll back by itself.
            if self._w.in_transaction:
                self._w.run("ROLLBACK")
        finally:
            group.set_result(None)

    def _end_group(self) -> list[tuple[TaskRecord, int]]:
        """Close the open group to new changes; returns the inserts left for its commit."""
        self._group = None
        inserts, self._group_inserts = self._group_inserts, []
        return inserts

    def _commit(self, group: _Group) -> None:
        inserts = self._end_group()
        if not self._w.in_transaction:
            # SQLite rolled the group's transaction back under it (an I/O error
            # in a read on this connection). Its waiting inserts must not run
            # now: outside a transaction each would commit on its own while
            # their callers are told the group failed.
            self._fail_group(group, None)
            return
        try:
            if inserts:
                # A failure here is the group's, like a failed COMMIT: every
                # change in it learns that it did not happen.
                _insert_free_tasks(self._w, inserts)
            self._w.run("COMMIT")
        except BaseException as exc:
            try:
                self._w.run("ROLLBACK")
            except sqlite3.Error:
                pass
            group.set_exception(exc)
            return
        group.set_result(None)

    async def _begin(self) -> None:
        deadline = time.monotonic() + WRITE_LOCK_TIMEOUT_SECONDS
        while True:
            try:
                self._w.run("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                # Another connection writes (a RESTART checkpoint, another
                # process): wait without holding up the event loop.
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.001)

    async def ping(self) -> None:
        """Raise unless the database file is where it was opened and can be read.

        SELECT 1 never touches the file; the schema row does. A file deleted
        under the process would still answer through the open handles, and
        every write would go to a file nobody will ever open again.
        """
        if not await asyncio.to_thread(os.path.exists, self.path):
            raise FileNotFoundError(f"the database file {self.path} is gone")
        async with self._r.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'"
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            raise RuntimeError(f"the database {self.path} has no schema version")

    # -- money ----------------------------------------------------------

    async def usage(self, team: str, since_day: str) -> Usage:
        return await _usage(self._w, team, since_day)

    async def create_reserved_task(
        self,
        task: TaskRecord,
        *,
        budget: Micros | None,
        period_start_day: str,
        idempotency: tuple[str, str] | None,
        now_ms: int,
        admit: Callable[[], None] | None = None,
    ) -> None:
        """Check the budget and reserve the task's price in one write transaction.

        admit() runs once the budget check has passed, inside the transaction; if
        it raises (a concurrency limit), nothing is written.
        """
        async with self._transaction() as db:
            if budget is not None:
                usage = await _usage(db, task.team, period_start_day)
                if usage.spent + usage.reserved + task.reserved_micros > budget:
                    raise BudgetExceeded(usage)
            if admit is not None:
                admit()
            await db.execute(_TASK_INSERT, task)  # its fields are the columns
            await _ledger(db, task, "reserve", task.reserved_micros, 0, now_ms)
            if idempotency is not None:
                await _remember_idempotency(db, task, idempotency, now_ms)

    async def create_task(
        self, task: TaskRecord, *, idempotency: tuple[str, str] | None, now_ms: int
    ) -> TaskRecord:
        """Insert a task that costs nothing: a cache hit (final at once) or a joined follower.

        A follower whose leader finished before this transaction took the lock
        is created final with the leader's outcome, so it can never be orphaned.

        A cache hit without an Idempotency-Key reads nothing and nothing else
        in its transaction reads it, so its rows are left for the group's
        COMMIT, which inserts them all with one statement per table. Made as a
        change of its own (a savepoint and four statements), a hit cost more
        CPU than everything else the gateway does for it together.
        """
        if task.leader_id is None and task.is_final and idempotency is None:
            await self._insert_at_commit(task, now_ms)
            return task
        async with self._transaction() as db:
            if task.leader_id is not None:
                async with db.execute(
                    _TASK_SELECT + " WHERE id = ?", (task.leader_id,)
                ) as cur:
                    row = await cur.fetchone()
                if row is not None:
                    leader = _task(row)
                    if leader.is_final:
                        task = _follow(task, leader)
                    elif leader.state != task.state:
                        task = task._replace(state=leader.state)
            _insert_free_tasks(db, [(task, now_ms)])
            if idempotency is not None:
                await _remember_idempotency(db, task, idempotency, now_ms)
        return task

    async def _insert_at_commit(self, task: TaskRecord, now_ms: int) -> None:
        await self._close_gate()
        try:
            group, commit_now = await self._open_change(savepoint=False)
            self._group_inserts.append((task, now_ms))
            if commit_now:
                self._commit(group)
        finally:
            self._gate.set()
        await _committed(group)

    async def finish(
        self,
        task_id: str,
        outcome: Outcome,
        *,
        cache_key: str | None,
        cache_ttl_ms: int,
    ) -> list[TaskRecord]:
        """Settle a task and its joined followers, exactly once.

        The UPDATE ... WHERE state IN (active) is a compare-and-set: of the
        tracker, the timeout and a restart, only the first to arrive settles.
        Returns the tasks this call finished (empty if it lost the race).

        An UNANNOUNCED failure's Idempotency-Key is dropped in this transaction
        (in a separate one, a kill between the two left the key replaying the
        failure), and no webhook is sent about a task id nobody was told (APIXO
        sends none for a refused submit either).
        """
        now_ms = outcome.complete_ms
        unannounced = outcome.fail_code in UNANNOUNCED
        async with self._transaction() as db:
            async with db.execute(_TASK_SELECT + " WHERE id = ?", (task_id,)) as cur:
                row = await cur.fetchone()
            if row is None or _task(row).is_final:
                return []
            leader = _settle(_task(row), outcome)
            cursor = await db.execute(
                "UPDATE tasks SET state = ?, result_json = ?, fail_code = ?, fail_msg = ?, "
                "complete_ms = ?, charged_micros = ?, images = ? "
                "WHERE id = ? AND state IN ('submitting', 'pending', 'processing')",
                (
                    leader.state, leader.result_json, leader.fail_code, leader.fail_msg,
                    leader.complete_ms, leader.charged_micros, leader.images, task_id,
                ),
            )
            if cursor.rowcount != 1:
                return []
            if unannounced:
                # Only by the call that settles it: a task someone else settled
                # first keeps the key its client was answered with.
                await db.execute("DELETE FROM idempotency WHERE task_id = ?", (task_id,))
            if leader.reserved_micros:
                await _ledger(db, leader, "release", leader.reserved_micros, 0, now_ms)
            # Every success has its charge row, $0 for a model priced at 0: the
            # images and the hits of the reports and metrics are counted from rows.
            if leader.state == "success":
                await _ledger(db, leader, "charge", leader.charged_micros, leader.images, now_ms)
            finished = [leader]
            async with db.execute(
                _TASK_SELECT + " WHERE leader_id = ? AND state IN ('pending', 'processing')",
                (task_id,),
            ) as cur:
                followers = [_follow(_task(r), leader) for r in await cur.fetchall()]
            for follower in followers:
                await db.execute(
                    "UPDATE tasks SET state = ?, result_json = ?, fail_code = ?, fail_msg = ?, "
                    "complete_ms = ?, images = ?, saved_micros = ? WHERE id = ?",
                    (
                        follower.state, follower.result_json, follower.fail_code,
                        follower.fail_msg, follower.complete_ms, follower.images,
                        follower.saved_micros, follower.id,
                    ),
                )
                if follower.state == "success":
                    await _ledger(
                        db, follower, "saving", follower.saved_micros, follower.images, now_ms
                    )
            finished.extend(followers)
            if (
                cache_key is not None
                and leader.state == "success"
                and leader.result_json is not None
                and not leader.no_store
            ):
                await db.execute(
                    "INSERT INTO cache (key, result_json, images, task_id, created_ms, expires_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                    "result_json = excluded.result_json, images = excluded.images, "
                    "task_id = excluded.task_id, created_ms = excluded.created_ms, "
                    "expires_ms = excluded.expires_ms",
                    (
                        cache_key, leader.result_json, leader.images, leader.id, now_ms,
                        now_ms + cache_ttl_ms,
                    ),
                )
            for task in finished:
                if task.callback_url and not (unannounced and task.id == task_id):
                    await _enqueue_callback(db, task, now_ms)
        return finished

    async def mark_submitted(self, task_id: str, upstream_id: str) -> None:
        # Durable before the client hears of the task: a task answered 200 must
        # still be tracked after a kill -9 a moment later.
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE tasks SET upstream_id = ?, state = 'pending' "
                "WHERE id = ? AND state = 'submitting'",
                (upstream_id, task_id),
            )
            if cursor.rowcount != 1:
                # Settled under the submit (only another process on the file
                # could, which dblock prevents): the client must not be given
                # an id whose task will never be tracked.
                raise RuntimeError(
                    f"task {task_id} was settled while its submit was in flight "
                    f"(upstream task {upstream_id})"
                )

    async def mark_processing(self, task_id: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE tasks SET state = 'processing' "
                "WHERE (id = ? OR leader_id = ?) AND state = 'pending'",
                (task_id, task_id),
            )

    # -- reads ------------------------------------------------------------

    async def get_task(self, task_id: str) -> TaskRecord | None:
        async with self._w.execute(_TASK_SELECT + " WHERE id = ?", (task_id,)) as cur:
            row = await cur.fetchone()
        return _task(row) if row else None

    async def active_tasks(self) -> list[TaskRecord]:
        """Non-final tasks, leaders first, read through the writer so nothing is missed."""
        async with self._exclusive():
            async with self._w.execute(
                _TASK_SELECT + " WHERE state IN ('submitting', 'pending', 'processing') "
                "ORDER BY leader_id IS NOT NULL, create_ms"
            ) as cur:
                return [_task(r) for r in await cur.fetchall()]

    async def recent_tasks(
        self, *, team: str | None, state: str | None, limit: int
    ) -> list[tuple[TaskRecord, str | None, int]]:
        """Newest first, with callback delivery state and attempts."""
        where: list[str] = []
        args: list[Any] = []
        if team is not None:
            where.append("t.team = ?")
            args.append(team)
        if state is not None:
            if state == "pending":
                where.append("t.state IN ('submitting', 'pending')")
            else:
                where.append("t.state = ?")
                args.append(state)
        sql = (
            "SELECT " + ", ".join(f"t.{c}" for c in _TASK_COLUMNS)
            + ", o.state, COALESCE(o.attempts, 0) FROM tasks t "
            "LEFT JOIN outbox o ON o.task_id = t.id"
            + (" WHERE " + " AND ".join(where) if where else "")
            # Tasks are inserted as they are created, so rowid order is creation
            # order (to within one group commit: hits are inserted at its end);
            # a team's list walks tasks_team_created instead.
            + (" ORDER BY t.create_ms DESC, t.rowid DESC" if team is not None
               else " ORDER BY t.rowid DESC")
            + " LIMIT ?"
        )
        args.append(limit)
        async with self._r.execute(sql, args) as cur:
            rows = await cur.fetchall()
        n = len(_TASK_COLUMNS)
        return [(_task(r[:n]), r[n], int(r[n + 1])) for r in rows]

    async def in_flight_by_team(self) -> dict[str, int]:
        """Upstream tasks not yet final, per team (leases to restore after a restart)."""
        async with self._r.execute(
            "SELECT team, COUNT(*) FROM tasks WHERE state IN ('submitting', 'pending', "
            "'processing') AND leader_id IS NULL AND cache IN ('miss', 'bypass') GROUP BY team"
        ) as cur:
            return {str(team): int(n) for team, n in await cur.fetchall()}

    async def ledger_totals(self) -> list[tuple[str, str, str, int, int]]:
        """(team, model, kind, amount, images) summed over the whole ledger."""
        async with self._r.execute(
            "SELECT team, model, kind, amount_micros, images FROM ledger_totals"
        ) as cur:
            rows = await cur.fetchall()
        return [(str(t), str(m), str(k), int(a), int(i)) for t, m, k, a, i in rows]

    async def usage_report(
        self, *, team: str | None, since_day: str | None, until_day: str | None, by_day: bool
    ) -> list[dict[str, Any]]:
        """Spend, images, savings, hits and failures per team (and day), from the ledger."""
        where: list[str] = []
        args: list[Any] = []
        if team is not None:
            where.append("team = ?")
            args.append(team)
        if since_day is not None:
            where.append("day >= ?")
            args.append(since_day)
        if until_day is not None:
            where.append("day <= ?")
            args.append(until_day)
        cond = (" WHERE " + " AND ".join(where)) if where else ""
        group = "team, day" if by_day else "team"
        day_col = "day" if by_day else "NULL"
        sql = (
            f"SELECT team, {day_col}, "
            "SUM(CASE kind WHEN 'charge' THEN amount_micros ELSE 0 END), "
            "SUM(CASE kind WHEN 'charge' THEN images ELSE 0 END), "
            "SUM(CASE kind WHEN 'saving' THEN amount_micros ELSE 0 END), "
            "SUM(kind = 'saving'), "
            "SUM(CASE kind WHEN 'reserve' THEN amount_micros "
            "WHEN 'release' THEN -amount_micros ELSE 0 END), "
            "SUM(kind = 'reserve') "
            f"FROM ledger{cond} GROUP BY {group} ORDER BY {group}"
        )
        async with self._r.execute(sql, args) as cur:
            rows = await cur.fetchall()
        # Failures are the failed tasks a client was told about, a joined one
        # included (its team saw it fail, as the failure metric counts it). An
        # UNANNOUNCED failure reserved and was released, but it is neither an
        # upstream task nor a failed one.
        fail_sql = (
            f"SELECT team, {'budget_day' if by_day else 'NULL'}, "
            f"SUM(fail_code NOT IN ({_UNANNOUNCED_SQL})), "
            f"SUM(fail_code IN ({_UNANNOUNCED_SQL})) FROM tasks WHERE state = 'failed'"
            + "".join(
                f" AND {c.replace('day', 'budget_day')}" for c in where
            )
            + f" GROUP BY team{', budget_day' if by_day else ''}"
        )
        async with self._r.execute(fail_sql, args) as cur:
            failures = {(t, d): (int(n or 0), int(u or 0)) for t, d, n, u in await cur.fetchall()}
        report = {
            (t, d): {
                "team": t,
                "day": d,
                "spent_micros": int(spent or 0),
                "images": int(images or 0),
                "saved_micros": int(saved or 0),
                "cache_hits": int(hits or 0),
                "reserved_micros": int(reserved or 0),
                "upstream_tasks": int(upstream or 0),
                "failures": 0,
            }
            for t, d, spent, images, saved, hits, reserved, upstream in rows
        }
        for (t, d), (failed, unannounced) in failures.items():
            # A team (or day) whose only tasks were failed joins has no ledger rows.
            row = report.setdefault((t, d), {
                "team": t, "day": d, "spent_micros": 0, "images": 0, "saved_micros": 0,
                "cache_hits": 0, "reserved_micros": 0, "upstream_tasks": 0, "failures": 0,
            })
            row["failures"] = failed
            row["upstream_tasks"] -= unannounced
        return [report[key] for key in sorted(report, key=lambda k: (k[0], k[1] or ""))]

    async def team_period(self, team: str, since_day: str) -> tuple[int, int, Micros]:
        """(images, cache hits and successful joins, saved) of a team since a day."""
        async with self._r.execute(
            "SELECT COALESCE(SUM(CASE kind WHEN 'charge' THEN images ELSE 0 END), 0), "
            "COALESCE(SUM(kind = 'saving'), 0), "
            "COALESCE(SUM(CASE kind WHEN 'saving' THEN amount_micros ELSE 0 END), 0) "
            "FROM ledger WHERE team = ? AND day >= ?",
            (team, since_day),
        ) as cur:
            row = await cur.fetchone()
        return (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)

    # -- cache ------------------------------------------------------------

    async def cache_get(self, key: str, now_ms: int, ttl_ms: int) -> CacheEntry | None:
        """The entry if it is fresh, with the earlier of its stored expiry and its
        creation plus the TTL configured now: a lowered ttl_seconds applies at once
        to what was cached under the old one."""
        async with self._w.execute(
            "SELECT key, result_json, images, task_id, "
            "MIN(expires_ms, created_ms + ?1) AS fresh_until FROM cache "
            "WHERE key = ?2 AND fresh_until > ?3",
            (ttl_ms, key, now_ms),
        ) as cur:
            row = await cur.fetchone()
        return CacheEntry(*row) if row else None

    async def cache_sweep(self, now_ms: int, max_entries: int) -> tuple[int, list[str]]:
        """Delete expired entries, then the oldest beyond max_entries.

        Returns how many went, and the keys of those that went for the size
        bound (not expired): the memory front must drop them too.
        """
        removed = await self._delete_batches(
            "DELETE FROM cache WHERE key IN "
            "(SELECT key FROM cache WHERE expires_ms <= ? LIMIT ?)", now_ms,
        )
        # Finding the entries past the limit is a scan: done by the reader in its thread.
        async with self._r.execute(
            "SELECT key FROM cache ORDER BY expires_ms DESC LIMIT -1 OFFSET ?", (max_entries,)
        ) as scan:
            surplus = [str(row[0]) for row in await scan.fetchall()]
        for start in range(0, len(surplus), SWEEP_BATCH):
            batch = surplus[start:start + SWEEP_BATCH]
            async with self._transaction() as db:
                cur = await db.execute(
                    f"DELETE FROM cache WHERE key IN ({', '.join('?' * len(batch))})", batch
                )
                removed += cur.rowcount
            await asyncio.sleep(0)
        return removed, surplus

    async def _delete_batches(self, sql: str, bound: int) -> int:
        """Run `sql` (bound, SWEEP_BATCH) until it deletes less than a batch, yielding between."""
        removed = 0
        while True:
            async with self._transaction() as db:
                cur = await db.execute(sql, (bound, SWEEP_BATCH))
                removed += cur.rowcount
            if cur.rowcount < SWEEP_BATCH:
                return removed
            await asyncio.sleep(0)

    # -- idempotency ------------------------------------------------------

    async def idempotency_get(self, team: str, key: str, since_ms: int) -> tuple[str, str] | None:
        """(body_hash, task_id) of a key used by the team since since_ms."""
        async with self._w.execute(
            "SELECT body_hash, task_id FROM idempotency "
            "WHERE team = ? AND key = ? AND created_ms >= ?",
            (team, key, since_ms),
        ) as cur:
            row = await cur.fetchone()
        return (str(row[0]), str(row[1])) if row else None

    async def forget_idempotency(self, task_id: str) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM idempotency WHERE task_id = ?", (task_id,))

    async def idempotency_sweep(self, before_ms: int) -> int:
        return await self._delete_batches(
            "DELETE FROM idempotency WHERE rowid IN "
            "(SELECT rowid FROM idempotency WHERE created_ms < ? LIMIT ?)", before_ms,
        )

    # -- callbacks outbox -------------------------------------------------

    async def outbox_due(self, now_ms: int, limit: int) -> list[OutboxItem]:
        async with self._r.execute(
            "SELECT id, task_id, url, attempts, next_attempt_ms FROM outbox "
            "WHERE state = 'pending' AND next_attempt_ms <= ? ORDER BY next_attempt_ms LIMIT ?",
            (now_ms, limit),
        ) as cur:
            return [OutboxItem(*r) for r in await cur.fetchall()]

    async def outbox_record(
        self, item_id: int, *, state: str, attempts: int, next_attempt_ms: int,
        error: str | None, now_ms: int,
    ) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE outbox SET state = ?, attempts = ?, next_attempt_ms = ?, last_error = ?, "
                "updated_ms = ? WHERE id = ? AND state = 'pending'",
                (state, attempts, next_attempt_ms, error, now_ms, item_id),
            )


class _Change:
    """The context manager behind Store._transaction(), written out as a class.

    It runs twice on every submit; the generator machinery of
    @asynccontextmanager cost more than the bookkeeping it wraps.
    """

    __slots__ = ("_commit_now", "_group", "_store")

    def __init__(self, store: Store) -> None:
        self._store = store
        self._group: _Group | None = None
        self._commit_now = False

    async def __aenter__(self) -> _Connection:
        store = self._store
        await store._close_gate()
        try:
            self._group, self._commit_now = await store._open_change()
        except BaseException:
            store._gate.set()
            raise
        return store._w

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        store = self._store
        group = self._group
        assert group is not None
        try:
            if self._commit_now:
                if exc_type is None:
                    store._commit(group)
                else:
                    store._abandon(group)
            elif exc_type is None:
                store._w.run("RELEASE change")
            elif store._w.in_transaction:
                store._w.run("ROLLBACK TO change")
                store._w.run("RELEASE change")
            else:
                # SQLite rolled the whole transaction back (a full disk, an I/O
                # error): the changes made before this one are gone too.
                store._fail_group(group, exc)
        finally:
            store._gate.set()
        if exc_type is None:
            await _committed(group)


class _Group(asyncio.Future[None]):
    """A group commit's outcome, awaited by every change in it.

    It refuses cancel(): a waiter being cancelled cancels the future it awaits,
    which would tell every other change in the group that it failed. The
    cancelled waiter is instead woken when the group is done; see
    _committed(). This replaced asyncio.shield() around a plain future, which
    put one more future and one more turn-of-the-loop callback between each
    commit and each of its waiters.
    """

    def cancel(self, msg: Any | None = None) -> bool:
        return False


async def _committed(group: _Group) -> None:
    """Wait for a group's COMMIT; a cancellation meanwhile is delivered after it.

    The change is already part of the group and will commit whatever the caller
    does: raising CancelledError now would tell the caller it did not happen (a
    reservation the submit path then never settles). Instead the caller learns
    the outcome and is cancelled at its next await.
    """
    try:
        await group
        return
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or not group.done():
            raise
        # Woken by the commit with the cancellation pending: hand it back for
        # the caller's next await, after the caller has heard the outcome.
        task.uncancel()
        task.cancel()
    group.result()


def _settle(task: TaskRecord, outcome: Outcome) -> TaskRecord:
    charged = task.price_micros * outcome.images if outcome.state == "success" else 0
    return task._replace(
        state=outcome.state,
        result_json=outcome.result_json,
        fail_code=outcome.fail_code,
        fail_msg=outcome.fail_msg,
        complete_ms=outcome.complete_ms,
        charged_micros=charged if task.reserved_micros else 0,
        images=outcome.images if outcome.state == "success" else 0,
    )


def _follow(follower: TaskRecord, leader: TaskRecord) -> TaskRecord:
    """A joined task ends exactly as its leader did, charged nothing.

    Not before it began, though: upstream may have finished the leader before
    the follower joined (the gateway learns of it at its next poll), and a
    client computing costTime must not see a negative one.
    """
    success = leader.state == "success"
    return follower._replace(
        state=leader.state,
        result_json=leader.result_json,
        fail_code=leader.fail_code,
        fail_msg=leader.fail_msg,
        complete_ms=max(follower.create_ms, leader.complete_ms or follower.create_ms),
        images=leader.images if success else 0,
        saved_micros=follower.price_micros * leader.images if success else 0,
    )


async def _usage(db: _Connection, team: str, since_day: str) -> Usage:
    async with db.execute(
        "SELECT COALESCE(SUM(spent_micros), 0), COALESCE(SUM(reserved_micros), 0) "
        "FROM usage_daily WHERE team = ? AND day >= ?",
        (team, since_day),
    ) as cur:
        row = await cur.fetchone()
    assert row is not None
    return Usage(spent=int(row[0]), reserved=int(row[1]))


_LEDGER_INSERT = (
    "INSERT INTO ledger (ts_ms, team, model, task_id, kind, amount_micros, images, day) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_OUTBOX_INSERT = (
    "INSERT INTO outbox (task_id, url, next_attempt_ms, updated_ms) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (task_id) DO NOTHING"
)


async def _ledger(
    db: _Connection, task: TaskRecord, kind: str, amount: Micros, images: int, now_ms: int
) -> None:
    await db.execute(
        _LEDGER_INSERT,
        (now_ms, task.team, task.model, task.id, kind, amount, images, task.budget_day),
    )


def _insert_free_tasks(db: _Connection, items: list[tuple[TaskRecord, int]]) -> None:
    """The rows of new tasks that cost nothing (hits, joins): each task, its
    saving, its webhook if it is already final. One statement per table."""
    db.run_many(_TASK_INSERT, [task for task, _ in items])  # its fields are the columns
    db.run_many(_LEDGER_INSERT, [
        (now, task.team, task.model, task.id, "saving", task.saved_micros, task.images,
         task.budget_day)
        for task, now in items if task.state == "success"
    ])
    db.run_many(_OUTBOX_INSERT, [
        (task.id, task.callback_url, now, now)
        for task, now in items if task.is_final and task.callback_url
    ])


async def _remember_idempotency(
    db: _Connection, task: TaskRecord, idempotency: tuple[str, str], now_ms: int
) -> None:
    key, body_hash = idempotency
    # An expired key (older than 24 h) is taken over; a live one is a conflict.
    await db.execute(
        "INSERT INTO idempotency (team, key, body_hash, task_id, created_ms) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (team, key) DO UPDATE SET "
        "body_hash = excluded.body_hash, task_id = excluded.task_id, "
        "created_ms = excluded.created_ms WHERE idempotency.created_ms < ?",
        (task.team, key, body_hash, task.id, now_ms, now_ms - IDEMPOTENCY_TTL_MS),
    )
    async with db.execute(
        "SELECT task_id, body_hash FROM idempotency WHERE team = ? AND key = ?", (task.team, key)
    ) as cur:
        row = await cur.fetchone()
    if row is not None and row[0] != task.id:
        raise IdempotencyConflict(str(row[0]), str(row[1]))


async def _enqueue_callback(db: _Connection, task: TaskRecord, now_ms: int) -> None:
    await db.execute(_OUTBOX_INSERT, (task.id, task.callback_url, now_ms, now_ms))


def _split_sql(script: str) -> Iterable[str]:
    """Split a migration into statements, keeping trigger bodies whole."""
    statement: list[str] = []
    for line in script.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("--"):
            continue
        statement.append(line)
        joined = "\n".join(statement)
        if stripped.endswith(";") and sqlite3.complete_statement(joined):
            yield joined
            statement = []
    if statement:
        yield "\n".join(statement)
