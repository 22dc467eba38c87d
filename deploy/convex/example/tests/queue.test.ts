/** The queue: retries with backoff, cancel, lease expiry, concurrency, priority. */
import { describe, expect, it, vi } from "vitest";
import { api, createJob, creds, fakeWorker, hostJob, internal, lease, newT, problem, run, settle, table, useFakeHost } from "./helpers";

useFakeHost();

describe("retries", () => {
  it("retries a failing delivery with growing backoff, then ends dead and tells the host", async () => {
    const t = newT();
    const worker = fakeWorker(() => problem(500, "boom"));
    const { jobId, runId } = await createJob(t, { maxAttempts: 3 });
    expect((await run(t, runId)).attempt).toBe(2);
    await settle(t, 120_000);
    const r = await run(t, runId);
    expect(r.status).toBe("dead");
    expect(r.error).toEqual({ code: "dispatch_failed", message: "worker answered 500: boom" });
    const starts = worker.starts();
    expect(starts.map((s) => s.json.data.attempt)).toEqual([1, 2, 3]);
    // Each attempt has its own token, and backoff grows: base 1 s then 2 s (equal jitter).
    expect(new Set(starts.map((s) => s.json.data.callbackToken)).size).toBe(3);
    const [g1, g2] = [starts[1]!.at - starts[0]!.at, starts[2]!.at - starts[1]!.at];
    // Equal jitter: attempt 2 waits 500..1000 ms (base 1 s), attempt 3 1000..2000 ms.
    expect(g1).toBeGreaterThanOrEqual(500);
    expect(g1).toBeLessThan(1_100);
    expect(g2).toBeGreaterThanOrEqual(1_000);
    expect(g2).toBeLessThan(2_100);
    const host = await hostJob(t, jobId);
    expect(host.status).toBe("failed");
    expect(host.error).toBe("worker answered 500: boom");
    expect(typeof host.completedAt).toBe("number");
  });

  it("a retryable worker failure goes back to the queue after backoff as the next attempt", async () => {
    const t = newT();
    const worker = fakeWorker();
    const { jobId, runId } = await createJob(t);
    const c = creds(worker, runId);
    await t.mutation(api.fondation.claim, c);
    const failedAt = Date.now();
    expect(
      await t.mutation(api.fondation.fail, { ...c, code: "clone_failed", message: "503 from git", retryable: true }),
    ).toEqual({ ok: true });
    const r = await run(t, runId);
    expect(r).toMatchObject({ status: "pending", attempt: 2, lastError: { code: "clone_failed" } });
    expect((await hostJob(t, jobId)).progress).toMatch(/^Retrying \(attempt 2\)/);
    await settle(t, 5_000);
    const second = worker.starts().at(-1)!;
    expect(second.json.data.attempt).toBe(2);
    // Backoff for attempt 2 is in [base/2, base] = [500, 1000] ms.
    const delay = (await run(t, runId)).dispatchedAt - failedAt;
    expect(delay).toBeGreaterThanOrEqual(500);
    expect(delay).toBeLessThanOrEqual(1_100);
    // The old attempt's repeated fail is acknowledged, its other calls are stale.
    expect(await t.mutation(api.fondation.fail, { ...c, code: "clone_failed", message: "again", retryable: true })).toEqual({ ok: true });
    expect(await t.mutation(api.fondation.claim, c)).toEqual({ ok: false, reason: "stale_attempt" });
  });

  it("a busy worker (503 + Retry-After) gets the byte-identical webhook later, without spending an attempt", async () => {
    const t = newT();
    let busy = true;
    const worker = fakeWorker(() => (busy ? problem(503, "full", { "retry-after": "7" }) : new Response("{}", { status: 202 })));
    const { runId } = await createJob(t);
    expect(await run(t, runId)).toMatchObject({ status: "pending", attempt: 1 });
    await settle(t, 3_000);
    expect(worker.starts()).toHaveLength(1); // Retry-After is honoured
    busy = false;
    await settle(t, 5_000);
    const [first, again] = worker.starts();
    // The worker dedupes on webhook-id + body: a re-send must be the same bytes (same token,
    // same message time), or it would answer 422 and the run would end dead.
    expect(again!.headers["webhook-id"]).toBe(`${runId}:1`);
    expect(again!.body).toBe(first!.body);
    expect((await run(t, runId)).status).toBe("dispatched");
    expect((await lease(t, runId)).sends).toBe(2);
    expect(await t.mutation(api.fondation.claim, creds(worker, runId))).toEqual({ ok: true });
  });
});

