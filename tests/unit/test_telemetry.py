"""OTLP push of the metrics to a Cockpit custom data source."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from app.clock import FakeClock
from app.metrics import METRIC_NAMES, create_metrics
from app.telemetry import MetricsPusher, to_otlp


def metric(doc: dict[str, Any], name: str) -> dict[str, Any]:
    metrics = doc["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]
    return next(m for m in metrics if m["name"] == name)


def test_registry_converts_to_otlp_json() -> None:
    m = create_metrics()
    m.webhooks.labels(type="job.start", outcome="accepted").inc(3)
    m.jobs_running.set(2)
    for v in (0.002, 0.02, 0.2, 5.0):
        m.ack_seconds.labels(outcome="accepted").observe(v)
    doc = to_otlp(m.registry, service="fondation-worker", instance="w1", start_s=100, now_s=160)
    res = doc["resourceMetrics"][0]["resource"]["attributes"]
    assert {"key": "service.instance.id", "value": {"stringValue": "w1"}} in res

    webhooks = metric(doc, "fondation_webhooks_total")["sum"]
    assert webhooks["isMonotonic"] is True and webhooks["aggregationTemporality"] == 2
    point = webhooks["dataPoints"][0]
    assert point["asDouble"] == 3.0
    assert point["startTimeUnixNano"] == str(100 * 10**9) and point["timeUnixNano"] == str(
        160 * 10**9
    )
    assert {"key": "outcome", "value": {"stringValue": "accepted"}} in point["attributes"]

    assert metric(doc, "fondation_jobs_running")["gauge"]["dataPoints"][0]["asDouble"] == 2.0

    hist = metric(doc, "fondation_webhook_ack_seconds")["histogram"]["dataPoints"][0]
    assert hist["count"] == "4" and abs(hist["sum"] - 5.222) < 1e-9
    assert len(hist["bucketCounts"]) == len(hist["explicitBounds"]) + 1
    assert sum(int(c) for c in hist["bucketCounts"]) == 4  # per bucket, not cumulative
    assert hist["bucketCounts"][-1] == "1"  # 5.0 s is above the last bound


async def test_pusher_posts_with_token_header() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200 if len(seen) == 1 else 503)

    m = create_metrics()
    m.jobs_started.inc()
    pusher = MetricsPusher(
        m.registry,
        url="https://abc.metrics.cockpit.fr-par.scw.cloud/otlp/v1/metrics",
        token="cockpit-push-token",
        instance="w1",
        interval_s=60,
        clock=FakeClock(),
        transport=httpx.MockTransport(handler),
    )
    assert await pusher.push_once() is True
    assert await pusher.push_once() is False  # refused: logged, not raised
    assert seen[0].headers["x-token"] == "cockpit-push-token"
    assert seen[0].url.path == "/otlp/v1/metrics"
    body = json.loads(seen[0].content)
    assert metric(body, "fondation_jobs_started_total")["sum"]["dataPoints"][0]["asDouble"] == 1.0
    assert pusher.pushed == 1


def mimir_series(otlp_metric: dict[str, Any], *, add_suffixes: bool) -> set[str]:
    """The Prometheus series names Mimir stores for one pushed OTLP metric.

    A model of the Prometheus OTLP translator Mimir uses (`otlptranslator`,
    `BuildCompliantMetricName`, underscore escaping): without suffixes the name is kept; with
    suffixes the name is split into tokens on anything but letters, digits and `:`, unit
    tokens are added (none here: the worker sets no OTLP unit) and, for a monotonic sum, every
    `total` token is removed and one is appended. Histograms become `_bucket`/`_sum`/`_count`.
    """
    name = otlp_metric["name"]
    assert "unit" not in otlp_metric
    if add_suffixes:
        tokens = [t for t in re.split(r"[^A-Za-z0-9:]+", name) if t]
        sum_ = otlp_metric.get("sum")
        if sum_ is not None and sum_["isMonotonic"]:
            tokens = [t for t in tokens if t != "total"] + ["total"]
        name = "_".join(tokens)
    if "histogram" in otlp_metric:
        return {f"{name}_{s}" for s in ("bucket", "sum", "count")}
    return {name}


def pushed_series(*, add_suffixes: bool) -> set[str]:
    """Every series name a push of the worker's full registry ends up as in Mimir."""
    m = create_metrics()
    # Labelled families only produce samples once a child exists.
    m.webhooks.labels(type="job.start", outcome="accepted").inc()
    m.ack_seconds.labels(outcome="accepted").observe(0.01)
    m.jobs_finished.labels(status="succeeded", code="").inc()
    m.job_duration_s.labels(status="succeeded").observe(10)
    m.step_duration_s.labels(step="clone").observe(1)
    m.callbacks.labels(function="progress", result="ok").inc()
    m.callback_retries.labels(function="progress").inc()
    m.callback_failures.labels(function="progress").inc()
    doc = to_otlp(m.registry, service="fondation-worker", instance="w1", start_s=0, now_s=1)
    names: set[str] = set()
    for otlp_metric in doc["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]:
        names |= mimir_series(otlp_metric, add_suffixes=add_suffixes)
    return names


def test_counters_are_pushed_with_their_total_suffix() -> None:
    m = create_metrics()
    doc = to_otlp(m.registry, service="fondation-worker", instance="w1", start_s=0, now_s=1)
    metrics = doc["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]
    sums = sorted(x["name"] for x in metrics if "sum" in x)
    assert sums and all(name.endswith("_total") for name in sums)
    assert not [n for n in sums if n.endswith("_total_total")]
    assert set(sums) == {n for n in METRIC_NAMES if n.endswith("_total")}


@pytest.mark.parametrize("add_suffixes", [False, True], ids=["suffixes-off", "suffixes-on"])
def test_mimir_stores_the_exposition_names_whatever_its_suffix_setting(add_suffixes: bool) -> None:
    stored = pushed_series(add_suffixes=add_suffixes)
    for name in METRIC_NAMES:
        if name.endswith(("_seconds",)):
            assert {f"{name}_bucket", f"{name}_sum", f"{name}_count"} <= stored, name
        else:
            assert name in stored, name


def test_translation_model_adds_total_once() -> None:
    counter = {"name": "fondation_webhooks", "sum": {"isMonotonic": True}}
    assert mimir_series(counter, add_suffixes=True) == {"fondation_webhooks_total"}
    assert mimir_series(counter, add_suffixes=False) == {"fondation_webhooks"}  # the old bug
    pushed = {"name": "fondation_webhooks_total", "sum": {"isMonotonic": True}}
    assert mimir_series(pushed, add_suffixes=True) == {"fondation_webhooks_total"}
