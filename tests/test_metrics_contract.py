"""The metrics contract (SPEC section 4) against a real gateway's /metrics after real traffic.

The contract is the table in tests/contract.py: every metric exists with exactly those
types and label names. `drive_mixed_traffic` produces every kind of event a series exists for
(counters appear only after their first use); tests/test_prometheus_live.py reuses it.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import MAX_FAIL_CODES, Metrics
from tests.conftest import Client, GatewayProcess, SimulatorProcess, t2i, team
from tests.contract import SPEC_LABEL_VALUES, SPEC_METRICS
from tests.receiver import serve_receiver

ROOT = Path(__file__).resolve().parent.parent

# Teams for mixed traffic: one kind of refusal each, so every rejection reason shows up.
MIXED_TEAMS = [
    team("alpha", budget_usd=100.0),  # successes, hits, joins, failures, callbacks
    team("tight", budget_usd=0.05),  # less than one image: 402
    team("solo", max_concurrent=1),  # a second task in flight: 429 concurrency
    team("paced", requests_per_minute=2),  # a third submit in a minute: 429 rate_limit
]
MIXED_UPSTREAM = {"max_concurrent": 3}  # three slow tasks fill the gateway: 429 busy
CONFIGURED_TEAMS = frozenset(t["name"] for t in MIXED_TEAMS)
SLOW = "[latency:5]"  # still in flight when the traffic is over


# ------------------------------------------------------------------------ helpers


async def scrape(http: aiohttp.ClientSession, gw: GatewayProcess) -> str:
    async with http.get(gw.url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return await r.text()


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every (sample name, labels, value) in a scrape, `_created` timestamps left out."""
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    ]


def value(text: str, name: str, **labels: str) -> float | None:
    for sample_name, sample_labels, v in samples(text):
        if sample_name == name and sample_labels == labels:
            return v
    return None


async def expect(
    client: Client, body: Any, status: int, *, cache: str | None = None, **kw: Any
) -> str | None:
    code, payload, headers = await client.submit(body, **kw)
    assert code == status, payload
    if cache is not None:
        assert headers["X-Gateway-Cache"] == cache
    if status == 200:
        return str(payload["data"]["taskId"])
    return None


async def drive_mixed_traffic(
    http: aiohttp.ClientSession, gw: GatewayProcess, sim: SimulatorProcess
) -> None:
    """Every event SPEC section 4 counts, on a gateway configured with MIXED_TEAMS.

    Charged successes, a cache hit, a join, a bypass, failed tasks with two failCodes,
    an upstream 503 that is retried, a delivered callback, every rejection reason,
    and three slow tasks left in flight.
    """
    alpha = Client(http, gw.url, "key-alpha")
    async with serve_receiver() as receiver:
        # A miss and an identical request joining it while it is in flight.
        leader = await expect(alpha, t2i("mixed: a red fox"), 200, cache="miss")
        joined = await expect(alpha, t2i("mixed: a red fox"), 200, cache="joined")
        for task_id in (leader, joined):  # at most 3 tasks upstream at once: no 429 yet
            assert task_id is not None
            await alpha.wait_final(task_id)
        await sim.faults(submit_errors=[503])  # retried: an upstream error series
        bypass = await expect(
            alpha, t2i("mixed: a blue whale"), 200, cache="bypass",
            headers={"Cache-Control": "no-cache"},
        )
        failed = [
            await expect(alpha, t2i("mixed: [fail:SensitiveContent] a"), 200),
            await expect(alpha, t2i("mixed: [fail:Timeout] b"), 200),
        ]
        for task_id in (bypass, *failed):
            assert task_id is not None
            await alpha.wait_final(task_id)
        hit = await expect(alpha, t2i("mixed: a red fox"), 200, cache="hit")
        assert hit is not None
        callback = {
            **t2i("mixed: a green owl"),
            "request_type": "callback",
            "callback_url": receiver.url(),
        }
        callback_task = await expect(alpha, callback, 200)
        assert callback_task is not None
        await alpha.wait_final(callback_task)
        await receiver.wait_hits(1, within=10)
        assert await alpha.balance() is not None

    # Rejections, one reason at a time.
    stranger = Client(http, gw.url, "key-nobody")
    await expect(stranger, t2i("mixed: nope"), 401)
    await expect(alpha, {"request_type": "async", "input": {"mode": "text-to-image"}}, 400)
    await expect(Client(http, gw.url, "key-tight"), t2i("mixed: too dear"), 402)
    paced = Client(http, gw.url, "key-paced")
    for i in range(2):
        task_id = await expect(paced, t2i(f"mixed: paced {i}"), 200)
        assert task_id is not None
        await paced.wait_final(task_id)
    await expect(paced, t2i("mixed: paced 2"), 429)
    solo = Client(http, gw.url, "key-solo")
    await expect(solo, t2i(f"mixed: {SLOW} solo 1"), 200)
    await expect(solo, t2i("mixed: solo 2"), 429)
    await expect(alpha, t2i(f"mixed: {SLOW} alpha 1"), 200)
    await expect(alpha, t2i(f"mixed: {SLOW} alpha 2"), 200)
    await expect(alpha, t2i("mixed: no room"), 429)
    await alpha.admin("/admin/teams")