describe("cancel", () => {
  it("cancels a running job: the worker gets job.cancel, its callbacks are refused, the slot is reused", async () => {
    vi.stubEnv("FONDATION_MAX_PARALLEL", "1");
    const t = newT();
    const worker = fakeWorker();
    const first = await createJob(t);
    const second = await createJob(t);
    expect((await run(t, second.runId)).status).toBe("pending");
    const c = creds(worker, first.runId);
    await t.mutation(api.fondation.claim, c);
    expect(await t.mutation(api.jobs.cancel, { jobId: first.jobId }).catch((e: Error) => e.message)).toMatch(/sign in/);
    const asUser = t.withIdentity({ subject: "user-1" });
    expect(await asUser.mutation(api.jobs.cancel, { jobId: first.jobId })).toEqual({ ok: true, status: "canceled" });
    await settle(t);
    const cancel = worker.sent.find((s) => s.json.type === "job.cancel")!;
    expect(cancel.json.data).toEqual({ jobId: first.runId, attempt: 1 });
    expect(cancel.headers["webhook-id"]).toBe(`${first.runId}:1:cancel`);
    expect(await t.mutation(api.fondation.progress, { ...c, seq: 1, status: "cloning", currentStep: 0, totalSteps: 0, message: "x" })).toEqual({
      ok: false,
      reason: "canceled",
    });
    expect((await hostJob(t, first.jobId)).status).toBe("canceled");
    expect((await run(t, second.runId)).status).toBe("dispatched");
    // Another user cannot cancel it.
    const other = t.withIdentity({ subject: "user-2" });
    await expect(other.mutation(api.jobs.cancel, { jobId: second.jobId })).rejects.toThrow(/no such job/);
  });

  it("cancels a queued job without a webhook", async () => {
    vi.stubEnv("FONDATION_MAX_PARALLEL", "1");
    const t = newT();
    const worker = fakeWorker();
    await createJob(t);
    const queued = await createJob(t);
    await t.withIdentity({ subject: "user-1" }).mutation(api.jobs.cancel, { jobId: queued.jobId });
    await settle(t);
    expect(worker.sent.filter((s) => s.json.type === "job.cancel")).toHaveLength(0);
    expect((await run(t, queued.runId)).status).toBe("canceled");
  });
});

describe("lease expiry", () => {
  it("re-dispatches a run whose worker went silent, and tells the old attempt to stop", async () => {
    const t = newT();
    const worker = fakeWorker();
    const { runId } = await createJob(t);
    const c = creds(worker, runId);
    await t.mutation(api.fondation.claim, c);
    await t.mutation(api.fondation.progress, { ...c, seq: 1, status: "analyzing", currentStep: 2, totalSteps: 6, message: "s" });
    // Lease 60 s, checked every 10 s: attempt 2 goes out within 70 s.
    await settle(t, 71_000);
    const r = await run(t, runId);
    expect(r).toMatchObject({ status: "dispatched", attempt: 2, lastError: { code: "lease_expired" } });
    expect(worker.starts().map((s) => s.json.data.attempt)).toEqual([1, 2]);
    expect(worker.sent.find((s) => s.json.type === "job.cancel")!.json.data).toEqual({ jobId: runId, attempt: 1 });
    expect(await t.mutation(api.fondation.progress, { ...c, seq: 2, status: "analyzing", currentStep: 3, totalSteps: 6, message: "s" })).toEqual({
      ok: false,
      reason: "stale_attempt",
    });
  });

  it("a run never claimed is re-dispatched after the claim timeout, and ends dead when attempts run out", async () => {
    const t = newT();
    const worker = fakeWorker();
    const { runId, jobId } = await createJob(t, { maxAttempts: 2 });
    await settle(t, 200_000);
    expect(worker.starts().map((s) => s.json.data.attempt)).toEqual([1, 2]);
    expect(await run(t, runId)).toMatchObject({ status: "dead", error: { code: "claim_timeout" } });
    expect((await hostJob(t, jobId)).status).toBe("failed");
    // The loop goes idle once nothing is active.
    const [state] = await table(t, "loopState");
    expect(state.state.kind).toBe("idle");
  });
});

describe("producers only insert", () => {
  it("50 concurrent enqueues all succeed; the loop dispatches up to maxParallel, highest priority first", async () => {
    vi.stubEnv("FONDATION_MAX_PARALLEL", "3");
    const t = newT();
    const worker = fakeWorker();
    const results = await Promise.all(
      Array.from({ length: 50 }, (_, i) =>
        t.mutation(internal.jobs.create, {
          userId: `user-${i}`,
          repositoryUrl: `https://github.com/owner/repo-${i}.git`,
          priority: i === 37 ? 10 : i === 12 ? 5 : 0,
        }),
      ),
    );
    expect(new Set(results.map((r) => r.runId)).size).toBe(50);
    await settle(t);
    const runs = await table(t, "runs");
    expect(runs).toHaveLength(50);
    const dispatched = worker.starts().map((s) => s.json.data.repository.url);
    // Priority 10, then 5, then the oldest of priority 0.
    expect(dispatched).toEqual([
      "https://github.com/owner/repo-37.git",
      "https://github.com/owner/repo-12.git",
      "https://github.com/owner/repo-0.git",
    ]);
    expect(runs.filter((r) => r.status === "pending")).toHaveLength(47);
    expect(await table(t, "queue")).toHaveLength(47);
    // Freeing a slot dispatches the next one in order.
    const c = creds(worker, results[37]!.runId);
    await t.mutation(api.fondation.claim, c);
    await t.mutation(api.fondation.complete, { ...c, docsCount: 0, durationMs: 1 });
    await settle(t);
    expect(worker.starts().at(-1)!.json.data.repository.url).toBe("https://github.com/owner/repo-1.git");
  });

  it("refuses bad input with a coded ConvexError before anything is queued", async () => {
    const t = newT();
    fakeWorker();
    for (const [args, code] of [
      [{ repositoryUrl: "file:///etc/passwd" }, "invalid_repository_url"],
      [{ repositoryUrl: "https://github.com/a/b.git", priority: 1.5 }, "invalid_priority"],
      [{ repositoryUrl: "https://github.com/a/b.git", maxAttempts: 0 }, "invalid_max_attempts"],
    ] as const) {
      const err = await t.mutation(internal.jobs.create, { userId: "u", ...args }).catch((e) => e);
      expect(err.data).toMatchObject({ code });
    }
    expect(await table(t, "runs")).toHaveLength(0);
  });
});
