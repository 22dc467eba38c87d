"""The Cockpit dashboard and alert rules are well formed and query only metrics that exist:
the worker's own (as exported, and as Mimir stores them after an OTLP push) and Scaleway's
Serverless Containers metrics; log queries select and unwrap Scaleway's log envelope."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.logs import JsonFormatter, Redactor
from app.metrics import create_metrics
from tests.unit.test_telemetry import pushed_series

ROOT = Path(__file__).resolve().parents[2]
COCKPIT = ROOT / "deploy" / "cockpit"
WORKER_DS = "${datasource}"
SCALEWAY_DS = "${scaleway}"

# Scaleway's own Serverless Containers metrics (the "Scaleway Metrics" data source), as
# queried by operators' tooling read through the search tool; Scaleway's docs list no names.
# They carry resource_id, resource_name, resource_instance and region labels.
SCALEWAY_METRICS = {
    "serverless_container_cpu_usage_ratio",
    "serverless_container_memory_usage_bytes",
    "serverless_container_memory_limit_bytes",
    "serverless_container_instances_total",
    "serverless_container_requests_per_second",
}
# What Scaleway's CLI (`scw container container logs`, custom_logs.go) selects.
LOG_SELECTOR = '{resource_type="serverless_container", resource_id="$container_id"}'

# PromQL words that look like identifiers but are not metric names.
PROMQL_WORDS = {
    # aggregations and their modifiers
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "and", "or", "unless", "offset", "inf", "nan",
    # functions used or likely
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "absent",
    "absent_over_time", "clamp_min", "clamp_max", "clamp", "abs", "ceil", "floor", "round",
    "label_replace", "label_join", "time", "vector", "scalar", "sort", "sort_desc", "changes",
    "resets", "avg_over_time", "max_over_time", "min_over_time", "sum_over_time",
    "count_over_time", "last_over_time", "present_over_time", "predict_linear", "timestamp",
}  # fmt: skip


def exported_names() -> set[str]:
    """Every series name the worker's registry can expose, from the registry itself."""
    names: set[str] = set()
    for family in create_metrics().registry.collect():
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count", "created")}
        else:
            names.add(family.name)
        names |= {sample.name for sample in family.samples}
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (strings, label matchers, ranges and grouping
    clauses removed first; what is left and is not a PromQL word is a metric name)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\w+|\$\{\w+\}", " ", text)
    words = re.findall(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text)
    return {w for w in words if w.lower() not in PROMQL_WORDS}


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((COCKPIT / "dashboard.json").read_text())
    return data


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _datasource(target: dict[str, Any], panel: dict[str, Any]) -> dict[str, Any]:
    ds = target.get("datasource") or panel.get("datasource") or {}
    assert isinstance(ds, dict)
    return ds


def _is_loki(target: dict[str, Any], panel: dict[str, Any]) -> bool:
    return _datasource(target, panel).get("type") == "loki"


def dashboard_promql(uid: str = WORKER_DS) -> list[str]:
    """PromQL of the targets (and query variables) on the data source variable `uid`."""
    dash = _dashboard()
    exprs = []
    for panel in _panels(dash):
        for target in panel.get("targets", []):
            if not _is_loki(target, panel) and _datasource(target, panel).get("uid") == uid:
                exprs.append(target["expr"])
    for var in dash["templating"]["list"]:
        if var["type"] == "query" and var["datasource"]["uid"] == uid:
            exprs.append(var["definition"].replace("label_values(", "(").split(",")[0] + ")")
    return exprs


