"""Structured logs of a real gateway process: one line per request, one per task state
change, request ids, and what must never be written (keys; prompts unless configured)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
from typing import Any

import aiohttp

from gateway.logs import DeferredStreamHandler, Event, JsonFormatter
from tests.conftest import ADMIN_TOKEN, UPSTREAM_KEY, Client, GatewayProcess, t2i, team

PROMPT = "a lighthouse keeper's secret diary, page 7f3e"
REQUEST_FIELDS = {"request_id", "team", "model", "endpoint", "status", "duration_ms"}


def requests_logged(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [line for line in gw.log_lines() if line.get("event") == "request"]


def task_lines(gw: GatewayProcess, task_id: str) -> list[dict[str, Any]]:
    return [
        line for line in gw.log_lines()
        if line.get("event") == "task_state" and line.get("task_id") == task_id
    ]


async def get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    async with http.get(url, headers=headers or {}) as r:
        await r.read()
        return r


async def test_request_id_is_echoed_or_generated(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways()
    alpha = Client(http, gw.url, "key-alpha")
    _, _, headers = await alpha.submit(t2i("ids"), headers={"X-Request-Id": "trace-42.a"})
    assert headers["X-Request-Id"] == "trace-42.a"

    generated = set()
    for _ in range(3):
        r = await get(http, gw.url + "/healthz")
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-Id"])
        generated.add(r.headers["X-Request-Id"])
    assert len(generated) == 3

    # Errors carry it too; an id that could bloat or forge log lines is replaced.
    r = await get(http, gw.url + "/api/v1/statusTask/grok-image?taskId=x",
                  headers={"X-Request-Id": "err-1"})
    assert r.status == 401 and r.headers["X-Request-Id"] == "err-1"
    for bad in ("x" * 500, "two words", "quote\"d"):
        r = await get(http, gw.url + "/healthz", headers={"X-Request-Id": bad})
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-Id"]), bad

    logged = {line["request_id"] for line in requests_logged(gw)}
    assert {"trace-42.a", "err-1"} | generated <= logged
    assert not any(len(i) > 128 or " " in i for i in logged)


async def test_one_json_line_per_request_and_per_task_state(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(teams=[team("alpha", budget_usd=10.0)])
    alpha = Client(http, gw.url, "key-alpha")

    code, body, _ = await alpha.submit(t2i("log me"), headers={"X-Request-Id": "sub-1"})
    assert code == 200
    leader = body["data"]["taskId"]
    code, body, _ = await alpha.submit(t2i("log me"), headers={"X-Request-Id": "sub-2"})
    assert code == 200
    follower = body["data"]["taskId"]
    code, body, _ = await alpha.submit(t2i("[fail:SensitiveContent] log me"),
                                       headers={"X-Request-Id": "sub-3"})
    assert code == 200
    failed = body["data"]["taskId"]
    for task_id in (leader, follower, failed):
        await alpha.wait_final(task_id)
    code, body, _ = await alpha.submit(t2i("log me"), headers={"X-Request-Id": "sub-4"})
    hit = body["data"]["taskId"]
    code, _, _ = await Client(http, gw.url, "key-wrong").submit(
        t2i("x"), headers={"X-Request-Id": "sub-5"}
    )
    assert code == 401
    await get(http, gw.url + "/metrics", headers={"X-Request-Id": "scrape-1"})
    gw.terminate()  # flushes everything; the log file is then complete

    lines = requests_logged(gw)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        assert REQUEST_FIELDS <= line.keys(), line
        assert isinstance(line["duration_ms"], float | int) and line["duration_ms"] >= 0
        by_id.setdefault(line["request_id"], []).append(line)
    # Exactly one line per request (wait_final's polls included, each with its own id).
    assert all(len(same) == 1 for same in by_id.values()), by_id
    submits = {i: by_id[i][0] for i in ("sub-1", "sub-2", "sub-3", "sub-4", "sub-5")}
    assert [submits[i]["cache"] for i in ("sub-1", "sub-2", "sub-4")] == ["miss", "joined", "hit"]
    for i in ("sub-1", "sub-2", "sub-3", "sub-4"):
        line = submits[i]
        assert (line["team"], line["model"], line["endpoint"], line["status"]) == (
            "alpha", "grok-image", "generateTask", 200)
        assert line["level"] == "info" and line["msg"] == "request" and line["ts"].endswith("Z")
    assert submits["sub-1"]["task_id"] == leader
    stranger = submits["sub-5"]
    assert (stranger["team"], stranger["status"], stranger["error"]) == (
        "none", 401, "Unknown API key")
    polls = [line for line in lines if line["endpoint"] == "statusTask"]
    assert polls and all(p["status"] == 200 and p["team"] == "alpha" for p in polls)
    assert "scrape-1" not in by_id  # scrapes are not logged

    # Task state changes: each state once, in order, ending in exactly one final line.
    order = ["pending", "processing", "success", "failed"]
    for task_id, final in ((leader, "success"), (follower, "success"), (failed, "failed")):
        states = [line["state"] for line in task_lines(gw, task_id)]
        assert states == sorted(set(states), key=order.index), (task_id, states)
        assert [s for s in states if s in ("success", "failed")] == [final], states
    # A hit is born final: its request line is its only line.
    assert submits["sub-4"]["task_id"] == hit and task_lines(gw, hit) == []
    assert task_lines(gw, leader)[0]["state"] == "pending"
    assert task_lines(gw, follower)[0]["cache"] == "joined"
    final_failed = task_lines(gw, failed)[-1]
    assert final_failed["fail_code"] == "SensitiveContent"
    assert final_failed["team"] == "alpha" and final_failed["model"] == "grok-image"
    assert task_lines(gw, leader)[-1]["charged_usd"] == 0.1


async def test_secrets_and_prompts_stay_out_of_the_log(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    key = "key-alpha-very-secret-31b9"
    gw = gateways(teams=[team("alpha", key=key)])
    alpha = Client(http, gw.url, key)
    code, body, _ = await alpha.submit(t2i(PROMPT))
    assert code == 200
    await alpha.wait_final(body["data"]["taskId"])
    code, _, _ = await alpha.submit({"request_type": "async", "input": {"prompt": PROMPT}})
    assert code == 400  # mode missing: the rejection is logged, its prompt is not
    await alpha.balance()
    await alpha.admin("/admin/teams")
    await Client(http, gw.url, "key-someone-else-9e0d").submit(t2i(PROMPT))
    gw.terminate()

    text = gw.log.read_text()
    assert len(requests_logged(gw)) >= 5
    for secret in (key, hashlib.sha256(key.encode()).hexdigest(), "key-someone-else-9e0d",
                   UPSTREAM_KEY, ADMIN_TOKEN):
        assert secret not in text, secret
    assert PROMPT not in text and "lighthouse" not in text
    assert not any("prompt" in line for line in gw.log_lines())


async def test_prompts_logged_when_configured(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(logging={"log_prompts": True})
    alpha = Client(http, gw.url, "key-alpha")
    code, body, _ = await alpha.submit(t2i(PROMPT), headers={"X-Request-Id": "with-prompt"})
    assert code == 200
    task_id = body["data"]["taskId"]
    await alpha.wait_final(task_id)
    gw.terminate()

    with_prompt = [line for line in gw.log_lines() if line.get("prompt") == PROMPT]
    assert [line["request_id"] for line in with_prompt] == ["with-prompt"]
    assert with_prompt[0]["event"] == "request" and with_prompt[0]["task_id"] == task_id
    # Only the submit line: task lines and the polls do not repeat it.
    assert all("prompt" not in line for line in task_lines(gw, task_id))
    assert "key-alpha" not in gw.log.read_text()


async def test_text_format_is_for_people(gateways: Any, http: aiohttp.ClientSession) -> None:
    gw = gateways(logging={"format": "text"})
    alpha = Client(http, gw.url, "key-alpha")
    code, body, _ = await alpha.submit(t2i("plain text logs"),
                                       headers={"X-Request-Id": "human-1"})
    assert code == 200
    await alpha.wait_final(body["data"]["taskId"])
    gw.terminate()

    lines = [line for line in gw.log.read_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            continue
        raise AssertionError(f"JSON line in text format: {line}")
    request = [line for line in lines if "request_id=human-1" in line]
    assert len(request) == 1
    assert re.match(r"\d\d:\d\d:\d\d INFO +request ", request[0]), request[0]
    for field in ("team=alpha", "endpoint=generateTask", "status=200", "cache=miss"):
        assert field in request[0], field
    assert any("task final" in line and "state=success" in line for line in lines)
    assert "key-alpha" not in "\n".join(lines)


def test_a_line_the_stream_cannot_encode_loses_no_other_line() -> None:
    """A turn's lines go out in one write; one bad line must not take the rest with it."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", write_through=True)
    handler = DeferredStreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler._write([
        Event(1.0, "INFO", "gateway", "first", {"prompt": "café"}),
        Event(1.0, "INFO", "gateway", "lone surrogate", {"prompt": "\ud800"}),
        Event(1.0, "INFO", "gateway", "last", {}),
    ])
    lines = [json.loads(line) for line in raw.getvalue().decode("utf-8").splitlines()]
    assert [line["msg"] for line in lines] == ["first", "lone surrogate", "last"]
    assert lines[0]["prompt"] == "café"
    assert lines[1]["prompt"] == "?"


