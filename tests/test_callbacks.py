"""Webhook delivery against a real receiver on loopback, with a real SQLite outbox."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.callbacks import Callbacks, check_callback_url, sign, verify_signature
from gateway.config import CallbacksConfig
from gateway.errors import APIError
from gateway.metrics import Metrics
from gateway.store import Outcome, Store, TaskRecord
from gateway.tasks import now_ms, status_envelope
from tests.conftest import Client, GatewayProcess, SimulatorProcess, t2i
from tests.receiver import Receiver, Reply

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = CallbacksConfig(allow_http=True, allow_private_networks=True)
SECRET = "whsec-test"
RESULT = json.dumps({"resultUrls": ["https://files.example/1.png"]})


# Polling: the state under test is in SQLite, written by another task or process.
async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


async def wait_for(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while True:
            if await check():
                return
            await asyncio.sleep(0.01)


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "gateway.db")


@pytest.fixture
async def store(db_path: str) -> AsyncIterator[Store]:
    s = Store(db_path)
    await s.open()
    yield s
    await s.close()


# -- helpers ------------------------------------------------------------------------


def task_record(task_id: str, callback_url: str | None, **changes: Any) -> TaskRecord:
    now = now_ms()
    values: dict[str, Any] = {
        "id": task_id, "team": "design", "model": "grok-image", "identity": "identity-1",
        "state": "success", "cache": "hit", "leader_id": None, "upstream_id": None,
        "request_json": "{}", "result_json": RESULT, "fail_code": None, "fail_msg": None,
        "create_ms": now - 1500, "complete_ms": now, "price_micros": 100_000,
        "reserved_micros": 0, "charged_micros": 0, "saved_micros": 0, "images": 1,
        "budget_day": "2025-01-01", "no_store": 0, "callback_url": callback_url,
    }
    values.update(changes)
    return TaskRecord(**values)


async def final_task(store: Store, task_id: str, url: str, **changes: Any) -> TaskRecord:
    """A task created final (like a cache hit): the store enqueues its callback."""
    return await store.create_task(
        task_record(task_id, url, **changes), idempotency=None, now_ms=now_ms()
    )


def outbox_row(db_path: str, task_id: str) -> tuple[str, int, str | None, int]:
    """(state, attempts, last_error, next_attempt_ms), read as another process would."""
    with sqlite3.connect(db_path) as db:
        row = db.execute(
            "SELECT state, attempts, last_error, next_attempt_ms FROM outbox WHERE task_id = ?",
            (task_id,),
        ).fetchone()
    assert row is not None, f"no outbox row for {task_id}"
    return str(row[0]), int(row[1]), row[2], int(row[3])


def deliveries(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "apixo_gateway_callback_deliveries_total", {"outcome": outcome}
    )
    return value or 0.0


@dataclass
class Worker:
    callbacks: Callbacks
    metrics: Metrics


@pytest.fixture
async def worker_factory(
    store: Store, http: aiohttp.ClientSession
) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    started: list[Callbacks] = []

    async def make(
        config: CallbacksConfig = LOOPBACK, secret: str | None = None, **kwargs: Any
    ) -> Worker:
        kwargs.setdefault("backoff_base_seconds", 0.02)
        metrics = Metrics()
        callbacks = Callbacks(store, http, config, metrics, store.get_task, secret, **kwargs)
        await callbacks.start()
        started.append(callbacks)
        return Worker(callbacks, metrics)

    yield make
    for callbacks in started:
        await callbacks.stop()


WorkerFactory = Callable[..., Awaitable[Worker]]


async def delivered(db_path: str, task_id: str) -> bool:
    return outbox_row(db_path, task_id)[0] == "delivered"


# -- retries ------------------------------------------------------------------------


async def test_two_500s_then_200_is_three_attempts_and_no_more(
    store: Store, db_path: str, receiver: Receiver, worker_factory: WorkerFactory
) -> None:
    receiver.script = [Reply(500), Reply(500), Reply(200)]
    worker = await worker_factory()
    task = await final_task(store, "gw_retry", receiver.url())
    worker.callbacks.wake()

    await wait_for(lambda: delivered(db_path, task.id))
    await asyncio.sleep(0.3)  # many backoff periods: nothing else may arrive

    assert [h.status for h in receiver.hits] == [500, 500, 200]
    assert outbox_row(db_path, task.id)[:3] == ("delivered", 3, None)
    assert deliveries(worker.metrics, "retried") == 2
    assert deliveries(worker.metrics, "delivered") == 1
    assert deliveries(worker.metrics, "gave_up") == 0
    expected = status_envelope(task)
    for n, hit in enumerate(receiver.hits, start=1):
        assert hit.path == "/hook"
        assert hit.headers["Content-Type"] == "application/json"
        assert hit.headers["X-Gateway-Task-Id"] == task.id
        assert hit.headers["X-Gateway-Attempt"] == str(n)
        assert "X-Gateway-Signature" not in hit.headers  # no secret configured
        assert json.loads(hit.body) == expected
    assert expected["data"]["state"] == "success"
    assert expected["data"]["resultJson"] == RESULT


async def test_timeout_counts_as_a_failed_attempt(
    store: Store, db_path: str, receiver: Receiver, worker_factory: WorkerFactory
) -> None:
    receiver.script = [Reply(200, delay=2.0), Reply(200)]
    worker = await worker_factory(attempt_timeout_seconds=0.2)
    task = await final_task(store, "gw_slow", receiver.url())
    worker.callbacks.wake()

    await wait_for(lambda: delivered(db_path, task.id))
    assert len(receiver.hits) == 2
    assert outbox_row(db_path, task.id)[:2] == ("delivered", 2)
    assert deliveries(worker.metrics, "retried") == 1
    assert deliveries(worker.metrics, "delivered") == 1


async def test_gives_up_after_max_attempts_and_shows_it(
    store: Store, db_path: str, receiver: Receiver, worker_factory: WorkerFactory
) -> None:
    receiver.script = [Reply(503)] * 10
    config = CallbacksConfig(allow_http=True, allow_private_networks=True, max_attempts=3)
    worker = await worker_factory(config)
    task = await final_task(store, "gw_down", receiver.url())
    worker.callbacks.wake()

    await wait_for(lambda: _state_is(db_path, task.id, "gave_up"))
    await asyncio.sleep(0.3)
    assert len(receiver.hits) == 3
    assert outbox_row(db_path, task.id)[:3] == ("gave_up", 3, "HTTP 503")
    assert deliveries(worker.metrics, "retried") == 2
    assert deliveries(worker.metrics, "gave_up") == 1
    assert deliveries(worker.metrics, "delivered") == 0
    # What /admin/tasks lists: the task with its delivery state and attempts.
    [(listed, outbox_state, attempts)] = await store.recent_tasks(team=None, state=None, limit=5)
    assert (listed.id, outbox_state, attempts) == (task.id, "gave_up", 3)


async def _state_is(db_path: str, task_id: str, state: str) -> bool:
    return outbox_row(db_path, task_id)[0] == state


async def test_connection_error_is_a_failed_attempt(
    store: Store, db_path: str, worker_factory: WorkerFactory
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    config = CallbacksConfig(allow_http=True, allow_private_networks=True, max_attempts=2)
    worker = await worker_factory(config)
    task = await final_task(store, "gw_refused", f"http://127.0.0.1:{closed_port}/hook")
    worker.callbacks.wake()

    await wait_for(lambda: _state_is(db_path, task.id, "gave_up"))
    _, attempts, error, _ = outbox_row(db_path, task.id)
    assert attempts == 2
    assert error is not None and "ClientConnectorError" in error
    assert deliveries(worker.metrics, "retried") == 1


async def test_backoff_grows_exponentially_and_is_capped(
    store: Store, http: aiohttp.ClientSession
) -> None:
    callbacks = Callbacks(
        store, http, LOOPBACK, Metrics(), store.get_task, None,
        backoff_base_seconds=1.0, backoff_cap_seconds=300.0,
    )
    for attempts, ceiling in [(1, 1), (2, 2), (3, 4), (8, 128), (9, 256), (10, 300), (30, 300)]:
        for _ in range(20):
            assert ceiling / 2 <= callbacks.backoff_seconds(attempts) <= ceiling


async def test_redirects_are_not_followed(
    store: Store, db_path: str, receiver: Receiver, worker_factory: WorkerFactory
) -> None:
    receiver.script = [Reply(307, headers={"Location": "/elsewhere"})]
    config = CallbacksConfig(allow_http=True, allow_private_networks=True, max_attempts=1)
    worker = await worker_factory(config)
    task = await final_task(store, "gw_redirect", receiver.url())
    worker.callbacks.wake()

    await wait_for(lambda: _state_is(db_path, task.id, "gave_up"))
    assert [h.path for h in receiver.hits] == ["/hook"]
    assert outbox_row(db_path, task.id)[2] == "HTTP 307"


async def test_deliveries_run_concurrently_but_bounded(
    store: Store, db_path: str, receiver: Receiver, worker_factory: WorkerFactory
) -> None:
    receiver.script = [Reply(200, delay=0.2) for _ in range(6)]
    worker = await worker_factory(concurrency=2)
    for i in range(6):
        await final_task(store, f"gw_many_{i}", receiver.url())
    worker.callbacks.wake()

    await wait_until(lambda: deliveries(worker.metrics, "delivered") == 6)
    assert receiver.max_active == 2
    assert sorted(h.headers["X-Gateway-Task-Id"] for h in receiver.hits) == [
        f"gw_many_{i}" for i in range(6)
    ]


# -- durability ---------------------------------------------------------------------


async def test_stop_and_new_worker_on_the_same_file_resumes(
    db_path: str, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    receiver.script = [Reply(500), Reply(200)]
    store = Store(db_path)
    await store.open()
    first = Callbacks(
        store, http, LOOPBACK, Metrics(), store.get_task, None, backoff_base_seconds=0.6
    )
    await first.start()
    task = await final_task(store, "gw_restart", receiver.url())
    first.wake()
    await wait_until(lambda: outbox_row(db_path, task.id)[1] == 1)
    await first.stop()
    await store.close()
    assert outbox_row(db_path, task.id)[:2] == ("pending", 1)
    assert len(receiver.hits) == 1

    store = Store(db_path)
    await store.open()
    metrics = Metrics()
    second = Callbacks(store, http, LOOPBACK, metrics, store.get_task, None)
    await second.start()
    try:
        await wait_for(lambda: delivered(db_path, task.id))
    finally:
        await second.stop()
        await store.close()
    assert [h.status for h in receiver.hits] == [500, 200]
    assert deliveries(metrics, "delivered") == 1


_WORKER_PROCESS = """
import asyncio, sys
import aiohttp
from gateway.callbacks import Callbacks
from gateway.config import CallbacksConfig
from gateway.metrics import Metrics
from gateway.store import Store

