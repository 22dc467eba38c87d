/** The operator's board functions (docs/BOARD.md), through the host's `operatorApi()` re-exports. */
import { describe, expect, it, vi } from "vitest";
import { api, createJob, creds, fakeWorker, hostJob, inComponent, internal, newT, run, settle, setupEnv, table, useFakeHost, type T } from "./helpers";

const BOARD = "board-secret-shared-with-the-worker";
const WRONG = "board-secret-shared-with-the-workeR";

useFakeHost({ FONDATION_BOARD_SECRET: BOARD });

const snapshot = (t: T, page = 1, pageSize = 20) =>
  t.query(api.fondation.boardSnapshot, { boardSecret: BOARD, page, pageSize });
const pendingIds = async (t: T) => (await snapshot(t)).pending.map((r) => r.jobId);

/** Every component table the operator functions could write. */
async function state(t: T) {
  const names = ["runs", "leases", "queue", "docs", "boardState", "boardSteps", "boardLogs", "loopState"];
  return Object.fromEntries(await Promise.all(names.map(async (n) => [n, await table(t, n)] as const)));
}

async function failedRun(t: T, worker: ReturnType<typeof fakeWorker>) {
  const { jobId, runId } = await createJob(t, { maxAttempts: 1 });
  const c = creds(worker, runId);
  await t.mutation(api.fondation.claim, c);
  await t.mutation(api.fondation.progress, { ...c, seq: 1, status: "analyzing", currentStep: 2, totalSteps: 6, message: "reading" });
  await t.mutation(api.fondation.fail, { ...c, code: "cli_failed", message: "exit 3", retryable: false });
  return { jobId, runId, c };
}

describe("board secret", () => {
  it("a wrong, empty or unconfigured secret is refused with forbidden and changes nothing", async () => {
    const t = newT();
    const worker = fakeWorker();
    const { runId } = await failedRun(t, worker);
    const { runId: pendingId } = await createJob(t, {}, false);
    const before = await state(t);
    const calls = (boardSecret: string) => [
      t.query(api.fondation.boardSnapshot, { boardSecret, page: 1, pageSize: 20 }),
      t.query(api.fondation.boardJob, { boardSecret, jobId: runId }),
      t.mutation(api.fondation.retry, { boardSecret, jobId: runId }),
      t.mutation(api.fondation.cancelJob, { boardSecret, jobId: pendingId }),
      t.mutation(api.fondation.setPriority, { boardSecret, jobId: pendingId, priority: 9 }),
    ];
    for (const secret of [WRONG, "", BOARD.slice(0, -1)]) {
      for (const call of calls(secret)) await expect(call).rejects.toThrow(/forbidden/);
    }
    // With no secret configured on the host, even an empty one is refused.
    vi.stubEnv("FONDATION_BOARD_SECRET", "");
    for (const call of calls("")) await expect(call).rejects.toThrow(/forbidden/);
    // A configured secret that is too short does not open the board either.
    vi.stubEnv("FONDATION_BOARD_SECRET", "short");
    for (const call of calls("short")) await expect(call).rejects.toThrow(/forbidden/);
    expect(await state(t)).toEqual(before);
    expect((await run(t, runId)).status).toBe("failed");
  });
});

