"""What the gateway costs on the hot path, each figure next to its baseline, in one run.

    python benchmarks/run.py            # the full suite, a few minutes
    python benchmarks/run.py --quick    # a smoke run, about a minute

Every server is its own process on loopback (the APIXO simulator with zero
latency, the gateway, a bare aiohttp app); load comes from wrk with the Lua
scripts in benchmarks/lua/. Prints Markdown tables and writes
benchmarks/results/latest.json (and latest.md).

Two kinds of load run:
- saturated: each client sends its next request as soon as the previous answer
  arrives; gives throughput (requests/s). Latency there is mostly queueing.
- paced: the same number of clients with random think time, offering a fixed
  total rate well below saturation; gives the latency a request really pays.
  "Added latency" is gateway minus direct-to-upstream at the same pace.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
LUA = HERE / "lua"
RESULTS = HERE / "results"
KEY = "key-bench"
MODEL = "grok-image"

sys.path.insert(0, str(HERE))
from seed import hit_body, seed  # noqa: E402


@dataclass
class Plan:
    seconds: float = 4.0  # one saturated run
    paced_seconds: float = 8.0  # one paced run: enough samples for a p99
    # Paced pairs too are run this many times, alternating; each percentile is the
    # median of the rounds' percentiles, so one stall in one window (a
    # neighbour, a checkpoint) does not decide the published p99.
    paced_rounds: int = 3
    # Saturated pairs are measured this many times, alternating baseline and
    # gateway, and each figure is the median: neighbours on a shared machine
    # otherwise decide the result of a single run. Three was not enough: one
    # run's three status-poll rounds at 64 clients gave ratios of 0.53 to 0.68
    # (0.53 to 0.89 across its rows) for code that had measured 0.72.
    rounds: int = 5
    warmup: float = 1.0
    clients: tuple[int, ...] = (1, 16, 64, 256)
    read_clients: tuple[int, ...] = (16, 64, 256)
    # Offered load for paced runs, requests/s for all clients together. 150/s is
    # about LiteLLM's published 73 requests/s per CPU core on this 2-core machine.
    submit_rate: float = 150.0
    status_rate: float = 500.0
    scale_tasks: tuple[int, ...] = (10_000, 1_000_000)
    scale_clients: int = 16
    # Status polls at scale draw from this many stored tasks, the same number at
    # every size (the 10^4 database has 2,500 of the bench team's), so the share of
    # polls answered from memory vs from SQLite is the same and only the size differs.
    scale_status_ids: int = 2_500
    scale_rounds: int = 5
    seed_cache: Path | None = RESULTS / "seed-cache"


QUICK = Plan(seconds=2.0, paced_seconds=3.0, rounds=1, paced_rounds=1, scale_rounds=1,
             warmup=1.0, clients=(1, 64), read_clients=(64,), scale_tasks=(10_000, 100_000))


# -- processes ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    name: str
    argv: list[str]
    workdir: Path
    ready_path: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    startup_seconds: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self, timeout: float = 120.0) -> None:
        started = time.perf_counter()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [a.replace("{port}", str(self.port)) for a in self.argv],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir,
                env={**os.environ, **self.env},
            )
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   + self.log.read_text()[-3000:])
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as resp:
                    if resp.status == 200:
                        self.startup_seconds = time.perf_counter() - started
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.01)
        raise RuntimeError(f"{self.name} not ready after {timeout} s:\n"
                           + self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _status(self, field_name: str) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def rss_mb(self) -> float:
        return self._status("VmRSS")

    def peak_rss_mb(self) -> float:
        return self._status("VmHWM")

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def simulator(workdir: Path) -> Server:
    return Server("simulator", [sys.executable, "-m", "gateway", "mock-upstream", "--port",
                                "{port}", "--latency", "0"], workdir, "/_sim/stats")


def bare(workdir: Path, status_json: str) -> Server:
    return Server("bare", [sys.executable, str(HERE / "bare.py"), "--port", "{port}",
                           "--status-json", status_json], workdir, "/healthz")


def passthrough(workdir: Path, upstream: str) -> Server:
    return Server("passthrough", [sys.executable, str(HERE / "passthrough.py"), "--port",
                                  "{port}", "--upstream", upstream], workdir, "/healthz")


def gateway(workdir: Path, upstream: str, db: Path) -> Server:
    port = free_port()
    key_hash = hashlib.sha256(KEY.encode()).hexdigest()
    config = f"""
