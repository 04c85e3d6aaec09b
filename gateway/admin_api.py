"""/admin/*: teams, usage and tasks for operators, behind the admin token."""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from aiohttp import web

from gateway.appkeys import GATEWAY
from gateway.budget import ALL_TIME, parse_day
from gateway.errors import APIError
from gateway.money import micros_to_usd
from gateway.store import TaskRecord

MAX_TASKS = 1000
TASK_STATES = ("pending", "processing", "success", "failed")


def _authorize(request: web.Request) -> None:
    gateway = request.app[GATEWAY]
    token = os.environ.get(gateway.config.admin.token_env)
    if not token:
        raise APIError(404, "The admin API is disabled: set the environment variable "
                       f"{gateway.config.admin.token_env}", message="Not found")
    header = request.headers.get("Authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(
        hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest(),
        hashlib.sha256(token.encode()).digest(),
    ):
        raise APIError(401, "Admin endpoints need 'Authorization: Bearer <admin token>'",
                       message="Invalid or missing admin token")


def _day(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if not value:
        return None
    try:
        return parse_day(value)
    except ValueError:
        raise APIError(400, f"{name} must be a date YYYY-MM-DD, got {value!r}") from None


async def teams(request: web.Request) -> web.Response:
    _authorize(request)
    gateway = request.app[GATEWAY]
    rows = []
    for team in gateway.config.teams:
        view = await gateway.budgets.view(team)
        # The same period as spent_usd, so images x price adds up to it.
        images, hits, saved = await gateway.store.team_period(
            team.name, view.period_start or ALL_TIME
        )
        rows.append({
            "name": team.name,
            "budget_usd": team.budget_usd,
            "budget_period": team.budget_period,
            "period_start": view.period_start,
            "spent_usd": micros_to_usd(view.spent),
            "reserved_usd": micros_to_usd(view.reserved),
            "remaining_usd": None if view.remaining is None else micros_to_usd(view.remaining),
            "in_flight": gateway.limits.in_flight(team.name),
            "max_concurrent": team.max_concurrent,
            "requests_per_minute": team.requests_per_minute,
            "images": images,
            "cache_hits": hits,
            "saved_usd": micros_to_usd(saved),
        })
    return web.json_response({"teams": rows})


def usage_row(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"team": row["team"]}
    if row["day"] is not None:
        out["day"] = row["day"]
    out.update({
        "spent_usd": micros_to_usd(row["spent_micros"]),
        "images": row["images"],
        "cache_hits": row["cache_hits"],
        "saved_usd": micros_to_usd(row["saved_micros"]),
        "upstream_tasks": row["upstream_tasks"],
        "failures": row["failures"],
        "reserved_usd": micros_to_usd(row["reserved_micros"]),
    })
    return out


async def usage(request: web.Request) -> web.Response:
    _authorize(request)
    gateway = request.app[GATEWAY]
    by = request.query.get("by")
    if by not in (None, "", "day", "team"):
        raise APIError(400, f"by must be 'day' or 'team', got {by!r}")
    since, until = _day(request, "since"), _day(request, "until")
    if since is not None and until is not None and since > until:
        raise APIError(400, f"since ({since}) is after until ({until})")
    rows = await gateway.store.usage_report(
        team=request.query.get("team") or None,
        since_day=since,
        until_day=until,
        by_day=by == "day",
    )
    return web.json_response({"rows": [usage_row(r) for r in rows]})


def task_row(task: TaskRecord, callback_state: str | None, attempts: int) -> dict[str, Any]:
    return {
        "taskId": task.id,
        "team": task.team,
        "model": task.model,
        "state": "pending" if task.state == "submitting" else task.state,
        "cache": task.cache,
        "leader_task_id": task.leader_id,
        "failCode": task.fail_code,
        "failMsg": task.fail_msg,
        "createTime": task.create_ms,
        "completeTime": task.complete_ms,
        "images": task.images,
        "charged_usd": micros_to_usd(task.charged_micros),
        "reserved_usd": micros_to_usd(task.reserved_micros),
        "saved_usd": micros_to_usd(task.saved_micros),
        "callback_url": task.callback_url,
        "callback_state": callback_state,
        "callback_attempts": attempts,
    }


async def tasks(request: web.Request) -> web.Response:
    _authorize(request)
    gateway = request.app[GATEWAY]
    state = request.query.get("state") or None
    if state is not None and state not in TASK_STATES:
        raise APIError(400, f"state must be one of {', '.join(TASK_STATES)}, got {state!r}")
    raw_limit = request.query.get("limit", "100")
    # Digits only: int() also takes "+5", " 5 " and "1_0".
    limit = int(raw_limit) if raw_limit.isascii() and raw_limit.isdigit() else 0
    if not 1 <= limit <= MAX_TASKS:
        raise APIError(400, f"limit must be an integer from 1 to {MAX_TASKS}, got {raw_limit!r}")
    rows = await gateway.store.recent_tasks(
        team=request.query.get("team") or None, state=state, limit=limit
    )
    return web.json_response({"tasks": [task_row(*r) for r in rows]})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/teams", teams)
    app.router.add_get("/admin/usage", usage)
    app.router.add_get("/admin/tasks", tasks)
