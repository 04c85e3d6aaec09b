"""The floor for the gateway's HTTP stack: forward generateTask to the simulator, answer it.

No auth, validation, database, metrics or logging: aiohttp's server and the
gateway's own upstream client (gateway.http1, with the same pool limit), and the
same gc.freeze() once started. What it adds over going straight to the
simulator is what the HTTP layers cost by themselves on this machine: the part
of the gateway's added latency that no gateway code on top of them can remove.
Started as its own process by run.py.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.http1 import Client

CLIENT = web.AppKey("client", Client)
UPSTREAM = web.AppKey("upstream", str)
HEADERS = "Authorization: Bearer bench-upstream-key\r\nContent-Type: application/json\r\n"


async def _client(app: web.Application) -> AsyncIterator[None]:
    # The gateway's pool allows twice upstream.max_concurrent, which the
    # benchmark sets far above any client count: no practical limit here either.
    app[CLIENT] = Client(app[UPSTREAM], limit=10_000, user_agent="passthrough")
    gc.freeze()
    yield
    await app[CLIENT].close()


async def generate_task(request: web.Request) -> web.Response:
    body = await request.read()
    answer = await request.app[CLIENT].request(
        "POST", "/generateTask/" + request.match_info["model"], body=body, headers=HEADERS
    )
    return web.Response(body=answer.body, status=answer.status, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the simulator's base URL")
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = args.upstream.rstrip("/") + "/api/v1"
    app.cleanup_ctx.append(_client)
    app.router.add_post("/api/v1/generateTask/{model}", generate_task)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