def dashboard_logql() -> list[str]:
    return [
        target["expr"]
        for panel in _panels(_dashboard())
        for target in panel.get("targets", [])
        if _is_loki(target, panel)
    ]


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((COCKPIT / "alerts.yaml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_extractor_sees_metric_names_and_skips_the_rest() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, step) (rate(fondation_step_duration_seconds_bucket"
        '{instance=~"$instance", step="rate"}[5m]))) > on(instance) group_left fondation_nope'
    )
    assert metric_names(expr) == {"fondation_step_duration_seconds_bucket", "fondation_nope"}
    assert "fondation_nope" not in exported_names()


def test_dashboard_is_a_grafana_dashboard() -> None:
    dash = _dashboard()
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    for name, kind in (("datasource", "prometheus"), ("scaleway", "prometheus"), ("loki", "loki")):
        assert variables[name]["type"] == "datasource" and variables[name]["query"] == kind
    assert variables["container_id"]["type"] == "textbox"
    ids = [p["id"] for p in _panels(dash)]
    assert len(ids) == len(set(ids))
    used: set[str] = set()
    for panel in _panels(dash):
        assert {"type", "title", "gridPos"} <= set(panel)
        for target in panel.get("targets", []):
            assert target["expr"].strip() and target["refId"]
            uid = target["datasource"]["uid"]
            assert uid == panel["datasource"]["uid"]
            assert uid in ("${datasource}", "${scaleway}", "${loki}")
            used.add(uid)
            if uid == "${loki}":
                assert target["datasource"]["type"] == "loki"
    assert used == {"${datasource}", "${scaleway}", "${loki}"}


def test_dashboard_covers_the_worker() -> None:
    used = set().union(*(metric_names(e) for e in dashboard_promql()))
    for needed in (
        "fondation_webhooks_total",
        "fondation_webhook_ack_seconds_bucket",
        "fondation_jobs_running",
        "fondation_job_slots",
        "fondation_jobs_finished_total",
        "fondation_job_duration_seconds_bucket",
        "fondation_step_duration_seconds_bucket",
        "fondation_callback_retries_total",
        "fondation_callback_failures_total",
        "fondation_heartbeats_total",
        "fondation_draining",
    ):
        assert needed in used, needed
    logs = [p for p in _panels(_dashboard()) if p["type"] == "logs"]
    assert logs and any(t["expr"].endswith('| level="error"') for p in logs for t in p["targets"])


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
@pytest.mark.parametrize("add_suffixes", [False, True], ids=["suffixes-off", "suffixes-on"])
def test_every_query_matches_what_an_otlp_push_stores(source: str, add_suffixes: bool) -> None:
    """Cockpit gets the worker's metrics by OTLP push: every name a query uses must be one
    Mimir stores, whether or not its OTLP metric-suffix setting is on."""
    exprs = dashboard_promql() if source == "dashboard" else [r["expr"] for r in alert_rules()]
    stored = pushed_series(add_suffixes=add_suffixes)
    for expr in exprs:
        missing = metric_names(expr) - stored
        assert not missing, f"{sorted(missing)} are not stored after a push (in {expr!r})"


def test_scaleway_panels_query_scaleway_metrics_of_the_container() -> None:
    exprs = dashboard_promql(SCALEWAY_DS)
    used = set().union(*(metric_names(e) for e in exprs))
    assert used == SCALEWAY_METRICS
    for expr in exprs:
        assert 'resource_id="$container_id"' in expr, expr
        assert not metric_names(expr) & exported_names()  # no worker metric on this source


def _logql_pipeline(expr: str, envelope: dict[str, str]) -> dict[str, str] | None:
    """Runs the stages our LogQL uses (`json`, `line_format "{{.f}}"`, `label="v"`) over one
    Loki line; returns the labels, or None when a filter drops the line."""
    stages = [s.strip() for s in expr.split("|")[1:]]
    line, labels = json.dumps(envelope), dict[str, str]()
    for stage in stages:
        if stage == "json":
            labels.update({k: str(v) for k, v in json.loads(line).items()})
        elif m := re.fullmatch(r'line_format "\{\{\.(\w+)\}\}"', stage):
            line = labels[m.group(1)]
        elif m := re.fullmatch(r'(\w+)="([^"]*)"', stage):
            if labels.get(m.group(1)) != m.group(2):
                return None
        else:
            raise AssertionError(f"stage not modelled: {stage!r}")
    return labels


def test_log_queries_select_the_container_and_unwrap_scaleways_envelope() -> None:
    exprs = dashboard_logql()
    assert exprs
    formatter = JsonFormatter(Redactor())

    def envelope(level: int, msg: str) -> dict[str, str]:
        record = logging.LogRecord("fondation.jobs", level, __file__, 1, msg, (), None)
        record.job_id = "j1"
        # Scaleway wraps each stdout line: {"stream", "resource_instance", "message"}.
        return {
            "stream": "stdout",
            "resource_instance": "abc-1",
            "message": formatter.format(record),
        }

    for expr in exprs:
        assert expr.startswith(LOG_SELECTOR + ' | json | line_format "{{.message}}" | json')
        assert "resource_name" not in expr
        error = _logql_pipeline(expr, envelope(logging.ERROR, "clone failed"))
        assert error is not None and error["msg"] == "clone failed" and error["job_id"] == "j1"
        info = _logql_pipeline(expr, envelope(logging.INFO, "job started"))
        assert (info is None) == expr.endswith('level="error"')


@pytest.mark.parametrize("doc", ["docs/DEPLOY.md", "README.md"])
def test_documented_log_queries_use_the_containers_id(doc: str) -> None:
    text = (ROOT / doc).read_text()
    # Full queries (a selector and a pipeline); prose may name a bare selector.
    queries = re.findall(r"\{resource_[^}]*\} \|[^`\n]*", text)
    assert queries, f"no log query in {doc}"
    for query in queries:
        assert query.startswith('{resource_type="serverless_container", resource_id='), query
        assert '| json | line_format "{{.message}}" | json' in query, query


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_query_names_only_exported_metrics(source: str) -> None:
    exprs = dashboard_promql() if source == "dashboard" else [r["expr"] for r in alert_rules()]
    exported = exported_names()
    assert exprs
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{sorted(unknown)} are not exported by the worker (in {expr!r})"


def test_alert_rules_are_well_formed() -> None:
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert len(names) == len(rules)
    for rule in rules:
        assert {"alert", "expr", "labels", "annotations"} <= set(rule)
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"])
    heartbeat = next(r for r in rules if "heartbeat" in r["alert"].lower())
    assert "fondation_jobs_running" in heartbeat["expr"]
    assert "fondation_heartbeats_total" in heartbeat["expr"]
