"""The floor for any aiohttp proxy: forward generateTask to the simulator and answer what it says.

No auth, validation, database, metrics or logging; the same aiohttp client
settings as the gateway (one pooled session without a practical connection
limit, no cookie jar, a parsed URL) and the same gc.freeze() once started.
What it adds over going straight to the simulator is what aiohttp's server and
client cost by themselves on this machine: the part of the gateway's added
latency that no gateway code can remove. Started as its own process by run.py.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from yarl import URL

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", URL)
HEADERS = {"Authorization": "Bearer bench-upstream-key", "Content-Type": "application/json"}


async def _session(app: web.Application) -> AsyncIterator[None]:
    # The gateway's pool allows twice upstream.max_concurrent, which the
    # benchmark sets far above any client count: no limit here either.
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar()
    )
    gc.freeze()
    yield
    await app[SESSION].close()


async def generate_task(request: web.Request) -> web.Response:
    body = await request.read()
    url = request.app[UPSTREAM] / request.match_info["model"]
    async with request.app[SESSION].post(url, data=body, headers=HEADERS) as resp:
        answer = await resp.read()
        status = resp.status
    return web.Response(body=answer, status=status, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the simulator's base URL")
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = URL(args.upstream.rstrip("/") + "/api/v1/generateTask")
    app.cleanup_ctx.append(_session)
    app.router.add_post("/api/v1/generateTask/{model}", generate_task)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