describe("retry", () => {
  it("a failed run gets attempt 2, which the loop dispatches with a new token", async () => {
    const t = newT();
    const worker = fakeWorker();
    const { jobId, runId, c } = await failedRun(t, worker);
    expect(await t.mutation(api.fondation.retry, { boardSecret: BOARD, jobId: runId })).toEqual({
      ok: true,
      message: "attempt 2 queued",
    });
    expect(await run(t, runId)).toMatchObject({ status: "pending", attempt: 2, lastError: { code: "cli_failed" } });
    expect((await run(t, runId)).error).toBeUndefined();
    expect((await hostJob(t, jobId)).progress).toMatch(/^Retrying \(attempt 2\): exit 3/);
    await settle(t);
    const second = worker.starts().at(-1)!;
    expect(second.json.data).toMatchObject({ jobId: runId, attempt: 2 });
    expect(second.json.data.callbackToken).not.toBe(c.callbackToken);
    expect((await run(t, runId)).status).toBe("dispatched");
    // The first attempt's worker is told it is stale; its repeated fail is acknowledged.
    expect(await t.mutation(api.fondation.claim, c)).toEqual({ ok: false, reason: "stale_attempt" });
    expect(await t.mutation(api.fondation.fail, { ...c, code: "cli_failed", message: "exit 3", retryable: false })).toEqual({ ok: true });
    // The job page shows both attempts and the first one's step.
    const c2 = creds(worker, runId);
    await t.mutation(api.fondation.claim, c2);
    await t.mutation(api.fondation.progress, { ...c2, seq: 1, status: "analyzing", currentStep: 1, totalSteps: 6, message: "one", logs: ["a", "b"] });
    const job = (await t.query(api.fondation.boardJob, { boardSecret: BOARD, jobId: runId }))!;
    expect(job.job).toMatchObject({ jobId: runId, attempt: 2, status: "analyzing", currentStep: 1, runner: "warm", claimedBy: "w1" });
    expect(job.attempts.map((a) => [a.attempt, a.status, a.error?.code ?? null])).toEqual([
      [1, "failed", "cli_failed"],
      [2, "analyzing", null],
    ]);
    expect(job.steps.map((s) => [s.step, s.message])).toEqual([[1, "one"]]);
    expect(job.logs).toEqual(["a", "b"]);
    // Only failed or dead runs are retried; an unknown id is an answer, not an error.
    expect(await t.mutation(api.fondation.retry, { boardSecret: BOARD, jobId: runId })).toEqual({
      ok: false,
      message: "only failed or dead jobs are retried (this one is analyzing)",
    });
    expect(await t.mutation(api.fondation.retry, { boardSecret: BOARD, jobId: "nope" })).toEqual({ ok: false, message: "unknown job" });
  });

  it("the job page shows how each attempt ended, automatic retries included", async () => {
    const t = newT();
    const worker = fakeWorker();
    const { runId } = await createJob(t, { maxAttempts: 2 });
    const c1 = creds(worker, runId);
    await t.mutation(api.fondation.claim, c1);
    await t.mutation(api.fondation.progress, { ...c1, seq: 1, status: "cloning", currentStep: 0, totalSteps: 0, message: "cloning" });
    await t.mutation(api.fondation.fail, { ...c1, code: "clone_failed", message: "503 from git", retryable: true });
    await settle(t, 5_000);
    const c2 = creds(worker, runId);
    await t.mutation(api.fondation.claim, c2);
    await t.mutation(api.fondation.fail, { ...c2, code: "cli_failed", message: "exit 3", retryable: false });
    expect(await t.mutation(api.fondation.retry, { boardSecret: BOARD, jobId: runId })).toMatchObject({ ok: true });
    const job = (await t.query(api.fondation.boardJob, { boardSecret: BOARD, jobId: runId }))!;
    expect(job.attempts.map((a) => [a.attempt, a.status, a.error?.code ?? null])).toEqual([
      [1, "failed", "clone_failed"],
      [2, "failed", "cli_failed"],
      [3, "pending", null],
    ]);
  });
});

describe("cancel", () => {
  it("cancels a pending run, and a running one with a job.cancel to its worker", async () => {
    const t = newT();
    setupEnv({ FONDATION_BOARD_SECRET: BOARD, FONDATION_MAX_PARALLEL: "1" });
    const worker = fakeWorker();
    const { runId: running } = await createJob(t);
    const { jobId: pendingJob, runId: pending } = await createJob(t);
    await t.mutation(api.fondation.claim, creds(worker, running));
    expect(await t.mutation(api.fondation.cancelJob, { boardSecret: BOARD, jobId: pending })).toEqual({ ok: true, message: "canceled" });
    expect((await run(t, pending)).status).toBe("canceled");
    expect((await hostJob(t, pendingJob)).status).toBe("canceled");
    expect(await t.mutation(api.fondation.cancelJob, { boardSecret: BOARD, jobId: running })).toEqual({ ok: true, message: "canceled" });
    await settle(t);
    const cancels = worker.sent.filter((s) => s.json.type === "job.cancel");
    expect(cancels.map((s) => s.json.data.jobId)).toEqual([running]);
    expect(worker.starts().map((s) => s.json.data.jobId)).toEqual([running]); // the pending one never went out
    expect(await t.mutation(api.fondation.cancelJob, { boardSecret: BOARD, jobId: "nope" })).toEqual({ ok: false, message: "unknown job" });
    const { runId: done, c } = await failedRun(t, worker);
    expect(await t.mutation(api.fondation.cancelJob, { boardSecret: BOARD, jobId: done })).toEqual({ ok: false, message: "already failed" });
    expect(c.jobId).toBe(done);
  });
});

