"""The aiohttp app factory: routes, middlewares, and resources opened through cleanup_ctx."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import aiohttp
from aiohttp import web

from gateway import admin_api, apixo_api, jsonio, ops_api
from gateway.appkeys import CONFIG, GATEWAY, METRICS, MOCK_UPSTREAM, UPSTREAM_KEY, UPSTREAM_URL
from gateway.callbacks import Callbacks
from gateway.config import Config
from gateway.core import Gateway
from gateway.dblock import DatabaseLock
from gateway.errors import APIError
from gateway.exchange import EXCHANGE, Exchange
from gateway.logs import log_event
from gateway.metrics import Metrics
from gateway.simulator import create_simulator_app
from gateway.store import Store, TaskRecord
from gateway.upstream import Upstream

log = logging.getLogger("gateway.access")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# A client's X-Request-Id is kept only if it looks like an id: it goes into every
# log line of the request, so it must not be able to forge or bloat them.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")

# Generated ids: 32 hex digits like a uuid4's, from a per-process random prefix
# and a counter, without an os.urandom call on every request.
_ID_PREFIX = secrets.token_hex(8)
_id_counter = itertools.count()


def _endpoint(request: web.Request) -> str:
    info = request.match_info.route.resource
    canonical = info.canonical if info is not None else ""
    return _endpoint_of(canonical)


@functools.lru_cache(maxsize=64)
def _endpoint_of(canonical: str) -> str:
    # Memoised: a handful of route patterns, asked about on every request.
    if "/generateTask/" in canonical:
        return "generateTask"
    if "/statusTask/" in canonical:
        return "statusTask"
    if canonical.endswith("current-balance"):
        return "current-balance"
    if canonical.startswith("/admin"):
        return "admin"
    if canonical == "/metrics":
        return "metrics"
    if canonical in ("/healthz", "/readyz"):
        return "health"
    return "other"


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn errors into APIXO envelopes; count, time and log every request once."""
    started = time.perf_counter()
    request_id = request.headers.get("X-Request-Id", "").strip()
    if not request_id or not _REQUEST_ID.fullmatch(request_id):
        request_id = f"{_ID_PREFIX}{next(_id_counter):016x}"
    info = request[EXCHANGE] = Exchange(request_id)
    metrics = request.app[METRICS]
    try:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            raise APIError(exc.status, exc.reason, message=exc.reason) from None
    except APIError as exc:
        response = jsonio.json_response(exc.envelope(), status=exc.code, headers=exc.headers)
        info.error = exc.error
        if exc.reason is not None:
            metrics.rejections.labels(info.team, exc.reason).inc()
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error", extra={"request_id": request_id, "path": request.path})
        response = jsonio.json_response(
            {"code": 500, "message": "Internal error",
             "data": {"error": f"internal gateway error; request id {request_id}"}},
            status=500,
        )
    response.headers["X-Request-Id"] = request_id
    elapsed = time.perf_counter() - started
    endpoint = _endpoint(request)
    team = info.team
    model = info.model
    metrics.requests.observe(endpoint, model, team, response.status, elapsed)
    # Scrapes are not logged: one line every few seconds would drown the requests.
    if endpoint != "metrics" and log.isEnabledFor(logging.INFO):
        fields: dict[str, object] = {
            "event": "request", "request_id": request_id, "method": request.method,
            "path": request.path, "endpoint": endpoint, "team": team, "model": model,
            "status": response.status,
        }
        # Only what is set: a line has no nulls, and leaving them out here
        # spares the formatter filtering them on every line.
        if info.cache is not None:
            fields["cache"] = info.cache
        if info.task_id is not None:
            fields["task_id"] = info.task_id
        if info.error is not None:
            fields["error"] = info.error
        # Whole microseconds: round(x, 3) formats a string on every call.
        fields["duration_ms"] = int(elapsed * 1_000_000) / 1000
        # Prompts can be personal or confidential: logged only when the operator opts in.
        if info.prompt is not None and request.app[CONFIG].logging.log_prompts:
            fields["prompt"] = info.prompt
        # Formatted and written after the response has gone (DeferredStreamHandler).
        log_event(log, "request", fields)
    return response


