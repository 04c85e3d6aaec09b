"""The ceiling: a bare aiohttp app answering the gateway's routes with the same JSON.

No auth, no database, no metrics, no logging: what Python and aiohttp cost by
themselves on this machine. Started as its own process by run.py.
"""

from __future__ import annotations

import argparse
import json
import secrets
from typing import Any

from aiohttp import web

STATUS_KEY = web.AppKey("status_body", bytes)


async def status_task(request: web.Request) -> web.Response:
    # The gateway's answer for a final task, encoded once at start: the gateway
    # too encodes a final task's answer once, so the ceiling is the response alone.
    return web.Response(
        body=request.app[STATUS_KEY], content_type="application/json", charset="utf-8"
    )


async def generate_task(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response(
        {"code": 200, "message": "success", "data": {"taskId": "gw_" + secrets.token_hex(12)}},
        headers={"X-Gateway-Cache": "hit"},
    )


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--status-json", required=True, help="the envelope statusTask returns")
    args = parser.parse_args()
    app = web.Application()
    body: dict[str, Any] = json.loads(args.status_json)
    app[STATUS_KEY] = json.dumps(body).encode()
    app.router.add_get("/api/v1/statusTask/{model}", status_task)
    app.router.add_post("/api/v1/generateTask/{model}", generate_task)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
