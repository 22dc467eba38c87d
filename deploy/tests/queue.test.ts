import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { backoffMs, parseRetryAfter } from "../convex/model";
import { api, createAndDispatch, creds, fakeWorker, internal, job, newT, settle, setupEnv } from "./helpers";

beforeEach(() => {
  vi.useFakeTimers({ now: new Date("2026-11-28T10:00:00Z") });
  setupEnv();
});
afterEach(() => {
  vi.useRealTimers();
  vi.unstubAllEnvs();
  vi.unstubAllGlobals();
});

describe("create", () => {
  it("queues with defaults", async () => {
    const t = newT();
    const jobId = await t.mutation(api.fondation.create, { repositoryUrl: "https://github.com/o/r.git" });
    const j = await job(t, jobId);
    // A free slot: the same transaction already reserved it and scheduled the delivery.
    expect(j).toMatchObject({ status: "dispatched", priority: 0, attempt: 1, maxAttempts: 3, progress: 0, docsCount: 0 });
  });

  it("rejects junk input with a ConvexError", async () => {
    const t = newT();
    await expect(t.mutation(api.fondation.create, { repositoryUrl: "file:///etc" })).rejects.toThrow(/repositoryUrl/);
    await expect(t.mutation(api.fondation.create, { repositoryUrl: "https://x/y", ref: "--upload-pack=x" })).rejects.toThrow(/ref/);
    // The worker's schema takes integer priorities within ±1e6 only.
    await expect(t.mutation(api.fondation.create, { repositoryUrl: "https://x/y", priority: 1.5 })).rejects.toThrow(/priority/);
    await expect(t.mutation(api.fondation.create, { repositoryUrl: "https://x/y", priority: 2e6 })).rejects.toThrow(/priority/);
    await expect(
      t.mutation(api.fondation.create, { repositoryUrl: "https://x/y", options: { model: "x; rm -rf /" } }),
    ).rejects.toThrow(/model/);
    await expect(
      t.mutation(api.fondation.create, { repositoryUrl: "https://x/y", options: { steps: ["--evil"] } }),
    ).rejects.toThrow(/steps/);
    await expect(
      // @ts-expect-error: validators refuse unknown option keys
      t.mutation(api.fondation.create, { repositoryUrl: "https://x/y", options: { evil: 1 } }),
    ).rejects.toThrow();
    expect(await t.run(async (ctx) => (await ctx.db.query("jobs").collect()).length)).toBe(0);
  });
});

describe("capacity and priority", () => {
  it("never runs more than MAX_PARALLEL and picks highest priority, then oldest", async () => {
    const t = newT();
    const worker = fakeWorker();
    const a = await createAndDispatch(t, worker, { priority: 0 });
    const b = await createAndDispatch(t, worker, { priority: 0 });
    const low = await createAndDispatch(t, worker, { priority: 1 });
    await vi.advanceTimersByTimeAsync(10);
    const high1 = await createAndDispatch(t, worker, { priority: 5 });
    await vi.advanceTimersByTimeAsync(10);
    const high2 = await createAndDispatch(t, worker, { priority: 5 });
    const started = () => worker.starts().map((s) => s.json.data.jobId);
    expect(started()).toEqual([a, b]);

    const ca = await creds(t, a);
    await t.mutation(api.fondation.claim, ca);
    await t.mutation(api.fondation.complete, { ...ca, docsCount: 0, durationMs: 1 });
    await settle(t);
    expect(started()).toEqual([a, b, high1]);

    const cb = await creds(t, b);
    await t.mutation(api.fondation.claim, cb);
    await t.mutation(api.fondation.fail, { ...cb, code: "cli_failed", message: "x", retryable: false });
    await settle(t);
    expect(started()).toEqual([a, b, high1, high2]);

    await t.mutation(api.fondation.cancel, { jobId: high1 });
    await settle(t);
    expect(started()).toEqual([a, b, high1, high2, low]);
    const active = await t.run(async (ctx) =>
      (await ctx.db.query("jobs").collect()).filter((j) => !["pending", "completed", "failed", "canceled", "dead"].includes(j.status)),
    );
    expect(active).toHaveLength(2);
  });

  it("a dead job frees its slot too", async () => {
    vi.stubEnv("MAX_PARALLEL", "1");
    const t = newT();
    let first = true;
    const worker = fakeWorker(() => {
      const r = first ? new Response("{\"detail\":\"nope\"}", { status: 400 }) : new Response(null, { status: 202 });
      first = false;
      return r;
    });
    const a = await t.mutation(api.fondation.create, { repositoryUrl: "https://github.com/o/a.git" });
    const b = await t.mutation(api.fondation.create, { repositoryUrl: "https://github.com/o/b.git" });
    await settle(t);
    expect((await job(t, a)).status).toBe("dead");
    expect((await job(t, b)).status).toBe("dispatched");
    expect(worker.starts()).toHaveLength(2);
  });

  it("pump dispatches nothing while full and nothing not yet due", async () => {
    vi.stubEnv("MAX_PARALLEL", "1");
    const t = newT();
    const worker = fakeWorker();
    await createAndDispatch(t, worker);
    await createAndDispatch(t, worker);
    expect(await t.mutation(internal.fondation.pump, {})).toEqual({ dispatched: 0 });
    expect(worker.starts()).toHaveLength(1);
  });
});

