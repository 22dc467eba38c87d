"""Optional push of the worker's metrics to a Scaleway Cockpit custom data source.

Cockpit ingests OTLP at `https://<id>.metrics.cockpit.<region>.scw.cloud/otlp/v1/metrics`
with the push token in `X-Token`. The registry is converted to OTLP/HTTP JSON (cumulative
sums, gauges and explicit-bucket histograms), so no protobuf or collector is needed.

Names: a counter is pushed under its exposition name, `_total` included
(`fondation_webhooks_total`). Mimir's OTLP translation adds `_total` to monotonic sums only
when its metric-suffix setting is on, and that translation first drops any `total` token, so
the stored name is `fondation_webhooks_total` either way: the dashboard and alert queries
match pushed and scraped metrics alike. Histograms become `_bucket`/`_sum`/`_count` series
in both modes; no OTLP `unit` is set, so no unit suffix is ever appended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from app.clock import Clock

log = logging.getLogger("fondation.telemetry")
CUMULATIVE = 2  # AggregationTemporality.CUMULATIVE


def pushed_name(family: Metric) -> str:
    """The OTLP name of a metric family: a counter keeps its `_total` (prometheus_client strips
    it from `family.name`), so the stored name does not depend on Mimir's suffix setting."""
    return f"{family.name}_total" if family.type == "counter" else family.name


def _attrs(labels: dict[str, str]) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"stringValue": v}} for k, v in sorted(labels.items())]


def _histogram_points(family: Metric, start_ns: int, now_ns: int) -> list[dict[str, Any]]:
    series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for sample in family.samples:
        labels = {k: v for k, v in sample.labels.items() if k != "le"}
        key = tuple(sorted(labels.items()))
        point = series.setdefault(key, {"labels": labels, "buckets": [], "sum": 0.0, "count": 0})
        if sample.name.endswith("_bucket"):
            point["buckets"].append((float(sample.labels["le"]), sample.value))
        elif sample.name.endswith("_sum"):
            point["sum"] = sample.value
        elif sample.name.endswith("_count"):
            point["count"] = int(sample.value)
    points = []
    for point in series.values():
        buckets = sorted(point["buckets"])
        bounds = [le for le, _ in buckets if le != float("inf")]
        cumulative = [count for _, count in buckets]
        # Prometheus buckets are cumulative; OTLP's are per bucket, one more than the bounds.
        per_bucket = [int(c - p) for c, p in zip(cumulative, [0.0, *cumulative[:-1]], strict=True)]
        points.append(
            {
                "attributes": _attrs(point["labels"]),
                "startTimeUnixNano": str(start_ns),
                "timeUnixNano": str(now_ns),
                "count": str(point["count"]),
                "sum": point["sum"],
                "bucketCounts": [str(c) for c in per_bucket],
                "explicitBounds": bounds,
            }
        )
    return points


def to_otlp(
    registry: CollectorRegistry, *, service: str, instance: str, start_s: float, now_s: float
) -> dict[str, Any]:
    """The registry's current values as an OTLP `ExportMetricsServiceRequest` (JSON form)."""
    start_ns, now_ns = int(start_s * 1e9), int(now_s * 1e9)
    metrics: list[dict[str, Any]] = []
    for family in registry.collect():
        if family.type == "counter":
            points = [
                {
                    "attributes": _attrs(s.labels),
                    "startTimeUnixNano": str(start_ns),
                    "timeUnixNano": str(now_ns),
                    "asDouble": s.value,
                }
                for s in family.samples
                if s.name.endswith("_total")
            ]
            body: dict[str, Any] = {
                "sum": {
                    "dataPoints": points,
                    "aggregationTemporality": CUMULATIVE,
                    "isMonotonic": True,
                }
            }
        elif family.type == "gauge":
            points = [
                {"attributes": _attrs(s.labels), "timeUnixNano": str(now_ns), "asDouble": s.value}
                for s in family.samples
            ]
            body = {"gauge": {"dataPoints": points}}
        elif family.type == "histogram":
            body = {
                "histogram": {
                    "dataPoints": _histogram_points(family, start_ns, now_ns),
                    "aggregationTemporality": CUMULATIVE,
                }
            }
        else:
            continue
        metrics.append({"name": pushed_name(family), "description": family.documentation, **body})
    resource = _attrs({"service.name": service, "service.instance.id": instance})
    return {
        "resourceMetrics": [
            {
                "resource": {"attributes": resource},
                "scopeMetrics": [{"scope": {"name": service}, "metrics": metrics}],
            }
        ]
    }


class MetricsPusher:
    """Pushes the registry every `interval_s`; failures are logged and never stop the worker."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        url: str,
        token: str,
        instance: str,
        interval_s: float,
        clock: Clock,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._registry = registry
        self._url = url
        self._instance = instance
        self._interval_s = interval_s
        self._clock = clock
        self._start_s = clock.now()
        self._client = httpx.AsyncClient(
            transport=transport, timeout=10.0, headers={"X-Token": token}
        )
        self.pushed = 0

    async def push_once(self) -> bool:
        doc = to_otlp(
            self._registry,
            service="fondation-worker",
            instance=self._instance,
            start_s=self._start_s,
            now_s=self._clock.now(),
        )
        try:
            resp = await self._client.post(self._url, json=doc)
        except httpx.HTTPError as exc:
            log.warning("metrics push failed", extra={"error": type(exc).__name__})
            return False
        if resp.status_code >= 300:
            log.warning("metrics push refused", extra={"http_status": resp.status_code})
            return False
        self.pushed += 1
        return True

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._interval_s)
                await self.push_once()
        finally:
            # The last values before exit, bounded so a dead endpoint cannot hold shutdown.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.push_once(), 2.0)
            await self._client.aclose()
