"""Resume: what a retried attempt costs when it restores the checkpoint and runs only the steps
left, against the steps left of an uninterrupted run (same run, same machine).

The CLI is the simulator with a fixed `--step-delay-s` per step. For each k = 2..6, attempt 1
runs all six steps and parks in step k (`--hang-at-step k`); as each step line arrives, the
step before it has ended and `OutputTracker.step_ended` hands out its files (what the worker
uploads as partial docs). The process is then killed (SIGKILL, as a lost instance). Attempt 2:
`plan_resume` on those files and ended steps, `restore` into a fresh output directory, and the
simulator started with `ResumePlan.options` (the remaining `--steps`); its time runs from
before the restore to the CLI's exit. Baseline: uninterrupted runs of all six steps (median
of 3, smoke 1), timed per step from their step lines: "steps left" of k = from step k's line
to the exit; "start" = from the spawn to step 1's line (Python and imports: any attempt pays
it once).

Ratio per k: resumed attempt / (start + steps left) (goal <= 1.1): what resuming adds beyond
the CLI run of the remaining steps (restore, step lines of restarted steps). Also printed:
resumed / steps left alone, and resumed / full run.
Broken (BenchError): a step not resumed where expected, or the course differing from the
uninterrupted run's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

from app.checkpoint import OutputTracker, checkpoint_from_mapping, plan_resume, restore
from app.collect import collect_docs
from app.domain import JobOptions
from app.progress import STEP_NAMES, parse_step
from bench.common import REPO_ROOT, BenchError, Result, bench_dir

SHA = "ab" * 20  # the simulator does not read git: any full SHA stands for the clone
MAX_DOC_BYTES = 800_000
GOAL = 1.1


def _argv(repo: Path, out: Path, delay_s: float, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "app.simulator",
        "analyze",
        str(repo),
        "--output-dir",
        str(out),
        "--step-delay-s",
        str(delay_s),
        *extra,
    ]


def _run_timed(argv: list[str], timeout_s: float) -> tuple[float, float, dict[int, float]]:
    """Run to the end: (wall seconds, seconds to step 1's line, global step -> seconds from
    its line to the exit)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    seen: dict[int, float] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        step = parse_step(line)
        if step is not None:
            seen[step.index] = time.perf_counter()
    code = proc.wait(timeout=timeout_s)
    end = time.perf_counter()
    if code != 0:
        raise BenchError(f"simulator exited {code}: {argv}")
    return end - t0, seen[1] - t0, {i: end - t for i, t in seen.items()}


def _interrupted(
    repo: Path, out: Path, delay_s: float, k: int, timeout_s: float
) -> tuple[dict[str, bytes], list[str]]:
    """Attempt 1, killed in step k: the files uploaded at each step's end, and those steps."""
    out.mkdir()
    tracker = OutputTracker(out, max_doc_bytes=MAX_DOC_BYTES)
    uploaded: dict[str, bytes] = {}
    ended: list[str] = []
    proc = subprocess.Popen(
        _argv(repo, out, delay_s, "--hang-at-step", str(k)),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            step = parse_step(line)
            if step is None:
                continue
            if step.index > 1:  # the previous step ended: upload what it wrote
                name = STEP_NAMES[step.index - 2]
                uploaded.update({f.path: f.data for f in tracker.step_ended(name).files})
                ended.append(name)
            if step.index == k or time.monotonic() > deadline:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)
        if proc.stdout is not None:
            proc.stdout.close()
    if len(ended) != k - 1:
        raise BenchError(f"attempt 1 did not reach step {k} (ended: {ended})")
    return uploaded, ended


def run(smoke: bool) -> list[Result]:
    delay_s, rounds = (0.2, 1) if smoke else (2.0, 3)
    timeout_s = 30 * delay_s + 30
    results: list[Result] = []
    with bench_dir("resume") as tmp:
        repo = tmp / "repo"
        (repo / "src").mkdir(parents=True)
        (repo / "src" / "core.py").write_text("def core():\n    return 1\n")
        (repo / "app.py").write_text("print('hello')\n")
        (repo / "README.md").write_text("# Demo\n")
        runs = [
            _run_timed(_argv(repo, tmp / f"full{r}", delay_s), timeout_s) for r in range(rounds)
        ]
        full_s = median(r[0] for r in runs)
        start_s = median(r[1] for r in runs)
        left_s = {k: median(r[2][k] for r in runs) for k in range(1, 7)}
        full_docs = collect_docs(tmp / "full0", max_doc_bytes=MAX_DOC_BYTES)
        base = Result("resume")
        base.add("step_delay_s", delay_s)
        base.add("baseline_rounds", rounds)
        base.add("full_run_s", full_s)
        base.add("cli_start_s", start_s)
        results.append(base)
        for k in range(2, 7):
            res = Result(f"resume_at_step_{k}")
            files, ended = _interrupted(repo, tmp / f"a1-{k}", delay_s, k, timeout_s)
            out = tmp / f"a2-{k}"
            out.mkdir()
            t0 = time.perf_counter()
            plan = plan_resume(
                checkpoint_from_mapping(SHA, files, ended),
                clone_commit=SHA,
                max_doc_bytes=MAX_DOC_BYTES,
            )
            restore(plan, out, max_doc_bytes=MAX_DOC_BYTES)
            restore_s = time.perf_counter() - t0
            steps = plan.options(JobOptions()).steps
            argv = [*_argv(repo, out, delay_s), "--steps", ",".join(steps)]
            cli_s, resumed_start_s, _ = _run_timed(argv, timeout_s)
            resumed_s = time.perf_counter() - t0
            if plan.remaining != STEP_NAMES[k - 1 :]:
                raise BenchError(f"k={k}: resumed {plan.remaining}, expected from step {k}")
            if collect_docs(out, max_doc_bytes=MAX_DOC_BYTES) != full_docs:
                raise BenchError(f"k={k}: the resumed course differs from the full run's")
            res.add("steps_run", len(plan.remaining))
            res.add("files_restored", len(plan.files))
            res.add("plan_and_restore_s", restore_s)
            res.add("resumed_cli_start_s", resumed_start_s)
            res.add("resumed_cli_s", cli_s)
            res.add("resumed_s", resumed_s)
            res.add("steps_left_s", left_s[k])
            res.add("ratio_resumed_over_full_run", resumed_s / full_s)
            res.add("ratio_resumed_over_steps_left_alone", resumed_s / left_s[k])
            ratio = resumed_s / (start_s + left_s[k])
            res.set_ratio(
                "ratio_resumed_over_start_plus_steps_left", ratio, f"<= {GOAL}", ratio <= GOAL
            )
            results.append(res)
    return results
