"""Team auth and isolation: keys, 401 envelopes, taskIds that belong to one team only."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tests.conftest import Client, SimulatorProcess, t2i, team
from tests.test_budget import until

ENDPOINTS = (
    ("POST", "/api/v1/generateTask/grok-image"),
    ("GET", "/api/v1/statusTask/grok-image?taskId=gw_x"),
    ("GET", "/api/v1/apikeys/current-balance"),
)


def plain_team(name: str, key: str, **limits: Any) -> dict[str, Any]:
    return {"name": name, "api_keys": [f"plain:{key}"], **limits}


def assert_401(status: int, body: dict[str, Any]) -> None:
    assert status == 401, body
    assert body["code"] == 401
    assert body["message"] == "Invalid or missing API key"
    assert "key" in body["data"]["error"].lower()


async def test_sha256_and_plain_keys_work_and_plain_warns_at_startup(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways([team("alpha", budget_usd=1.0), plain_team("beta", "beta-plain-key")])
    alpha = Client(http, gw.url, "key-alpha")
    beta = Client(http, gw.url, "beta-plain-key")
    assert await alpha.balance() == 1.0
    assert await beta.balance() is None  # no budget_usd: unlimited
    code, body, _ = await beta.submit(t2i("plain keys still authenticate"))
    assert code == 200, body
    # The scheme word is case-insensitive, like any HTTP auth scheme.
    async with http.get(f"{gw.url}/api/v1/apikeys/current-balance",
                        headers={"Authorization": "bearer key-alpha"}) as r:
        assert r.status == 200
    warnings = [line for line in gw.log_lines()
                if line.get("level") == "warning" and "plain" in line.get("msg", "")]
    assert len(warnings) == 1, warnings  # beta only; alpha's sha256 key is not warned about
    assert "beta" in warnings[0]["msg"]
    # The key itself never lands in the log.
    assert "beta-plain-key" not in gw.log.read_text()


async def test_missing_or_unknown_key_is_401_envelope_everywhere(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer    "},
        {"Authorization": "Basic a2V5LWFscGhhOg=="},
        {"Authorization": "key-alpha"},  # the right key without the scheme
        {"Authorization": "Bearer key-alpha-but-longer"},
        {"Authorization": "Bearer KEY-ALPHA"},
    ]
    for method, path in ENDPOINTS:
        for headers in bad_headers:
            async with http.request(method, gw.url + path, headers=headers,
                                    json=t2i("a cat")) as r:
                assert_401(r.status, await r.json())
    # Auth comes before everything else: an unpriced model or a bad body still says 401.
    async with http.post(f"{gw.url}/api/v1/generateTask/no-such-model",
                         headers={"Authorization": "Bearer nope"}, data=b"{not json") as r:
        assert_401(r.status, await r.json())
    stats = await sim.stats()
    assert stats["submit_attempts"] == 0 and stats["status_polls"] == 0


async def test_task_ids_are_the_gateways_own_and_private_to_the_team(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways([team("alpha", budget_usd=1.0), team("beta", budget_usd=2.0)],
                  pricing={"grok-image": 0.1, "nano-banana": 0.05})
    alpha = Client(http, gw.url, "key-alpha")
    beta = Client(http, gw.url, "key-beta")
    code, body, _ = await alpha.submit(t2i("alpha's private lighthouse"))
    assert code == 200
    task_id = body["data"]["taskId"]
    data = await alpha.wait_final(task_id)
    assert data["state"] == "success" and data["taskId"] == task_id

    stats = await sim.stats()
    (upstream_id,) = stats["tasks"]
    assert task_id != upstream_id
    # Nothing in the answer, result URLs included, mentions the upstream id.
    assert upstream_id not in json.dumps(data)
    # The upstream id is not a valid taskId at the gateway either.
    code, reply = await alpha.status(upstream_id)
    assert code == 404 and reply["code"] == 404

    # Another team's task looks exactly like one that does not exist.
    code, theirs = await beta.status(task_id)
    code_unknown, unknown = await beta.status("gw_" + "0" * 24)
    assert code == code_unknown == 404
    assert theirs["message"] == unknown["message"] == "Task not found"
    assert theirs["data"]["error"] == unknown["data"]["error"].replace("gw_" + "0" * 24, task_id)

    # The right team, the wrong model: 404 too.
    code, reply = await alpha.status(task_id, model="nano-banana")
    assert code == 404 and reply["code"] == 404

    # Budgets are per team: alpha paid, beta did not.
    assert await alpha.balance() == 0.9
    assert await beta.balance() == 2.0

    # A cache hit for beta on the same request is a new task of beta's, not alpha's id.
    code, body, headers = await beta.submit(t2i("alpha's private lighthouse"))
    assert code == 200 and headers["X-Gateway-Cache"] == "hit"
    hit_id = body["data"]["taskId"]
    assert hit_id != task_id
    assert (await beta.wait_final(hit_id))["state"] == "success"
    code, _ = await alpha.status(hit_id)
    assert code == 404
    assert (await sim.stats())["submits"] == 1


async def test_a_task_stays_readable_after_a_reload_stops_serving_its_model(
    gateways: Any, http: aiohttp.ClientSession
) -> None:
    gw = gateways([team("alpha")], pricing={"grok-image": 0.1, "nano-banana": 0.05})
    alpha = Client(http, gw.url, "key-alpha")
    task_id = await alpha.submit_ok(t2i("a banana boat"), model="nano-banana")
    await alpha.wait_final(task_id, model="nano-banana")

    gw.config["pricing"] = {"grok-image": 0.1}
    gw.write_config()
    gw.hup()

    async def reloaded() -> bool:
        return (await alpha.submit(t2i("another banana"), model="nano-banana"))[0] == 404

    await until(reloaded)

    # The prices the out-of-budget alert compares with follow the reload too.
    async with http.get(gw.url + "/metrics") as r:
        prices = [ln for ln in (await r.text()).splitlines()
                  if ln.startswith("apixo_gateway_price_usd{")]
    assert prices == ['apixo_gateway_price_usd{model="grok-image"} 0.1']

    # Submitted (and paid for) before the reload: still the team's to read.
    code, body = await alpha.status(task_id, model="nano-banana")
    assert code == 200 and body["data"]["state"] == "success"
    # Any other id under that model says the model is not served.
    code, body = await alpha.status("gw_" + "0" * 24, model="nano-banana")
    assert code == 404 and body["message"] == "Model not found"
    assert "not served" in body["data"]["error"]
    # Nor does the model's disappearance open the task to the wrong model.
    code, body = await alpha.status(task_id)
    assert code == 404 and body["message"] == "Task not found"


async def test_status_needs_a_task_id(gateways: Any, http: aiohttp.ClientSession) -> None:
    gw = gateways()
    headers = {"Authorization": "Bearer key-alpha"}
    for query in ("", "?taskId=", "?taskId=%20%20", "?task_id=gw_1"):
        async with http.get(f"{gw.url}/api/v1/statusTask/grok-image{query}",
                            headers=headers) as r:
            body = await r.json()
            assert r.status == 400 and body["code"] == 400, body
            assert "taskId" in body["data"]["error"]


async def test_client_polls_never_reach_upstream(
    gateways: Any, http: aiohttp.ClientSession, sim: SimulatorProcess
) -> None:
    gw = gateways()
    alpha = Client(http, gw.url, "key-alpha")
    code, body, _ = await alpha.submit(t2i("poll me as much as you like"))
    assert code == 200
    task_id = body["data"]["taskId"]
    await alpha.wait_final(task_id)
    polls = (await sim.stats())["status_polls"]
    assert polls >= 1  # the gateway's own tracker asked upstream
    for _ in range(30):
        code, reply = await alpha.status(task_id)
        assert code == 200 and reply["data"]["state"] == "success"
    assert (await sim.stats())["status_polls"] == polls
