"""OTLP push of the metrics to a Cockpit custom data source."""

from __future__ import annotations

import json
from typing import Any

import httpx

from app.clock import FakeClock
from app.metrics import create_metrics
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

    webhooks = metric(doc, "fondation_webhooks")["sum"]
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
    assert metric(body, "fondation_jobs_started")["sum"]["dataPoints"][0]["asDouble"] == 1.0
    assert pusher.pushed == 1