describe("setPriority", () => {
  it("re-ranks a pending run in the queue, and the loop dispatches in the new order", async () => {
    const t = newT();
    setupEnv({ FONDATION_BOARD_SECRET: BOARD, FONDATION_MAX_PARALLEL: "1" });
    const worker = fakeWorker();
    const { runId: first } = await createJob(t);
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) {
      vi.advanceTimersByTime(10); // distinct ages
      ids.push((await createJob(t)).runId);
    }
    const [a, b, c] = ids as [string, string, string];
    expect(await pendingIds(t)).toEqual([a, b, c]);
    const v0 = (await snapshot(t)).version;
    expect(await t.mutation(api.fondation.setPriority, { boardSecret: BOARD, jobId: c, priority: 5 })).toEqual({
      ok: true,
      message: "priority set to 5",
    });
    expect(await t.mutation(api.fondation.setPriority, { boardSecret: BOARD, jobId: a, priority: -1 })).toMatchObject({ ok: true });
    expect(await pendingIds(t)).toEqual([c, b, a]);
    expect((await snapshot(t)).version).not.toBe(v0);
    expect((await snapshot(t)).pending[0]).toMatchObject({ jobId: c, priority: 5, status: "pending" });
    // Refused: a running run, a priority out of range or not an integer.
    for (const [jobId, priority] of [[first, 1], [b, 1001], [b, 1.5]] as const) {
      expect(await t.mutation(api.fondation.setPriority, { boardSecret: BOARD, jobId, priority })).toMatchObject({ ok: false });
    }
    // The running one ends: the loop takes the re-ranked head of the queue.
    const c1 = creds(worker, first);
    await t.mutation(api.fondation.claim, c1);
    await t.mutation(api.fondation.complete, { ...c1, docsCount: 0, durationMs: 1 });
    await settle(t);
    expect(worker.starts().map((s) => s.json.data.jobId)).toEqual([first, c]);
  });
});

