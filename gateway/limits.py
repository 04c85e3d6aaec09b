"""Concurrency leases and request-rate windows, per team and for the whole gateway.

A lease is held from the moment a task is about to go upstream until it is
final, so `max_concurrent` counts real upstream work, not a time window.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque

from gateway.config import TeamConfig
from gateway.errors import APIError

RATE_WINDOW_SECONDS = 60.0


def _too_many(error: str, reason: str, retry_after: float) -> APIError:
    seconds = max(1, math.ceil(retry_after))
    return APIError(
        429, f"{error}; retry after {seconds} s", reason=reason,
        headers={"Retry-After": str(seconds)},
    )


class Limits:
    def __init__(self, global_max: int, expected_task_seconds: float) -> None:
        self.global_max = global_max
        self._global = 0
        self._team: dict[str, int] = defaultdict(int)
        self._started: dict[str, deque[float]] = defaultdict(deque)
        self._windows: dict[str, deque[float]] = defaultdict(deque)
        # A running estimate of upstream task duration, so Retry-After for a
        # concurrency limit says when a slot is likely to free up.
        self._expected = expected_task_seconds

    @property
    def global_in_flight(self) -> int:
        return self._global

    def in_flight(self, team: str) -> int:
        return self._team.get(team, 0)

    def check_rate(self, team: TeamConfig, now: float | None = None) -> float | None:
        """Count one submit in the team's sliding minute, or refuse it.

        Returns the submit's place in the window (None without a limit), for
        refund_rate() if the submit is then refused for another reason.
        """
        limit = team.requests_per_minute
        if limit is None:
            return None
        now = time.monotonic() if now is None else now
        window = self._windows[team.name]
        while window and window[0] <= now - RATE_WINDOW_SECONDS:
            window.popleft()
        if len(window) >= limit:
            retry = window[0] + RATE_WINDOW_SECONDS - now
            raise _too_many(
                f"Team {team.name!r} is over its rate limit of {limit} requests per minute",
                "rate_limit", retry,
            )
        window.append(now)
        return now

    def refund_rate(self, team: str, stamp: float | None) -> None:
        """Take back a submit refused by its budget or a concurrency limit.

        It did no work, and a client that honours that refusal's Retry-After
        must not find its minute used up by the refusals themselves.
        """
        if stamp is None:
            return
        window = self._windows.get(team)
        if window is not None and stamp in window:
            window.remove(stamp)

    def acquire(self, team: TeamConfig, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        held = self._team.get(team.name, 0)
        if team.max_concurrent is not None and held >= team.max_concurrent:
            raise _too_many(
                f"Team {team.name!r} has {held} tasks in flight, its max_concurrent is "
                f"{team.max_concurrent}",
                "concurrency", self._retry_after(self._started[team.name], now),
            )
        if self._global >= self.global_max:
            oldest = min((d[0] for d in self._started.values() if d), default=now)
            raise _too_many(
                f"The gateway has {self._global} upstream tasks in flight, "
                f"upstream.max_concurrent is {self.global_max}",
                "busy", oldest + self._expected - now,
            )
        self._take(team.name, now)

    def _take(self, team: str, now: float) -> None:
        self._team[team] += 1
        self._global += 1
        self._started[team].append(now)

    def restore(self, team: str, count: int) -> None:
        """Leases for tasks found in flight at startup (they may exceed a lowered limit)."""
        now = time.monotonic()
        for _ in range(count):
            self._take(team, now)

    def release(self, team: str, duration: float | None = None) -> None:
        if self._team.get(team, 0) <= 0:
            return
        self._team[team] -= 1
        self._global -= 1
        started = self._started[team]
        if started:
            started.popleft()
        if duration is not None and duration > 0:
            self._expected = 0.8 * self._expected + 0.2 * duration

    def _retry_after(self, started: deque[float], now: float) -> float:
        if not started:
            return 1.0
        return started[0] + self._expected - now
