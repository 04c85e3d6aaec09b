"""Static checks of grafana/ (SPEC section 5) against the metrics contract (SPEC section 4).

No gateway is needed. promtool (Debian package `prometheus`) checks the Prometheus
config and rules, parses every dashboard query and runs unit tests of the alert rules;
without promtool those tests are skipped locally and fail when CI is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import promql
from tests.contract import EXTRA_GAUGES, SPEC_LABEL_VALUES, SPEC_METRICS

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"

# SPEC section 4, plus the two gauges the gateway exports for "in-flight vs limits".
CONTRACT: dict[str, tuple[str, frozenset[str]]] = {**SPEC_METRICS, **EXTRA_GAUGES}
# The endpoint label's values are the gateway's own (SPEC 4 leaves that set open).
LABEL_VALUES: dict[str, frozenset[str]] = {
    "endpoint": frozenset(
        {"generateTask", "statusTask", "current-balance", "admin", "metrics", "health"}
    ),
    **SPEC_LABEL_VALUES,
}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
JOB = "apixo-gateway"

_METRIC = re.compile(r"\bapixo_gateway_\w+")
_SELECTOR = re.compile(r"\b(apixo_gateway_\w+|up)\b\s*(?:\{(?P<matchers>[^}]*)\})?")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[([^\]]+)\]")
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def base_metric(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in CONTRACT:
            return name[: -len(suffix)]
    return name


def metrics_in(expr: str) -> set[str]:
    return {base_metric(m) for m in _METRIC.findall(expr)}


def labels_of(series_name: str) -> frozenset[str]:
    """Labels a scraped series has, target labels included."""
    if series_name == "up":
        return TARGET_LABELS
    base = base_metric(series_name)
    if base not in CONTRACT:  # reported by test_every_referenced_metric_is_in_the_contract
        return TARGET_LABELS
    labels = CONTRACT[base][1] | TARGET_LABELS
    if series_name.endswith("_bucket"):
        labels |= {"le"}
    return labels


def all_queries() -> list[tuple[str, str]]:
    """(where, raw expression) for every dashboard target and alert rule."""
    out = [(f"panel {t.panel_title!r} {t.ref_id}", t.expr) for t in promql.dashboard_targets(ROOT)]
    out += [(f"alert {r.name}", r.expr) for r in promql.alert_rules(ROOT)]
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return promql.load_dashboard(ROOT)


@pytest.fixture(scope="module")
def rules() -> list[promql.AlertRule]:
    return promql.alert_rules(ROOT)


# ------------------------------------------------------------------- metrics and labels


def test_every_referenced_metric_is_in_the_contract() -> None:
    queries = all_queries()
    assert len(queries) > 20
    for where, expr in queries:
        names = metrics_in(expr)
        assert names or "up{" in expr, f"{where}: no apixo_gateway_ metric in {expr!r}"
        unknown = names - CONTRACT.keys()
        assert not unknown, f"{where}: metrics not exported by the gateway: {unknown}"


def test_histogram_suffixes_only_on_histograms() -> None:
    for where, expr in all_queries():
        for name in _METRIC.findall(expr):
            base = base_metric(name)
            if base != name:
                assert CONTRACT[base][0] == "histogram", f"{where}: {name}"
            elif CONTRACT[name][0] == "histogram":
                pytest.fail(f"{where}: histogram {name} used without _bucket/_sum/_count")
        for match in re.finditer(r"histogram_quantile\(\s*[\d.]+\s*,(.*)", expr, re.DOTALL):
            assert "_bucket" in match.group(1), f"{where}: histogram_quantile without _bucket"
            assert re.search(r"by\s*\([^)]*\ble\b", match.group(1)), f"{where}: not by (le)"


def test_selector_labels_and_values_exist() -> None:
    for where, expr in all_queries():
        for match in _SELECTOR.finditer(expr):
            name, matchers = match.group(1), match.group("matchers") or ""
            allowed = labels_of(name)
            for label, _op, value in _MATCHER.findall(matchers):
                assert label in allowed, f"{where}: {name} has no label {label!r}"
                if label == "job":
                    assert value == JOB, f"{where}: job must be {JOB!r}"
                if label in LABEL_VALUES and re.fullmatch(r"[\w-]+(\|[\w-]+)*", value):
                    unknown = set(value.split("|")) - LABEL_VALUES[label]
                    assert not unknown, f"{where}: {label} values {unknown} never exported"
            if name == "apixo_gateway_upstream_requests_total":
                for label, _, value in _MATCHER.findall(matchers):
                    if label == "code":
                        assert re.fullmatch(r"[0-9.\[\]|error-]+", value), f"{where}: {value!r}"


def test_grouping_labels_exist() -> None:
    for where, expr in all_queries():
        available: set[str] = set()
        for name in {m.group(1) for m in _SELECTOR.finditer(expr)}:
            available |= labels_of(name)
        for group in _GROUPING.findall(expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in available, f"{where}: grouping by unknown label {label!r}"


def test_legends_use_existing_labels() -> None:
    for target in promql.dashboard_targets(ROOT):
        available: set[str] = set()
        for name in {m.group(1) for m in _SELECTOR.finditer(target.expr)}:
            available |= labels_of(name)
        for label in _LEGEND_LABEL.findall(target.legend):
            assert label in available, f"panel {target.panel_title!r}: legend {{{{{label}}}}}"


# ------------------------------------------------------------------------- dashboard


def test_dashboard_basics(dashboard: dict) -> None:
    assert dashboard["uid"] == "apixo-gateway"
    assert dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard.get("id") is None, "provisioned dashboards must not carry a database id"
    panels = promql.iter_panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    boxes = []
    for panel in panels:
        assert panel["type"] in {"row", "timeseries", "stat", "bargauge", "gauge", "table"}
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["h"] > 0
        assert pos["x"] + pos["w"] <= 24, f"panel {panel['title']!r} is wider than the grid"
        boxes.append((panel["title"], pos))
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus", panel["title"]
            assert target["expr"].strip()
    for i, (title_a, a) in enumerate(boxes):
        for title_b, b in boxes[i + 1 :]:
            overlap_x = a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
            overlap_y = a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]
            assert not (overlap_x and overlap_y), f"panels {title_a!r} and {title_b!r} overlap"


def test_team_variable(dashboard: dict) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    team = variables["team"]
    assert team["type"] == "query"
    assert team["datasource"]["uid"] == "prometheus"
    assert team["multi"] is True and team["includeAll"] is True
    assert team["allValue"] == ".*"
    query = team["query"]["query"] if isinstance(team["query"], dict) else team["query"]
    # Requests without a valid team key carry team="none": not a team to pick.
    match = re.fullmatch(r'label_values\((apixo_gateway_\w+)\{team!="none"\},\s*team\)', query)
    assert match and "team" in CONTRACT[match.group(1)][1]
    assert [name for name, _ in promql.variable_queries(ROOT)] == ["team"]


def test_team_labelled_metrics_follow_the_team_variable() -> None:
    for target in promql.dashboard_targets(ROOT):
        for match in _SELECTOR.finditer(target.expr):
            name = match.group(1)
            if name == "up" or "team" not in labels_of(name):
                continue
            matchers = match.group("matchers") or ""
            if 'team=~"$team"' in matchers:
                continue
            assert "all teams" in target.legend, (
                f"panel {target.panel_title!r}: {name} ignores $team "
                "(say 'all teams' in the legend if that is intended)"
            )


def test_dashboard_rate_windows_use_rate_interval() -> None:
    for target in promql.dashboard_targets(ROOT):
        for window in _RANGE.findall(target.expr):
            assert window == "$__rate_interval", f"panel {target.panel_title!r}: [{window}]"


REQUIRED_PANELS: dict[str, tuple[str, set[str], list[str]]] = {
    # topic: (title regex, metrics the panel must query, regexes its queries must match)
    "spend vs budget": (
        r"spend vs budget",
        {"apixo_gateway_budget_usd", "apixo_gateway_budget_remaining_usd"},
        [],
    ),
    "remaining budget": (r"remaining budget", {"apixo_gateway_budget_remaining_usd"}, []),
    "spend": (r"^spend", {"apixo_gateway_spend_usd_total"}, []),
    "images": (r"^images", {"apixo_gateway_images_total"}, []),
    "cache hit rate": (
        r"cache hit rate",
        {"apixo_gateway_cache_lookups_total"},
        [r'result=~"hit\|joined"'],
    ),
    "dollars saved": (r"dollars saved", {"apixo_gateway_saved_usd_total"}, []),
    "task latency": (
        r"task latency",
        {"apixo_gateway_task_duration_seconds"},
        [
            r"histogram_quantile\(0\.5,",
            r"histogram_quantile\(0\.95,",
            r"histogram_quantile\(0\.99,",
        ],
    ),
    "failures by failCode": (
        r"failures by failcode",
        {"apixo_gateway_task_failures_total"},
        [r"by \(fail_code\)"],
    ),
    "in-flight vs limits": (
        r"in-flight vs limits",
        {
            "apixo_gateway_tasks_in_flight",
            "apixo_gateway_team_max_concurrent",
            "apixo_gateway_upstream_max_concurrent",
        },
        [],
    ),
    "rejections by reason": (
        r"rejections by reason",
        {"apixo_gateway_rejections_total"},
        [r"by \(reason\)"],
    ),
    "upstream errors": (
        r"upstream (requests by code|error)",
        {"apixo_gateway_upstream_requests_total"},
        [r"\bcode\b"],
    ),
    "upstream latency": (
        r"upstream latency",
        {"apixo_gateway_upstream_duration_seconds"},
        [r"histogram_quantile\(0\.95,"],
    ),
}


@pytest.mark.parametrize("topic", sorted(REQUIRED_PANELS))
def test_required_panel(dashboard: dict, topic: str) -> None:
    title_re, metrics, patterns = REQUIRED_PANELS[topic]
    candidates = []
    for panel in promql.iter_panels(dashboard["panels"]):
        if panel["type"] == "row" or not re.search(title_re, panel["title"], re.IGNORECASE):
            continue
        exprs = "\n".join(t["expr"] for t in panel["targets"])
        candidates.append(panel["title"])
        if metrics <= metrics_in(exprs) and all(re.search(p, exprs) for p in patterns):
            return
    pytest.fail(f"no panel for {topic!r} (title /{title_re}/, metrics {metrics}); saw {candidates}")


# --------------------------------------------------------------------------- alerts


def test_alert_rules_shape(rules: list[promql.AlertRule]) -> None:
    assert len({r.name for r in rules}) == len(rules)
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule.for_ or ""), f"{rule.name}: needs for:"
        assert rule.labels.get("severity") in {"warning", "critical"}, rule.name
        assert rule.annotations.get("summary"), rule.name
        assert rule.annotations.get("description"), rule.name
        query, _, _ = promql.split_threshold(rule.expr)
        assert not re.search(r"(==|!=|>=|<=|>|<)\s*[\d.]+\s*$", query), rule.name


def _one_rule(rules: list[promql.AlertRule], *needles: str) -> promql.AlertRule:
    found = [r for r in rules if all(n in r.expr for n in needles)]
    assert len(found) >= 1, f"no alert rule using {needles}"
    return found[0]


def test_budget_alerts(rules: list[promql.AlertRule]) -> None:
    budget = [
        r
        for r in rules
        if "apixo_gateway_budget_remaining_usd" in metrics_in(r.expr)
    ]
    by_threshold = {promql.split_threshold(r.expr)[1:]: r for r in budget}
    warning = by_threshold[(">=", 0.8)]
    # Less left than the cheapest image: above 0, maybe, yet every submit gets 402.
    critical = by_threshold[("<", 0.0)]
    assert "apixo_gateway_price_usd" in critical.expr
    assert warning.labels["severity"] == "warning"
    assert critical.labels["severity"] == "critical"
    for rule in (warning, critical):
        assert "$labels.team" in rule.annotations["summary"]
        assert "$labels.team" in rule.annotations["description"]


def test_failure_rate_alert(rules: list[promql.AlertRule]) -> None:
    rule = _one_rule(rules, 'apixo_gateway_task_duration_seconds_count{state="failed"}')
    assert "[10m]" in rule.expr
    # Not the failCode counter: its series are born with their first failures
    # already counted, which increase() never sees.
    assert "apixo_gateway_task_failures_total" not in rule.expr
    assert promql.split_threshold(rule.expr)[1:] == (">", 0.2)


def test_upstream_error_alert(rules: list[promql.AlertRule]) -> None:
    rule = _one_rule(rules, "apixo_gateway_upstream_requests_total")
    assert "[5m]" in rule.expr
    assert 'code!~"2..|400"' in rule.expr
    assert promql.split_threshold(rule.expr)[1:] == (">", 0.1)


def test_gateway_down_alert(rules: list[promql.AlertRule]) -> None:
    rule = _one_rule(rules, f'up{{job="{JOB}"}}')
    assert promql.split_threshold(rule.expr) == (f'up{{job="{JOB}"}}', "==", 0.0)
    assert rule.labels["severity"] == "critical"


def test_alerts_parser_agrees_with_yaml(rules: list[promql.AlertRule]) -> None:
    yaml = pytest.importorskip("yaml")  # only a cross-check of tests/promql.py's reader
    data = yaml.safe_load((GRAFANA / "alerts.yml").read_text())
    parsed = [(g["name"], r) for g in data["groups"] for r in g["rules"]]
    assert len(parsed) == len(rules)
    for rule, (group, raw) in zip(rules, parsed, strict=True):
        assert (rule.group, rule.name, rule.for_) == (group, raw["alert"], raw["for"])
        assert rule.expr.split() == raw["expr"].split()
        assert rule.labels == raw["labels"]
        assert {k: v.split() for k, v in rule.annotations.items()} == {
            k: v.split() for k, v in raw["annotations"].items()
        }


# ------------------------------------------------------------------ helper for live tests


def test_queries_for_live_evaluation() -> None:
    queries = promql.dashboard_and_alert_queries(ROOT)
    targets = promql.dashboard_targets(ROOT)
    rules = promql.alert_rules(ROOT)
    assert len(queries) == len(targets) + len(rules) + 1  # + the team variable
    for description, query in queries:
        assert "$" not in query, f"{description}: unsubstituted variable in {query!r}"
        assert query.strip()
    by_description = dict(queries)
    assert by_description["alert " + _one_rule(rules, "up{").name] == f'up{{job="{JOB}"}}'
    assert 'team=~".*"' in "\n".join(q for _, q in queries)
    assert "[1m]" in "\n".join(q for _, q in queries)


def test_prometheus_config_helper() -> None:
    text = promql.prometheus_config(ROOT, "127.0.0.1:18080", "2s")
    assert '"127.0.0.1:18080"' in text and '8080"' not in text.replace("18080", "")
    assert "scrape_interval: 2s" in text
    assert str((GRAFANA / "alerts.yml").resolve()) in text


# -------------------------------------------------------------------- config files


def test_prometheus_config_static() -> None:
    text = (GRAFANA / "prometheus.yml").read_text()
    assert re.search(r"job_name:\s*['\"]?apixo-gateway['\"]?\s*$", text, re.MULTILINE)
    assert re.search(r"metrics_path:\s*/metrics\s*$", text, re.MULTILINE)
    assert re.search(r"targets:\s*\[\s*\"127\.0\.0\.1:8080\"\s*\]", text)
    assert re.search(r"^\s*scrape_interval:\s*15s\s*$", text, re.MULTILINE)
    assert re.search(r"rule_files:\s*\n\s*-\s*alerts\.yml\s*$", text, re.MULTILINE)


def test_grafana_provisioning_files() -> None:
    datasource = (GRAFANA / "provisioning/datasources/prometheus.yml").read_text()
    for pattern in (
        r"^apiVersion:\s*1\s*$",
        r"^\s*type:\s*prometheus\s*$",
        r"^\s*uid:\s*prometheus\s*$",
        r"^\s*url:\s*http://localhost:9090\s*$",
        r"^\s*isDefault:\s*true\s*$",
    ):
        assert re.search(pattern, datasource, re.MULTILINE), pattern
    provider = (GRAFANA / "provisioning/dashboards/apixo-gateway.yml").read_text()
    for pattern in (r"^apiVersion:\s*1\s*$", r"^\s*type:\s*file\s*$"):
        assert re.search(pattern, provider, re.MULTILINE), pattern
    path = re.search(r"^\s*path:\s*(\S+)\s*$", provider, re.MULTILINE)
    assert path and path.group(1).startswith("/")
    assert path.group(1) in (GRAFANA / "README.md").read_text(), "README must say where to copy"
    assert (GRAFANA / "dashboards/apixo-gateway.json").is_file()


# ------------------------------------------------------------------------- promtool


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not found (Debian/Ubuntu: apt install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_promtool(promtool: str, *args: str | Path) -> None:
    proc = subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, f"promtool {args}:\n{proc.stdout}\n{proc.stderr}"


def test_promtool_check_config(promtool: str) -> None:
    run_promtool(promtool, "check", "config", "grafana/prometheus.yml")


def test_promtool_check_rules(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", "grafana/alerts.yml")


def test_promtool_parses_every_dashboard_query(promtool: str, tmp_path: Path) -> None:
    queries = promql.dashboard_and_alert_queries(ROOT)
    recording = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"record": f"apixo_gateway_test:query_{i}", "expr": query}
                    for i, (_, query) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "queries.yml"
    path.write_text(json.dumps(recording, indent=1))
    run_promtool(promtool, "check", "rules", path)


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    all_labels = {"job": JOB, "instance": "gw:8080", **labels}
    matchers = ", ".join(f'{k}="{v}"' for k, v in all_labels.items())
    return {"series": f"{name}{{{matchers}}}", "values": values}


def test_promtool_alert_unit_tests(
    promtool: str, tmp_path: Path, rules: list[promql.AlertRule]
) -> None:
    """The alert rules (without annotations) fire when, and only when, they should; the
    queries without thresholds return data for a gateway with traffic but no errors."""
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(
        json.dumps(
            {
                "groups": [
                    {
                        "name": "alerts",
                        "rules": [
                            {
                                "alert": r.name,
                                "expr": r.expr,
                                "for": r.for_,
                                "labels": r.labels,
                            }
                            for r in rules
                        ],
                    }
                ]
            },
            indent=1,
        )
    )
    name = {
        "warn": _one_rule(rules, "apixo_gateway_budget_usd", ">= 0.8").name,
        "crit": _one_rule(rules, "apixo_gateway_budget_remaining_usd", "price_usd").name,
        "fail": _one_rule(rules, 'apixo_gateway_task_duration_seconds_count{state="failed"}').name,
        "upstream": _one_rule(rules, "apixo_gateway_upstream_requests_total").name,
        "down": _one_rule(rules, "up{").name,
    }
    target = {"job": JOB, "instance": "gw:8080"}
    budget = "apixo_gateway_budget_usd"
    remaining = "apixo_gateway_budget_remaining_usd"
    finished = "apixo_gateway_task_duration_seconds_count"
    failures = "apixo_gateway_task_failures_total"
    upstream = "apixo_gateway_upstream_requests_total"
    price = "apixo_gateway_price_usd"

    def expect(alert: str, at: str, *label_sets: dict[str, str]) -> dict:
        return {
            "eval_time": at,
            "alertname": alert,
            "exp_alerts": [{"exp_labels": labels} for labels in label_sets],
        }

    noisy = {
        "interval": "1m",
        "input_series": [
            # design: $10 budget, $0.50 spent per minute until exhausted at 20m.
            _series(budget, {"team": "design"}, "10x40"),
            _series(remaining, {"team": "design"}, "10-0.5x20 0x19"),
            _series(budget, {"team": "ops"}, "100x40"),
            _series(remaining, {"team": "ops"}, "90x40"),
            # The cheapest image is $0.04.
            _series(price, {"model": "grok-image"}, "0.1x40"),
            _series(price, {"model": "nano-banana"}, "0.04x40"),
            _series(price, {"model": "free-model"}, "0x40"),
            # odd: $0.35, three $0.10 images bought by 3m. $0.05 left still buys a
            # $0.04 image; from 13m $0.03 buys none, though it is not 100% used;
            # at 30m a reload raises the budget to $10 and it ends at once.
            _series(budget, {"team": "odd"}, "0.35x29 10x10"),
            _series(remaining, {"team": "odd"}, "0.35 0.25 0.15 0.05x9 0.03x16 9.73x10"),
            # grok-image: 40% of tasks fail; gpt-image-2: 10%; nano-banana: none.
            _series(finished, {"model": "grok-image", "state": "success"}, "0+6x40"),
            _series(finished, {"model": "grok-image", "state": "failed"}, "0+4x40"),
            _series(
                failures,
                {"team": "design", "model": "grok-image", "fail_code": "Timeout"},
                "0+3x40",
            ),
            _series(
                failures,
                {"team": "ops", "model": "grok-image", "fail_code": "SensitiveContent"},
                "0+1x40",
            ),
            _series(finished, {"model": "gpt-image-2", "state": "success"}, "0+9x40"),
            _series(finished, {"model": "gpt-image-2", "state": "failed"}, "0+1x40"),
            _series(
                failures,
                {"team": "design", "model": "gpt-image-2", "fail_code": "GENERATION_FAILED"},
                "0+1x40",
            ),
            _series(finished, {"model": "nano-banana", "state": "success"}, "0+10x40"),
            # submit: a third of calls get 503; status: 1% connection errors.
            _series(upstream, {"operation": "submit", "code": "200"}, "0+10x40"),
            _series(upstream, {"operation": "submit", "code": "503"}, "0+5x40"),
            _series(upstream, {"operation": "status", "code": "200"}, "0+100x40"),
            _series(upstream, {"operation": "status", "code": "error"}, "0+1x40"),
            # A third of status calls are 400s, clients' own invalid requests: not an
            # upstream fault, so status never alerts.
            _series(upstream, {"operation": "status", "code": "400"}, "0+50x40"),
            # scraped for 10 minutes, then down.
            {"series": f'up{{job="{JOB}", instance="gw:8080"}}', "values": "1x10 0x30"},
        ],
        "alert_rule_test": [
            expect(name["warn"], "2m"),
            expect(name["warn"], "10m", {**target, "team": "odd", "severity": "warning"}),
            expect(name["crit"], "10m"),
            expect(name["warn"], "18m", *(
                {**target, "team": t, "severity": "warning"} for t in ("design", "odd")
            )),
            expect(name["crit"], "18m", {**target, "team": "odd", "severity": "critical"}),
            expect(name["warn"], "25m", *(
                {**target, "team": t, "severity": "warning"} for t in ("design", "odd")
            )),
            expect(name["crit"], "25m", *(
                {**target, "team": t, "severity": "critical"} for t in ("design", "odd")
            )),
            expect(name["warn"], "35m", {**target, "team": "design", "severity": "warning"}),
            expect(name["crit"], "35m", {**target, "team": "design", "severity": "critical"}),
            expect(name["fail"], "3m"),
            expect(name["fail"], "30m", {"model": "grok-image", "severity": "warning"}),
            expect(name["upstream"], "3m"),
            expect(name["upstream"], "30m", {"operation": "submit", "severity": "warning"}),
            expect(name["down"], "5m"),
            expect(name["down"], "15m", {**target, "severity": "critical"}),
        ],
    }

    stripped = dict(promql.dashboard_and_alert_queries(ROOT))

    def samples(alert: str, *pairs: tuple[dict[str, str], float]) -> dict:
        return {
            "expr": stripped[f"alert {alert}"],
            "eval_time": "15m",
            "exp_samples": [
                {
                    "labels": "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}",
                    "value": value,
                }
                for labels, value in pairs
            ],
        }

    quiet = {
        "interval": "1m",
        "input_series": [
            _series(budget, {"team": "design"}, "10x20"),
            _series(remaining, {"team": "design"}, "7x20"),
            _series(price, {"model": "grok-image"}, "0.5x20"),
            _series(finished, {"model": "grok-image", "state": "success"}, "0+5x20"),
            # Exported at 0 from the gateway's start (Metrics.prepare).
            _series(finished, {"model": "grok-image", "state": "failed"}, "0x20"),
            _series(upstream, {"operation": "submit", "code": "200"}, "0+5x20"),
            {"series": f'up{{job="{JOB}", instance="gw:8080"}}', "values": "1x20"},
        ],
        "promql_expr_test": [
            samples(name["warn"], ({**target, "team": "design"}, 0.3)),
            samples(name["crit"], ({**target, "team": "design"}, 6.5)),
            samples(name["fail"], ({"model": "grok-image"}, 0.0)),
            samples(name["upstream"], ({"operation": "submit"}, 0.0)),
        ],
    }
    up_sample = samples(name["down"], (target, 1.0))
    up_sample["exp_samples"][0]["labels"] = "up" + up_sample["exp_samples"][0]["labels"]
    quiet["promql_expr_test"].append(up_sample)

    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(
        json.dumps(
            {
                "rule_files": [str(rules_file)],
                "evaluation_interval": "1m",
                "tests": [noisy, quiet],
            },
            indent=1,
        )
    )
    run_promtool(promtool, "test", "rules", test_file)


def test_failures_panel_counts_a_new_fail_codes_first_burst(
    promtool: str, tmp_path: Path
) -> None:
    """A failCode's series is born with its first failures already counted, which
    increase() alone never shows; the panel's `unless ... offset` arm does, for as long
    as the window holds the birth."""
    (panel,) = [
        t for t in promql.dashboard_targets(ROOT)
        if "apixo_gateway_task_failures_total" in t.expr
    ]
    expr = promql.substitute_grafana_variables(
        panel.expr, {"__rate_interval": "2m", "team": ".*"}
    )
    failures = "apixo_gateway_task_failures_total"
    labels = {"team": "design", "model": "grok-image"}
    test = {
        "interval": "1m",
        "input_series": [
            # Five NewCode failures at once at 5m; two more at 8m.
            _series(failures, {**labels, "fail_code": "NewCode"}, "_x5 5 5 5 7 7 7 7"),
            # A code seen from the start: its increase() is right as it is.
            _series(failures, {**labels, "fail_code": "Timeout"}, "0 0 0 0 0 3 3 3 3 3 3 3"),
        ],
        "promql_expr_test": [
            {"expr": expr, "eval_time": "5m", "exp_samples": [
                # increase() alone has nothing for NewCode here: one sample.
                {"labels": '{fail_code="NewCode"}', "value": 5},
                {"labels": '{fail_code="Timeout"}', "value": 3},
            ]},
            # Still 5 while the window holds the birth: with two samples in it,
            # increase() has a value (0), which must not hide the first burst.
            {"expr": expr, "eval_time": "6m", "exp_samples": [
                {"labels": '{fail_code="NewCode"}', "value": 5},
                {"labels": '{fail_code="Timeout"}', "value": 3},
            ]},
            {"expr": expr, "eval_time": "8m", "exp_samples": [
                {"labels": '{fail_code="NewCode"}', "value": 2},
                {"labels": '{fail_code="Timeout"}', "value": 0},
            ]},
        ],
    }
    rules = tmp_path / "none.yml"
    rules.write_text(json.dumps({"groups": []}))
    test_file = tmp_path / "panel_test.yml"
    test_file.write_text(json.dumps(
        {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": [test]}, indent=1
    ))
    run_promtool(promtool, "test", "rules", test_file)
