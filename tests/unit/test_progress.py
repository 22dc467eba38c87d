from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.domain import JobStatus, Progress
from app.progress import PHASES, STEP_NAMES, ProgressTracker, StepLine, StepPlan, parse_step


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "[FONDATION_STEP_1/6] Extracting core abstractions from codebase",
            StepLine(1, 6, "Extracting core abstractions from codebase"),
        ),
        (
            "  [FONDATION_STEP_6/6] Generating interactive tutorials\n",
            StepLine(6, 6, "Generating interactive tutorials"),
        ),
        ("[fondation_step_2/3] lower case", StepLine(2, 3, "lower case")),
        (
            "[2/6] Analyze: Analyzing relationships",
            StepLine(2, 6, "Analyze: Analyzing relationships"),
        ),
        ("[3/3]", StepLine(3, 3, "")),
        (
            "[12:34:56.789] INFO (4242): [FONDATION_STEP_3/6] Determining optimal chapter order",
            StepLine(3, 6, "Determining optimal chapter order"),
        ),
        ("INFO: [1/2] go", StepLine(1, 2, "go")),
        ("2026-11-28T10:00:00.123Z INFO [1/2] go", StepLine(1, 2, "go")),
        ("\x1b[32m[FONDATION_STEP_1/2]\x1b[0m colored", StepLine(1, 2, "colored")),
        (
            json.dumps(
                {
                    "level": 30,
                    "time": 1,
                    "msg": "[FONDATION_STEP_4/6] Generating chapter content",
                    "step": "4/6",
                }
            ),
            StepLine(4, 6, "Generating chapter content"),
        ),
    ],
)
def test_step_lines(line: str, expected: StepLine) -> None:
    assert parse_step(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "",
        "hello",
        "retrying request [1/2] after error",
        "Generated: chapter_1_foo.md [1/2]",
        "x [FONDATION_STEP_1/2] not at start",
        "[0/6] zero index",
        "[1/0] zero total",
        "[7/6] index over total",
        "[1/100000] absurd total",
        "[1/2]glued text",
        "[a/b] letters",
        "info [1/2] lower-case level words are not a prefix",
        json.dumps({"msg": "Starting codebase analysis"}),
        json.dumps({"msg": 5, "text": "[1/2] x"}),
        json.dumps(["[1/2] a list"]),
        '{"msg": "[1/2] broken json',
        json.dumps({"msg": "says [1/2] in the middle"}),
    ],
)
def test_not_step_lines(line: str) -> None:
    assert parse_step(line) is None


def test_json_line_text_wins_over_raw() -> None:
    # the raw JSON text starts with "{", so only the msg can match
    assert parse_step(json.dumps({"msg": "[1/2] a"})) == StepLine(1, 2, "a")


def make(min_interval: float = 1.0, heartbeat: float = 15.0, **kw: int) -> ProgressTracker:
    return ProgressTracker(min_interval, heartbeat, **kw)


def test_phase_then_steps_and_logs() -> None:
    t = make()
    p = t.set_phase(JobStatus.CLAIMED, "claimed", 0.0)
    assert (p.seq, p.status, p.current_step, p.total_steps, p.message, p.logs) == (
        1,
        JobStatus.CLAIMED,
        0,
        0,
        "claimed",
        (),
    )
    assert t.set_phase(JobStatus.ANALYZING, "running the CLI", 0.1).seq == 2
    # a log line right after an emission waits for the interval
    assert t.feed("some log", 0.2) is None
    assert t.tick(0.5) is None
    # a step change emits at once (within the burst allowance), carrying the pending log
    p = t.feed("[FONDATION_STEP_1/6] Extracting", 0.6)
    assert p is not None
    assert (p.seq, p.status, p.current_step, p.total_steps, p.message, p.logs) == (
        3,
        JobStatus.ANALYZING,
        1,
        6,
        "Extracting",
        ("some log",),
    )
    # same step again is just a log line
    assert t.feed("[FONDATION_STEP_1/6] Extracting", 0.7) is None
    p = t.tick(1.6)
    assert p is not None
    assert p.logs == ("[FONDATION_STEP_1/6] Extracting",)
    assert p.current_step == 1
    # a log after the interval emits at once
    p = t.feed("later", 3.0)
    assert p is not None
    assert p.logs == ("later",)


