"""grafana/ against a real Prometheus scraping a real gateway (SPEC section 5).

Prometheus runs with the shipped scrape config (only the target and the intervals
changed), the gateway serves mixed traffic on the simulator, then every dashboard
query and every alert expression is evaluated through Prometheus's HTTP API and
must return data. Without the `prometheus` binary (Debian package `prometheus`)
the test is skipped locally and fails when CI is set.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import promql
from tests.conftest import SimulatorProcess, free_port, stop_process
from tests.test_metrics_contract import drive_mixed_traffic, mixed_gateway

ROOT = Path(__file__).resolve().parent.parent
JOB = "apixo-gateway"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found (Debian/Ubuntu: apt install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


class PrometheusProcess:
    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "prometheus.yml"
        self.config.write_text(promql.prometheus_config(ROOT, target, "1s"))
        self.log = workdir / "prometheus.log"
        self.args = [
            binary,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        stop_process(self.proc, 15)

    def exited(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            return f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()}"
        return None

    async def get(self, http: aiohttp.ClientSession, path: str, **params: str) -> Any:
        async with http.get(self.url + path, params=params) as r:
            body = await r.json()
            assert r.status == 200 and body["status"] == "success", (path, params, body)
            return body["data"]

    async def wait_ready(self, http: aiohttp.ClientSession, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            assert self.exited() is None, self.exited()
            try:
                async with http.get(self.url + "/-/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"prometheus not ready after {within}s:\n{self.log.read_text()}")

    async def last_scrape(self, http: aiohttp.ClientSession) -> float:
        """Unix time of the newest scrape of the gateway, 0 if none yet."""
        # timestamp() of a plain selector is the sample's time (of anything else: now).
        data = await self.get(http, "/api/v1/query", query=f'timestamp(up{{job="{JOB}"}})')
        return max((float(r["value"][1]) for r in data["result"]), default=0.0)

    async def wait_scrape_after(
        self, http: aiohttp.ClientSession, moment: float, within: float = 15
    ) -> float:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            scraped = await self.last_scrape(http)
            if scraped > moment:
                return scraped
            await asyncio.sleep(0.1)
        raise AssertionError(f"no scrape of the gateway after {moment}:\n{self.log.read_text()}")


@pytest.fixture
def prometheus_binary() -> str:
    return _binary("prometheus")


@pytest.fixture
def promtool() -> str:
    return _binary("promtool")


@pytest.fixture
def prometheus_factory(tmp_path: Path, prometheus_binary: str) -> Iterator[Any]:
    started: list[PrometheusProcess] = []

    def make(target: str) -> PrometheusProcess:
        workdir = tmp_path / f"prometheus{len(started)}"
        workdir.mkdir()
        prom = PrometheusProcess(prometheus_binary, workdir, target)
        started.append(prom)
        prom.start()
        return prom

    yield make
    for prom in started:  # always, even when the test failed
        prom.stop()


def run_promtool(promtool: str, *args: str | Path) -> str:
    proc = subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, f"promtool {args}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


async def test_every_dashboard_and_alert_query_returns_data(
    gateways: Any, sim: SimulatorProcess, http: aiohttp.ClientSession,
    prometheus_factory: Any, promtool: str,
) -> None:
    # The shipped files as they are, and the config this test runs with.
    run_promtool(promtool, "check", "config", "grafana/prometheus.yml")
    run_promtool(promtool, "check", "rules", "grafana/alerts.yml")

    gw = mixed_gateway(gateways)
    prom: PrometheusProcess = prometheus_factory(f"127.0.0.1:{gw.port}")
    assert "SUCCESS" in run_promtool(promtool, "check", "config", prom.config)
    await prom.wait_ready(http)
    # As in production, Prometheus has seen the series at 0 before the traffic:
    # otherwise what came before its first scrape is invisible to increase().
    await prom.wait_scrape_after(http, time.time())

    await drive_mixed_traffic(http, gw, sim)
    # Two scrapes after the traffic, so every series has two samples in a 1m window.
    first = await prom.wait_scrape_after(http, time.time())
    await prom.wait_scrape_after(http, first)

    queries = promql.dashboard_and_alert_queries(ROOT)
    assert len(queries) > 30
    empty: list[str] = []
    for description, query in queries:
        data = await prom.get(http, "/api/v1/query", query=query)
        if data["resultType"] == "vector" and not data["result"]:
            empty.append(f"{description}: {' '.join(query.split())}")
        else:
            assert data["resultType"] in ("vector", "scalar"), (description, data)
    assert not empty, "queries without data:\n" + "\n".join(empty)

    # The team variable lists the configured teams that sent requests, never "none".
    (_, team_query), = [q for q in queries if q[0] == "dashboard variable 'team'"]
    teams = {
        r["metric"]["team"]
        for r in (await prom.get(http, "/api/v1/query", query=team_query))["result"]
    }
    assert teams == {"alpha", "tight", "solo", "paced"}

    # Every alert rule was loaded from alerts.yml and evaluates without error.
    await asyncio.sleep(1.5)  # at least one evaluation (interval 1s) after the traffic
    groups = (await prom.get(http, "/api/v1/rules"))["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(loaded) == {rule.name for rule in promql.alert_rules(ROOT)}
    for name, rule in loaded.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
    # tight's budget ($0.05) is smaller than one image: nothing was spent, but its
    # submit got a 402, so it is out of budget in practice; no other team is.
    exhausted = loaded["ApixoTeamBudgetExhausted"]
    assert exhausted["state"] == "firing", exhausted
    assert [a["labels"]["team"] for a in exhausted["alerts"]] == ["tight"]
    # Its description's lookups render, scoped to the alert's own gateway.
    described = " ".join(exhausted["alerts"][0]["annotations"]["description"].split())
    assert "$0.05 left of $0.05, less than the cheapest priced image ($0.10)" in described
    target = (await prom.get(http, "/api/v1/targets", state="active"))["activeTargets"]
    assert [(t["labels"]["job"], t["health"]) for t in target] == [(JOB, "up")]