def mixed_gateway(gateways: Any) -> GatewayProcess:
    gw: GatewayProcess = gateways(teams=MIXED_TEAMS, upstream=MIXED_UPSTREAM)
    return gw


# --------------------------------------------------------------------------- tests


async def test_every_spec_metric_has_its_type_and_labels(
    gateways: Any, sim: SimulatorProcess, http: aiohttp.ClientSession
) -> None:
    gw = mixed_gateway(gateways)
    await drive_mixed_traffic(http, gw, sim)
    text = await scrape(http, gw)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    problems = []
    for name, (kind, labels) in SPEC_METRICS.items():
        # The parser names a counter's family without its _total suffix.
        family = families.get(name.removesuffix("_total") if kind == "counter" else name)
        if family is None:
            problems.append(f"{name}: not exported")
            continue
        if family.type != kind:
            problems.append(f"{name}: type {family.type}, SPEC says {kind}")
        value_samples = [
            s for s in family.samples
            if not s.name.endswith("_created") and not s.name.endswith("_gsum")
        ]
        if not value_samples:
            problems.append(f"{name}: no series after traffic")
        for s in value_samples:
            seen = set(s.labels) - ({"le"} if s.name.endswith("_bucket") else set())
            if seen != labels:
                problems.append(f"{name}: sample {s.name} has labels {sorted(seen)}, "
                                f"SPEC says {sorted(labels)}")
                break
        for label, allowed in SPEC_LABEL_VALUES.items():
            if label in labels:
                extra = {s.labels[label] for s in value_samples} - allowed
                if extra:
                    problems.append(f"{name}: {label} values {extra} not in {sorted(allowed)}")
        if "team" in labels:
            teams = {s.labels["team"] for s in value_samples}
            if teams - CONFIGURED_TEAMS - {"none"}:
                problems.append(f"{name}: team values {teams - CONFIGURED_TEAMS}")
    assert not problems, "\n".join(problems)

    # Every closed set was exercised, so each of these series is really produced.
    rejections = {
        labels["reason"] for n, labels, _ in samples(text) if n == "apixo_gateway_rejections_total"
    }
    assert rejections == SPEC_LABEL_VALUES["reason"]
    lookups = {
        labels["result"] for n, labels, _ in samples(text)
        if n == "apixo_gateway_cache_lookups_total"
    }
    assert lookups == SPEC_LABEL_VALUES["result"]
    assert value(text, "apixo_gateway_rejections_total", team="none", reason="unauthorized") == 1
    assert value(text, "apixo_gateway_callback_deliveries_total", outcome="delivered") == 1
    codes = {
        labels["fail_code"] for n, labels, _ in samples(text)
        if n == "apixo_gateway_task_failures_total"
    }
    assert codes == {"SensitiveContent", "Timeout"}
    assert value(text, "apixo_gateway_upstream_requests_total", operation="submit", code="503")
    # alpha: fox, whale, owl and two slow tasks were charged or reserved; 3 images so far.
    assert value(text, "apixo_gateway_images_total", team="alpha", model="grok-image") == 3
    assert value(text, "apixo_gateway_spend_usd_total", team="alpha", model="grok-image") == 0.3
    # The join and the hit each saved one image's price.
    assert value(text, "apixo_gateway_saved_usd_total", team="alpha", model="grok-image") == 0.2
    assert value(text, "apixo_gateway_tasks_in_flight", team="alpha") == 2
    assert value(text, "apixo_gateway_tasks_in_flight", team="solo") == 1
    assert value(text, "apixo_gateway_budget_usd", team="tight") == 0.05
    assert value(text, "apixo_gateway_price_usd", model="grok-image") == 0.1

    # Every metric the dashboards and alerts query is one the gateway exports.
    exported = {name for name, _, _ in samples(text)}
    referenced = grafana_metric_names()
    assert len(referenced) >= 15
    missing = referenced - exported
    assert not missing, f"grafana/ queries metrics the gateway does not export: {missing}"


