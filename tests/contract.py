"""The metrics contract of SPEC section 4, written once for every test that checks it.

tests/test_metrics_contract.py holds a live gateway's /metrics to it; tests/test_grafana_files.py
holds every query in grafana/ to it (plus EXTRA_GAUGES, which the dashboard also reads).
"""

from __future__ import annotations

# SPEC section 4, word for word: name -> (type, label names).
SPEC_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "apixo_gateway_requests_total": ("counter", frozenset({"endpoint", "model", "team", "code"})),
    "apixo_gateway_request_duration_seconds": ("histogram", frozenset({"endpoint"})),
    "apixo_gateway_spend_usd_total": ("counter", frozenset({"team", "model"})),
    "apixo_gateway_saved_usd_total": ("counter", frozenset({"team", "model"})),
    "apixo_gateway_images_total": ("counter", frozenset({"team", "model"})),
    "apixo_gateway_budget_usd": ("gauge", frozenset({"team"})),
    "apixo_gateway_budget_remaining_usd": ("gauge", frozenset({"team"})),
    "apixo_gateway_cache_lookups_total": ("counter", frozenset({"model", "result"})),
    "apixo_gateway_tasks_in_flight": ("gauge", frozenset({"team"})),
    "apixo_gateway_task_duration_seconds": ("histogram", frozenset({"model", "state"})),
    "apixo_gateway_task_failures_total": ("counter", frozenset({"team", "model", "fail_code"})),
    "apixo_gateway_rejections_total": ("counter", frozenset({"team", "reason"})),
    "apixo_gateway_upstream_requests_total": ("counter", frozenset({"operation", "code"})),
    "apixo_gateway_upstream_duration_seconds": ("histogram", frozenset({"operation"})),
    "apixo_gateway_callback_deliveries_total": ("counter", frozenset({"outcome"})),
}

# The closed sets SPEC section 4 names for some labels.
SPEC_LABEL_VALUES: dict[str, frozenset[str]] = {
    "result": frozenset({"hit", "miss", "joined", "bypass"}),
    "state": frozenset({"success", "failed"}),
    "reason": frozenset({"unauthorized", "invalid", "budget", "concurrency", "rate_limit", "busy"}),
    "operation": frozenset({"submit", "status"}),
    "outcome": frozenset({"delivered", "retried", "gave_up"}),
}

# Not in the SPEC table: the two gauges the gateway adds for "in-flight vs limits" (SPEC 5),
# and the prices, which the out-of-budget alert compares the remaining budget with.
EXTRA_GAUGES: dict[str, tuple[str, frozenset[str]]] = {
    "apixo_gateway_team_max_concurrent": ("gauge", frozenset({"team"})),
    "apixo_gateway_upstream_max_concurrent": ("gauge", frozenset()),
    "apixo_gateway_price_usd": ("gauge", frozenset({"model"})),
}
