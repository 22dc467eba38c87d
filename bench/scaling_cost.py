"""The monthly cost of warm only, warm + overflow and runs only (docs/SCALING.md), from Scaleway's
published per-second prices and a simulated month of arrivals. Deterministic (fixed seed).

Model: 20-minute jobs; Poisson arrivals, 70 % of a day's jobs between 08:00 and 20:00 and 30 %
in the other 12 hours; a warm instance has 2 slots (MAX_CONCURRENT_JOBS=2, 2 GiB / 1.12 vCPU,
paid every second); a run has one job on the same size (the deploy's default), paid for its
duration. Warm only is sized so that 99 % of the simulated minutes need no more slots than it
has (jobs beyond wait in the queue); warm + overflow keeps enough warm instances for the quiet
hours' mean and starts a run whenever every warm slot is taken; runs only starts a run per job.
Free tiers (400 000 GB-s and 200 000 vCPU-s a month per account) are left out: they are worth
€2.40 a month at most.

    python -m bench.scaling_cost
"""

from __future__ import annotations

import heapq
import json
import math
import random

# Scaleway, Serverless Containers and Serverless Jobs (same rates), read 2026-11-28:
# €1.00 per 100 000 vCPU-s, €0.10 per 100 000 GB-s.
EUR_PER_VCPU_S = 1.00 / 100_000
EUR_PER_GB_S = 0.10 / 100_000
VCPU = 1.12
MEMORY_GB = 2.0
EUR_PER_INSTANCE_S = VCPU * EUR_PER_VCPU_S + MEMORY_GB * EUR_PER_GB_S  # €0.0000132
JOB_S = 20 * 60
SLOTS_PER_INSTANCE = 2
DAYS = 30
MONTH_S = DAYS * 86_400
BUSY_SHARE = 0.7  # of a day's jobs, between 08:00 and 20:00
SEED = 14


def arrivals(jobs_per_day: int, rng: random.Random) -> list[float]:
    """Arrival times (s) over the month, a Poisson process with two rates a day."""
    out: list[float] = []
    for day in range(DAYS):
        for start_h, share in (
            (0, (1 - BUSY_SHARE) / 2),
            (8, BUSY_SHARE),
            (20, (1 - BUSY_SHARE) / 2),
        ):
            hours = 12 if start_h == 8 else 8 if start_h == 0 else 4
            rate = jobs_per_day * share / (hours * 3600)
            t = day * 86_400 + start_h * 3600.0
            end = t + hours * 3600
            while True:
                t += rng.expovariate(rate)
                if t >= end:
                    break
                out.append(t)
    return sorted(out)


def concurrency_p99(times: list[float]) -> int:
    """Slots in use at the 99th percentile of the month's minutes, with no limit."""
    per_minute = [0] * (MONTH_S // 60 + JOB_S // 60 + 1)
    for t in times:
        first = int(t // 60)
        for m in range(first, first + JOB_S // 60):
            per_minute[m] += 1
    ordered = sorted(per_minute[: MONTH_S // 60])
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


def overflow_runs(times: list[float], warm_slots: int) -> int:
    """How many jobs find every warm slot taken (and go to a run)."""
    busy: list[float] = []  # end times of the jobs in warm slots
    runs = 0
    for t in times:
        while busy and busy[0] <= t:
            heapq.heappop(busy)
        if len(busy) < warm_slots:
            heapq.heappush(busy, t + JOB_S)
        else:
            runs += 1
    return runs


def month(jobs_per_day: int) -> dict[str, object]:
    times = arrivals(jobs_per_day, random.Random(SEED))
    instance_month = EUR_PER_INSTANCE_S * MONTH_S
    run_cost = EUR_PER_INSTANCE_S * JOB_S
    warm_only = math.ceil(max(1, concurrency_p99(times)) / SLOTS_PER_INSTANCE)
    quiet_mean = jobs_per_day * (1 - BUSY_SHARE) / (12 * 3600) * JOB_S
    warm_base = max(1, math.ceil(quiet_mean / SLOTS_PER_INSTANCE))
    runs = overflow_runs(times, warm_base * SLOTS_PER_INSTANCE)
    return {
        "jobs_per_day": jobs_per_day,
        "jobs_in_month": len(times),
        "warm_only": {"instances": warm_only, "eur": round(warm_only * instance_month, 2)},
        "warm_plus_overflow": {
            "instances": warm_base,
            "runs": runs,
            "runs_share": round(runs / len(times), 3),
            "eur": round(warm_base * instance_month + runs * run_cost, 2),
        },
        "runs_only": {"runs": len(times), "eur": round(len(times) * run_cost, 2)},
    }


def main() -> None:
    print(
        json.dumps(
            {"eur_per_instance_s": EUR_PER_INSTANCE_S, "eur_per_run": EUR_PER_INSTANCE_S * JOB_S}
        )
    )
    for jobs_per_day in (100, 1_000, 10_000):
        print(json.dumps(month(jobs_per_day)))


if __name__ == "__main__":
    main()
