"""Operations endpoints: /metrics, /healthz, /readyz."""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.appkeys import GATEWAY, METRICS
from gateway.errors import APIError
from gateway.money import micros_to_usd

log = logging.getLogger("gateway.ops")


async def metrics(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    registry = request.app[METRICS]
    # Budget gauges are read from the ledger at scrape time, so they are exact
    # at every scrape without a database read on the submit path.
    budgets = [
        (team.name, team.budget, await gateway.budgets.view(team))
        for team in gateway.config.teams if team.budget is not None
    ]
    # Rebuilt whole, with no await in between: a team whose budget a reload
    # removed (or the team itself) must drop out, or its last values would
    # keep the budget alerts firing after the operator lifted the limit.
    registry.budget.clear()
    registry.budget_remaining.clear()
    for name, budget, view in budgets:
        registry.budget.labels(name).set(micros_to_usd(budget))
        # Not clamped at 0 (the API's balance is): a task that returned more
        # images than it reserved can take a team past its budget, and the
        # panels and alerts must show by how much.
        registry.budget_remaining.labels(name).set(
            micros_to_usd(budget - view.spent - view.reserved)
        )
    body = generate_latest(registry.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        await request.app[GATEWAY].store.ping()
    except Exception as exc:
        log.warning("not ready: database unusable", extra={"error": str(exc)})
        # An error like any other: the APIXO envelope, for probes that read the body.
        raise APIError(
            503, f"The database is not usable: {exc}", extra={"status": "unavailable"}
        ) from None
    return web.json_response({"status": "ready"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
