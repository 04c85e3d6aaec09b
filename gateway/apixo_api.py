"""The APIXO-compatible endpoints: generateTask, statusTask, current-balance."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from aiohttp import web
from cachetools import LRUCache

from gateway import jsonio
from gateway.appkeys import GATEWAY
from gateway.cache import canonical_json
from gateway.config import TeamConfig
from gateway.core import Gateway, SubmitOptions
from gateway.errors import APIError
from gateway.exchange import Exchange, exchange
from gateway.money import micros_to_usd
from gateway.validation import Submission, invalid, validate_submit

MAX_IDEMPOTENCY_KEY_CHARS = 255
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


# The handlers pass the gateway and the request's Exchange down rather than
# look them up again: each lookup is a chain of properties, and a status poll
# made eight of them.


def _team(request: web.Request, gateway: Gateway, info: Exchange) -> TeamConfig:
    team = gateway.authenticate(request.headers.get("Authorization"))
    info.team = team.name
    return team


def _model(request: web.Request, gateway: Gateway, info: Exchange) -> str:
    model = request.match_info["model"]
    pricing = gateway.config.pricing
    if model not in pricing:
        served = ", ".join(sorted(pricing)) or "none"
        raise APIError(404, f"Model {model!r} is not served by this gateway (served: {served})",
                       message="Model not found", reason="invalid")
    info.model = model
    return model


async def _read_body(request: web.Request, gateway: Gateway) -> bytes:
    limit = gateway.config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise APIError(413, f"Request body is {request.content_length} bytes; "
                       f"server.max_body_bytes is {limit}", reason="invalid")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise APIError(
            413, f"Request body exceeds server.max_body_bytes ({limit})", reason="invalid"
        ) from None
    if len(raw) > limit:
        raise APIError(
            413, f"Request body is {len(raw)} bytes; server.max_body_bytes is {limit}",
            reason="invalid",
        )
    return raw


def _decode(raw: bytes) -> Any:
    try:
        body = jsonio.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"Request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise invalid("Request body is not valid JSON: nested too deeply") from None
    # JSON escapes can spell lone UTF-16 surrogates ("\ud800"), which no
    # UTF-8 store or upstream accepts: refuse them here, not with a 500 later.
    # Only an escape can spell one (UTF-8 input cannot), so only then is it checked.
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise invalid(
                "Request body contains invalid Unicode (an unpaired surrogate)"
            ) from None
        except RecursionError:
            raise invalid("Request body is nested too deeply") from None
    return body


class ParsedBodies:
    """Request identities of recent valid submit bodies, by model and exact bytes.

    Identical requests are what a dedupe gateway exists for, and for them the
    identity (canonical JSON and SHA-256) was the largest part of decoding and
    validating a body. It is a pure function of the model and the bytes, so
    it is kept for the last ENTRIES bodies of up to MAX_BYTES: at most about
    ENTRIES x MAX_BYTES of memory, whatever the bodies hold. Each request
    still decodes and validates its own body, and refused bodies are refused
    afresh every time.
    """

    ENTRIES = 1024
    MAX_BYTES = 8192

    def __init__(self) -> None:
        self._identities: LRUCache[tuple[str, bytes], str] = LRUCache(maxsize=self.ENTRIES)

    def parse(self, model: str, raw: bytes) -> tuple[Any, Submission]:
        body = _decode(raw)
        if len(raw) > self.MAX_BYTES:
            return body, validate_submit(model, body)
        known = self._identities.get((model, raw))
        submission = validate_submit(model, body, identity=known)
        if known is None:
            self._identities[model, raw] = submission.identity
        return body, submission


PARSED_BODIES = web.AppKey("parsed_bodies", ParsedBodies)


def _body_hash(model: str, body: Any) -> str:
    # The model is part of what was asked: the same body sent to another
    # model under the same Idempotency-Key is a different request (409).
    try:
        return hashlib.sha256(canonical_json({"model": model, "body": body}).encode()).hexdigest()
    except RecursionError:  # orjson reads deeper nesting than the stdlib writes
        raise invalid("Request body is nested too deeply") from None


def _cache_control(request: web.Request) -> tuple[bool, bool]:
    directives = {
        part.strip().split("=", 1)[0].lower()
        for header in request.headers.getall("Cache-Control", [])
        for part in header.split(",")
    }
    return "no-cache" in directives, "no-store" in directives


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_CHARS or not key.isprintable():
        raise invalid(
            f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} printable characters"
        )
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid("Idempotency-Key must be valid UTF-8") from None
    return key


async def generate_task(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    info = exchange(request)
    team = _team(request, gateway, info)
    model = _model(request, gateway, info)
    body, submission = request.app[PARSED_BODIES].parse(
        model, await _read_body(request, gateway)
    )
    prompt = submission.input.get("prompt")
    if isinstance(prompt, str):
        info.prompt = prompt  # logged only with [logging] log_prompts = true
    no_cache, no_store = _cache_control(request)
    idempotency_key = _idempotency_key(request)
    opts = SubmitOptions(
        # Only compared under an Idempotency-Key, so only computed then.
        body_hash=_body_hash(model, body) if idempotency_key is not None else "",
        idempotency_key=idempotency_key,
        no_cache=no_cache,
        no_store=no_store,
    )
    # A client that disconnects mid-submit does not cancel this handler (the
    # server runs with handler_cancellation=False, see cli.cmd_serve), so the
    # pipeline never stops half-way: a reservation without its upstream task.
    result = await gateway.submit(team, submission, opts)
    info.cache = result.cache
    info.task_id = result.task_id
    headers = {"X-Gateway-Cache": result.cache}
    if result.replayed:
        headers["X-Gateway-Idempotent-Replay"] = "true"
    return jsonio.json_response(
        {"code": 200, "message": "success", "data": {"taskId": result.task_id}}, headers=headers
    )


async def status_task(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    info = exchange(request)
    team = _team(request, gateway, info)
    model = request.match_info["model"]
    task_id = request.query.get("taskId", "").strip()
    if not task_id:
        _model(request, gateway, info)
        raise invalid("Missing required query parameter: taskId")
    answer = await gateway.status_answer(task_id)
    # Another team's task is indistinguishable from one that does not exist.
    if answer is None or answer.team != team.name or answer.model != model:
        _model(request, gateway, info)  # a model no longer priced says so
        raise APIError(404, f"Task {task_id!r} not found", message="Task not found")
    # Not checked against [pricing] first: a task submitted before a reload
    # dropped its model is still the team's to read.
    info.model = model
    info.task_id = task_id
    return web.Response(body=answer.body, content_type="application/json", charset="utf-8")


async def current_balance(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    team = _team(request, gateway, exchange(request))
    view = await gateway.budgets.view(team)
    remaining = view.remaining
    data = None if remaining is None else micros_to_usd(remaining)
    return web.json_response({"code": 200, "message": "success", "data": data})


def add_routes(app: web.Application) -> None:
    app[PARSED_BODIES] = ParsedBodies()
    app.router.add_post("/api/v1/generateTask/{model}", generate_task)
    app.router.add_get("/api/v1/statusTask/{model}", status_task)
    app.router.add_get("/api/v1/apikeys/current-balance", current_balance)