[server]
host = "127.0.0.1"
port = {port}

[upstream]
base_url = "{upstream}/api/v1"
# No gateway limit may refuse the load: this measures cost, not 429s.
max_concurrent = 10000000
# The zero-latency simulator finishes every task at once; polling it during the
# run would measure the tracker, not the request path, so the first poll is late.
first_poll_seconds = 3600
poll_interval_seconds = 60
task_timeout_seconds = 7200

[storage]
path = "{db}"

[logging]
format = "json"
level = "INFO"

[[teams]]
name = "bench"
api_keys = ["sha256:{key_hash}"]
"""
    (workdir / "config.toml").write_text(config)
    server = Server("gateway", [sys.executable, "-m", "gateway", "serve", "--config",
                                str(workdir / "config.toml")], workdir, "/readyz",
                    env={"APIXO_API_KEY": "bench-upstream-key"}, port=port)
    return server


# -- load ---------------------------------------------------------------------


@dataclass
class Load:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: int  # non-2xx answers, timeouts, socket errors
    cpu_us_per_request: float | None = None

    def brief(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in vars(self).items()}


def wrk(
    url: str,
    *,
    clients: int,
    seconds: float,
    script: Sequence[str] = (),
    args: Sequence[str] = (),
    rate: float | None = None,
    headers: Sequence[str] = (f"Authorization: Bearer {KEY}",),
    measure: Sequence[Server] = (),
) -> Load:
    parts = [(LUA / name).read_text() for name in script]
    if rate is not None:
        parts.append(f"pace_mean_ms = {clients / rate * 1000:.3f}\n")
        parts.append((LUA / "pace.lua").read_text())
    parts.append((LUA / "report.lua").read_text())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write("\n".join(parts))
        script_path = f.name
    cmd = ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", script_path]
    for header in headers:
        cmd += ["-H", header]
    cmd += [url, "--", *args]
    cpu_before = [s.cpu_seconds() for s in measure]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60,
                             check=True).stdout
    finally:
        os.unlink(script_path)
    cpu = sum(s.cpu_seconds() for s in measure) - sum(cpu_before)
    line = next((x for x in out.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    r = json.loads(line[len("WRKJSON "):])
    duration = r["duration_us"] / 1e6
    errors = (r["status_errors"] + r["timeouts"] + r["connect_errors"] + r["read_errors"]
              + r["write_errors"])
    return Load(
        requests=r["requests"], seconds=duration, rps=r["requests"] / duration,
        p50_ms=r["p50_us"] / 1000, p90_ms=r["p90_us"] / 1000, p95_ms=r["p95_us"] / 1000,
        p99_ms=r["p99_us"] / 1000, mean_ms=r["mean_us"] / 1000, max_ms=r["max_us"] / 1000,
        errors=errors,
        cpu_us_per_request=(cpu / r["requests"] * 1e6) if measure and r["requests"] else None,
    )


def median_load(loads: list[Load]) -> dict[str, Any]:
    """Each figure's median over rounds; counts are summed, each round's req/s is kept."""
    def med(values: list[float]) -> float:
        ordered = sorted(values)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2

    out: dict[str, Any] = {}
    for name in vars(loads[0]):
        values = [getattr(load, name) for load in loads]
        if name in ("requests", "errors"):
            out[name] = sum(values)
        elif all(v is not None for v in values):
            out[name] = round(med(values), 3)
        else:
            out[name] = None
    out["rounds_rps"] = [round(load.rps) for load in loads]
    return out


def http_json(method: str, url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def copy_db(src: Path, dst: Path) -> None:
    """Copy a seeded database and fsync it: otherwise the gateway's first checkpoint
    fsyncs the whole freshly written gigabyte, a stall no real deployment has."""
    shutil.copy(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# -- the measurements ----------------------------------------------------------


class Bench:
    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.workdir = workdir
        self.nonce = f"{os.getpid()}-{time.time_ns()}"
        self.runs = 0

    def fresh(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir()
        return path

    def unique(self) -> str:
        self.runs += 1
        return f"{self.nonce}-{self.runs}"

    def alternate(
        self, label: str, runs: dict[str, Callable[[], Load]], rounds: int
    ) -> dict[str, dict[str, Any]]:
        """Run each (baseline first) in turn, `rounds` times; the median of each figure."""
        loads: dict[str, list[Load]] = {name: [] for name in runs}
        for i in range(rounds):
            for name, run in runs.items():
                say(f"{label}: {name} (round {i + 1}/{rounds})")
                loads[name].append(run())
        return {name: median_load(found) for name, found in loads.items()}

    def submit_miss(self) -> list[dict[str, Any]]:
        """Cache-miss submits through the gateway vs the same submits straight to the simulator.

        A pass-through proxy on the gateway's HTTP stack (aiohttp's server, the
        gateway's upstream client) runs alongside as a second baseline: the part
        of the added latency those two cost by themselves, before any gateway code.

        A fresh simulator and gateway for each number of clients: with the first
        poll an hour away every submit stays in flight, and tens of thousands of
        them left over from the previous level (their trackers, the simulator's
        tasks) would be measured too. A real gateway holds at most
        upstream.max_concurrent in flight.
        """
        p = self.plan
        path = f"/api/v1/generateTask/{MODEL}"
        rows = []
        for clients in p.clients:
            work = self.fresh(f"submit-{clients}")
            sim = simulator(work)
            sim.start()
            proxy = passthrough(work, sim.url)
            proxy.start()
            gw = gateway(work, sim.url, work / "gateway.db")
            gw.start()
            try:
                for server in (sim, proxy, gw):
                    wrk(server.url + path, clients=16, seconds=p.warmup, script=["submit.lua"],
                        args=["unique", self.unique()])
                row: dict[str, Any] = {"clients": clients}
                for mode, rate, seconds, rounds in (
                    ("paced", p.submit_rate, p.paced_seconds, p.paced_rounds),
                    ("saturated", None, p.seconds, p.rounds),
                ):
                    def run(server: Server, c: int = clients, r: float | None = rate,
                            s: float = seconds) -> Load:
                        return wrk(server.url + path, clients=c, seconds=s,
                                   script=["submit.lua"], args=["unique", self.unique()],
                                   rate=r, measure=[server])
                    # Paced first: saturated rounds leave thousands of tasks in flight.
                    found = self.alternate(
                        f"submit miss, {mode}, {clients} clients",
                        {"direct": lambda: run(sim), "passthrough": lambda: run(proxy),  # noqa: B023
                         "gateway": lambda: run(gw)},  # noqa: B023
                        rounds,
                    )
                    for name, load in found.items():
                        row[f"{name}_{mode}"] = load
            finally:
                gw.stop()
                proxy.stop()
                sim.stop()
            g, d, f = row["gateway_paced"], row["direct_paced"], row["passthrough_paced"]
            row["added_ms"] = {q: round(g[f"{q}_ms"] - d[f"{q}_ms"], 3)
                               for q in ("p50", "p95", "p99")}
            row["passthrough_added_ms"] = {q: round(f[f"{q}_ms"] - d[f"{q}_ms"], 3)
                                           for q in ("p50", "p95", "p99")}
            row["throughput_ratio"] = round(
                row["gateway_saturated"]["rps"] / row["direct_saturated"]["rps"], 3)
            rows.append(row)
        return rows

    def reads(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Status polls of a final task and cache-hit submits vs a bare aiohttp handler."""
        p = self.plan
        work = self.fresh("reads")
        seeded = self.seeded(1_000)
        db = work / "gateway.db"
        copy_db(seeded["path"], db)
        sim = simulator(work)
        sim.start()
        gw = gateway(work, sim.url, db)
        gw.start()
        task_id = seeded["final_task_id"]
        status_path = f"/api/v1/statusTask/{MODEL}?taskId={task_id}"
        status_body = http_json("GET", gw.url + status_path)
        assert status_body["data"]["state"] == "success", status_body
        hit = http_json("POST", gw.url + f"/api/v1/generateTask/{MODEL}",
                        hit_body(seeded["hit_prompt"]))
        assert hit["code"] == 200, hit
        bare_server = bare(work, json.dumps(status_body))
        bare_server.start()
        status_rows: list[dict[str, Any]] = []
        hit_rows: list[dict[str, Any]] = []
        try:
            def status(server: Server, clients: int) -> Load:
                return wrk(server.url + status_path, clients=clients, seconds=p.seconds,
                           measure=[server])

            def hit(server: Server, clients: int) -> Load:
                return wrk(server.url + f"/api/v1/generateTask/{MODEL}", clients=clients,
                           seconds=p.seconds, script=["submit.lua"],
                           args=["same", seeded["hit_prompt"]], measure=[server])

            for server in (bare_server, gw):  # connections, caches, the first SQLite pages
                status(server, 16)
                hit(server, 16)
            for rows, label, fn in ((status_rows, "status", status), (hit_rows, "cache hit", hit)):
                for clients in p.read_clients:
                    found = self.alternate(
                        f"{label}, {clients} clients",
                        {"bare": functools.partial(fn, bare_server, clients),
                         "gateway": functools.partial(fn, gw, clients)},
                        p.rounds,
                    )
                    rows.append({"clients": clients, **found,
                                 "ratio": round(found["gateway"]["rps"] / found["bare"]["rps"], 3)})
        finally:
            bare_server.stop()
            gw.stop()
            sim.stop()
        return status_rows, hit_rows

    def seeded(self, n: int) -> dict[str, Any]:
        """A database with n final tasks, from the seed cache when one matches."""
        fingerprint = hashlib.sha256(
            (HERE / "seed.py").read_bytes()
            + (HERE.parent / "gateway" / "store.py").read_bytes()
        ).hexdigest()[:12]
        cache_dir = self.plan.seed_cache or self.workdir
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = cache_dir / f"seed-{n}-{fingerprint}.db"
        meta = path.with_suffix(".json")
        if path.exists() and meta.exists():
            return {**json.loads(meta.read_text()), "path": path, "reused": True}
        for old in cache_dir.glob(f"seed-{n}-*"):
            old.unlink()
        say(f"seeding {n} tasks")
        result = seed(path, n)
        info = {"tasks": n, "seconds": round(result.seconds, 1),
                "final_task_id": result.final_task_id, "hit_prompt": result.hit_prompt,
                "sample_ids": result.sample_ids}
        meta.write_text(json.dumps(info))
        return {**info, "path": path, "reused": False}

    def scale(self) -> list[dict[str, Any]]:
        """Submit and status latency, startup time and RSS with many tasks already stored.

        Every size's gateway is up at once and their rounds alternate (10^4,
        10^6, 10^4, ...), as the other pairs do: measured one after the other,
        minutes apart, the machine's drift decided the ratio (the status p99
        ratio moved from 0.69x to 2.07x across runs of unchanged code).
        """
        p = self.plan
        rows: dict[int, dict[str, Any]] = {}
        servers: list[Server] = []
        dbs: list[Path] = []
        runs: dict[str, Callable[[], Load]] = {}
        try:
            for n in p.scale_tasks:
                work = self.fresh(f"scale-{n}")
                seeded = self.seeded(n)
                db = work / "gateway.db"
                copy_db(seeded["path"], db)
                dbs.append(db)
                ids = work / "ids.txt"
                ids.write_text("\n".join(seeded["sample_ids"][:p.scale_status_ids]) + "\n")
                sim = simulator(work)
                servers.append(sim)
                sim.start()
                gw = gateway(work, sim.url, db)
                servers.append(gw)
                say(f"scale {n}: starting the gateway")
                gw.start()
                rows[n] = {
                    "tasks": n, "db_mb": round(db.stat().st_size / 1e6),
                    "seed_seconds": seeded["seconds"], "seed_reused": seeded["reused"],
                    "startup_seconds": round(gw.startup_seconds, 3),
                    "rss_mb_after_start": round(gw.rss_mb(), 1),
                }
                status_url = gw.url + f"/api/v1/statusTask/{MODEL}"
                submit_url = gw.url + f"/api/v1/generateTask/{MODEL}"
                # No status warm-up: it would put the polled tasks in memory first.
                wrk(submit_url, clients=p.scale_clients, seconds=p.warmup,
                    script=["submit.lua"], args=["unique", self.unique()])

                def submits(url: str = submit_url, server: Server = gw) -> Load:
                    return wrk(url, clients=p.scale_clients, seconds=p.paced_seconds,
                               script=["submit.lua"], args=["unique", self.unique()],
                               rate=p.submit_rate, measure=[server])

                def polls(url: str = status_url, server: Server = gw, path: Path = ids) -> Load:
                    return wrk(url, clients=p.scale_clients, seconds=p.paced_seconds,
                               script=["status.lua"], args=[str(path)], rate=p.status_rate,
                               measure=[server])

                runs[f"{n}/submit"] = submits
                runs[f"{n}/status"] = polls
            found = self.alternate("scale, paced", runs, p.scale_rounds)
            for n, row in rows.items():
                row["submit"] = found[f"{n}/submit"]
                row["status"] = found[f"{n}/status"]
            for n, gw in zip(p.scale_tasks, servers[1::2], strict=True):
                rows[n]["rss_mb_after_load"] = round(gw.rss_mb(), 1)
                rows[n]["peak_rss_mb"] = round(gw.peak_rss_mb(), 1)
        finally:
            for server in reversed(servers):
                server.stop()
            for db in dbs:
                db.unlink(missing_ok=True)
        return list(rows.values())