describe("boardSnapshot", () => {
  it("pages finished runs newest first, keeps counts without a scan, and moves its version on each change", async () => {
    const t = newT();
    setupEnv({ FONDATION_BOARD_SECRET: BOARD, FONDATION_MAX_PARALLEL: "1" });
    const worker = fakeWorker();
    const { runId: running } = await createJob(t);
    const canceled: string[] = [];
    for (let i = 0; i < 25; i++) {
      vi.advanceTimersByTime(5);
      const { runId } = await createJob(t, {}, false);
      await t.mutation(api.fondation.cancelJob, { boardSecret: BOARD, jobId: runId });
      canceled.push(runId);
    }
    await settle(t);
    const newestFirst = [...canceled].reverse();
    const p1 = await snapshot(t, 1, 10);
    const p3 = await snapshot(t, 3, 10);
    expect(p1.recent.map((r) => r.jobId)).toEqual(newestFirst.slice(0, 10));
    expect(p1.hasNext).toBe(true);
    expect(p3.recent.map((r) => r.jobId)).toEqual(newestFirst.slice(20));
    expect(p3.hasNext).toBe(false);
    expect((await snapshot(t, 4, 10)).recent).toEqual([]);
    expect(p1.counts).toEqual({ dispatched: 1, canceled: 25 });
    expect(p1.running.map((r) => r.jobId)).toEqual([running]);
    expect(p1.running[0]!.leaseUntil).toBeGreaterThan(Date.now());
    // The counts agree with the table as it goes through claim, steps, docs and completion.
    const c = creds(worker, running);
    const versions = [p1.version];
    const moved = async () => {
      const s = await snapshot(t);
      expect(s.version).not.toBe(versions.at(-1));
      versions.push(s.version);
      const tally: Record<string, number> = {};
      for (const r of await table(t, "runs")) tally[r.status] = (tally[r.status] ?? 0) + 1;
      expect(s.counts).toEqual(tally);
      return s;
    };
    await t.mutation(api.fondation.claim, c);
    await moved();
    await t.mutation(api.fondation.progress, { ...c, seq: 1, status: "analyzing", currentStep: 1, totalSteps: 6, message: "one" });
    expect((await moved()).running[0]).toMatchObject({ status: "analyzing", currentStep: 1, totalSteps: 6, message: "one" });
    await t.mutation(api.fondation.progress, { ...c, seq: 2, status: "analyzing", currentStep: 2, totalSteps: 6, message: "two" });
    await moved();
    // A bare heartbeat changes nothing the board shows: same version.
    await t.mutation(api.fondation.progress, { ...c, seq: 3, status: "analyzing", currentStep: 2, totalSteps: 6, message: "two" });
    expect((await snapshot(t)).version).toBe(versions.at(-1));
    await t.mutation(api.fondation.complete, { ...c, docsCount: 0, durationMs: 5 });
    const done = await moved();
    expect(done.counts).toEqual({ completed: 1, canceled: 25 });
    expect(done.recent[0]!.jobId).toBe(running);
    // Bounded arguments: a huge page size is clamped, a far page is empty.
    expect((await snapshot(t, 1, 10_000)).recent).toHaveLength(26);
    expect((await snapshot(t, 1_000_000, 50)).recent).toEqual([]);
    expect((await table(t, "boardState")).length).toBeLessThanOrEqual(16); // shards, not one row per run
  });

  it("shows the pending queue in dispatch order with its total", async () => {
    const t = newT();
    setupEnv({ FONDATION_BOARD_SECRET: BOARD, FONDATION_MAX_PARALLEL: "1" });
    fakeWorker();
    await createJob(t);
    const ids: string[] = [];
    for (let i = 0; i < 12; i++) {
      vi.advanceTimersByTime(5);
      ids.push((await createJob(t, { priority: i === 11 ? 3 : 0 }, false)).runId);
    }
    const s = await snapshot(t);
    expect(s.pendingTotal).toBe(12);
    expect(s.pending.map((r) => r.jobId)).toEqual([ids[11], ...ids.slice(0, 9)]);
    expect(s.counts.pending).toBe(12);
    expect(await t.query(internal.jobs.runStatus, { runId: ids[0]! })).toMatchObject({ status: "pending" });
  });
});

describe("bounded reads", () => {
  it("with 1,500 finished runs, pages stop 1,000 deep and every read stays within the limits", async () => {
    const t = newT();
    fakeWorker();
    const now = Date.now();
    // Inserted directly, 500 per transaction (so not counted): this is about the lists' reads.
    for (let batch = 0; batch < 3; batch++) {
      await inComponent(t, async (ctx) => {
        for (let i = 0; i < 500; i++) {
          const at = now - (batch * 500 + i) * 1000;
          await ctx.db.insert("runs", {
            status: "completed", repositoryUrl: "https://github.com/o/r.git", priority: 0, attempt: 1, maxAttempts: 3,
            currentStep: 6, totalSteps: 6, progress: 1, message: "completed: 7 docs", storedDocs: 7, docsCount: 7,
            createdAt: at - 60_000, updatedAt: at, finishedAt: at,
          });
        }
      });
    }
    const first = await snapshot(t, 1, 50);
    expect(first.recent).toHaveLength(50);
    expect(first.recent[0]!.updatedAt).toBe(now); // newest first
    const last = await snapshot(t, 20, 50);
    expect(last.recent).toHaveLength(50);
    expect(last.hasNext).toBe(false);
    expect((await snapshot(t, 21, 50)).recent).toEqual([]);
  });
});
