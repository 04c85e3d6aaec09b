"""Background polling of upstream tasks: one loop per upstream task, timeouts included.

Client status polls never reach upstream; this is the only place that asks
APIXO how a task is doing, at the first-poll delay and interval from config.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

from gateway.config import UpstreamConfig
from gateway.store import Outcome, TaskRecord
from gateway.upstream import TransientUpstreamError, Upstream

log = logging.getLogger("gateway.tracker")

OnOutcome = Callable[[TaskRecord, Outcome], Awaitable[None]]
OnProcessing = Callable[[TaskRecord], Awaitable[None]]


def outcome_from_status(data: dict[str, object], now_ms: int) -> Outcome | None:
    """A final Outcome from upstream's status data, or None while it is still running."""
    state = data.get("state")
    if state == "success":
        try:
            urls = json.loads(str(data.get("resultJson")))["resultUrls"]
            if not isinstance(urls, list) or not urls:
                raise ValueError("no resultUrls")
        except (ValueError, TypeError, KeyError) as exc:
            return Outcome(
                "failed", now_ms, fail_code="InvalidUpstreamResult",
                fail_msg=f"APIXO reported success without usable resultUrls ({exc})",
            )
        return Outcome(
            "success", now_ms, result_json=json.dumps({"resultUrls": urls}), images=len(urls)
        )
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
        self._loops: dict[str, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._loops)

    def track(self, task: TaskRecord) -> None:
        if task.id in self._loops:
            return
        loop = asyncio.create_task(self._follow(task), name=f"track-{task.id}")
        self._loops[task.id] = loop
        loop.add_done_callback(lambda done: self._done(task, done))

    def _done(self, task: TaskRecord, loop: asyncio.Task[None]) -> None:
        self._loops.pop(task.id, None)
        if not loop.cancelled() and loop.exception() is not None:
            log.error("tracking stopped by an unexpected error; the task resumes on restart",
                      exc_info=loop.exception(), extra={"task_id": task.id})

    async def stop(self) -> None:
        """Stop polling; tasks stay in the database and resume on next start."""
        loops = list(self._loops.values())
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    async def _follow(self, task: TaskRecord) -> None:
        assert task.upstream_id is not None
        cfg = self._config
        deadline = task.create_ms / 1000 + cfg.task_timeout_seconds
        next_poll = task.create_ms / 1000 + cfg.first_poll_seconds
        processing = task.state == "processing"
        while True:
            await asyncio.sleep(max(0.0, min(next_poll, deadline) - time.time()))
            try:
                data = await self._upstream.status(task.model, task.upstream_id)
            except TransientUpstreamError as exc:
                # 429, 5xx, timeouts: the task is not failed, only unknown for now.
                log.warning("upstream status unavailable, will ask again",
                            extra={"task_id": task.id, "error": str(exc)})
            except Exception:
                # Anything else (an undecodable answer, a bug) must not end the
                # loop: the timeout below lives here, and so does the lease.
                log.exception("polling upstream failed, will ask again",
                              extra={"task_id": task.id})
            else:
                outcome = outcome_from_status(data, int(time.time() * 1000))
                if outcome is not None:
                    await self._settle(task, outcome)
                    return
                if data.get("state") == "processing" and not processing:
                    try:
                        await self._on_processing(task)
                        processing = True
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
                    fail_msg=f"Task not final after {cfg.task_timeout_seconds:g} s; "
                    "the gateway gave up and refunded it",
                ))
                return
            next_poll = now + cfg.poll_interval_seconds

    async def _settle(self, task: TaskRecord, outcome: Outcome) -> None:
        # A failed write (disk full, locked database) must not drop the task:
        # keep trying, the compare-and-set makes a repeat harmless.
        while True:
            try:
                await self._on_outcome(task, outcome)
                return
            except Exception:
                log.exception("settling a task failed; retrying", extra={"task_id": task.id})
                await asyncio.sleep(self._config.poll_interval_seconds)
