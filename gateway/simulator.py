"""The bundled APIXO simulator: same endpoints, validation and envelopes as the real API.

It lets the whole gateway run offline and gives tests an upstream they can steer:
prompt markers (`[fail:CODE]`, `[images:N]`, `[latency:S]`) decide one task's
outcome, and `/_sim/*` injects faults and exposes counters. Task state is computed
from monotonic timestamps on every read, so nothing has to tick in the background.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import re
import secrets
import struct
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway.errors import APIError
from gateway.validation import validate_submit

log = logging.getLogger(__name__)

MODELS = frozenset({"grok-image", "nano-banana", "gpt-image-2", "veo-3-1"})
PRICE_CENTS_PER_IMAGE = 10  # $0.10, the grok-image price; kept in cents so the balance never drifts
START_BALANCE_CENTS = 100_000
PENDING_SHARE = 0.2  # a task reads "pending" for this share of its latency, then "processing"
CALLBACK_TIMEOUT_SECONDS = 30.0  # what APIXO gives a webhook receiver

# The grok-image page's failure codes, with its "Meaning" column as failMsg.
FAIL_MESSAGES = {
    "PromptInvalid": "Prompt was invalid or rejected by the provider",
    "SensitiveContent": "Content violates provider policy, please adjust the prompt",
    "ImageFormatIncorrect": "Reference image format could not be processed",
    "RateLimited": "Provider rate limit was reached",
    "Timeout": "Provider timeout",
    "Unknown error": "Provider returned an unmapped failure",
}

FAULT_MESSAGES = {
    400: "Invalid request",
    401: "Invalid or missing API key",
    402: "Insufficient balance",
    403: "Forbidden",
    404: "Not found",
    429: "Rate limit exceeded",
    500: "Internal error",
    502: "Upstream provider error",
    503: "Model unavailable",
}

_FAIL_MARK = re.compile(r"\[fail:([^\]]+)\]")
_IMAGES_MARK = re.compile(r"\[images:(\d+)\]")
_LATENCY_MARK = re.compile(r"\[latency:(\d+(?:\.\d*)?|\.\d+)\]")

# An HTTP status; "drop" to close the connection unanswered; "garbled" to do the
# work but answer 200 with a body cut short (a submit still creates its task);
# "html" for a 400 whose body is an HTML page (a proxy in front of APIXO).
Fault = int | str
STRING_FAULTS = ("drop", "garbled", "html")


@dataclass
class Task:
    task_id: str
    model: str
    input: dict[str, Any]  # as the client sent it, so tests can see what was forwarded
    provider: str
    created: float  # time.monotonic()
    create_ms: int  # wall clock, for createTime
    latency: float
    outcome: str  # "success" | "failed", decided at submit
    fail_code: str | None
    result_urls: list[str]
    callback_url: str | None
    settled: bool = False  # images counted and balance charged

    def state(self, now: float) -> str:
        elapsed = now - self.created
        if elapsed >= self.latency:
            return self.outcome
        return "pending" if elapsed < PENDING_SHARE * self.latency else "processing"

    def status_data(self, now: float) -> dict[str, Any]:
        state = self.state(now)
        data: dict[str, Any] = {
            "taskId": self.task_id, "state": state, "createTime": self.create_ms
        }
        if state == "success":
            data["resultJson"] = json.dumps({"resultUrls": self.result_urls})
        elif state == "failed":
            assert self.fail_code is not None
            data["failCode"] = self.fail_code
            data["failMsg"] = FAIL_MESSAGES.get(self.fail_code, f"Task failed: {self.fail_code}")
        if state in ("success", "failed"):
            cost_ms = round(self.latency * 1000)
            data["completeTime"] = self.create_ms + cost_ms
            data["costTime"] = cost_ms
        return data


@dataclass
class Stats:
    submits: int = 0
    submit_attempts: int = 0
    status_polls: int = 0
    images: int = 0
    task_ids: list[str] = field(default_factory=list)  # tasks created since the last reset


@dataclass
class Faults:
    submit_errors: deque[Fault] = field(default_factory=deque)
    status_errors: deque[Fault] = field(default_factory=deque)
    reject_submits_with: int | None = None
    retry_after_seconds: float = 0.0  # sent with simulated 429 and 503 answers


@dataclass
class SimState:
    default_latency: float
    default_fail_rate: float
    api_key: str | None
    rng: random.Random
    latency: float
    fail_rate: float
    balance_cents: int = START_BALANCE_CENTS
    tasks: dict[str, Task] = field(default_factory=dict)
    # Result files are named by a key of their own, as APIXO's are: a URL in a
    # gateway's answer must not show the upstream task id the gateway hides.
    files: dict[str, str] = field(default_factory=dict)
    unsettled: set[str] = field(default_factory=set)
    stats: Stats = field(default_factory=Stats)
    faults: Faults = field(default_factory=Faults)
    background: set[asyncio.Task[None]] = field(default_factory=set)

    def settle(self) -> None:
        """Account for tasks that have become final since the last read."""
        now = time.monotonic()
        for task_id in list(self.unsettled):
            task = self.tasks[task_id]
            if task.state(now) not in ("success", "failed"):
                continue
            self.unsettled.discard(task_id)
            task.settled = True
            if task.outcome == "success":
                self.stats.images += len(task.result_urls)
                self.balance_cents -= PRICE_CENTS_PER_IMAGE * len(task.result_urls)


SIM_STATE = web.AppKey("simulator_state", SimState)


def create_simulator_app(
    *,
    latency: float = 2.0,
    fail_rate: float = 0.0,
    api_key: str | None = None,
    seed: int | None = None,
) -> web.Application:
    app = web.Application()
    app[SIM_STATE] = SimState(
        default_latency=latency,
        default_fail_rate=fail_rate,
        api_key=api_key,
        rng=random.Random(seed),
        latency=latency,
        fail_rate=fail_rate,
    )
    app.router.add_post("/api/v1/generateTask/{model}", _submit)
    app.router.add_get("/api/v1/statusTask/{model}", _status)
    app.router.add_get("/api/v1/apikeys/current-balance", _balance)
    app.router.add_get("/files/{name}.png", _file)
    app.router.add_get("/_sim/stats", _stats)
    app.router.add_post("/_sim/faults", _set_faults)
    app.router.add_post("/_sim/reset", _reset)
    app.on_cleanup.append(_cancel_background)
    return app


# --- envelopes and faults ---------------------------------------------------


def _error(exc: APIError) -> web.Response:
    body: dict[str, Any] = exc.envelope()
    if exc.code == 401:
        body = {"code": 401, "message": FAULT_MESSAGES[401]}  # APIXO's 401 carries no data
    return web.json_response(body, status=exc.code, headers=exc.headers)


def _fault_response(request: web.Request, fault: Fault) -> web.Response:
    if fault == "drop":
        # Close the socket before answering; aiohttp then fails to write the
        # response below and the client sees a dropped connection.
        request.protocol.force_close()
        return web.Response(status=500)
    if fault == "html":
        return web.Response(status=400, text="<html><body>Bad Request</body></html>",
                            content_type="text/html")
    assert isinstance(fault, int)
    retry_after = request.app[SIM_STATE].faults.retry_after_seconds
    # A 429 always says when to come back; a 503 only when a test asks for it.
    headers = (
        {"Retry-After": f"{retry_after:g}"}
        if fault == 429 or (fault == 503 and retry_after > 0) else {}
    )
    message = FAULT_MESSAGES.get(fault, "Error")
    return _error(
        APIError(fault, f"Simulated fault: HTTP {fault}", message=message, headers=headers)
    )


def _check_auth(request: web.Request) -> None:
    state = request.app[SIM_STATE]
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "Missing bearer token")
    if state.api_key is not None and token != state.api_key:
        raise APIError(401, "Unknown API key")


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise APIError(404, f"Unknown model: {model}")


# --- APIXO endpoints ----------------------------------------------------------


async def _submit(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    state.stats.submit_attempts += 1
    garbled = False
    if state.faults.submit_errors:
        fault = state.faults.submit_errors.popleft()
        if fault != "garbled":
            return _fault_response(request, fault)
        garbled = True
    if state.faults.reject_submits_with is not None:
        return _fault_response(request, state.faults.reject_submits_with)
    try:
        _check_auth(request)
        model = request.match_info["model"]
        _check_model(model)
        try:
            body = json.loads(await request.text())
        except ValueError as exc:
            raise APIError(400, f"Request body is not valid JSON: {exc}") from exc
        submission = validate_submit(model, body)
    except APIError as exc:
        return _error(exc)

    prompt = submission.input.get("prompt")
    prompt = prompt if isinstance(prompt, str) else ""
    # Always draw, so a seeded run's outcome sequence does not depend on fail_rate.
    roll = state.rng.random()
    fail_mark = _FAIL_MARK.search(prompt)
    if fail_mark:
        fail_code: str | None = fail_mark.group(1)
    elif roll < state.fail_rate:
        fail_code = state.rng.choice(list(FAIL_MESSAGES))
    else:
        fail_code = None
    images_mark = _IMAGES_MARK.search(prompt)
    n_images = int(images_mark.group(1)) if images_mark else 1
    latency_mark = _LATENCY_MARK.search(prompt)
    latency = float(latency_mark.group(1)) if latency_mark else state.latency

    task_id = f"task_{secrets.token_hex(8)}"
    base = f"{request.scheme}://{request.host}"
    file_key = secrets.token_hex(8)
    urls = [f"{base}/files/{file_key}-{i}.png" for i in range(n_images)]
    task = Task(
        task_id=task_id,
        model=model,
        input=body["input"],
        provider=submission.provider,
        created=time.monotonic(),
        create_ms=int(time.time() * 1000),
        latency=max(latency, 0.0),
        outcome="failed" if fail_code else "success",
        fail_code=fail_code,
        result_urls=[] if fail_code else urls,
        callback_url=submission.callback_url,
    )
    state.tasks[task_id] = task
    state.files[file_key] = task_id
    state.unsettled.add(task_id)
    state.stats.submits += 1
    state.stats.task_ids.append(task_id)
    if task.callback_url:
        bg = asyncio.create_task(_deliver_callback(state, task))
        state.background.add(bg)
        bg.add_done_callback(state.background.discard)
    if garbled:
        return web.Response(text='{"code": 200, "message": "success", "data": {"taskI',
                            content_type="application/json")
    return web.json_response({"code": 200, "message": "success", "data": {"taskId": task_id}})


async def _status(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    state.stats.status_polls += 1
    if state.faults.status_errors:
        fault = state.faults.status_errors.popleft()
        if fault == "garbled":
            return web.Response(text='{"code": 200, "da', content_type="application/json")
        return _fault_response(request, fault)
    try:
        _check_auth(request)
        model = request.match_info["model"]
        _check_model(model)
        task_id = request.query.get("taskId", "").strip()
        if not task_id:
            raise APIError(400, "Missing required query parameter: taskId")
        task = state.tasks.get(task_id)
        if task is None or task.model != model:
            raise APIError(404, f"Task not found: {task_id}")
    except APIError as exc:
        return _error(exc)
    state.settle()
    data = task.status_data(time.monotonic())
    return web.json_response({"code": 200, "message": "success", "data": data})


async def _balance(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    try:
        _check_auth(request)
    except APIError as exc:
        return _error(exc)
    state.settle()
    return web.json_response(
        {"code": 200, "message": "success", "data": state.balance_cents / 100}
    )


async def _file(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    name = request.match_info["name"]
    file_key, _, index = name.rpartition("-")
    task = state.tasks.get(state.files.get(file_key, ""))
    # A file exists only once its task has succeeded, like a real result URL.
    if (
        task is None
        or task.state(time.monotonic()) != "success"
        or not index.isdigit()
        or int(index) >= len(task.result_urls)
    ):
        return _error(APIError(404, f"File not found: {name}.png"))
    colour = hashlib.sha256(name.encode()).digest()[:3]
    return web.Response(body=solid_png(64, 64, colour), content_type="image/png")


def solid_png(width: int, height: int, rgb: bytes) -> bytes:
    """A valid truecolour PNG of one colour, built by hand to need no imaging library."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    rows = b"".join(b"\x00" + rgb * width for _ in range(height))  # filter byte 0 per row
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


