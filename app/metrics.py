"""Prometheus metrics, all named `fondation_*`, on a registry owned by each app instance."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ACK_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
JOB_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

# Every metric name the worker exports (with the suffixes Prometheus adds), so the dashboard
# and alert rules can be checked against it.
METRIC_NAMES = (
    "fondation_webhooks_total",
    "fondation_webhook_ack_seconds",
    "fondation_jobs_started_total",
    "fondation_jobs_finished_total",
    "fondation_job_duration_seconds",
    "fondation_step_duration_seconds",
    "fondation_jobs_running",
    "fondation_job_slots",
    "fondation_draining",
    "fondation_heartbeats_total",
    "fondation_callbacks_total",
    "fondation_callback_retries_total",
    "fondation_callback_failures_total",
    "fondation_cli_output_lines_total",
)


@dataclass(frozen=True)
class Metrics:
    """The worker's metrics; one instance per app so tests do not share counters."""

    registry: CollectorRegistry
    webhooks: Counter
    ack_seconds: Histogram
    jobs_started: Counter
    jobs_finished: Counter
    job_duration_s: Histogram
    step_duration_s: Histogram
    jobs_running: Gauge
    job_slots: Gauge
    draining: Gauge
    heartbeats: Counter
    callbacks: Counter
    callback_retries: Counter
    callback_failures: Counter
    cli_output_lines: Counter

    def render(self) -> bytes:
        return generate_latest(self.registry)


def create_metrics() -> Metrics:
    """A fresh registry with every `fondation_*` metric."""
    r = CollectorRegistry()
    return Metrics(
        registry=r,
        webhooks=Counter(
            "fondation_webhooks", "Webhook deliveries by outcome", ["type", "outcome"], registry=r
        ),
        ack_seconds=Histogram(
            "fondation_webhook_ack_seconds",
            "Time from request start to the webhook answer",
            ["outcome"],
            buckets=ACK_BUCKETS_S,
            registry=r,
        ),
        jobs_started=Counter("fondation_jobs_started", "Job attempts started", registry=r),
        jobs_finished=Counter(
            "fondation_jobs_finished",
            "Job attempts finished, by final status and failure code",
            ["status", "code"],
            registry=r,
        ),
        job_duration_s=Histogram(
            "fondation_job_duration_seconds",
            "Job attempt duration by final status",
            ["status"],
            buckets=JOB_BUCKETS_S,
            registry=r,
        ),
        step_duration_s=Histogram(
            "fondation_step_duration_seconds",
            "Duration of each phase or CLI step",
            ["step"],
            buckets=JOB_BUCKETS_S,
            registry=r,
        ),
        jobs_running=Gauge("fondation_jobs_running", "Jobs running now", registry=r),
        job_slots=Gauge("fondation_job_slots", "Job slots (MAX_CONCURRENT_JOBS)", registry=r),
        draining=Gauge("fondation_draining", "1 after SIGTERM, while draining", registry=r),
        heartbeats=Counter(
            "fondation_heartbeats", "Progress reports sent (each renews the lease)", registry=r
        ),
        callbacks=Counter(
            "fondation_callbacks",
            "Callbacks to the job store by function and result",
            ["function", "result"],
            registry=r,
        ),
        callback_retries=Counter(
            "fondation_callback_retries",
            "Callback attempts retried after a transient error",
            ["function"],
            registry=r,
        ),
        callback_failures=Counter(
            "fondation_callback_failures",
            "Callbacks given up on",
            ["function"],
            registry=r,
        ),
        cli_output_lines=Counter(
            "fondation_cli_output_lines", "Lines read from the CLI's stdout and stderr", registry=r
        ),
    )
