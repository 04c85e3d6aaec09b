"""The app's own Prometheus registry and every metric the SPEC promises."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from gateway.money import Micros, micros_to_usd

# fail_code is an open set upstream; past this many distinct values a label
# series explosion would hurt Prometheus, so the rest become "other".
MAX_FAIL_CODES = 50
MAX_FAIL_CODE_CHARS = 64

# From 0.1 ms: a status poll or a cache hit is answered in well under a millisecond,
# and a p95 needs buckets on both sides of it to move when it gets slower.
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
    5, 10, 30,
)
_TASK_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 15, 20, 25, 30, 45, 60, 90, 120, 300, 600, 900)


# Label values known before any event happens. Their series are exported at 0
# from the start: a series born with its first events already counted hides them
# from increase() and rate() (there is no earlier sample to differ from), so a
# first burst of failures or rejections would never reach an alert or a panel.
CACHE_RESULTS = ("hit", "miss", "joined", "bypass")
TASK_STATES = ("success", "failed")
REJECTION_REASONS = ("unauthorized", "invalid", "budget", "concurrency", "rate_limit", "busy")
UPSTREAM_OPERATIONS = ("submit", "status")
# The codes an upstream outage, a rejected key or an empty account show up as,
# and those a proxy in front of APIXO may answer; others are created at their
# first call.
UPSTREAM_CODES = (
    "200", "error", "400", "401", "402", "403", "404", "408", "422", "429",
    "500", "502", "503", "504",
)
CALLBACK_OUTCOMES = ("delivered", "retried", "gave_up")


class MoneyCounter:
    """A USD counter by (team, model), kept in integer micro-dollars.

    A float counter fed 0.1 at a time drifts from the ledger's exact sum; after a
    restart the restored (exact) value can then be a hair lower than the last
    scraped one, and Prometheus reads any decrease as a counter reset: increase()
    would show the whole all-time total as new spend. Integers make the value the
    same before and after a restart.
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._micros: dict[tuple[str, str], Micros] = {}
        registry.register(self)

    def add(self, team: str, model: str, micros: Micros) -> None:
        if micros < 0:
            raise ValueError("counters only go up")
        key = (team, model)
        self._micros[key] = self._micros.get(key, 0) + micros

    def touch(self, team: str, model: str) -> None:
        """Export 0 for a pair before its first dollar, so rate() sees that first dollar."""
        self._micros.setdefault((team, model), 0)

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=("team", "model"))
        for (team, model), micros in sorted(self._micros.items()):
            family.add_metric([team, model], micros_to_usd(micros))
        yield family

    def describe(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, labels=("team", "model"))


