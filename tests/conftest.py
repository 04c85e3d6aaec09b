"""Real servers on loopback: the simulator and the gateway run as their own processes.

Subprocesses (not in-process apps) so tests can kill -9 the gateway, send it
SIGHUP or SIGTERM, and restart it on the same SQLite file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.receiver import Receiver, serve_receiver

UPSTREAM_KEY = "upstream-test-key"
ADMIN_TOKEN = "admin-test-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)
    raise RuntimeError(f"{url} not up after {timeout}s:\n{log.read_text()}")


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM, and SIGKILL if it is still running `timeout` seconds later."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class SimulatorProcess:
    def __init__(self, workdir: Path, latency: float = 0.2, fail_rate: float = 0.0) -> None:
        self.port = free_port()
        self.log = workdir / f"sim-{self.port}.log"
        self.latency = latency
        self.fail_rate = fail_rate
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "mock-upstream", "--port", str(self.port),
                 "--latency", str(self.latency), "--fail-rate", str(self.fail_rate)],
                stdout=out, stderr=subprocess.STDOUT,
            )
        _wait_http(self.root + "/_sim/stats", self.proc, self.log)

    def stop(self) -> None:
        stop_process(self.proc, 10)

    async def stats(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(self.root + "/_sim/stats") as r:
            data: dict[str, Any] = await r.json()
            return data

    async def faults(self, **faults: Any) -> None:
        async with aiohttp.ClientSession() as s, s.post(
            self.root + "/_sim/faults", json=faults
        ) as r:
            assert r.status == 200, await r.text()


def team(name: str, key: str | None = None, **limits: Any) -> dict[str, Any]:
    """A [[teams]] entry whose key is `key-<name>` unless given."""
    entry: dict[str, Any] = {
        "name": name,
        "api_keys": ["sha256:" + hashlib.sha256((key or f"key-{name}").encode()).hexdigest()],
    }
    entry.update(limits)
    return entry


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def render_toml(config: dict[str, Any]) -> str:
    lines: list[str] = []
    for section, values in config.items():
        if section == "teams":
            continue
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{json.dumps(key)} = {_toml_value(value)}")
        lines.append("")
    for entry in config.get("teams", []):
        lines.append("[[teams]]")
        for key, value in entry.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


class GatewayProcess:
    """`apixo-gateway serve` on a loopback port with a config written for the test."""

    def __init__(
        self, workdir: Path, upstream_url: str, teams: list[dict[str, Any]],
        env: dict[str, str] | None = None, **sections: dict[str, Any],
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.db = workdir / "gateway.db"
        self.config_path = workdir / "config.toml"
        self.log = workdir / "gateway.log"
        self.env = {**os.environ, "APIXO_API_KEY": UPSTREAM_KEY,
                    "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})}
        self.config: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": self.port},
            "upstream": {
                "base_url": upstream_url, "first_poll_seconds": 0.1,
                "poll_interval_seconds": 0.1, "max_retries": 3,
                "request_timeout_seconds": 5,
            },
            "storage": {"path": str(self.db)},
            "logging": {"format": "json", "level": "INFO"},
            "callbacks": {"allow_http": True, "allow_private_networks": True,
                          "backoff_base_seconds": 0.5},
        }
        for name, values in sections.items():
            self.config.setdefault(name, {}).update(values)
        self.config["teams"] = teams
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> None:
        self.config_path.write_text(render_toml(self.config))

    def start(self) -> None:
        self.write_config()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path)],
                stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
            )
        _wait_http(self.url + "/healthz", self.proc, self.log)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def hup(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


class Client:
    """An APIXO client pointed at a base URL, the way a team's code would be."""

    def __init__(self, session: aiohttp.ClientSession, root: str, key: str) -> None:
        self.session = session
        self.root = root
        self.key = key

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", **(extra or {})}

    async def submit(
        self, body: Any, *, model: str = "grok-image", headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, Any], Any]:
        kwargs: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
        async with self.session.post(
            f"{self.root}/api/v1/generateTask/{model}", headers=self._headers(headers), **kwargs
        ) as r:
            return r.status, await r.json(), r.headers

    async def submit_ok(self, body: Any, **kwargs: Any) -> str:
        """Submit, insist on 200, return the taskId."""
        code, payload, _ = await self.submit(body, **kwargs)
        assert code == 200, payload
        return str(payload["data"]["taskId"])

    async def status(self, task_id: str, model: str = "grok-image") -> tuple[int, dict[str, Any]]:
        async with self.session.get(
            f"{self.root}/api/v1/statusTask/{model}", params={"taskId": task_id},
            headers=self._headers(),
        ) as r:
            return r.status, await r.json()

    async def wait_final(
        self, task_id: str, within: float = 20.0, model: str = "grok-image"
    ) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            code, body = await self.status(task_id, model)
            assert code == 200, body
            data: dict[str, Any] = body["data"]
            if data["state"] in ("success", "failed"):
                return data
            await asyncio.sleep(0.05)
        raise AssertionError(f"task {task_id} not final after {within}s")

    async def balance(self) -> Any:
        async with self.session.get(
            f"{self.root}/api/v1/apikeys/current-balance", headers=self._headers()
        ) as r:
            assert r.status == 200
            return (await r.json())["data"]

    async def admin(self, path: str, **params: Any) -> Any:
        async with self.session.get(
            f"{self.root}{path}", params=params,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as r:
            assert r.status == 200, await r.text()
            return await r.json()


def t2i(prompt: str, **extra: Any) -> dict[str, Any]:
    """A text-to-image submit body."""
    return {"request_type": "async",
            "input": {"mode": "text-to-image", "prompt": prompt, **extra}}


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimulatorProcess]:
    proc = SimulatorProcess(tmp_path)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def gateways(tmp_path: Path, sim: SimulatorProcess) -> Iterator[Any]:
    """A factory: gateways(teams=[...], cache={...}, ...) -> started GatewayProcess."""
    started: list[GatewayProcess] = []

    def make(
        teams: list[dict[str, Any]] | None = None, *, start: bool = True,
        env: dict[str, str] | None = None, **sections: dict[str, Any],
    ) -> GatewayProcess:
        workdir = tmp_path / f"gw{len(started)}"
        workdir.mkdir()
        gw = GatewayProcess(workdir, sim.base_url, teams or [team("alpha"), team("beta")],
                            env=env, **sections)
        started.append(gw)
        if start:
            gw.start()
        return gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A webhook receiver on loopback (tests/receiver.py) for the whole test."""
    async with serve_receiver() as rec:
        yield rec