describe("sweeper", () => {
  it("re-dispatches a job never claimed, with a new token, and cancels the old attempt", async () => {
    const t = newT();
    const worker = fakeWorker();
    const jobId = await createAndDispatch(t, worker);
    const old = await creds(t, jobId);
    expect(await t.mutation(internal.fondation.sweep, {})).toEqual({ redispatched: 0, dead: 0, dispatched: 0 });
    await vi.advanceTimersByTimeAsync(60_001);
    expect(await t.mutation(internal.fondation.sweep, {})).toEqual({ redispatched: 1, dead: 0, dispatched: 1 });
    await settle(t);
    const starts = worker.starts();
    expect(starts).toHaveLength(2);
    expect(starts[1]!.json.data.attempt).toBe(2);
    expect(starts[1]!.json.data.callbackToken).not.toBe(old.callbackToken);
    const cancel = worker.sent.find((s) => s.json.type === "job.cancel")!;
    expect(cancel.json.data).toEqual({ jobId, attempt: 1 });
    expect(await t.mutation(api.fondation.claim, old)).toEqual({ ok: false, reason: "stale_attempt" });
    const j = await job(t, jobId);
    expect(j.lastError?.code).toBe("claim_timeout");
  });

  it("re-dispatches a running job whose lease expired; progress keeps it alive", async () => {
    const t = newT();
    const worker = fakeWorker();
    const jobId = await createAndDispatch(t, worker);
    const c = await creds(t, jobId);
    await t.mutation(api.fondation.claim, c);
    await vi.advanceTimersByTimeAsync(50_000);
    await t.mutation(api.fondation.progress, { ...c, seq: 1, status: "cloning", currentStep: 1, totalSteps: 3, message: "clone" });
    await vi.advanceTimersByTimeAsync(50_000);
    expect((await t.mutation(internal.fondation.sweep, {})).redispatched).toBe(0);
    await vi.advanceTimersByTimeAsync(10_001);
    expect((await t.mutation(internal.fondation.sweep, {})).redispatched).toBe(1);
    const j = await job(t, jobId);
    expect(j.lastError?.code).toBe("lease_expired");
    expect(j.attempt).toBe(2);
    expect(await t.mutation(api.fondation.progress, { ...c, seq: 2, status: "cloning", currentStep: 1, totalSteps: 3, message: "x" })).toEqual({
      ok: false,
      reason: "stale_attempt",
    });
  });

  it("declares the job dead after maxAttempts", async () => {
    const t = newT();
    const worker = fakeWorker();
    const jobId = await createAndDispatch(t, worker, { maxAttempts: 2 });
    await vi.advanceTimersByTimeAsync(70_001);
    await t.mutation(internal.fondation.sweep, {});
    await settle(t);
    expect((await job(t, jobId)).attempt).toBe(2);
    await vi.advanceTimersByTimeAsync(70_001);
    expect(await t.mutation(internal.fondation.sweep, {})).toMatchObject({ redispatched: 0, dead: 1 });
    const j = await job(t, jobId);
    expect(j.status).toBe("dead");
    expect(j.error?.code).toBe("claim_timeout");
    expect(worker.starts()).toHaveLength(2);
  });

  it("dispatches jobs left pending when a scheduled pump was lost", async () => {
    vi.stubEnv("WORKER_URL", "");
    const t = newT();
    const worker = fakeWorker();
    const jobId = await t.mutation(api.fondation.create, { repositoryUrl: "https://github.com/o/r.git" });
    await settle(t);
    vi.stubEnv("WORKER_URL", "http://worker.test");
    await t.run(async (ctx) => ctx.db.patch(jobId, { nextAttemptAt: 0 }));
    await t.mutation(internal.fondation.sweep, {});
    await settle(t);
    expect(worker.starts()).toHaveLength(1);
  });
});

describe("backoff helpers", () => {
  it("doubles from RETRY_BASE_MS with equal jitter, capped", () => {
    expect(backoffMs(1, 0)).toBe(500);
    expect(backoffMs(1, 1)).toBe(1000);
    expect(backoffMs(3, 0)).toBe(2000);
    expect(backoffMs(3, 1)).toBe(4000);
    expect(backoffMs(30, 1)).toBe(60_000);
  });

  it("parses Retry-After seconds and dates within bounds", () => {
    const now = Date.parse("2026-11-28T10:00:00Z");
    expect(parseRetryAfter("7", now)).toBe(7000);
    expect(parseRetryAfter("0", now)).toBe(1000);
    expect(parseRetryAfter(null, now)).toBe(30_000);
    expect(parseRetryAfter("garbage", now)).toBe(30_000);
    expect(parseRetryAfter("Sat, 28 Nov 2026 10:01:00 GMT", now)).toBe(60_000);
    expect(parseRetryAfter("999999", now)).toBe(3_600_000);
  });
});