async def main() -> None:
    store = Store(sys.argv[1])
    await store.open()
    async with aiohttp.ClientSession() as http:
        config = CallbacksConfig(allow_http=True, allow_private_networks=True)
        callbacks = Callbacks(store, http, config, Metrics(), store.get_task, sys.argv[2],
                              backoff_base_seconds=float(sys.argv[3]))
        await callbacks.start()
        await asyncio.Event().wait()

asyncio.run(main())
"""


@asynccontextmanager
async def worker_process(db_path: str, backoff: float) -> AsyncIterator[None]:
    """A delivery worker in its own process, killed with SIGKILL when the block ends:
    no cleanup, no chance to flush anything."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WORKER_PROCESS, db_path, SECRET, str(backoff),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_kill_9_between_attempts_then_restart_delivers_once(
    store: Store, db_path: str, receiver: Receiver
) -> None:
    receiver.script = [Reply(500), Reply(200)]
    task = await final_task(store, "gw_kill", receiver.url())

    async with worker_process(db_path, backoff=1.0):
        await receiver.wait_hits(1, within=15)
        await wait_until(lambda: outbox_row(db_path, task.id)[1] == 1)
    assert outbox_row(db_path, task.id)[:2] == ("pending", 1)

    async with worker_process(db_path, backoff=0.05):
        await wait_for(lambda: delivered(db_path, task.id), within=15)
        await asyncio.sleep(0.3)
    assert [h.status for h in receiver.hits] == [500, 200]
    assert outbox_row(db_path, task.id)[:2] == ("delivered", 2)
    assert all(verify_signature(SECRET, h.headers["X-Gateway-Signature"], h.body)
               for h in receiver.hits)