class RequestStats:
    """apixo_gateway_requests_total and apixo_gateway_request_duration_seconds, in plain ints.

    Every request is counted and timed, and through prometheus-client's labelled
    children that was two validated, locked method chains per request: with the
    request log line, the largest cost a status poll adds to aiohttp's own (an
    A/B of the two: about 7% of a poll's CPU). Only the loop's thread touches
    these numbers, /metrics included, so they need no lock; they become metric
    families only when scraped, with the same names, labels and buckets.
    """

    REQUESTS = "apixo_gateway_requests"
    REQUESTS_HELP = "HTTP requests answered by the gateway"
    DURATION = "apixo_gateway_request_duration_seconds"
    DURATION_HELP = "Time to answer an HTTP request"

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counts: dict[tuple[str, str, str, int], int] = {}
        # Per endpoint: a count per bucket (the last is +Inf, not cumulative), then the sum.
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        self._bounds = _LATENCY_BUCKETS
        # As prometheus-client writes bounds: 1 -> "1.0".
        self._les = [repr(float(b)) for b in self._bounds] + ["+Inf"]
        registry.register(self)

    def observe(self, endpoint: str, model: str, team: str, code: int, seconds: float) -> None:
        key = (endpoint, model, team, code)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        buckets = self._buckets.get(endpoint)
        if buckets is None:
            buckets = self._buckets[endpoint] = [0] * len(self._les)
            self._sums[endpoint] = 0.0
        # bisect_left: the first bound >= seconds, as "le" means.
        buckets[bisect_left(self._bounds, seconds)] += 1
        self._sums[endpoint] += seconds

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        return (
            CounterMetricFamily(self.REQUESTS, self.REQUESTS_HELP,
                                labels=("endpoint", "model", "team", "code")),
            HistogramMetricFamily(self.DURATION, self.DURATION_HELP, labels=("endpoint",)),
        )

    def collect(self) -> Iterable[Metric]:
        requests, duration = self._families()
        for (endpoint, model, team, code), count in sorted(self._counts.items()):
            requests.add_metric([endpoint, model, team, str(code)], count)
        for endpoint, counts in sorted(self._buckets.items()):
            cumulative, running = [], 0
            for le, count in zip(self._les, counts, strict=True):
                running += count
                cumulative.append((le, running))
            duration.add_metric([endpoint], cumulative, self._sums[endpoint])
        yield requests
        yield duration

    def describe(self) -> Iterable[Metric]:
        yield from self._families()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = RequestStats(r)
        self.spend = MoneyCounter(
            "apixo_gateway_spend_usd", "USD charged to teams for upstream images", r,
        )
        self.saved = MoneyCounter(
            "apixo_gateway_saved_usd", "USD not spent thanks to cache hits and joins", r,
        )
        self.images = Counter(
            "apixo_gateway_images", "Images generated upstream and charged",
            ["team", "model"], registry=r,
        )
        self.budget = Gauge(
            "apixo_gateway_budget_usd", "Team budget for the current period", ["team"], registry=r,
        )
        self.budget_remaining = Gauge(
            "apixo_gateway_budget_remaining_usd",
            "Team budget left in the current period: budget - spent - reserved, "
            "negative if tasks returned more images than they reserved",
            ["team"], registry=r,
        )
        self.cache_lookups = Counter(
            "apixo_gateway_cache_lookups", "Submit cache decisions", ["model", "result"],
            registry=r,
        )
        self.tasks_in_flight = Gauge(
            "apixo_gateway_tasks_in_flight", "Upstream tasks in flight", ["team"], registry=r,
        )
        self.team_max_concurrent = Gauge(
            "apixo_gateway_team_max_concurrent", "Team max_concurrent limit", ["team"], registry=r,
        )
        # The alerts compare a team's remaining budget with the cheapest image.
        self.price = Gauge(
            "apixo_gateway_price_usd", "[pricing]: USD per image", ["model"], registry=r,
        )
        self.upstream_max_concurrent = Gauge(
            "apixo_gateway_upstream_max_concurrent", "upstream.max_concurrent", registry=r,
        )
        self.task_duration = Histogram(
            "apixo_gateway_task_duration_seconds", "Submit to final state",
            ["model", "state"], buckets=_TASK_BUCKETS, registry=r,
        )
        self.task_failures = Counter(
            "apixo_gateway_task_failures", "Failed tasks by failCode",
            ["team", "model", "fail_code"], registry=r,
        )
        self.rejections = Counter(
            "apixo_gateway_rejections",
            "Requests refused by the gateway, by reason (any endpoint: a status poll "
            "with a bad key is unauthorized too)",
            ["team", "reason"], registry=r,
        )
        self.upstream_requests = Counter(
            "apixo_gateway_upstream_requests", "HTTP calls to APIXO",
            ["operation", "code"], registry=r,
        )
        self.upstream_duration = Histogram(
            "apixo_gateway_upstream_duration_seconds", "Duration of one HTTP call to APIXO",
            ["operation"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.callback_deliveries = Counter(
            "apixo_gateway_callback_deliveries", "Webhook delivery attempts by outcome",
            ["outcome"], registry=r,
        )
        self._fail_codes: set[str] = set()
        self._cache_series: dict[tuple[str, str], Counter] = {}

    def prepare(self, teams: Iterable[str], models: Iterable[str]) -> None:
        """Export every series whose labels are known in advance at 0 (see CACHE_RESULTS)."""
        models = list(models)
        for model in models:
            for result in CACHE_RESULTS:
                self.cache_lookups.labels(model, result)
            for state in TASK_STATES:
                self.task_duration.labels(model, state)
        # A request without a known key is counted as team "none".
        for team in ("none", *teams):
            for reason in REJECTION_REASONS if team != "none" else ("unauthorized",):
                self.rejections.labels(team, reason)
            if team != "none":
                for model in models:
                    self.spend.touch(team, model)
                    self.saved.touch(team, model)
                    self.images.labels(team, model)
        for operation in UPSTREAM_OPERATIONS:
            for code in UPSTREAM_CODES:
                self.upstream_requests.labels(operation, code)
        for outcome in CALLBACK_OUTCOMES:
            self.callback_deliveries.labels(outcome)

    def count_cache(self, model: str, result: str) -> None:
        """One submit's cache decision; the children are kept as in observe_request()."""
        child = self._cache_series.get((model, result))
        if child is None:
            child = self._cache_series[model, result] = self.cache_lookups.labels(model, result)
        child.inc()

    def fail_code_label(self, code: str | None) -> str:
        code = (code or "unknown")[:MAX_FAIL_CODE_CHARS]
        if code in self._fail_codes:
            return code
        if len(self._fail_codes) >= MAX_FAIL_CODES:
            return "other"
        self._fail_codes.add(code)
        return code
