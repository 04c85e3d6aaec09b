"""Background polling of upstream tasks, timeouts included.

Client status polls never reach upstream; this is the only place that asks
APIXO how a task is doing, at the first-poll delay and interval from config.

A task waiting for its next poll is an entry in a heap of due times, not a
sleeping coroutine: with thousands of tasks in flight, a coroutine, its frame,
its sleep future and its timer each were objects every full garbage
collection walked (pauses past 100 ms under load), and every timer sat in the
event loop's own heap. One loop timer fires for the earliest due poll; a poll
runs as a short task and schedules the next.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.config import UpstreamConfig
from gateway.store import Outcome, TaskRecord
from gateway.upstream import TransientUpstreamError, Upstream

log = logging.getLogger("gateway.tracker")

OnOutcome = Callable[[TaskRecord, Outcome], Awaitable[None]]
OnProcessing = Callable[[TaskRecord], Awaitable[None]]


def completed_at(data: dict[str, object], created_ms: int, now_ms: int) -> int:
    """When APIXO says the task finished, else now (when the gateway learnt it).

    The gateway finds out at its next poll, up to poll_interval_seconds late (and
    first_poll_seconds for a fast task), and clients read completeTime and
    costTime as APIXO's. Kept between the task's creation here and now: the
    two clocks may disagree, and a task cannot end before it began.
    """
    value = data.get("completeTime")
    if not isinstance(value, int) or isinstance(value, bool):
        return now_ms
    return max(created_ms, min(value, now_ms))


def outcome_from_status(
    data: dict[str, object], now_ms: int, *, created_ms: int
) -> Outcome | None:
    """A final Outcome from upstream's status data, or None while it is still running."""
    state = data.get("state")
    if state in ("success", "failed"):
        now_ms = completed_at(data, created_ms, now_ms)
    if state == "success":
        raw = data.get("resultJson")
        try:
            if not isinstance(raw, str):
                raise TypeError(f"resultJson is {type(raw).__name__}, not a string")
            urls = json.loads(raw)["resultUrls"]
            if not isinstance(urls, list) or not urls:
                raise ValueError("no resultUrls")
        except (ValueError, TypeError, KeyError) as exc:
            return Outcome(
                "failed", now_ms, fail_code="InvalidUpstreamResult",
                fail_msg=f"APIXO reported success without usable resultUrls ({exc})",
            )
        # Upstream's own string, not one rebuilt from its URLs: other models
        # may say more in it, and clients read it as APIXO wrote it.
        return Outcome("success", now_ms, result_json=raw, images=len(urls))
    if state == "failed":
        return Outcome(
            "failed", now_ms,
            fail_code=str(data.get("failCode") or "Unknown error"),
            fail_msg=str(data.get("failMsg") or "APIXO reported the task as failed"),
        )
    return None


