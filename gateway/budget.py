"""Where a team's dollar is reserved, charged and released.

reserve(): the budget check and the reservation are one SQLite write
transaction (Store.create_reserved_task), so concurrent submits cannot both
pass a check that only one of them fits.
settle(): charges price x images on success and releases the reservation on
any ending; Store.finish makes that a compare-and-set, so it happens once.
Periods are UTC calendar periods; money is attributed to the UTC day the task
was submitted, and a period's figure is the sum of its days.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache

from gateway.config import TeamConfig
from gateway.errors import APIError
from gateway.money import Micros, format_usd
from gateway.store import BudgetExceeded, Outcome, Store, TaskRecord, Usage

ALL_TIME = "0000-01-01"


def utc_today(now: datetime | None = None) -> date:
    return (now or datetime.now(UTC)).astimezone(UTC).date()


def utc_day_of_ms(epoch_ms: int) -> str:
    """The UTC day (ISO) of a timestamp: the day a task's money is attributed to."""
    return _day_iso(epoch_ms // 86_400_000)


@lru_cache(maxsize=8)
def _day_iso(day_number: int) -> str:
    # Every submit asks; building a datetime for it each time was a visible cost.
    return (date(1970, 1, 1) + timedelta(days=day_number)).isoformat()


_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_day(value: str) -> str:
    """A UTC day as YYYY-MM-DD, or ValueError; fromisoformat alone also takes
    20261125 and 2026-W48-3, which the reports' filters do not mean to."""
    if not _DAY.fullmatch(value):
        raise ValueError(f"not a date YYYY-MM-DD: {value!r}")
    return date.fromisoformat(value).isoformat()


def period_start(period: str, today: date) -> date | None:
    """First UTC day of the period containing today; None for "total"."""
    if period == "daily":
        return today
    if period == "weekly":
        return today - timedelta(days=today.weekday())
    if period == "monthly":
        return today.replace(day=1)
    return None


def period_start_key(team: TeamConfig, today: date) -> str:
    start = period_start(team.budget_period, today)
    return start.isoformat() if start else ALL_TIME


@dataclass(frozen=True)
class BudgetView:
    budget: Micros | None
    period_start: str | None
    spent: Micros
    reserved: Micros

    @property
    def remaining(self) -> Micros | None:
        if self.budget is None:
            return None
        return max(0, self.budget - self.spent - self.reserved)


class Budgets:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def reserve(
        self, team: TeamConfig, task: TaskRecord, *, idempotency: tuple[str, str] | None,
        now_ms: int, admit: Callable[[], None] | None = None,
    ) -> None:
        today = date.fromisoformat(task.budget_day)
        try:
            await self._store.create_reserved_task(
                task,
                budget=team.budget,
                period_start_day=period_start_key(team, today),
                idempotency=idempotency,
                now_ms=now_ms,
                admit=admit,
            )
        except BudgetExceeded as exc:
            raise over_budget(team, exc.usage, task.reserved_micros) from None

    async def settle(
        self, task_id: str, outcome: Outcome, *, cache_key: str | None, cache_ttl_ms: int
    ) -> list[TaskRecord]:
        return await self._store.finish(
            task_id, outcome, cache_key=cache_key, cache_ttl_ms=cache_ttl_ms
        )

    async def view(self, team: TeamConfig, today: date | None = None) -> BudgetView:
        today = today or utc_today()
        start = period_start(team.budget_period, today)
        usage = await self._store.usage(team.name, start.isoformat() if start else ALL_TIME)
        return BudgetView(
            budget=team.budget,
            period_start=start.isoformat() if start else None,
            spent=usage.spent,
            reserved=usage.reserved,
        )


def over_budget(team: TeamConfig, usage: Usage, price: Micros) -> APIError:
    budget = team.budget or 0
    remaining = max(0, budget - usage.spent - usage.reserved)
    period = "in total" if team.budget_period == "total" else f"this {team.budget_period} period"
    return APIError(
        402,
        f"Team {team.name!r} is over budget: budget {format_usd(budget)} {period}, "
        f"spent {format_usd(usage.spent)}, reserved {format_usd(usage.reserved)}, "
        f"remaining {format_usd(remaining)}; this request needs {format_usd(price)}",
        message="Insufficient budget",
        reason="budget",
        extra={
            "budget_usd": budget / 1e6,
            "spent_usd": usage.spent / 1e6,
            "reserved_usd": usage.reserved / 1e6,
            "remaining_usd": remaining / 1e6,
        },
    )