def test_heartbeat_and_final() -> None:
    t = make(min_interval=1.0, heartbeat=15.0)
    assert t.tick(0.0) is None  # nothing emitted yet: nothing to beat for
    t.set_phase(JobStatus.CLONING, "cloning", 0.0)
    assert t.tick(14.9) is None
    hb = t.tick(15.0)
    assert hb is not None
    assert (hb.seq, hb.status, hb.message, hb.logs) == (2, JobStatus.CLONING, "cloning", ())
    assert t.tick(15.5) is None
    assert t.feed("pending", 15.6) is None
    assert t.feed("pending 2", 15.7) is None
    f = t.final(JobStatus.COMPLETED, "done", 16.7)
    assert (f.seq, f.status, f.message, f.logs) == (
        3,
        JobStatus.COMPLETED,
        "done",
        ("pending", "pending 2"),
    )


def test_logs_bounded_and_truncated() -> None:
    t = make(max_log_lines=3, max_line_chars=10)
    t.set_phase(JobStatus.ANALYZING, "x", 0.0)
    for i in range(10):
        assert t.feed(f"line {i} " + "y" * 20, 0.1) is None
    assert t.feed("   ", 0.2) is None  # blank lines are not logs
    p = t.tick(1.0)
    assert p is not None
    assert len(p.logs) == 3
    assert all(len(line) <= 10 for line in p.logs)
    assert p.logs[-1].startswith("line 9")
    assert p.logs[-1].endswith("…")
    assert t.dropped_lines == 7


def test_json_log_lines_use_msg() -> None:
    t = make()
    t.set_phase(JobStatus.ANALYZING, "x", 0.0)
    t.feed(json.dumps({"level": 30, "msg": "hello from pino"}), 0.1)
    p = t.tick(2.0)
    assert p is not None
    assert p.logs == ("hello from pino",)


def test_invalid_limits() -> None:
    with pytest.raises(ValueError):
        ProgressTracker(-1.0, 1.0)
    with pytest.raises(ValueError):
        ProgressTracker(1.0, 0.0)


# -- properties ----------------------------------------------------------------------------

_event = st.one_of(
    st.tuples(st.just("feed"), st.sampled_from(["log a", "log b", "", "x [1/2] mid"])),
    st.tuples(st.just("step"), st.tuples(st.integers(1, 4), st.integers(4, 5))),
    st.tuples(st.just("tick"), st.none()),
    st.tuples(
        st.just("phase"),
        st.sampled_from([JobStatus.CLONING, JobStatus.ANALYZING, JobStatus.GATHERING]),
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(st.tuples(st.floats(0.0, 3.0), _event), max_size=80),
    min_interval=st.floats(0.0, 2.0),
    heartbeat=st.floats(0.5, 5.0),
    max_logs=st.integers(0, 5),
)
def test_tracker_properties(
    events: list[tuple[float, tuple[str, object]]],
    min_interval: float,
    heartbeat: float,
    max_logs: int,
) -> None:
    t = ProgressTracker(min_interval, heartbeat, max_log_lines=max_logs, max_line_chars=50)
    now = 0.0
    last_seq = 0
    last_emit: float | None = None
    current = (0, 0)
    steps_early = 0  # step reports inside the interval: the burst allowance
    for dt, (kind, arg) in events:
        now += dt
        forced = False
        if kind == "feed":
            assert isinstance(arg, str)
            p = t.feed(arg, now)
        elif kind == "step":
            assert isinstance(arg, tuple)
            i, n = arg
            changed = (i, n) != current
            p = t.feed(f"[FONDATION_STEP_{i}/{n}] step {i}", now)
            current = (i, n)  # the state changes at once; its report may wait
            if changed and p is not None:
                steps_early += last_emit is not None and now - last_emit < min_interval
                forced = True
        elif kind == "tick":
            p = t.tick(now)
        else:
            assert isinstance(arg, JobStatus)
            p = t.set_phase(arg, "phase", now)
            assert p is not None
            forced = True
        if p is None:
            continue
        assert p.seq == last_seq + 1  # strictly increasing, no gaps
        last_seq = p.seq
        assert len(p.logs) <= max_logs
        assert all(len(line) <= 50 for line in p.logs)
        assert (p.current_step, p.total_steps) == current
        if not forced and last_emit is not None:
            # at most one unforced emission per min_interval
            assert now - last_emit >= min_interval
        last_emit = now
    # Early step reports never exceed the burst plus what the elapsed time earned.
    assert steps_early <= t.step_burst + (now / min_interval if min_interval > 0 else 0) + 1
    f = t.final(JobStatus.COMPLETED, "done", now)
    assert f.seq == last_seq + 1
    assert len(f.logs) <= max_logs


_batch_lines = st.lists(
    st.one_of(
        st.builds(
            lambda i, n: f"[FONDATION_STEP_{min(i, n)}/{n}] step",
            st.integers(1, 6),
            st.integers(1, 6),
        ),
        st.text(max_size=30),
        st.just("flood line 3/100: output"),
    ),
    max_size=60,
)


@given(lines=_batch_lines, cut=st.integers(0, 60))
def test_feed_many_reports_the_same_steps_as_feed(lines: list[str], cut: int) -> None:
    """Batching is an optimisation only: the same step changes in the same order, the same
    final state, and logs still bounded."""
    one, many = ProgressTracker(1.0, 15.0), ProgressTracker(1.0, 15.0)
    singles = [u for line in lines if (u := one.feed(line, 0.0)) is not None]
    batched = many.feed_many(lines[:cut], 0.0) + many.feed_many(lines[cut:], 0.0)

    def steps(us: list[Progress]) -> list[tuple[int, int]]:
        # Log-only reports may be coalesced differently; step states are what must agree.
        return [(u.current_step, u.total_steps) for u in us if u.current_step]

    def changes(us: list[Progress]) -> list[tuple[int, int]]:
        seen = steps(us)
        return [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]]

    def is_subsequence(part: list[tuple[int, int]], whole: list[tuple[int, int]]) -> bool:
        rest = iter(whole)
        return all(any(s == w for w in rest) for s in part)

    # Step changes within one interval are coalesced (all lines here come at t=0): each
    # reports a subsequence of every change, and both end in the same state.
    unlimited = ProgressTracker(0.0, 15.0)
    every = changes([u for line in lines if (u := unlimited.feed(line, 0.0)) is not None])
    assert is_subsequence(changes(singles), every)
    assert is_subsequence(changes(batched), every)
    assert one.current == many.current and one.message == many.message
    assert all(len(u.logs) <= 20 for u in batched)


