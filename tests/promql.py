"""PromQL found in grafana/: the dashboard's queries and the alert rules' expressions.

Used by the static checks in tests/test_grafana_files.py and by tests that evaluate
every query against a real Prometheus scraping a real gateway. No YAML library is
needed: alerts.yml keeps to a simple layout (see the comment at its top) that the
small reader below understands.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARD = Path("grafana/dashboards/apixo-gateway.json")
ALERTS = Path("grafana/alerts.yml")
PROMETHEUS_CONFIG = Path("grafana/prometheus.yml")

# Values Grafana would put in place of its variables when evaluating a query by hand.
GRAFANA_SUBSTITUTIONS = {
    "team": ".*",
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
}

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_THRESHOLD = re.compile(
    r"^(?P<query>.*?\S)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?:bool\s+)?"
    r"(?P<threshold>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*$",
    re.DOTALL,
)
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<metric>.+?)\s*,\s*(?P<label>\w+)\s*\)\s*$")
_BLOCK_INDICATOR = re.compile(r"^[|>][-+]?$")


@dataclass
class AlertRule:
    group: str
    name: str
    expr: str
    for_: str | None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class DashboardTarget:
    panel_title: str
    panel_type: str
    ref_id: str
    expr: str
    legend: str


# ---------------------------------------------------------------------------- dashboard


def load_dashboard(repo_root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((repo_root / DASHBOARD).read_text(encoding="utf-8"))
    return data


def iter_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All panels, rows' nested panels included (rows themselves too)."""
    out: list[dict[str, Any]] = []
    for panel in panels:
        out.append(panel)
        out.extend(iter_panels(panel.get("panels", [])))
    return out


def dashboard_targets(repo_root: Path) -> list[DashboardTarget]:
    dashboard = load_dashboard(repo_root)
    out = []
    for panel in iter_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append(
                    DashboardTarget(
                        panel_title=panel.get("title", ""),
                        panel_type=panel.get("type", ""),
                        ref_id=target.get("refId", ""),
                        expr=target["expr"],
                        legend=target.get("legendFormat", ""),
                    )
                )
    return out


def variable_queries(repo_root: Path) -> list[tuple[str, str]]:
    """(variable name, PromQL equivalent) for each `label_values(metric, label)` variable."""
    out = []
    for var in load_dashboard(repo_root).get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        match = _LABEL_VALUES.match(query or var.get("definition", ""))
        if match:
            out.append((var["name"], f"count by ({match['label']}) ({match['metric']})"))
    return out


def substitute_grafana_variables(expr: str, values: dict[str, str] | None = None) -> str:
    values = GRAFANA_SUBSTITUTIONS if values is None else values

    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return values.get(name, match.group(0))

    return _VARIABLE.sub(repl, expr)


# ------------------------------------------------------------------------------ alerts


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _unquote(value: str) -> str:
    value = value.strip()
    if value.startswith('"') and value.endswith('"') and len(value) >= 2:
        unquoted: str = json.loads(value)
        return unquoted
    if value.startswith("'") and value.endswith("'") and len(value) >= 2:
        return value[1:-1].replace("''", "'")
    return value


def _read_mapping(lines: list[str], start: int, indent: int) -> tuple[dict[str, str], int]:
    """Read `key: scalar` entries indented exactly `indent` from lines[start:].

    Returns the mapping and the index of the first line that is not part of it.
    Block scalars (| |- > >-) are read as text; nested mappings are skipped.
    """
    out: dict[str, str] = {}
    i = start
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line.lstrip().startswith("#"):
            i += 1
            continue
        if _indent(line) < indent or (_indent(line) == indent and line.lstrip().startswith("-")):
            break
        if _indent(line) > indent:  # belongs to a nested mapping we do not read here
            i += 1
            continue
        key, _, value = line.strip().partition(":")
        value = value.strip()
        i += 1
        if _BLOCK_INDICATOR.match(value):
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            common = min((_indent(b) for b in block if b.strip()), default=0)
            body = [b[common:] for b in block]
            out[key] = ("\n" if value.startswith("|") else " ").join(body).strip()
        else:
            out[key] = _unquote(value)
    return out, i


def alert_rules(repo_root: Path) -> list[AlertRule]:
    lines = (repo_root / ALERTS).read_text(encoding="utf-8").splitlines()
    rules: list[AlertRule] = []
    group = ""
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("- name:"):
            group = _unquote(stripped.partition(":")[2])
            i += 1
            continue
        if not stripped.startswith("- alert:"):
            i += 1
            continue
        indent = _indent(lines[i]) + 2
        name = _unquote(stripped.partition(":")[2])
        fields, _ = _read_mapping(lines, i + 1, indent)
        labels: dict[str, str] = {}
        annotations: dict[str, str] = {}
        for key, target in (("labels", labels), ("annotations", annotations)):
            for j in range(i + 1, len(lines)):
                line = lines[j]
                if line.strip().startswith("- ") and _indent(line) <= indent - 2:
                    break
                if _indent(line) == indent and line.strip() == f"{key}:":
                    target.update(_read_mapping(lines, j + 1, indent + 2)[0])
                    break
        rules.append(
            AlertRule(
                group=group,
                name=name,
                expr=fields.get("expr", ""),
                for_=fields.get("for"),
                labels=labels,
                annotations=annotations,
            )
        )
        i += 1
    return rules


def split_threshold(expr: str) -> tuple[str, str, float]:
    """`<query> <op> <number>` -> (query, op, number). ValueError if not of that form."""
    match = _THRESHOLD.match(expr.strip())
    if not match:
        raise ValueError(f"alert expression does not end in '<op> <number>': {expr!r}")
    return match["query"].strip(), match["op"], float(match["threshold"])


# ------------------------------------------------------------------------------ public


def dashboard_and_alert_queries(repo_root: Path) -> list[tuple[str, str]]:
    """(description, PromQL) for every query in grafana/ that must return data.

    Dashboard targets have Grafana variables replaced ($team -> .*, $__rate_interval and
    $__interval -> 1m); alert expressions lose their final threshold comparison; the
    dashboard's `label_values()` variables become `count by (label) (metric)`.
    """
    out: list[tuple[str, str]] = []
    for target in dashboard_targets(repo_root):
        out.append(
            (
                f"dashboard panel {target.panel_title!r} target {target.ref_id}",
                substitute_grafana_variables(target.expr),
            )
        )
    for name, query in variable_queries(repo_root):
        out.append((f"dashboard variable {name!r}", query))
    for rule in alert_rules(repo_root):
        query, _, _ = split_threshold(rule.expr)
        out.append((f"alert {rule.name}", query))
    return out


def prometheus_config(repo_root: Path, target: str, scrape_interval: str = "1s") -> str:
    """grafana/prometheus.yml with another target and interval, and an absolute rule path
    (so the result can be written to any directory)."""
    text = (repo_root / PROMETHEUS_CONFIG).read_text(encoding="utf-8")
    text = text.replace('"127.0.0.1:8080"', json.dumps(target))
    text = re.sub(r"(scrape_interval|evaluation_interval): \S+", rf"\1: {scrape_interval}", text)
    alerts = (repo_root / ALERTS).resolve()
    return text.replace("  - alerts.yml", f"  - {json.dumps(str(alerts))}")
