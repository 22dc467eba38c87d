"""The benchmark harness stays importable and its pure helpers stay right (the benchmarks
themselves run with `make bench` / `make bench-smoke`, never in pytest)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

from bench.__main__ import BENCHMARKS
from bench.common import percentile
from bench.dispatch import _claimed, _received, _stamps

REPO = Path(__file__).resolve().parents[2]


def test_every_benchmark_has_a_run_function() -> None:
    for name in BENCHMARKS:
        assert callable(importlib.import_module(f"bench.{name}").run)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0


def test_stamps_name_the_job_from_its_workspace(tmp_path: Path) -> None:
    stamp = tmp_path / "stamps.txt"
    stamp.write_text("100.5 /w/j57abc-1-0a1b2c3d/out\n101.0 /w/j57abc-1-0a1b2c3d/out\n")
    assert _stamps(stamp) == {"j57abc": 100.5}


def test_webhook_and_claim_lines_name_their_job(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_text(
        '{"time": "2026-11-29T01:48:16.573Z", "msg": "webhook", "webhook_id": "j3:1"}\n'
        "not json\n"
        '{"time": "2026-11-29T01:48:16.590Z", "msg": "job claimed", "job_id": "j3"}\n'
    )
    assert round(_claimed(log)["j3"] - _received(log)["j3"], 3) == 0.017


def test_paced_cli_prints_its_lines_and_stamps(tmp_path: Path) -> None:
    stamp = tmp_path / "stamps.txt"
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "paced_cli.py"),
            "--lines",
            "50",
            "--seconds",
            "0.05",
            "--stamp",
            str(stamp),
            "--",
            "analyze",
            str(tmp_path / "missing"),
            "--output-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    lines = out.stdout.splitlines()
    assert lines[0] == "[FONDATION_STEP_1/2] paced output"
    assert sum(1 for ln in lines if ln.startswith("paced line")) == 50
    assert stamp.read_text().split()[1] == str(tmp_path / "out")


def test_profile_summary_counts_own_and_cumulative_samples(tmp_path: Path) -> None:
    from bench.profile_dup import summarize

    raw = tmp_path / "prof.txt"
    raw.write_text("main (a.py:1);handler (b.py:2) 3\nmain (a.py:1);log (c.py:3) 1\n")
    text = summarize(raw)
    assert "samples: 4" in text
    assert " 75.0%  handler (b.py:2)" in text and "100.0%  main (a.py:1)" in text


def test_stamp_script_stamps_then_execs(tmp_path: Path) -> None:
    stamp = tmp_path / "stamps.txt"
    out = subprocess.run(
        ["/bin/sh", str(REPO / "bench" / "stamp.sh"), str(stamp), "/w/j1-1-ab/out", "echo", "ran"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout == "ran\n"
    at, out_dir = stamp.read_text().split()
    assert out_dir == "/w/j1-1-ab/out" and float(at) > 1.7e9