async def _simulator_ctx(app: web.Application) -> AsyncIterator[None]:
    """--mock-upstream: the bundled simulator on a loopback port of this process."""
    if not app[MOCK_UPSTREAM]:
        yield
        return
    sim = create_simulator_app(latency=2.0, fail_rate=0.0)
    runner = web.AppRunner(sim, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    app[UPSTREAM_URL] = f"http://127.0.0.1:{port}/api/v1"
    logging.getLogger("gateway").info(
        "mock upstream running", extra={"upstream": app[UPSTREAM_URL]}
    )
    yield
    await runner.cleanup()


async def _gateway_ctx(app: web.Application) -> AsyncIterator[None]:
    path = app[CONFIG].storage.path
    lock = DatabaseLock(path)
    lock.acquire()
    store = Store(path)
    try:
        await store.open()
        async with _serving(app, store):
            yield
    finally:
        await store.close()
        lock.release()


@asynccontextmanager
async def _serving(app: web.Application, store: Store) -> AsyncIterator[None]:
    config = app[CONFIG]
    metrics = app[METRICS]
    upstream = Upstream(
        base_url=app[UPSTREAM_URL],
        api_key=app[UPSTREAM_KEY],
        timeout_seconds=config.upstream.request_timeout_seconds,
        max_retries=config.upstream.max_retries,
        metrics=metrics,
        connection_limit=max(100, config.upstream.max_concurrent * 2),
    )
    async with AsyncExitStack() as stack:
        stack.push_async_callback(upstream.close)
        # Webhook deliveries: receivers are many hosts, unlike APIXO's one.
        session = await stack.enter_async_context(aiohttp.ClientSession(
            # Webhook receivers get no cookies; filtering the jar on every
            # delivery was pure cost.
            cookie_jar=aiohttp.DummyCookieJar(),
        ))
        secret_env = config.callbacks.signing_secret_env
        gateway_ref: list[Gateway] = []

        async def load_task(task_id: str) -> TaskRecord | None:
            return await gateway_ref[0].get_task(task_id)

        callbacks = Callbacks(
            store, session, config.callbacks, metrics, load_task,
            os.environ.get(secret_env) or None,
            backoff_base_seconds=config.callbacks.backoff_base_seconds,
        )
        gateway = Gateway(config, store, upstream, metrics, callbacks)
        gateway_ref.append(gateway)
        app[GATEWAY] = gateway
        await gateway.resume()
        await callbacks.start()
        maintenance = asyncio.create_task(_maintenance(gateway), name="maintenance")
        try:
            yield
        finally:
            maintenance.cancel()
            await asyncio.gather(maintenance, return_exceptions=True)
            await callbacks.stop()
            await gateway.stop()


async def _maintenance(gateway: Gateway) -> None:
    """Sweep expired cache entries and idempotency keys in the background, not only on read."""
    from gateway.store import IDEMPOTENCY_TTL_MS
    from gateway.tasks import now_ms

    while True:
        try:
            now = now_ms()
            removed, swept = await gateway.store.cache_sweep(
                now, gateway.config.cache.max_entries
            )
            gateway.cache.forget_expired(now, swept)
            keys = await gateway.store.idempotency_sweep(now - IDEMPOTENCY_TTL_MS)
            if removed or keys:
                logging.getLogger("gateway").info(
                    "swept", extra={"cache_entries": removed, "idempotency_keys": keys}
                )
        except Exception:
            logging.getLogger("gateway").exception("maintenance sweep failed; will retry")
        # Read on every round so a SIGHUP reload changes the interval too.
        await asyncio.sleep(gateway.config.cache.sweep_interval_seconds)


def create_app(
    config: Config, *, upstream_key: str = "", mock_upstream: bool = False,
    upstream_url: str | None = None,
) -> web.Application:
    app = web.Application(
        middlewares=[observe], client_max_size=config.server.max_body_bytes, handler_args=None,
    )
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[UPSTREAM_KEY] = upstream_key or ("simulator" if mock_upstream else "")
    app[UPSTREAM_URL] = upstream_url or config.upstream.base_url
    app[MOCK_UPSTREAM] = mock_upstream
    app.cleanup_ctx.append(_simulator_ctx)
    app.cleanup_ctx.append(_gateway_ctx)
    apixo_api.add_routes(app)
    admin_api.add_routes(app)
    ops_api.add_routes(app)
    return app