async def test_kill_9_during_an_attempt_sends_it_again(
    store: Store, db_path: str, receiver: Receiver
) -> None:
    receiver.script = [Reply(200, delay=30), Reply(200)]
    task = await final_task(store, "gw_kill_mid", receiver.url())

    async with worker_process(db_path, backoff=0.05):
        await receiver.wait_hits(1, within=15)
    # The answer never reached the gateway: the attempt was not recorded.
    assert outbox_row(db_path, task.id)[:2] == ("pending", 0)

    async with worker_process(db_path, backoff=0.05):
        await wait_for(lambda: delivered(db_path, task.id), within=15)
    assert len(receiver.hits) == 2
    assert receiver.hits[0].body == receiver.hits[1].body


# -- what gets delivered ------------------------------------------------------------


async def test_signature_verifies_and_a_tampered_body_does_not(
    store: Store, db_path: str, receiver: Receiver, worker_factory: WorkerFactory
) -> None:
    worker = await worker_factory(secret=SECRET)
    task = await final_task(store, "gw_signed", receiver.url())
    worker.callbacks.wake()
    await wait_for(lambda: delivered(db_path, task.id))

    [hit] = receiver.hits
    header = hit.headers["X-Gateway-Signature"]
    t, v1 = (part.split("=", 1)[1] for part in header.split(","))
    assert header == f"t={t},v1={v1}"
    assert abs(int(t) - time.time()) < 60
    expected = hmac.new(SECRET.encode(), t.encode() + b"." + hit.body, hashlib.sha256)
    assert v1 == expected.hexdigest()

    assert verify_signature(SECRET, header, hit.body)
    assert not verify_signature(SECRET, header, hit.body.replace(b"success", b"failed!"))
    assert not verify_signature(SECRET, header, hit.body + b" ")
    assert not verify_signature("another-secret", header, hit.body)
    assert not verify_signature(SECRET, header, hit.body, now=int(t) + 301)
    assert verify_signature(SECRET, header, hit.body, now=int(t) + 299)