# -- report ---------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(int(mem) / 1024 / 1024, 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "aiohttp": aiohttp.__version__, "sqlite": __import__("sqlite3").sqlite_version,
        "wrk": wrk_version.split("[")[0].strip(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _fixed_work() -> None:
    # About what one step of a request does in Python: small dicts, strings, JSON.
    for i in range(40):
        body = json.dumps({"taskId": f"gw_{i:024x}", "state": "success", "n": i})
        json.loads(body)["taskId"].upper()


def idle_wake_cost(reps: int = 400, idle_seconds: float = 0.005) -> dict[str, float]:
    """The same fixed piece of Python timed right after another run of it, then
    after the process slept: what waking from idle costs on this machine.

    The two are interleaved, one of each per repetition, so the machine's drift
    (its speed moves by tens of percent from one second to the next) touches
    both alike. A paced request finds its server idle and pays this on every
    step that follows a wait (the request's arrival, the upstream's answer); a
    saturated one rarely does.
    """
    busy: list[float] = []
    after_idle: list[float] = []
    for _ in range(reps):
        _fixed_work()  # so that the next run follows another one
        started = time.perf_counter_ns()
        _fixed_work()
        busy.append((time.perf_counter_ns() - started) / 1000)
        time.sleep(idle_seconds)
        started = time.perf_counter_ns()
        _fixed_work()
        after_idle.append((time.perf_counter_ns() - started) / 1000)
    b, a = statistics.median(busy), statistics.median(after_idle)
    return {"busy_us": round(b, 1), "after_idle_us": round(a, 1),
            "idle_ms": idle_seconds * 1000, "ratio": round(a / b, 2)}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []

    def check(name: str, value: float | None, limit: float, higher_is_better: bool) -> None:
        if value is None:
            return
        met = value >= limit if higher_is_better else value <= limit
        out.append({"target": name, "value": round(value, 3), "limit": limit, "met": met})

    for row in result.get("submit_miss", []):
        if row["clients"] == 64:
            check("added submit latency p50 at 64 clients (ms)", row["added_ms"]["p50"], 1.5,
                  False)
            check("added submit latency p99 at 64 clients (ms)", row["added_ms"]["p99"], 10.0,
                  False)
    for key, label, limit in (("status", "status-poll throughput vs bare", 0.6),
                              ("cache_hit", "cache-hit submit throughput vs bare", 0.4)):
        rows = result.get(key, [])
        row = next((r for r in rows if r["clients"] == 64), rows[0] if rows else None)
        if row:
            check(f"{label} at {row['clients']} clients", row["ratio"], limit, True)
    scale = result.get("scale", [])
    if len(scale) >= 2:
        small, big = scale[0], scale[-1]
        for what in ("submit", "status"):
            check(f"{what} p99 at {big['tasks']:,} tasks / at {small['tasks']:,}",
                  big[what]["p99_ms"] / max(small[what]["p99_ms"], 1e-9), 1.5, False)
    return out


def tables(result: dict[str, Any]) -> str:
    lines: list[str] = []
    m = result["machine"]
    lines += [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; Linux {m['kernel']}; "
        f"Python {m['python']}, aiohttp {m['aiohttp']}, SQLite {m['sqlite']}, {m['wrk']}. "
        f"Load client, simulator and gateway share the machine; load average at start "
        f"{m['load_average_at_start']}.",
        "",
    ]
    wake = m.get("idle_wake")
    if wake:
        lines += [
            f"Waking from idle: a fixed piece of Python took {wake['busy_us']:,.0f} µs right "
            f"after another run of it and {wake['after_idle_us']:,.0f} µs after a "
            f"{wake['idle_ms']:g} ms sleep ({wake['ratio']:.2f}x; medians, interleaved). Paced "
            f"requests find their servers idle; see the paced CPU columns.",
            "",
        ]
    plan = result["plan"]
    if result.get("submit_miss"):
        lines += [
            "### Cache-miss submit: gateway vs straight to the simulator (zero latency)",
            "",
            f"Throughput: saturated clients. Latency: the same clients paced to "
            f"{plan['submit_rate']:g} requests/s in total, median of "
            f"{plan.get('paced_rounds', 1)} runs. Added = gateway - direct.",
            "",
            "| clients | direct req/s | gateway req/s | ratio | direct p50 / p99 ms "
            "| gateway p50 / p95 / p99 ms | added p50 / p95 / p99 ms "
            "| gateway CPU µs/req saturated / paced |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["submit_miss"]:
            d, g, a = r["direct_paced"], r["gateway_paced"], r["added_ms"]
            lines.append(
                f"| {r['clients']} | {r['direct_saturated']['rps']:,.0f} "
                f"| {r['gateway_saturated']['rps']:,.0f} | {r['throughput_ratio']:.2f} "
                f"| {d['p50_ms']:.2f} / {d['p99_ms']:.2f} "
                f"| {g['p50_ms']:.2f} / {g['p95_ms']:.2f} / {g['p99_ms']:.2f} "
                f"| {a['p50']:.2f} / {a['p95']:.2f} / {a['p99']:.2f} "
                f"| {_cpu(r['gateway_saturated'])} / {_cpu(g)} |"
            )
        lines += [
            "",
            "The floor: a pass-through proxy on the gateway's HTTP stack (`passthrough.py`: "
            "aiohttp's server reads the body, the gateway's upstream client `gateway/http1.py` "
            "forwards it, the simulator's answer goes back; nothing else), paced and measured "
            "in the same rounds. Its added latency is what those two HTTP layers cost by "
            "themselves; the gateway's own work is the rest.",
            "",
            "| clients | pass-through req/s | pass-through added p50 / p99 ms "
            "| gateway added p50 / p99 ms | gateway beyond pass-through p50 / p99 ms "
            "| pass-through CPU µs/req saturated / paced | direct (simulator) CPU µs/req "
            "saturated / paced |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["submit_miss"]:
            f, a = r.get("passthrough_added_ms"), r["added_ms"]
            if f is None:
                continue
            lines.append(
                f"| {r['clients']} | {r['passthrough_saturated']['rps']:,.0f} "
                f"| {f['p50']:.2f} / {f['p99']:.2f} | {a['p50']:.2f} / {a['p99']:.2f} "
                f"| {a['p50'] - f['p50']:.2f} / {a['p99'] - f['p99']:.2f} "
                f"| {_cpu(r['passthrough_saturated'])} / {_cpu(r['passthrough_paced'])} "
                f"| {_cpu(r['direct_saturated'])} / {_cpu(r['direct_paced'])} |"
            )
        lines.append("")
    for key, title in (("status", "Status poll of a final task"),
                       ("cache_hit", "Cache-hit submit")):
        if not result.get(key):
            continue
        lines += [
            f"### {title}: gateway vs a bare aiohttp handler returning the same JSON",
            "",
            "| clients | bare req/s | gateway req/s | ratio | each round's ratio "
            "| bare p50 / p99 ms | gateway p50 / p99 ms | gateway CPU µs/req |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result[key]:
            b, g = r["bare"], r["gateway"]
            # Each round runs bare then gateway back to back: their ratio, round by
            # round, shows how much the machine moved the median.
            rounds = " ".join(f"{gr / br:.2f}" for gr, br in zip(g["rounds_rps"],
                                                                 b["rounds_rps"], strict=True))
            lines.append(
                f"| {r['clients']} | {b['rps']:,.0f} | {g['rps']:,.0f} | {r['ratio']:.2f} "
                f"| {rounds} "
                f"| {b['p50_ms']:.2f} / {b['p99_ms']:.2f} | {g['p50_ms']:.2f} / {g['p99_ms']:.2f} "
                f"| {_cpu(g)} |"
            )
        lines.append("")
    if result.get("scale"):
        lines += [
            "### Scale: tasks already in the database",
            "",
            f"Paced: {plan['scale_clients']} clients, submits (cache miss) at "
            f"{plan['submit_rate']:g}/s, status polls at {plan['status_rate']:g}/s of "
            f"{plan['scale_status_ids']:,} stored tasks drawn across the whole table; "
            f"one gateway per size, up at once, their runs alternating; median of "
            f"{plan['scale_rounds']} runs each.",
            "",
            "| stored tasks | DB MB | startup s | RSS after start MB | RSS after load MB "
            "| submit p50 / p99 ms | status p50 / p99 ms |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["scale"]:
            s, t = r["submit"], r["status"]
            lines.append(
                f"| {r['tasks']:,} | {r['db_mb']:,} | {r['startup_seconds']:.2f} "
                f"| {r['rss_mb_after_start']:.0f} | {r['rss_mb_after_load']:.0f} "
                f"| {s['p50_ms']:.2f} / {s['p99_ms']:.2f} | {t['p50_ms']:.2f} / {t['p99_ms']:.2f} |"
            )
        lines.append("")
    if result.get("targets"):
        lines += ["### Targets", "", "| target | measured | limit | met |", "|---|---:|---:|:---:|"]
        for t in result["targets"]:
            lines.append(f"| {t['target']} | {t['value']} | {t['limit']} | "
                         f"{'yes' if t['met'] else '**no**'} |")
        lines.append("")
    errors = _errors(result)
    if errors:
        lines += ["Runs with errors (non-2xx, timeouts, socket errors):", ""]
        lines += [f"- {e}" for e in errors]
        lines.append("")
    return "\n".join(lines)


def _cpu(load: dict[str, Any]) -> str:
    value = load.get("cpu_us_per_request")
    return "-" if value is None else f"{value:,.0f}"


def _errors(node: Any, path: str = "") -> list[str]:
    found = []
    if isinstance(node, dict):
        if node.get("errors"):
            found.append(f"{path}: {node['errors']} of {node.get('requests')}")
        for k, v in node.items():
            found += _errors(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _errors(v, f"{path}[{i}]")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, fewer points")
    parser.add_argument("--only", default="submit,reads,scale",
                        help="comma-separated sections: submit, reads, scale")
    parser.add_argument("--seconds", type=float, help="length of each measured run")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--no-seed-cache", action="store_true",
                        help="always build the seeded databases afresh")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is required (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else Plan()
    if args.seconds:
        plan.seconds = args.seconds
    if args.no_seed_cache:
        plan.seed_cache = None
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    workdir = Path(tempfile.mkdtemp(prefix="apixo-bench-"))
    bench = Bench(plan, workdir)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": machine(),
        "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(plan).items()},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    result["machine"]["idle_wake"] = idle_wake_cost()
    try:
        if "submit" in sections:
            result["submit_miss"] = bench.submit_miss()
        if "reads" in sections:
            result["status"], result["cache_hit"] = bench.reads()
        if "scale" in sections:
            result["scale"] = bench.scale()
    finally:
        if args.keep:
            say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["targets"] = targets(result)
    text = tables(result)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text + "\n")
    say(f"wrote {args.out} and {args.out.with_suffix('.md')} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
