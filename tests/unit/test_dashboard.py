"""The Cockpit dashboard and alert rules are well formed and query only metrics the worker exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.metrics import create_metrics

COCKPIT = Path(__file__).resolve().parents[2] / "deploy" / "cockpit"

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


def _is_loki(target: dict[str, Any], panel: dict[str, Any]) -> bool:
    ds = target.get("datasource") or panel.get("datasource") or {}
    return isinstance(ds, dict) and ds.get("type") == "loki"


def dashboard_promql() -> list[str]:
    dash = _dashboard()
    exprs = []
    for panel in _panels(dash):
        for target in panel.get("targets", []):
            if not _is_loki(target, panel):
                exprs.append(target["expr"])
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"].replace("label_values(", "(").split(",")[0] + ")")
    return exprs


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
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in _panels(dash)]
    assert len(ids) == len(set(ids))
    for panel in _panels(dash):
        assert {"type", "title", "gridPos"} <= set(panel)
        for target in panel.get("targets", []):
            assert target["expr"].strip() and target["refId"]
            if not _is_loki(target, panel):
                assert target["datasource"]["uid"] == "${datasource}"


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
    assert logs and any(
        re.search(r'\|\s*json\s*\|\s*level="error"', t["expr"]) for p in logs for t in p["targets"]
    )


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