async def test_a_request_aiohttp_cannot_parse_does_not_log_its_key(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    # A key saved with a Windows line ending: the header line ends in a bare CR,
    # and aiohttp's own error quotes the line it could not parse.
    key = "key-alpha-crlf-7d41"
    gw = gateways(teams=[team("alpha", key=key)])
    host, port = gw.url.removeprefix("http://").split(":")
    for header in (f"Authorization: Bearer {key}\r", f"Authorization: Bearer {key}\x00"):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /api/v1/apikeys/current-balance HTTP/1.1\r\nHost: x\r\n"
                     f"{header}\r\n\r\n".encode())
        await writer.drain()
        assert b" 400 " in (await reader.read(100)).split(b"\r\n")[0]
        writer.close()
    gw.terminate()
    text = gw.log.read_text()
    assert key not in text
    assert "a request could not be parsed" in text


async def test_text_format_keeps_a_client_newline_inside_its_line(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways(logging={"format": "text"})
    forged = "20:00:00 INFO    request  team=alpha status=200"
    r = await get(http, gw.url + "/x%0A" + forged.replace(" ", "%20"))
    assert r.status == 404
    gw.terminate()
    lines = gw.log.read_text().splitlines()
    assert not any(line.startswith("20:00:00") for line in lines)
    (line,) = [ln for ln in lines if "endpoint=other" in ln]
    assert 'path="/x\\n20:00:00' in line
