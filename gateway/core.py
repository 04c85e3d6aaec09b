"""The submit pipeline and the task lifecycle: one place where a request becomes upstream work.

handler -> Gateway.submit: idempotency -> rate -> cache (hit / join) ->
concurrency lease -> budget reservation -> upstream; the tracker reports the
outcome to Gateway.finish, which settles money once and fans out to joined
tasks, the cache, metrics and the webhook outbox.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

from cachetools import LRUCache

from gateway import jsonio
from gateway.budget import Budgets, utc_day_of_ms
from gateway.cache import Flight, Flights, ResultCache, cache_key
from gateway.callbacks import Callbacks, check_callback_url
from gateway.config import Config, TeamConfig
from gateway.errors import APIError
from gateway.limits import Limits
from gateway.logs import log_event
from gateway.metrics import Metrics
from gateway.money import micros_to_usd
from gateway.store import (
    IDEMPOTENCY_TTL_MS,
    UNANNOUNCED,
    CacheEntry,
    IdempotencyConflict,
    Outcome,
    Store,
    TaskRecord,
)
from gateway.tasks import new_task_id, now_ms, status_envelope
from gateway.tracker import Tracker
from gateway.upstream import Upstream
from gateway.validation import Submission

log = logging.getLogger("gateway.core")

VIEW_CACHE_ENTRIES = 100_000
# Encoded statusTask answers of final tasks (about 1 KB each), which never change.
STATUS_BODY_ENTRIES = 10_000
# Refusals that leave the submit out of the team's requests_per_minute: it did no work.
REFUNDED_REFUSALS = frozenset({"budget", "concurrency", "busy"})


class SubmitOptions(NamedTuple):  # built on every submit: see store.TaskRecord
    body_hash: str
    idempotency_key: str | None = None
    no_cache: bool = False
    no_store: bool = False


class Submitted(NamedTuple):
    task_id: str
    cache: str  # hit | miss | joined | bypass
    replayed: bool = False


class StatusAnswer(NamedTuple):
    team: str
    model: str
    body: bytes


class TaskViews:
    """Recently seen tasks by id: what status polls and the lifecycle read first.

    Kept as plain tuples. The collector stops tracking a tuple that holds only
    strings, ints and None after its first collection, but never a tuple
    subclass such as TaskRecord: with 100,000 of them every full collection
    walked them all, a pause of about 20 ms every second or two under load.
    """

    def __init__(self, maxsize: int) -> None:
        self._rows: LRUCache[str, tuple[Any, ...]] = LRUCache(maxsize=maxsize)

    def get(self, task_id: str) -> TaskRecord | None:
        row = self._rows.get(task_id)
        return None if row is None else TaskRecord._make(row)

    def put(self, task: TaskRecord) -> None:
        self._rows[task.id] = tuple(task)


class Gateway:
    def __init__(
        self,
        config: Config,
        store: Store,
        upstream: Upstream,
        metrics: Metrics,
        callbacks: Callbacks,
    ) -> None:
        self.config = config
        self.store = store
        self.upstream = upstream
        self.metrics = metrics
        self.callbacks = callbacks
        self.budgets = Budgets(store)
        self.limits = Limits(config.upstream.max_concurrent, config.upstream.first_poll_seconds)
        self.cache = ResultCache(
            store, config.cache.memory_entries, config.cache.ttl_seconds * 1000
        )
        self.flights = Flights()
        self.tracker = Tracker(upstream, config.upstream, self._on_outcome, self._on_processing)
        self._views = TaskViews(VIEW_CACHE_ENTRIES)
        self._final_answers: LRUCache[str, StatusAnswer] = LRUCache(maxsize=STATUS_BODY_ENTRIES)
        self._idempotency_locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}
        self._keys: dict[bytes, TeamConfig] = {}
        self._seen_keys: dict[str, TeamConfig] = {}
        self.apply_config(config)

    # -- configuration ------------------------------------------------------

    def apply_config(self, config: Config) -> None:
        """Swap teams, keys, budgets and limits; in-flight work keeps its leases."""
        previous = self.config
        self.config = config
        self._keys = {digest: team for team in config.teams for digest in team.key_hashes}
        self._seen_keys = {}
        self.limits.global_max = config.upstream.max_concurrent
        self.metrics.upstream_max_concurrent.set(config.upstream.max_concurrent)
        # Rebuilt whole: a limit the reload lifted must not stay drawn on the panel.
        self.metrics.team_max_concurrent.clear()
        for team in config.teams:
            if team.max_concurrent is not None:
                self.metrics.team_max_concurrent.labels(team.name).set(team.max_concurrent)
            self.metrics.tasks_in_flight.labels(team.name).set(self.limits.in_flight(team.name))
        for gone in {t.name for t in previous.teams} - {t.name for t in config.teams}:
            self._show_in_flight(gone)
        self.metrics.prepare((team.name for team in config.teams), config.pricing)
        self.metrics.price.clear()
        for model, micros in config.pricing.items():
            self.metrics.price.labels(model).set(micros_to_usd(micros))
        self.cache.set_ttl(config.cache.ttl_seconds * 1000)

    def _show_in_flight(self, team: str) -> None:
        """Set a team's in-flight gauge; a team no longer configured keeps its
        series only while its tasks are still in flight."""
        n = self.limits.in_flight(team)
        if n or self._is_team(team):
            self.metrics.tasks_in_flight.labels(team).set(n)
        else:
            try:
                self.metrics.tasks_in_flight.remove(team)
            except KeyError:
                pass

    def authenticate(self, authorization: str | None) -> TeamConfig:
        token = ""
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip()
        if not token:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <team key>'",
                           reason="unauthorized")
        # Keys already seen to be valid skip the hash: OpenSSL's sha256 set-up is
        # most of an authentication's cost on a status poll. Only valid keys are
        # remembered, so the map is no larger than the configured keys.
        team_cfg = self._seen_keys.get(token)
        if team_cfg is not None:
            return team_cfg
        # surrogateescape: a header that is not UTF-8 is just an unknown key (401), not a 500.
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        # Looked up, not compared key by key: a dict lookup's time depends on the
        # hash of what the caller sent (randomised per process for the token,
        # SHA-256 for the digest), which tells the caller nothing about any key.
        team_cfg = self._keys.get(digest)
        if team_cfg is None:
            raise APIError(401, "Unknown API key", reason="unauthorized")
        if len(self._seen_keys) < len(self._keys):
            self._seen_keys[token] = team_cfg
        return team_cfg

    # -- startup ------------------------------------------------------------

    async def resume(self) -> None:
        """Pick up tasks that were in flight when the previous process stopped."""
        # Every team's money, configured now or not: a team a reload adds back
        # must not start from 0 and jump at the next restart, and what a
        # removed team spent stays spent.
        for kind_total in await self.store.ledger_totals():
            team, model, kind, amount, images = kind_total
            if kind == "charge":
                self.metrics.spend.add(team, model, amount)
                self.metrics.images.labels(team, model).inc(images)
            elif kind == "saving":
                self.metrics.saved.add(team, model, amount)
        leaders = [t for t in await self.store.active_tasks() if t.leader_id is None]
        # Settled before any lease is restored: finishing a task releases a
        # lease, and these never got theirs back, so releasing first would take
        # slots from the tasks still running upstream.
        for task in leaders:
            if task.upstream_id is None:
                # It may or may not have reached upstream; we never resubmit,
                # so the team gets its reservation back. The client never got
                # an answer (see store.UNANNOUNCED).
                await self.finish(task.id, Outcome(
                    "failed", now_ms(), fail_code="GatewayRestart",
                    fail_msg="The gateway restarted before APIXO accepted the task",
                ))
        for task in leaders:
            if task.upstream_id is None:
                continue
            self.limits.restore(task.team, 1)
            if task.cache in ("miss", "bypass") and self.config.cache.enabled:
                self.flights.adopt(self._cache_key(task.identity, task.team), task.id)
            self._views.put(task)
            self.tracker.track(task)
        for team in (await self.store.in_flight_by_team()):
            self._show_in_flight(team)

    def _is_team(self, name: str) -> bool:
        return self.config.team(name) is not None

    # -- submit ---------------------------------------------------------------

    async def submit(self, team: TeamConfig, sub: Submission, opts: SubmitOptions) -> Submitted:
        if sub.callback_url is not None:
            await check_callback_url(sub.callback_url, self.config.callbacks)
        if opts.idempotency_key is None:
            return await self._submit(team, sub, opts)
        async with self._idempotency(team.name, opts.idempotency_key):
            previous = await self.store.idempotency_get(
                team.name, opts.idempotency_key, now_ms() - IDEMPOTENCY_TTL_MS
            )
            if previous is None:
                try:
                    return await self._submit(team, sub, opts)
                except IdempotencyConflict as exc:  # the UNIQUE key says who came first
                    previous = (exc.body_hash, exc.task_id)
            body_hash, task_id = previous
            if body_hash != opts.body_hash:
                raise APIError(
                    409,
                    f"Idempotency-Key {opts.idempotency_key!r} was already used by this team "
                    f"with a different request body (task {task_id})",
                    reason="invalid",
                )
            task = await self.get_task(task_id)
            return Submitted(task_id, task.cache if task else "miss", replayed=True)

    @asynccontextmanager
    async def _idempotency(self, team: str, key: str) -> AsyncIterator[None]:
        # Same team and key: one at a time, so the second sees the first's row.
        lock, users = self._idempotency_locks.get((team, key), (asyncio.Lock(), 0))
        self._idempotency_locks[(team, key)] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._idempotency_locks[(team, key)]
            if users <= 1:
                del self._idempotency_locks[(team, key)]
            else:
                self._idempotency_locks[(team, key)] = (lock, users - 1)

    async def _submit(self, team: TeamConfig, sub: Submission, opts: SubmitOptions) -> Submitted:
        stamp = self.limits.check_rate(team)
        try:
            return await self._decide(team, sub, opts)
        except APIError as exc:
            if exc.reason in REFUNDED_REFUSALS:
                self.limits.refund_rate(team.name, stamp)
            raise

    async def _decide(self, team: TeamConfig, sub: Submission, opts: SubmitOptions) -> Submitted:
        identity = sub.identity
        if not self.config.cache.enabled:
            return await self._lead(team, sub, opts, identity, "bypass", None, None)
        key = self._cache_key(identity, team.name)
        if opts.no_cache:
            return await self._bypass(team, sub, opts, identity, key)
        while True:
            entry = self.cache.get_hot(key, now_ms())
            if entry is not None:
                return await self._hit(team, sub, opts, identity, entry.result_json, entry.images)
            leader = self.flights.leader(key)
            if leader is not None:
                return await self._join(team, sub, opts, identity, leader)
            flight = self.flights.get(key)
            if flight is not None:
                ready = await asyncio.shield(flight.ready)
                if isinstance(ready, APIError):  # upstream refused this very request
                    raise APIError(ready.code, ready.error, message=ready.message,
                                   headers={**ready.headers, "X-Gateway-Cache": "joined"},
                                   reason=ready.reason, extra=ready.extra)
                if ready is not None:
                    return await self._join(team, sub, opts, identity, ready)
                continue  # the leader stopped before upstream: decide again
            flight = self.flights.start(key)
            try:
                entry = await self.cache.get(key, now_ms())
                if entry is not None:
                    self.flights.abort(key, flight)
                    return await self._hit(
                        team, sub, opts, identity, entry.result_json, entry.images
                    )
                return await self._lead(team, sub, opts, identity, "miss", key, flight)
            except BaseException:
                self.flights.abort(key, flight)
                raise

    async def _bypass(
        self, team: TeamConfig, sub: Submission, opts: SubmitOptions, identity: str, key: str
    ) -> Submitted:
        """A no-cache submit: it neither looks up nor joins, but others may join it.

        Its task is as good an answer to an identical request as a miss's, so
        when nothing identical is on its way it becomes the task they join.
        """
        if self.flights.get(key) is not None or self.flights.leader(key) is not None:
            return await self._lead(team, sub, opts, identity, "bypass", None, None)
        flight = self.flights.start(key)
        try:
            return await self._lead(team, sub, opts, identity, "bypass", key, flight)
        except BaseException:
            self.flights.abort(key, flight)
            raise

    def _cache_key(self, identity: str, team: str) -> str:
        return cache_key(identity, self.config.cache.scope, team)

    def _new_task(
        self, team: TeamConfig, sub: Submission, opts: SubmitOptions, identity: str, cache: str,
        created: int, *, state: str = "submitting", leader_id: str | None = None,
        result_json: str | None = None, images: int = 0, complete_ms: int | None = None,
        reserve: bool = False,
    ) -> TaskRecord:
        # Built once with its final fields rather than copied with changes.
        body = {"request_type": "async", "input": sub.input, "provider": sub.provider}
        price = self.config.pricing.get(sub.model)
        if price is None:  # a reload stopped serving it while this request waited
            raise APIError(404, f"Model {sub.model!r} is no longer served by this gateway",
                           message="Model not found", reason="invalid")
        return TaskRecord(
            id=new_task_id(), team=team.name, model=sub.model, identity=identity,
            state=state, cache=cache, leader_id=leader_id, upstream_id=None,
            request_json=jsonio.dumps_text(body), result_json=result_json,
            fail_code=None, fail_msg=None, create_ms=created, complete_ms=complete_ms,
            price_micros=price, reserved_micros=price if reserve else 0, charged_micros=0,
            saved_micros=price * images if cache == "hit" else 0, images=images,
            budget_day=utc_day_of_ms(created),
            no_store=int(opts.no_store), callback_url=sub.callback_url,
        )

    def _idem(self, opts: SubmitOptions) -> tuple[str, str] | None:
        if opts.idempotency_key is None:
            return None
        return (opts.idempotency_key, opts.body_hash)

    async def _hit(
        self, team: TeamConfig, sub: Submission, opts: SubmitOptions, identity: str,
        result_json: str, images: int,
    ) -> Submitted:
        created = now_ms()
        task = self._new_task(
            team, sub, opts, identity, "hit", created,
            state="success", result_json=result_json, images=images, complete_ms=created,
        )
        task = await self.store.create_task(task, idempotency=self._idem(opts), now_ms=created)
        self.metrics.count_cache(sub.model, "hit")
        self._finished([task])
        return Submitted(task.id, "hit")

    async def _join(
        self, team: TeamConfig, sub: Submission, opts: SubmitOptions, identity: str,
        leader_id: str,
    ) -> Submitted:
        created = now_ms()
        task = self._new_task(
            team, sub, opts, identity, "joined", created, state="pending", leader_id=leader_id,
        )
        task = await self.store.create_task(task, idempotency=self._idem(opts), now_ms=created)
        self.metrics.count_cache(sub.model, "joined")
        if task.is_final:
            self._finished([task])
        else:
            self._views.put(task)
            _log_state("task joined", task, leader_id=leader_id)
        return Submitted(task.id, "joined")

    async def _lead(
        self, team: TeamConfig, sub: Submission, opts: SubmitOptions, identity: str, cache: str,
        key: str | None, flight: Flight | None,
    ) -> Submitted:
        # The lease is taken inside the reservation's transaction, after the budget
        # check: requests that will get a 402 never hold a slot, so a burst from a
        # team out of budget cannot make the gateway look busy to everyone else.
        acquired = False

        def admit() -> None:
            nonlocal acquired
            self.limits.acquire(team)
            acquired = True

        try:
            created = now_ms()
            task = self._new_task(team, sub, opts, identity, cache, created, reserve=True)
            await self.budgets.reserve(
                team, task, idempotency=self._idem(opts), now_ms=created, admit=admit
            )
        except BaseException as exc:
            if acquired:
                self.limits.release(team.name)
            _tag_cache(exc, cache)
            raise
        self.metrics.tasks_in_flight.labels(team.name).set(self.limits.in_flight(team.name))
        # Counted once admitted, like hits and joins: a submit refused with 402/429
        # is a rejection, and counting it as a miss would dilute the hit rate.
        self.metrics.count_cache(sub.model, cache)
        try:
            upstream_id = await self.upstream.submit(sub.model, task.request_json)
            await self.store.mark_submitted(task.id, upstream_id)
        except BaseException as exc:
            # Upstream refused or never answered: nothing is owed. finish() does
            # the release exactly once and frees the lease.
            why = exc.error if isinstance(exc, APIError) else f"submit interrupted: {exc!r}"
            if flight is not None and key is not None and isinstance(exc, APIError):
                self.flights.abort(key, flight, refusal=exc)
            refused = Outcome("failed", now_ms(), fail_code="UpstreamRejected", fail_msg=why)
            # The client gets an error, not this task's id (see store.UNANNOUNCED).
            forget = opts.idempotency_key is not None
            try:
                settled = await asyncio.shield(self.finish(task.id, refused))
                if not settled:
                    # Settled first by a writer outside this process (see
                    # Store.mark_submitted): _finished() never ran for it here.
                    self.limits.release(team.name)
                    self._show_in_flight(team.name)
            except Exception:
                # A failed write (disk full) must not leave the reservation and
                # the lease held until a restart, nor hide the client's error.
                log.exception("settling a refused submit failed; retrying",
                              extra={"task_id": task.id})
                self.tracker.settle_later(task, refused)
                if forget:
                    try:
                        await self.store.forget_idempotency(task.id)
                    except Exception:
                        log.exception("forgetting the Idempotency-Key of a refused submit "
                                      "failed", extra={"task_id": task.id})
            _tag_cache(exc, cache)
            raise
        task = task._replace(state="pending", upstream_id=upstream_id)
        self._views.put(task)
        _log_state("task submitted upstream", task)
        if flight is not None and key is not None:
            self.flights.lift_off(key, flight, task.id)
        self.tracker.track(task)
        return Submitted(task.id, cache)

    # -- lifecycle --------------------------------------------------------------

    async def _on_processing(self, task: TaskRecord) -> None:
        await self.store.mark_processing(task.id)
        view = self._views.get(task.id)
        if view is not None and view.state == "pending":
            self._views.put(view._replace(state="processing"))
        _log_state("task processing", task._replace(state="processing"))

    async def _on_outcome(self, task: TaskRecord, outcome: Outcome) -> None:
        await self.finish(task.id, outcome)

    async def finish(self, task_id: str, outcome: Outcome) -> list[TaskRecord]:
        task = self._views.get(task_id) or await self.store.get_task(task_id)
        key = None
        # A no-cache request ("bypass") only skipped the lookup: unless it also
        # said no-store, its fresh result is kept like any miss.
        if task is not None and (
            task.cache == "miss" or (task.cache == "bypass" and self.config.cache.enabled)
        ):
            key = self._cache_key(task.identity, task.team)
        finished = await self.budgets.settle(
            task_id, outcome, cache_key=key, cache_ttl_ms=self.config.cache.ttl_seconds * 1000
        )
        self._finished(finished, cache_key=key)
        return finished

    def _finished(self, tasks: list[TaskRecord], cache_key: str | None = None) -> None:
        """In-memory effects of tasks that just became final (the database already says so)."""
        callbacks = False
        for task in tasks:
            self._views.put(task)
            callbacks = callbacks or task.callback_url is not None
            seconds = (task.complete_ms or task.create_ms) / 1000 - task.create_ms / 1000
            if task.leader_id is None and task.cache in ("miss", "bypass"):
                # The lease was held until now, when the gateway learnt the outcome
                # (up to a poll after APIXO's completeTime): that is what a client
                # waiting for a slot waits, so it is what Retry-After estimates.
                held = (now_ms() - task.create_ms) / 1000
                self.limits.release(task.team, held if task.state == "success" else None)
                self.flights.land(task.id)
                self._show_in_flight(task.team)
                # Counted whether or not a reload removed the team: the money was spent.
                if task.state == "success":
                    self.metrics.spend.add(task.team, task.model, task.charged_micros)
                    self.metrics.images.labels(task.team, task.model).inc(task.images)
                if task.charged_micros > task.reserved_micros:
                    # The budget check saw only the reservation (one image): say
                    # so, since this is how a team can end up past its budget.
                    log.warning("task charged more than it reserved", extra={
                        "task_id": task.id, "team": task.team, "model": task.model,
                        "images": task.images,
                        "charged_usd": micros_to_usd(task.charged_micros),
                        "reserved_usd": micros_to_usd(task.reserved_micros),
                    })
                if (
                    cache_key is not None and task.state == "success" and not task.no_store
                    and task.result_json is not None
                ):
                    self.cache.remember(CacheEntry(
                        cache_key, task.result_json, task.images, task.id,
                        (task.complete_ms or 0) + self.config.cache.ttl_seconds * 1000,
                    ))
            if task.saved_micros:
                self.metrics.saved.add(task.team, task.model, task.saved_micros)
            if task.state == "failed" and task.fail_code not in UNANNOUNCED:
                self.metrics.task_failures.labels(
                    task.team, task.model, self.metrics.fail_code_label(task.fail_code)
                ).inc()
            # Hits end the moment they start; counting them would hide upstream latency.
            if task.cache != "hit" and task.fail_code not in UNANNOUNCED:
                self.metrics.task_duration.labels(task.model, task.state).observe(max(0, seconds))
            # A hit is born final and never changes state: its request line
            # (cache=hit, task_id) is its whole story, and a second line for
            # it was about a fifteenth of a hit's cost.
            if task.cache != "hit":
                _log_state(
                    "task final", task, fail_code=task.fail_code, images=task.images,
                    charged_usd=micros_to_usd(task.charged_micros), seconds=round(seconds, 3),
                )
        if callbacks:
            self.callbacks.wake()

    # -- reads ----------------------------------------------------------------

    async def get_task(self, task_id: str) -> TaskRecord | None:
        task = self._views.get(task_id)
        if task is None:
            task = await self.store.get_task(task_id)
            if task is not None:
                self._views.put(task)
        return task

    async def status_answer(self, task_id: str) -> StatusAnswer | None:
        """A task's owner and encoded statusTask answer; None if there is no such task.

        A final task's answer is encoded once and kept with its owner, so the
        polls most clients make (of tasks already final: they poll until they
        see it, and often after) take one lookup. Reading the task and
        rebuilding its record first was a tenth of such a poll's cost.
        """
        answer = self._final_answers.get(task_id)
        if answer is not None:
            return answer
        task = await self.get_task(task_id)
        if task is None:
            return None
        if not task.is_final:
            body = json.dumps(status_envelope(task, self.shown_state(task))).encode()
            return StatusAnswer(task.team, task.model, body)
        answer = StatusAnswer(task.team, task.model, json.dumps(status_envelope(task)).encode())
        self._final_answers[task.id] = answer
        return answer

    def shown_state(self, task: TaskRecord) -> str | None:
        """A joined task shows its leader's progress until both are final."""
        if task.leader_id is not None and not task.is_final:
            leader = self._views.get(task.leader_id)
            if leader is not None and leader.state == "processing":
                return "processing"
        return None

    async def stop(self) -> None:
        await self.tracker.stop()


def _tag_cache(exc: BaseException, cache: str) -> None:
    """A refused submit still says what the cache decided (X-Gateway-Cache on every submit)."""
    if isinstance(exc, APIError):
        exc.headers.setdefault("X-Gateway-Cache", cache)


def _log_state(message: str, task: TaskRecord, **extra: object) -> None:
    """One log line per task state change (never the prompt: that is the request line's)."""
    log_event(log, message, {
        "event": "task_state", "task_id": task.id, "team": task.team, "model": task.model,
        "state": task.state, "cache": task.cache, **extra,
    })