def test_sign_and_verify_edge_cases() -> None:
    body = b'{"code":200}'
    header = sign("k", 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=")
    assert verify_signature("k", header, body, now=1_700_000_000)
    # A second v1 (secret rotation) is accepted if any entry matches.
    rotated = header + "," + sign("old", 1_700_000_000, body).split(",")[1]
    assert verify_signature("k", rotated, body, now=1_700_000_000)
    for bad in ("", "garbage", "t=abc,v1=00", "v1=" + header.split("v1=")[1], "t=1700000000"):
        assert not verify_signature("k", bad, body, now=1_700_000_000)


async def test_cache_hit_is_delivered_at_once(
    store: Store, db_path: str, receiver: Receiver, worker_factory: WorkerFactory
) -> None:
    worker = await worker_factory()
    await asyncio.sleep(0.05)  # the loop is idle, sleeping until the next poll
    started = time.monotonic()
    task = await final_task(store, "gw_hit", receiver.url(), cache="hit")
    worker.callbacks.wake()  # what the gateway core does after creating it
    await receiver.wait_hits(1)
    assert time.monotonic() - started < 1.0
    assert json.loads(receiver.hits[0].body)["data"]["taskId"] == task.id


async def test_joined_task_is_delivered_when_its_leader_finishes(
    store: Store, db_path: str, receiver: Receiver, worker_factory: WorkerFactory
) -> None:
    worker = await worker_factory()
    leader = task_record(
        "gw_leader", None, state="pending", cache="miss", result_json=None, complete_ms=None,
        images=0, reserved_micros=100_000,
    )
    await store.create_reserved_task(
        leader, budget=None, period_start_day="2025-01-01", idempotency=None, now_ms=now_ms()
    )
    follower = task_record(
        "gw_follower", receiver.url("/joined"), state="pending", cache="joined",
        leader_id=leader.id, result_json=None, complete_ms=None, images=0,
    )
    await store.create_task(follower, idempotency=None, now_ms=now_ms())
    await asyncio.sleep(0.1)
    assert receiver.hits == []  # not final yet: nothing to deliver

    finished = await store.finish(
        leader.id, Outcome("success", now_ms(), result_json=RESULT, images=1),
        cache_key=None, cache_ttl_ms=0,
    )
    assert {t.id for t in finished} == {leader.id, follower.id}
    worker.callbacks.wake()
    await receiver.wait_hits(1)
    [hit] = receiver.hits
    assert hit.path == "/joined"
    data = json.loads(hit.body)["data"]
    assert (data["taskId"], data["state"], data["resultJson"]) == (follower.id, "success", RESULT)


async def test_failed_task_is_delivered_with_code_200_envelope(
    store: Store, db_path: str, receiver: Receiver, worker_factory: WorkerFactory
) -> None:
    worker = await worker_factory()
    task = await final_task(
        store, "gw_failed", receiver.url(), state="failed", result_json=None, images=0,
        fail_code="SensitiveContent", fail_msg="Content violates provider policy",
    )
    worker.callbacks.wake()
    await wait_for(lambda: delivered(db_path, task.id))
    body = json.loads(receiver.hits[0].body)
    assert body["code"] == 200
    assert body["data"]["state"] == "failed"
    assert body["data"]["failCode"] == "SensitiveContent"


async def test_connects_to_the_checked_address_keeping_the_host_name(
    store: Store, db_path: str, receiver: Receiver, worker_factory: WorkerFactory
) -> None:
    worker = await worker_factory()
    task = await final_task(store, "gw_pinned", receiver.url(host="localhost"))
    worker.callbacks.wake()
    await wait_for(lambda: delivered(db_path, task.id))
    assert receiver.hits[0].headers["Host"] == f"localhost:{receiver.port}"


# -- SSRF -------------------------------------------------------------------------------


REFUSED_BY_DEFAULT = [
    "http://example.com/hook",
    "https://127.0.0.1/hook",
    "https://127.1.2.3:8443/hook",
    "https://localhost/hook",
    "https://[::1]/hook",
    "https://10.0.0.5/hook",
    "https://172.16.0.1/hook",
    "https://172.31.255.254/hook",
    "https://192.168.1.10/hook",
    "https://169.254.169.254/latest/meta-data/",
    "https://0.0.0.0/hook",
    "https://224.0.0.1/hook",
    "https://[::ffff:127.0.0.1]/hook",
    "https://[::ffff:169.254.169.254]/hook",
    "https://[fe80::1]/hook",
    "https://[fc00::1]/hook",
    "https://[::]/hook",
    "https://[ff02::1]/hook",
    "https://[2002:7f00:1::]/hook",  # 6to4 wrapping 127.0.0.1
    "https://100.64.0.1/hook",  # carrier-grade NAT
    "https://2130706433/hook",  # 127.0.0.1 written as one number
    "https://0x7f.1/hook",
    "https://does-not-exist.invalid/hook",
    "https://user@/hook",
    "ftp://example.com/hook",
    "not a url",
]


@pytest.mark.parametrize("url", REFUSED_BY_DEFAULT)
async def test_refused_with_400_by_default(url: str) -> None:
    with pytest.raises(APIError) as info:
        await check_callback_url(url, CallbacksConfig())
    assert info.value.code == 400
    assert info.value.reason == "invalid"
    assert info.value.error.startswith("callback_url: ")
    assert info.value.envelope()["code"] == 400


async def test_refusal_messages_say_why() -> None:
    async def error(url: str, config: CallbacksConfig | None = None) -> str:
        with pytest.raises(APIError) as info:
            await check_callback_url(url, config or CallbacksConfig())
        return info.value.error

    assert "callbacks.allow_http" in await error("http://example.com/")
    message = await error("https://localhost/")
    assert "resolves to" in message and "loopback" in message
    assert "callbacks.allow_private_networks" in message
    assert "link-local" in await error("https://169.254.169.254/")
    assert "could not be resolved" in await error("https://does-not-exist.invalid/")
    # allow_http alone does not open private networks.
    assert "loopback" in await error("http://127.0.0.1:9/", CallbacksConfig(allow_http=True))


@pytest.mark.parametrize("url", ["https://93.184.215.14/hook", "https://[2606:4700::1111]:8443/h"])
async def test_public_addresses_are_accepted(url: str) -> None:
    await check_callback_url(url, CallbacksConfig())


async def test_private_networks_allowed_by_config() -> None:
    await check_callback_url("http://127.0.0.1:9/hook", LOOPBACK)
    await check_callback_url("http://localhost:9/hook", LOOPBACK)
    await check_callback_url("https://[::1]/hook", LOOPBACK)
    with pytest.raises(APIError):  # still https-only without allow_http
        await check_callback_url(
            "http://127.0.0.1:9/hook", CallbacksConfig(allow_private_networks=True)
        )


async def test_refused_again_at_delivery_time(
    store: Store, db_path: str, receiver: Receiver, worker_factory: WorkerFactory
) -> None:
    # Accepted when submitted (the config allowed it then); refused when sent.
    task = await final_task(store, "gw_ssrf", receiver.url())
    config = CallbacksConfig(allow_http=True, allow_private_networks=False, max_attempts=2)
    worker = await worker_factory(config)
    await wait_for(lambda: _state_is(db_path, task.id, "gave_up"))
    assert receiver.hits == []
    _, attempts, error, _ = outbox_row(db_path, task.id)
    assert attempts == 2
    assert error is not None and "loopback" in error
    assert deliveries(worker.metrics, "gave_up") == 1


async def test_apply_config_takes_effect_for_the_next_attempt(
    store: Store, db_path: str, receiver: Receiver, worker_factory: WorkerFactory
) -> None:
    task = await final_task(store, "gw_reload", receiver.url())
    refusing = CallbacksConfig(allow_http=True, allow_private_networks=False, max_attempts=50)
    worker = await worker_factory(refusing, backoff_base_seconds=0.05, backoff_cap_seconds=0.05)
    await wait_until(lambda: outbox_row(db_path, task.id)[1] >= 1)
    worker.callbacks.apply_config(LOOPBACK)
    await wait_for(lambda: delivered(db_path, task.id))
    assert len(receiver.hits) == 1


# -- end to end: the gateway process, the simulator, a receiver ---------------------------


def _callback_body(prompt: str, url: str) -> dict[str, Any]:
    return t2i(prompt) | {"request_type": "callback", "callback_url": url}


async def _metric(http: aiohttp.ClientSession, gw: GatewayProcess, outcome: str) -> float:
    async with http.get(gw.url + "/metrics") as r:
        text = await r.text()
    line = f'apixo_gateway_callback_deliveries_total{{outcome="{outcome}"}} '
    values = [float(x[len(line):]) for x in text.splitlines() if x.startswith(line)]
    return values[0] if values else 0.0


async def test_e2e_cache_hit_is_delivered_at_once_and_signed(
    gateways: Any, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    gw = gateways(env={"GATEWAY_WEBHOOK_SECRET": SECRET})
    client = Client(http, gw.url, "key-alpha")
    code, body, headers = await client.submit(
        _callback_body("a lighthouse at dusk", receiver.url("/first"))
    )
    assert code == 200 and headers["X-Gateway-Cache"] == "miss"
    first_id = body["data"]["taskId"]
    await receiver.wait_hits(1, within=20)
    first = receiver.hits[0]
    assert first.headers["X-Gateway-Task-Id"] == first_id
    assert verify_signature(SECRET, first.headers["X-Gateway-Signature"], first.body)
    first_data = json.loads(first.body)["data"]
    assert first_data["state"] == "success"
    assert first_data == await client.wait_final(first_id)

    started = time.monotonic()
    code, body, headers = await client.submit(
        _callback_body("a lighthouse at dusk", receiver.url("/second"))
    )
    assert code == 200 and headers["X-Gateway-Cache"] == "hit"
    await receiver.wait_hits(2)
    assert time.monotonic() - started < 1.0
    second = receiver.hits[1]
    assert second.path == "/second"
    assert second.headers["X-Gateway-Task-Id"] == body["data"]["taskId"] != first_id
    assert verify_signature(SECRET, second.headers["X-Gateway-Signature"], second.body)
    data = json.loads(second.body)["data"]
    assert (data["state"], data["resultJson"]) == ("success", first_data["resultJson"])
    # The gateway counts a delivery once its outbox row is marked, a moment after
    # the receiver answered: wait for it rather than race it.
    for _ in range(250):
        if await _metric(http, gw, "delivered") >= 2:
            break
        await asyncio.sleep(0.02)
    assert await _metric(http, gw, "delivered") == 2


async def test_e2e_kill_9_between_attempts_then_restart_delivers_once(
    gateways: Any, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.script = [Reply(500), Reply(200)]
    gw = gateways(env={"GATEWAY_WEBHOOK_SECRET": SECRET})
    client = Client(http, gw.url, "key-alpha")
    code, body, _ = await client.submit(_callback_body("a red kite", receiver.url()))
    assert code == 200
    task_id = body["data"]["taskId"]
    await receiver.wait_hits(1, within=20)

    async def first_attempt_recorded() -> bool:
        [row] = (await client.admin("/admin/tasks"))["tasks"]
        return bool(row["callback_attempts"] == 1)

    await wait_for(first_attempt_recorded)  # the retry is due 0.5-1 s after it
    gw.kill9()
    await asyncio.sleep(1.5)  # past the retry the dead process had scheduled
    assert len(receiver.hits) == 1

    await asyncio.to_thread(gw.start)  # same config, same database file
    await receiver.wait_hits(2, within=20)
    await asyncio.sleep(0.5)
    assert [h.status for h in receiver.hits] == [500, 200]
    assert {h.headers["X-Gateway-Task-Id"] for h in receiver.hits} == {task_id}
    assert receiver.hits[0].body == receiver.hits[1].body
    [row] = (await client.admin("/admin/tasks"))["tasks"]
    assert (row["taskId"], row["callback_state"]) == (task_id, "delivered")
    assert row["callback_attempts"] == 2
    assert await _metric(http, gw, "delivered") == 1


async def test_e2e_private_callback_urls_refused_with_400(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways(callbacks={"allow_http": False, "allow_private_networks": False})
    client = Client(http, gw.url, "key-alpha")
    for url in ("http://example.com/hook", "https://127.0.0.1/hook", "https://localhost/hook",
                "https://169.254.169.254/latest", "https://[::ffff:10.0.0.1]/hook"):
        code, body, _ = await client.submit(_callback_body("a fox", url))
        assert code == 400, url
        assert body["code"] == 400 and "callback_url" in body["data"]["error"]
    assert (await sim.stats())["submits"] == 0


async def test_e2e_a_refused_submit_sends_no_webhook(
    gateways: Any, http: aiohttp.ClientSession, receiver: Receiver, sim: SimulatorProcess
) -> None:
    # The client got an error and no task id; APIXO sends no callback for a
    # refused submit either. A later accepted one is delivered as usual.
    gw = gateways(upstream={"max_retries": 0})
    client = Client(http, gw.url, "key-alpha")
    await sim.faults(submit_errors=[400, 503])
    for expected in (400, 502):
        code, body, _ = await client.submit(
            _callback_body("refused upstream", receiver.url("/refused"))
        )
        assert code == expected, body
    code, body, _ = await client.submit(_callback_body("accepted", receiver.url("/ok")))
    assert code == 200, body
    await receiver.wait_hits(1, within=20)
    await asyncio.sleep(0.5)
    assert [h.path for h in receiver.hits] == ["/ok"]
    tasks = (await client.admin("/admin/tasks"))["tasks"]
    refused = [t for t in tasks if t["failCode"] == "UpstreamRejected"]
    assert len(refused) == 2 and all(t["callback_state"] is None for t in refused), refused


async def test_a_receiver_that_never_answers_does_not_hold_up_the_others(
    store: Store, receiver: Receiver, worker_factory: WorkerFactory
) -> None:
    # It accepts connections and never replies: each attempt to it lasts the
    # whole attempt timeout. Twenty of them are queued before a healthy one.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        worker = await worker_factory(attempt_timeout_seconds=20)
        for i in range(20):
            await final_task(store, f"gw_stuck_{i}", f"http://127.0.0.1:{port}/hook")
        await final_task(store, "gw_healthy", receiver.url())
        started = time.monotonic()
        worker.callbacks.wake()
        await receiver.wait_hits(1, within=5)
        assert time.monotonic() - started < 3
        assert receiver.hits[0].headers["X-Gateway-Task-Id"] == "gw_healthy"
    finally:
        server.close()