async def _deliver_callback(state: SimState, task: Task) -> None:
    assert task.callback_url is not None
    await asyncio.sleep(max(0.0, task.created + task.latency - time.monotonic()))
    state.settle()
    envelope = {"code": 200, "message": "success", "data": task.status_data(time.monotonic())}
    # Best effort, one attempt: the real API's retry policy is not documented.
    try:
        timeout = aiohttp.ClientTimeout(total=CALLBACK_TIMEOUT_SECONDS)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(task.callback_url, json=envelope) as resp,
        ):
            if resp.status != 200:
                log.warning(
                    "simulator callback for %s to %s answered %s",
                    task.task_id, task.callback_url, resp.status,
                )
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning(
            "simulator callback for %s to %s failed: %r", task.task_id, task.callback_url, exc
        )


async def _cancel_background(app: web.Application) -> None:
    tasks = list(app[SIM_STATE].background)
    for bg in tasks:
        bg.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- /_sim/ controls ----------------------------------------------------------


async def _stats(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    state.settle()
    now = time.monotonic()
    stats = state.stats
    tasks = {}
    for task_id in stats.task_ids:
        task = state.tasks[task_id]
        tasks[task_id] = {
            "model": task.model,
            "input": task.input,
            "provider": task.provider,
            "state": task.state(now),
            "state_final": task.outcome,  # decided at submit, whether or not reached yet
            "images": len(task.result_urls),
        }
    return web.json_response(
        {
            "submits": stats.submits,
            "submit_attempts": stats.submit_attempts,
            "status_polls": stats.status_polls,
            "images": stats.images,
            "balance": state.balance_cents / 100,
            "tasks": tasks,
        }
    )


def _parse_fault_list(value: Any, key: str) -> list[Fault]:
    if not isinstance(value, list) or not all(
        v in STRING_FAULTS or (isinstance(v, int) and not isinstance(v, bool)) for v in value
    ):
        raise APIError(400, f"{key} must be a list of HTTP statuses or one of "
                            f"{', '.join(map(repr, STRING_FAULTS))}")
    return list(value)


def _parse_number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise APIError(400, f"{key} must be a non-negative number")
    return float(value)


async def _set_faults(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    try:
        try:
            body = json.loads(await request.text())
        except ValueError as exc:
            raise APIError(400, f"Request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise APIError(400, "Request body must be a JSON object")
        unknown = set(body) - {
            "submit_errors", "status_errors", "latency", "fail_rate", "reject_submits_with",
            "retry_after_seconds",
        }
        if unknown:
            raise APIError(400, f"Unknown fault keys: {', '.join(sorted(unknown))}")
        # Parse everything before changing anything, so a bad request changes nothing.
        submit_errors = _parse_fault_list(body.get("submit_errors", []), "submit_errors")
        status_errors = _parse_fault_list(body.get("status_errors", []), "status_errors")
        latency = _parse_number(body["latency"], "latency") if "latency" in body else None
        fail_rate = _parse_number(body["fail_rate"], "fail_rate") if "fail_rate" in body else None
        retry_after = (_parse_number(body["retry_after_seconds"], "retry_after_seconds")
                       if "retry_after_seconds" in body else None)
        reject = body.get("reject_submits_with")
        if reject is not None and (isinstance(reject, bool) or not isinstance(reject, int)):
            raise APIError(400, "reject_submits_with must be an HTTP status or null")
    except APIError as exc:
        return _error(exc)
    state.faults.submit_errors.extend(submit_errors)
    state.faults.status_errors.extend(status_errors)
    if latency is not None:
        state.latency = latency
    if fail_rate is not None:
        state.fail_rate = fail_rate
    if "reject_submits_with" in body:
        state.faults.reject_submits_with = reject
    if retry_after is not None:
        state.faults.retry_after_seconds = retry_after
    return web.json_response({"ok": True})


async def _reset(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    state.settle()  # so tasks finished before the reset are not counted after it
    state.faults = Faults()
    state.stats = Stats()
    state.latency = state.default_latency
    state.fail_rate = state.default_fail_rate
    return web.json_response({"ok": True})