def grafana_metric_names() -> set[str]:
    """Every apixo_gateway_* sample name used in the dashboards and alert rules."""
    names: set[str] = set()
    files = [*sorted((ROOT / "grafana/dashboards").glob("*.json")), ROOT / "grafana/alerts.yml"]
    for path in files:
        names |= set(re.findall(r"\bapixo_gateway_\w+", path.read_text()))
    return names


async def test_money_counters_survive_a_crash(
    gateways: Any, sim: SimulatorProcess, http: aiohttp.ClientSession
) -> None:
    gw = gateways(teams=[team("alpha"), team("beta")])
    alpha = Client(http, gw.url, "key-alpha")
    before = await scrape(http, gw)
    # Configured teams export 0 from the start, so rate() sees their first dollar.
    for name in ("apixo_gateway_spend_usd_total", "apixo_gateway_saved_usd_total",
                 "apixo_gateway_images_total"):
        assert value(before, name, team="beta", model="grok-image") == 0

    # Ten charged images (float addition of 0.1 drifts; the exported value must not).
    tasks = await asyncio.gather(*(expect(alpha, t2i(f"restart {i}"), 200) for i in range(10)))
    for task_id in tasks:
        assert task_id is not None
        assert (await alpha.wait_final(task_id))["state"] == "success"
    for i in range(3):
        await expect(alpha, t2i(f"restart {i}"), 200, cache="hit")
    await expect(alpha, t2i("restart [fail:SensitiveContent]"), 200)

    money = ("apixo_gateway_spend_usd_total", "apixo_gateway_saved_usd_total",
             "apixo_gateway_images_total")
    totals = await scrape(http, gw)
    expected = {"apixo_gateway_spend_usd_total": 1.0, "apixo_gateway_saved_usd_total": 0.3,
                "apixo_gateway_images_total": 10}
    for name in money:
        assert value(totals, name, team="alpha", model="grok-image") == expected[name], name

    gw.kill9()
    gw.start()
    after = await scrape(http, gw)
    for name in money:
        for who in ("alpha", "beta"):
            # Exactly equal: any decrease would read as a counter reset in Prometheus.
            assert value(after, name, team=who, model="grok-image") == value(
                totals, name, team=who, model="grok-image"
            ), (name, who)
    # Counters that are not money start again from zero, as counters do (their
    # series exist at 0 from the start, so the first increments show in rate()).
    assert value(after, "apixo_gateway_cache_lookups_total", model="grok-image",
                 result="hit") == 0


async def test_unknown_callers_and_models_are_not_label_values(
    gateways: Any, sim: SimulatorProcess, http: aiohttp.ClientSession
) -> None:
    gw = gateways(teams=[team("alpha")])
    secret = "key-stranger-5d1c"
    stranger = Client(http, gw.url, secret)
    await expect(stranger, t2i("who am i"), 401)
    assert (await stranger.status("gw_nope"))[0] == 401
    async with http.get(gw.url + "/api/v1/apikeys/current-balance",
                        headers={"Authorization": f"Bearer {secret}"}) as r:
        assert r.status == 401
    async with http.post(gw.url + "/api/v1/generateTask/grok-image") as r:
        assert r.status == 401  # no Authorization header at all
    alpha = Client(http, gw.url, "key-alpha")
    await expect(alpha, t2i("x"), 404, model="made-up-model-77")
    async with http.get(gw.url + "/no/such/path-91") as r:
        assert r.status == 404

    text = await scrape(http, gw)
    assert secret not in text and "made-up-model-77" not in text and "path-91" not in text
    for name, labels, _ in samples(text):
        assert labels.get("team", "none") in {"alpha", "none"}, (name, labels)
        assert labels.get("model", "none") in {"grok-image", "none"}, (name, labels)
    assert value(text, "apixo_gateway_rejections_total", team="none", reason="unauthorized") == 4
    assert value(text, "apixo_gateway_rejections_total", team="alpha", reason="invalid") == 1
    assert value(text, "apixo_gateway_requests_total", endpoint="generateTask",
                 model="none", team="none", code="401") == 2