def _sim_line(i: int, n: int, step: str, *, legacy: bool = False) -> str:
    """A step line as the simulator (and the real CLI) prints it with --json."""
    k = STEP_NAMES.index(step)
    msg = f"Step text {k + 1}"
    rec = {"level": 30, "time": 1, "msg": msg if legacy else f"[FONDATION_STEP_{i}/{n}] {msg}"}
    return json.dumps({**rec, "step": f"{i}/{n}", "phase": PHASES[k]})


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (  # older CLI: only the JSON fields, a plain message
            json.dumps(
                {"msg": "Reviewing and enhancing chapters", "step": "1/2", "phase": "Review"}
            ),
            StepLine(1, 2, "Reviewing and enhancing chapters", "Review"),
        ),
        (  # the marker wins over the field; the phase is kept
            json.dumps(
                {"msg": "[FONDATION_STEP_2/2] Tutorials", "step": "1/9", "phase": "Tutorials"}
            ),
            StepLine(2, 2, "Tutorials", "Tutorials"),
        ),
        (json.dumps({"msg": "x", "step": " 3/6 "}), StepLine(3, 6, "x")),
        (json.dumps({"step": "3/6"}), StepLine(3, 6, "")),
    ],
)
def test_legacy_json_step_fields(line: str, expected: StepLine) -> None:
    assert parse_step(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        json.dumps({"msg": "x", "step": "0/2"}),
        json.dumps({"msg": "x", "step": "3/2"}),
        json.dumps({"msg": "x", "step": 1}),
        json.dumps({"msg": "x", "step": "1/2/3"}),
        json.dumps({"msg": "x", "step": "one/two"}),
        json.dumps({"msg": "x", "phase": "Review"}),  # a phase alone is no step
        '"step": "1/2" in plain text',
    ],
)
def test_not_legacy_step_lines(line: str) -> None:
    assert parse_step(line) is None


@pytest.mark.parametrize("k", range(1, 7))
@pytest.mark.parametrize("legacy", [False, True])
def test_subset_numbering_maps_to_global_steps(k: int, legacy: bool) -> None:
    """A run of steps k..6 numbers them 1..(7-k); the plan reports k..6 of 6."""
    run = STEP_NAMES[k - 1 :]
    plan = StepPlan(run)
    lines = [_sim_line(i, len(run), s, legacy=legacy) for i, s in enumerate(run, start=1)]
    got = [plan.parse(line) for line in lines]
    assert [(s.index, s.total) for s in got if s] == [(g, 6) for g in range(k, 7)]
    assert [s.phase for s in got if s] == list(PHASES[k - 1 :])