class Tracker:
    def __init__(
        self,
        upstream: Upstream,
        config: UpstreamConfig,
        on_outcome: OnOutcome,
        on_processing: OnProcessing,
    ) -> None:
        self._upstream = upstream
        self._config = config
        self._on_outcome = on_outcome
        self._on_processing = on_processing
        # task id -> (the task as a plain tuple, deadline, seen processing). Plain
        # tuples of strings and numbers are not tracked by the garbage collector.
        self._watch: dict[str, tuple[tuple[Any, ...], float, bool]] = {}
        self._due: list[tuple[float, int, str]] = []  # (when, tie-breaker, task id)
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._polls: dict[str, asyncio.Task[None]] = {}
        self._rng = random.Random()

    def __len__(self) -> int:
        return len(self._watch)

    def track(self, task: TaskRecord) -> None:
        if task.id in self._watch:
            return
        assert task.upstream_id is not None
        cfg = self._config
        deadline = task.create_ms / 1000 + cfg.task_timeout_seconds
        self._watch[task.id] = (tuple(task), deadline, task.state == "processing")
        first = task.create_ms / 1000 + cfg.first_poll_seconds
        now = time.time()
        if first < now:
            # Overdue: tasks resumed after a restart. Due all at once, they would
            # reach APIXO in one burst and, each polled again an interval after
            # its last poll, stay in that burst for good. Spread over an interval.
            first = now + self._rng.uniform(0, cfg.poll_interval_seconds)
        self._schedule(task.id, min(first, deadline))

    def settle_later(self, task: TaskRecord, outcome: Outcome) -> None:
        """Keep trying to record an outcome whose first write failed (see _settle).

        Until it is recorded the task holds its reservation and its lease; a
        stop leaves it to the next start, which settles unaccepted tasks.
        """
        if task.id in self._polls:
            return
        settle = asyncio.create_task(self._settle(task, outcome), name=f"settle-{task.id}")
        self._polls[task.id] = settle
        settle.add_done_callback(functools.partial(self._poll_done, task.id))

    async def stop(self) -> None:
        """Stop polling; tasks stay in the database and resume on next start."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        polls = list(self._polls.values())
        for poll in polls:
            poll.cancel()
        await asyncio.gather(*polls, return_exceptions=True)

    # -- scheduling ------------------------------------------------------------

    def _schedule(self, task_id: str, when: float) -> None:
        heapq.heappush(self._due, (when, next(self._seq), task_id))
        if self._timer is None or when < self._timer_when:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_when = when
        self._timer = loop.call_at(loop.time() + max(0.0, when - time.time()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = time.time()
        while self._due and self._due[0][0] <= now:
            _, _, task_id = heapq.heappop(self._due)
            if task_id in self._watch and task_id not in self._polls:
                poll = asyncio.create_task(self._poll(task_id), name=f"poll-{task_id}")
                self._polls[task_id] = poll
                poll.add_done_callback(functools.partial(self._poll_done, task_id))
        if self._due:
            self._arm(self._due[0][0])

    def _poll_done(self, task_id: str, poll: asyncio.Task[None]) -> None:
        self._polls.pop(task_id, None)
        if poll.cancelled() or poll.exception() is None:
            return
        # A bug must not drop the task: its timeout and its lease live here.
        log.error("polling a task failed unexpectedly; will ask again",
                  exc_info=poll.exception(), extra={"task_id": task_id})
        if task_id in self._watch:
            self._schedule(task_id, time.time() + self._config.poll_interval_seconds)

    # -- one poll ----------------------------------------------------------------

    async def _poll(self, task_id: str) -> None:
        row, deadline, processing = self._watch[task_id]
        task = TaskRecord._make(row)
        assert task.upstream_id is not None
        wait = self._config.poll_interval_seconds
        not_before = 0.0  # what APIXO's Retry-After asked for
        try:
            data = await self._upstream.status(task.model, task.upstream_id)
        except TransientUpstreamError as exc:
            # 429, 5xx, timeouts: the task is not failed, only unknown for now.
            # APIXO asking for a pause (Retry-After) gets it.
            not_before = exc.retry_after or 0.0
            wait = max(wait, not_before)
            log.warning("upstream status unavailable, will ask again",
                        extra={"task_id": task.id, "error": str(exc), "retry_in_s": wait})
        except Exception:
            # Anything else (an undecodable answer, a bug) must not end the
            # tracking: the timeout below lives here, and so does the lease.
            log.exception("polling upstream failed, will ask again",
                          extra={"task_id": task.id})
        else:
            outcome = outcome_from_status(
                data, int(time.time() * 1000), created_ms=task.create_ms
            )
            if outcome is not None:
                await self._settle(task, outcome)
                return
            if data.get("state") == "processing" and not processing:
                try:
                    await self._on_processing(task)
                    processing = True
                    self._watch[task_id] = (row, deadline, True)
                except Exception:
                    # Only the shown state lags; keep polling toward the outcome.
                    log.exception("recording 'processing' failed",
                                  extra={"task_id": task.id})
        # Asked once more before giving up, so a task that finished while
        # the gateway was down is settled as it really ended.
        now = time.time()
        if now >= deadline:
            await self._settle(task, Outcome(
                "failed", int(now * 1000), fail_code="Timeout",
                fail_msg=f"Task not final after {self._config.task_timeout_seconds:g} s; "
                "the gateway gave up and refunded it",
            ))
            return
        # A tenth of jitter either way: polls that fell into step (a restart, a
        # Retry-After every task got at once) drift apart again.
        when = now + max(wait * self._rng.uniform(0.9, 1.1), not_before)
        self._schedule(task_id, min(when, deadline))

    async def _settle(self, task: TaskRecord, outcome: Outcome) -> None:
        # A failed write (disk full, locked database) must not drop the task:
        # keep trying, the compare-and-set makes a repeat harmless.
        while True:
            try:
                await self._on_outcome(task, outcome)
                break
            except Exception:
                log.exception("settling a task failed; retrying", extra={"task_id": task.id})
                await asyncio.sleep(self._config.poll_interval_seconds)
        self._watch.pop(task.id, None)