def test_fail_code_labels_are_capped() -> None:
    metrics = Metrics()
    codes = [f"CODE_{i}" for i in range(MAX_FAIL_CODES)]
    # Upstream's failCode is passed through until the cap...
    assert [metrics.fail_code_label(c) for c in codes] == codes
    # ... then new ones share one "other" series, while known ones keep theirs.
    assert metrics.fail_code_label("ONE_TOO_MANY") == "other"
    assert metrics.fail_code_label("x" * 10_000) == "other"
    assert metrics.fail_code_label(codes[0]) == codes[0]
    assert metrics.fail_code_label(codes[-1]) == codes[-1]

    assert Metrics().fail_code_label(None) == "unknown"  # failed without a failCode
    fresh = Metrics()
    for i in range(MAX_FAIL_CODES * 3):
        fresh.task_failures.labels("alpha", "grok-image", fresh.fail_code_label(f"F{i}")).inc()
    text = generate_latest(fresh.registry).decode()
    series = {
        labels["fail_code"]: v for name, labels, v in samples(text)
        if name == "apixo_gateway_task_failures_total"
    }
    assert len(series) == MAX_FAIL_CODES + 1
    assert series["other"] == MAX_FAIL_CODES * 2
    assert sum(series.values()) == MAX_FAIL_CODES * 3


def test_registry_belongs_to_the_app() -> None:
    """Two gateways in one process keep separate counts (no global registry)."""
    first, second = Metrics(), Metrics()
    first.requests.observe("generateTask", "grok-image", "alpha", 200, 0.01)
    first.spend.add("alpha", "grok-image", 100_000)
    one = generate_latest(first.registry).decode()
    two = generate_latest(second.registry).decode()
    assert value(one, "apixo_gateway_spend_usd_total", team="alpha", model="grok-image") == 0.1
    assert value(two, "apixo_gateway_spend_usd_total", team="alpha", model="grok-image") is None
    assert "apixo_gateway_requests_total{" not in two
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("apixo_gateway_requests_total", {
        "endpoint": "generateTask", "model": "grok-image", "team": "alpha", "code": "200",
    }) is None


def test_request_stats_expose_what_prometheus_client_would() -> None:
    """The requests counter and duration histogram are plain ints until scraped;
    scraped, they must read exactly as prometheus-client's own Counter and
    Histogram fed the same requests (values on and between bucket bounds
    included), apart from the `_created` timestamps."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from gateway.metrics import _LATENCY_BUCKETS

    ours = Metrics()
    registry = CollectorRegistry()
    counter = Counter("apixo_gateway_requests_total", "HTTP requests answered by the gateway",
                      ["endpoint", "model", "team", "code"], registry=registry)
    histogram = Histogram("apixo_gateway_request_duration_seconds",
                          "Time to answer an HTTP request", ["endpoint"],
                          buckets=_LATENCY_BUCKETS, registry=registry)
    requests = [
        ("statusTask", "grok-image", "alpha", 200, 0.0001),  # on a bound
        ("statusTask", "grok-image", "alpha", 200, 0.00011),
        ("statusTask", "grok-image", "beta", 404, 0.003),
        ("generateTask", "grok-image", "alpha", 200, 0.0),
        ("generateTask", "none", "none", 401, 31.0),  # beyond the last bound: +Inf only
        ("metrics", "none", "none", 200, 1.0),
    ]
    for endpoint, model, team_name, code, seconds in requests:
        ours.requests.observe(endpoint, model, team_name, code, seconds)
        counter.labels(endpoint, model, team_name, str(code)).inc()
        histogram.labels(endpoint).observe(seconds)

    def exposed(registry: CollectorRegistry) -> dict[tuple[str, frozenset[Any]], float]:
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            if family.name in ("apixo_gateway_requests", "apixo_gateway_request_duration_seconds")
            for s in family.samples
            if not s.name.endswith("_created")
        }

    expected = exposed(registry)
    # Five request series; three endpoints with each bound, +Inf, _count and _sum.
    assert len(expected) == 5 + 3 * (len(_LATENCY_BUCKETS) + 3)
    assert exposed(ours.registry) == expected
    types = {f.name: f.type for f in text_string_to_metric_families(
        generate_latest(ours.registry).decode())}
    assert types["apixo_gateway_requests"] == "counter"
    assert types["apixo_gateway_request_duration_seconds"] == "histogram"