def test_plan_by_position_without_phase() -> None:
    plan = StepPlan(("analyze", "review-chapters"))
    assert plan.parse("[FONDATION_STEP_1/2] a") == StepLine(2, 6, "a", "Analyze")
    assert plan.parse("[FONDATION_STEP_2/2] b") == StepLine(5, 6, "b", "Review")
    assert plan.parse("[FONDATION_STEP_4/6] c") == StepLine(4, 6, "c", "Generate")  # global
    assert plan.parse("[FONDATION_STEP_1/3] ?") is None  # neither this plan nor global
    assert StepPlan().parse("[FONDATION_STEP_3/6] o") == StepLine(3, 6, "o", "Order")


def test_phase_wins_over_position() -> None:
    line = json.dumps({"msg": "[FONDATION_STEP_1/2] x", "phase": "tutorials"})
    assert StepPlan(("review-chapters", "generate-tutorials")).parse(line) == StepLine(
        6, 6, "x", "Tutorials"
    )


def test_floor_and_invalid_plan() -> None:
    plan = StepPlan(STEP_NAMES[3:], floor=5)
    assert plan.start == (5, 6)
    assert StepPlan().start == (0, 0)
    got = plan.parse(_sim_line(1, 3, "generate-chapters"))
    assert got is not None and (got.index, got.total) == (5, 6)
    with pytest.raises(ValueError, match="floor"):
        StepPlan(floor=7)


def test_progress_never_goes_backwards_across_attempts() -> None:
    """Attempt 1 is killed in step 5; attempt 2 resumes with the remaining steps, in the legacy
    format: every report of attempt 2 is at or past the last of attempt 1, and global."""
    first = ProgressTracker(0.0, 15.0)
    seen = [first.set_phase(JobStatus.ANALYZING, "run", 0.0)]
    seen += first.feed_many([_sim_line(i, 6, s) for i, s in enumerate(STEP_NAMES[:5], 1)], 1.0)
    last = seen[-1].current_step
    assert (last, seen[-1].total_steps) == (5, 6)

    rest = STEP_NAMES[4:]
    second = ProgressTracker(0.0, 15.0, plan=StepPlan(rest, floor=last))
    again = [second.set_phase(JobStatus.CLONING, "cloning", 2.0)]
    lines = [_sim_line(i, 2, s, legacy=True) for i, s in enumerate(rest, start=1)]
    again += second.feed_many(["plain log", *lines, "done"], 3.0)
    again.append(second.final(JobStatus.COMPLETED, "done", 4.0))
    assert [(u.current_step, u.total_steps) for u in again] == [
        (5, 6),  # before the CLI starts: the floor, not 0
        (5, 6),
        (6, 6),
        (6, 6),
        (6, 6),
    ]
    assert again[2].message == "Step text 6"
    assert "plain log" in again[1].logs


def test_feed_and_feed_many_agree_on_legacy_lines() -> None:
    lines = [_sim_line(i, 6, s, legacy=True) for i, s in enumerate(STEP_NAMES, start=1)]
    one, many = ProgressTracker(1.0, 15.0), ProgressTracker(1.0, 15.0)
    singles = [u.current_step for line in lines if (u := one.feed(line, 0.0)) is not None]
    assert singles == [1, 2, 3, 4, 5, 6]
    assert [u.current_step for u in many.feed_many(lines, 0.0)] == singles


def test_step_flood_is_rate_limited_and_bounded() -> None:
    """A CLI alternating [1/2] and [2/2] with 60 KB lines (issue 11 item 5): after the burst
    allowance, at most one report per interval, and the step text cut like a log line."""
    t = make(min_interval=1.0, heartbeat=15.0)
    t.set_phase(JobStatus.ANALYZING, "running", 0.0)
    reports: list[Progress] = []
    lines = 2_000
    for k in range(lines):
        now = 5.0 * k / lines  # 400 step lines a second for 5 s
        line = f"[{k % 2 + 1}/2] " + "x" * 60_000
        reports += t.feed_many([line], now)
        if (tick := t.tick(now)) is not None:
            reports.append(tick)
    assert len(reports) <= 6 + t.step_burst  # the burst, then one a second
    assert all(len(r.message) <= 500 for r in reports)
    stored = sum(len(r.message) + sum(map(len, r.logs)) for r in reports)
    print(f"FIGURES step flood: {lines} lines of 60 KB in 5 s -> {len(reports)} reports, "
          f"{stored} chars of message and logs")  # fmt: skip
    assert stored <= (6 + t.step_burst) * 21 * 500
