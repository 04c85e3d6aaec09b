"""Property: under any interleaving of submits, outcomes, timeouts, crashes and reloads,
a team never has more spent + reserved than its budget allows, and the ledger always
equals the sum of the tasks it settled.

One simulator and one gateway serve every example; each example gets a fresh
team (added by SIGHUP) so examples cannot see each other's money. Outcomes are
decided by the simulator's prompt markers; "timeout" tasks outlive the
gateway's task_timeout_seconds.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Client, GatewayProcess, SimulatorProcess, t2i, team
from tests.test_budget import PRICE, admin_team, check_ledger, read_db, until, wait_quiet

TASK_TIMEOUT_SECONDS = 1.0
MARKERS = {
    "success": "",
    "slow": "[latency:0.8]",
    "fail": "[fail:GENERATION_FAILED]",
    "timeout": "[latency:30]",
}
PERIODS = ("total", "daily", "weekly", "monthly")

outcomes = st.sampled_from(sorted(MARKERS))
steps = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), outcomes),
        st.tuples(st.just("burst"), st.lists(outcomes, min_size=2, max_size=6)),
        st.tuples(st.just("repeat"), st.integers(0, 1000)),
        st.tuples(st.just("refuse"), st.none()),
        st.tuples(st.just("restart"), st.none()),
        st.tuples(st.just("sighup"), st.integers(0, 8)),
        st.tuples(st.just("wait"), st.sampled_from([0.1, 0.5])),
    ),
    min_size=1,
    max_size=8,
)


def _micros(usd: float) -> int:
    return round(usd * 1_000_000)


@dataclass
class Example:
    gw: GatewayProcess
    sim: SimulatorProcess
    http: aiohttp.ClientSession
    name: str
    budget: int  # micro-dollars, as configured now
    bound: int  # what spent + reserved may never exceed (see sighup)
    prompts: list[str] = field(default_factory=list)
    counter: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def client(self) -> Client:
        return Client(self.http, self.gw.url, f"key-{self.name}")

    def prompt(self, outcome: str) -> str:
        text = f"{self.name} #{next(self.counter)} {MARKERS[outcome]}"
        self.prompts.append(text)
        return text

    async def in_use(self) -> int:
        return sum(await self.money())

    async def money(self) -> tuple[int, int]:
        row = await admin_team(self.http, self.gw.url, self.name)
        return _micros(row["spent_usd"]), _micros(row["reserved_usd"])

    async def check(self) -> None:
        used = await self.in_use()
        assert used <= self.bound, f"{self.name}: spent + reserved {used} > {self.bound}"
        totals = check_ledger(self.gw.db, self.name)
        assert totals["spent"] + totals["reserved"] <= self.bound, totals

    async def submit(self, prompt: str) -> tuple[int, str | None]:
        code, body, headers = await self.client.submit(t2i(prompt))
        assert code in (200, 400, 402), body
        if code == 402:
            assert body["data"]["budget_usd"] == self.budget / 1e6
        return code, headers.get("X-Gateway-Cache")

    async def step(self, kind: str, arg: Any) -> None:
        if kind == "submit":
            spent, reserved = await self.money()
            code, _ = await self.submit(self.prompt(arg))
            fits = spent + reserved + PRICE <= self.budget
            # The sum only shrinks between the look and the submit (a reservation
            # may be settled meanwhile), so what fitted must be let through; and
            # with nothing reserved it cannot shrink, so what did not fit is refused.
            if fits:
                assert code != 402, (spent, reserved, self.budget)
            elif reserved == 0:
                assert code == 402, (spent, self.budget)
        elif kind == "burst":
            before = await self.in_use()
            results = await asyncio.gather(*(self.submit(self.prompt(o)) for o in arg))
            admitted = sum(code != 402 for code, _ in results)
            fits = max(0, (self.budget - before) // PRICE)
            assert admitted >= min(len(arg), fits), (results, before, self.budget)
        elif kind == "repeat":
            if not self.prompts:
                return
            before = await self.in_use()
            code, cache = await self.submit(self.prompts[arg % len(self.prompts)])
            if cache in ("hit", "joined"):
                assert code == 200  # free work is served whatever the budget says
            elif code == 402:
                assert before + PRICE > self.budget
        elif kind == "refuse":
            before = await self.in_use()
            if before + PRICE > self.budget:
                return  # would not reach upstream: the queued fault would leak
            await self.sim.faults(submit_errors=[400])
            code, _ = await self.submit(self.prompt("success"))
            assert code == 400  # APIXO's refusal passes through; the reservation is released
        elif kind == "restart":
            self.gw.kill9()
            self.gw.start()
        elif kind == "sighup":
            self.budget = arg * PRICE
            _set_budget(self.gw, self.name, self.budget)
            self.gw.write_config()
            self.gw.hup()
            await until(self._budget_applied)
            # A lowered budget does not undo what was already spent or reserved; from
            # here on the sum can only grow through submits that fit the new budget.
            self.bound = max(self.budget, await self.in_use())
        elif kind == "wait":
            await asyncio.sleep(arg)

    async def _budget_applied(self) -> bool:
        row = await admin_team(self.http, self.gw.url, self.name)
        return bool(_micros(row["budget_usd"]) == self.budget)


def _set_budget(gw: GatewayProcess, name: str, budget: int) -> None:
    (entry,) = [t for t in gw.config["teams"] if t["name"] == name]
    entry["budget_usd"] = budget / 1e6


async def _run(
    gw: GatewayProcess, sim: SimulatorProcess, name: str, budget: int, period: str,
    plan: list[tuple[str, Any]],
) -> None:
    async with aiohttp.ClientSession() as http:
        gw.config["teams"].append(team(name, budget_usd=budget / 1e6, budget_period=period))
        gw.write_config()
        gw.hup()
        ex = Example(gw, sim, http, name, budget, budget)

        async def known() -> bool:
            async with http.get(f"{gw.url}/api/v1/apikeys/current-balance",
                                headers={"Authorization": f"Bearer key-{name}"}) as r:
                return r.status == 200

        await until(known)
        for kind, arg in plan:
            await ex.step(kind, arg)
            await ex.check()
        await wait_quiet(http, gw.url, name, gw.db, within=20)
        await ex.check()
        totals = check_ledger(gw.db, name)
        assert totals["reserved"] == 0
        # Upstream agrees with every settlement the gateway made, except for
        # tasks the gateway gave up on (timed out, refunded) while APIXO worked on.
        stats = await sim.stats()
        for upstream_id, state, fail_code, images in read_db(
            gw.db, "SELECT upstream_id, state, fail_code, images FROM tasks "
            "WHERE team = ? AND upstream_id IS NOT NULL", (name,),
        ):
            truth = stats["tasks"][upstream_id]
            if fail_code == "Timeout":
                continue
            assert state == truth["state_final"], (upstream_id, state, truth)
            assert images == (truth["images"] if state == "success" else 0)


def test_budget_invariants_under_random_interleavings(
    gateways: Any, sim: SimulatorProcess
) -> None:
    gw = gateways(teams=[team("seed")],
                  upstream={"task_timeout_seconds": TASK_TIMEOUT_SECONDS, "max_retries": 0})
    names = (f"p{i}" for i in itertools.count())
    runs = []

    @settings(max_examples=15, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(budget=st.integers(0, 5), period=st.sampled_from(PERIODS), plan=steps)
    def example(budget: int, period: str, plan: list[tuple[str, Any]]) -> None:
        runs.append(plan)
        asyncio.run(_run(gw, sim, next(names), budget * PRICE, period, plan))

    example()
    assert len(runs) >= 15
    # Across all examples, the whole ledger is still consistent.
    check_ledger(gw.db)
