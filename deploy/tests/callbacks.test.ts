import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import type { Id } from "../convex/_generated/dataModel";
import { api, createAndDispatch, creds, fakeWorker, job, newT, settle, setupEnv, type T } from "./helpers";

beforeEach(() => {
  vi.useFakeTimers({ now: new Date("2026-11-28T10:00:00Z") });
  setupEnv();
});
afterEach(() => {
  vi.useRealTimers();
  vi.unstubAllEnvs();
  vi.unstubAllGlobals();
});

async function dispatched(t: T) {
  const worker = fakeWorker();
  const jobId = await createAndDispatch(t, worker);
  return { jobId, worker, c: await creds(t, jobId) };
}

async function claimed(t: T) {
  const d = await dispatched(t);
  expect(await t.mutation(api.fondation.claim, d.c)).toEqual({ ok: true });
  return d;
}

const step = (seq: number, status: "claimed" | "cloning" | "analyzing" | "gathering", extra: object = {}) => ({
  seq,
  status,
  currentStep: seq,
  totalSteps: 4,
  message: `step ${seq}`,
  ...extra,
});

const doc = (slug: string, kind: "yaml" | "chapter" | "tutorial", chapterIndex: number | null, content = `# ${slug}`) => ({
  slug,
  title: slug,
  kind,
  chapterIndex,
  content,
});

/** Snapshot of everything a refused call must leave untouched. */
async function snapshot(t: T, jobId: Id<"jobs">) {
  return t.run(async (ctx) => ({
    job: await ctx.db.get(jobId),
    docs: await ctx.db.query("docs").collect(),
    logs: await ctx.db.query("jobLogs").collect(),
  }));
}

describe("claim", () => {
  it("claims a dispatched job and sets lease and claimedBy", async () => {
    const t = newT();
    const { jobId } = await claimed(t);
    const j = await job(t, jobId);
    expect(j.status).toBe("claimed");
    expect(j.claimedBy).toBe("w1");
    expect(j.leaseUntil).toBe(j.updatedAt + 60_000);
  });

  it("hands out the clone token when configured", async () => {
    vi.stubEnv("GIT_CLONE_TOKEN", "ghp_secret");
    const t = newT();
    const { c } = await dispatched(t);
    expect(await t.mutation(api.fondation.claim, c)).toEqual({ ok: true, cloneToken: "ghp_secret" });
  });

  it("is idempotent for the same worker and refuses a second one", async () => {
    const t = newT();
    const { c } = await claimed(t);
    expect(await t.mutation(api.fondation.claim, c)).toEqual({ ok: true });
    expect(await t.mutation(api.fondation.claim, { ...c, workerId: "w2" })).toEqual({
      ok: false,
      reason: "already_claimed",
    });
  });

  it("refuses a wrong token, another attempt and unknown ids without changing anything", async () => {
    const t = newT();
    const { jobId, c } = await dispatched(t);
    const before = await snapshot(t, jobId);
    expect(await t.mutation(api.fondation.claim, { ...c, callbackToken: `${c.callbackToken}x` })).toEqual({
      ok: false,
      reason: "unauthorized",
    });
    expect(await t.mutation(api.fondation.claim, { ...c, callbackToken: "" })).toEqual({ ok: false, reason: "unauthorized" });
    expect(await t.mutation(api.fondation.claim, { ...c, attempt: 2 })).toEqual({ ok: false, reason: "stale_attempt" });
    expect(await t.mutation(api.fondation.claim, { ...c, jobId: "nope" })).toEqual({ ok: false, reason: "not_found" });
    expect(await snapshot(t, jobId)).toEqual(before);
  });
});

describe("progress", () => {
  it("moves forward through the phases, renews the lease and keeps logs", async () => {
    const t = newT();
    const { jobId, c } = await claimed(t);
    const before = await job(t, jobId);
    await vi.advanceTimersByTimeAsync(10_000);
    expect(await t.mutation(api.fondation.progress, { ...c, ...step(1, "cloning", { logs: ["a", "b"] }) })).toEqual({ ok: true });
    expect(await t.mutation(api.fondation.progress, { ...c, ...step(2, "analyzing") })).toEqual({ ok: true });
    expect(await t.mutation(api.fondation.progress, { ...c, ...step(3, "analyzing", { logs: ["c"] }) })).toEqual({ ok: true });
    expect(await t.mutation(api.fondation.progress, { ...c, ...step(4, "gathering") })).toEqual({ ok: true });
    const j = await job(t, jobId);
    expect(j.status).toBe("gathering");
    expect(j.lastSeq).toBe(4);
    expect(j.currentStep).toBe(4);
    expect(j.progress).toBe(1);
    expect(j.message).toBe("step 4");
    expect(j.leaseUntil!).toBeGreaterThan(before.leaseUntil!);
    const logs = await t.query(api.fondation.recentLogs, { jobId });
    expect(logs.map((l) => l.line)).toEqual(["a", "b", "c"]);
    expect(logs.map((l) => l.seq)).toEqual([1, 2, 3]);
    expect((await t.query(api.fondation.recentLogs, { jobId, limit: 2 })).map((l) => l.line)).toEqual(["b", "c"]);
  });

  it("acknowledges and ignores a stale seq", async () => {
    const t = newT();
    const { jobId, c } = await claimed(t);
    await t.mutation(api.fondation.progress, { ...c, ...step(5, "analyzing") });
    const before = await snapshot(t, jobId);
    expect(await t.mutation(api.fondation.progress, { ...c, ...step(5, "gathering", { logs: ["x"] }) })).toEqual({ ok: true, stale: true });
    expect(await t.mutation(api.fondation.progress, { ...c, ...step(3, "gathering") })).toEqual({ ok: true, stale: true });
    expect(await snapshot(t, jobId)).toEqual(before);
  });

  it("refuses going back to an earlier phase", async () => {
    const t = newT();
    const { jobId, c } = await claimed(t);
    await t.mutation(api.fondation.progress, { ...c, ...step(1, "analyzing") });
    const before = await snapshot(t, jobId);
    expect(await t.mutation(api.fondation.progress, { ...c, ...step(2, "cloning") })).toEqual({ ok: false, reason: "invalid_transition" });
    expect(await snapshot(t, jobId)).toEqual(before);
  });

  it("refuses before claim, from another worker, with a wrong token or attempt", async () => {
    const t = newT();
    const { jobId, c } = await dispatched(t);
    expect(await t.mutation(api.fondation.progress, { ...c, ...step(1, "cloning") })).toEqual({ ok: false, reason: "not_claimed" });
    await t.mutation(api.fondation.claim, c);
    const before = await snapshot(t, jobId);
    expect(await t.mutation(api.fondation.progress, { ...c, workerId: "w2", ...step(1, "cloning") })).toEqual({ ok: false, reason: "already_claimed" });
    expect(await t.mutation(api.fondation.progress, { ...c, callbackToken: "x".repeat(43), ...step(1, "cloning") })).toEqual({ ok: false, reason: "unauthorized" });
    expect(await t.mutation(api.fondation.progress, { ...c, attempt: 0, ...step(1, "cloning") })).toEqual({ ok: false, reason: "stale_attempt" });
    expect(await snapshot(t, jobId)).toEqual(before);
  });

  it("keeps only the last LOG_LIMIT lines and truncates long ones", async () => {
    vi.stubEnv("LOG_LIMIT", "5");
    const t = newT();
    const { jobId, c } = await claimed(t);
    await t.mutation(api.fondation.progress, { ...c, ...step(1, "cloning", { logs: ["1", "2", "3", "4"] }) });
    await t.mutation(api.fondation.progress, { ...c, ...step(2, "cloning", { logs: ["5", "6", "y".repeat(5000)] }) });
    const logs = await t.query(api.fondation.recentLogs, { jobId, limit: 100 });
    expect(logs.map((l) => l.line.slice(0, 1))).toEqual(["3", "4", "5", "6", "y"]);
    expect(logs[4]!.line.length).toBe(2001);
    expect((await job(t, jobId)).logCount).toBe(5);
    expect(await t.run(async (ctx) => (await ctx.db.query("jobLogs").collect()).length)).toBe(5);
  });
});

describe("putDocs", () => {
  it("stores docs, replaces on the same slug, and lists them yaml first then by chapter", async () => {
    const t = newT();
    const { jobId, c } = await claimed(t);
    expect(
      await t.mutation(api.fondation.putDocs, {
        ...c,
        docs: [doc("chapter_2_b", "chapter", 2), doc("tutorial_1_t", "tutorial", 1), doc("chapter_1_a", "chapter", 1, "old")],
      }),
    ).toEqual({ ok: true, stored: 3 });
    expect(
      await t.mutation(api.fondation.putDocs, {
        ...c,
        docs: [doc("step1_abstractions", "yaml", null), doc("chapter_1_a", "chapter", 1, "new")],
      }),
    ).toEqual({ ok: true, stored: 2 });
    const docs = await t.query(api.fondation.listDocs, { jobId });
    expect(docs.map((d) => d.slug)).toEqual(["step1_abstractions", "chapter_1_a", "chapter_2_b", "tutorial_1_t"]);
    expect(docs[1]!.content).toBe("new");
    expect(await t.run(async (ctx) => (await ctx.db.query("docs").collect()).length)).toBe(4);
    expect((await job(t, jobId)).storedDocs).toBe(4);
  });

  it("refuses a wrong token without storing", async () => {
    const t = newT();
    const { jobId, c } = await claimed(t);
    const before = await snapshot(t, jobId);
    expect(await t.mutation(api.fondation.putDocs, { ...c, callbackToken: "bad", docs: [doc("a", "yaml", null)] })).toEqual({
      ok: false,
      reason: "unauthorized",
    });
    expect(await snapshot(t, jobId)).toEqual(before);
  });
});

describe("complete", () => {
  it("completes, records the result, and is idempotent", async () => {
    const t = newT();
    const { jobId, c } = await claimed(t);
    await t.mutation(api.fondation.putDocs, { ...c, docs: [doc("a", "yaml", null)] });
    expect(await t.mutation(api.fondation.complete, { ...c, docsCount: 1, durationMs: 1234 })).toEqual({ ok: true });
    const snap = await snapshot(t, jobId);
    expect(snap.job!.status).toBe("completed");
    expect(snap.job!.progress).toBe(1);
    expect(snap.job!.docsCount).toBe(1);
    expect(snap.job!.result).toEqual({ docsCount: 1, durationMs: 1234, storedDocs: 1 });
    expect(await t.mutation(api.fondation.complete, { ...c, docsCount: 1, durationMs: 1234 })).toEqual({ ok: true });
    expect(await snapshot(t, jobId)).toEqual(snap);
    // After the final state, other callbacks are told so.
    expect(await t.mutation(api.fondation.progress, { ...c, ...step(9, "gathering") })).toEqual({ ok: false, reason: "final" });
    expect(await t.mutation(api.fondation.fail, { ...c, code: "internal", message: "x", retryable: false })).toEqual({ ok: false, reason: "final" });
  });

  it("refuses without a valid token", async () => {
    const t = newT();
    const { jobId, c } = await claimed(t);
    expect(await t.mutation(api.fondation.complete, { ...c, callbackToken: "nope", docsCount: 0, durationMs: 1 })).toEqual({
      ok: false,
      reason: "unauthorized",
    });
    expect((await job(t, jobId)).status).toBe("claimed");
  });

  it("drops docs of earlier attempts", async () => {
    const t = newT();
    const { jobId, c } = await claimed(t);
    await t.mutation(api.fondation.putDocs, { ...c, docs: [doc("old_only", "chapter", 1), doc("shared", "yaml", null, "v1")] });
    await t.mutation(api.fondation.fail, { ...c, code: "interrupted", message: "sigterm", retryable: true });
    await settle(t);
    const c2 = await creds(t, jobId, "w2");
    expect(c2.attempt).toBe(2);
    expect(await t.query(api.fondation.listDocs, { jobId })).toEqual([]);
    await t.mutation(api.fondation.claim, c2);
    await t.mutation(api.fondation.putDocs, { ...c2, docs: [doc("shared", "yaml", null, "v2")] });
    await t.mutation(api.fondation.complete, { ...c2, docsCount: 1, durationMs: 5 });
    const docs = await t.query(api.fondation.listDocs, { jobId });
    expect(docs.map((d) => [d.slug, d.content, d.attempt])).toEqual([["shared", "v2", 2]]);
    expect(await t.run(async (ctx) => (await ctx.db.query("docs").collect()).length)).toBe(1);
  });
});

describe("fail", () => {
  it("non-retryable: failed with the error, idempotent", async () => {
    const t = newT();
    const { jobId, c } = await claimed(t);
    const args = { ...c, code: "clone_failed" as const, message: "repository not found", retryable: false };
    expect(await t.mutation(api.fondation.fail, args)).toEqual({ ok: true });
    const snap = await snapshot(t, jobId);
    expect(snap.job!.status).toBe("failed");
    expect(snap.job!.error).toEqual({ code: "clone_failed", message: "repository not found" });
    expect(await t.mutation(api.fondation.fail, args)).toEqual({ ok: true });
    expect(await snapshot(t, jobId)).toEqual(snap);
  });

  it("retryable: next attempt with a new token after backoff; the old attempt is stale", async () => {
    const t = newT();
    const { jobId, c, worker } = await claimed(t);
    const args = { ...c, code: "cli_failed" as const, message: "exit 1", retryable: true };
    expect(await t.mutation(api.fondation.fail, args)).toEqual({ ok: true });
    const j = await job(t, jobId);
    expect(j.status).toBe("pending");
    expect(j.attempt).toBe(2);
    expect(j.callbackToken).toBeUndefined();
    expect(j.lastError).toEqual({ code: "cli_failed", message: "exit 1" });
    const delay = j.nextAttemptAt - j.updatedAt;
    expect(delay).toBeGreaterThanOrEqual(500);
    expect(delay).toBeLessThanOrEqual(1000);
    // Repeating the same fail is acknowledged and changes nothing.
    const snap = await snapshot(t, jobId);
    expect(await t.mutation(api.fondation.fail, args)).toEqual({ ok: true });
    expect(await snapshot(t, jobId)).toEqual(snap);
    // Other calls of the old attempt are stale.
    expect(await t.mutation(api.fondation.progress, { ...c, ...step(7, "cloning") })).toEqual({ ok: false, reason: "stale_attempt" });
    await settle(t, delay);
    expect(worker.starts()).toHaveLength(2);
    const second = worker.starts()[1]!.json.data;
    expect(second.attempt).toBe(2);
    expect(second.callbackToken).not.toBe(c.callbackToken);
    expect((await job(t, jobId)).callbackToken).toBe(second.callbackToken);
    const c2 = await creds(t, jobId);
    expect(await t.mutation(api.fondation.claim, c2)).toEqual({ ok: true });
    // seq starts over for the new attempt
    expect(await t.mutation(api.fondation.progress, { ...c2, ...step(1, "cloning") })).toEqual({ ok: true });
  });

  it("interrupted re-dispatches at once", async () => {
    const t = newT();
    const { jobId, c, worker } = await claimed(t);
    await t.mutation(api.fondation.fail, { ...c, code: "interrupted", message: "SIGTERM", retryable: true });
    const j = await job(t, jobId);
    expect(j.nextAttemptAt).toBe(j.updatedAt);
    await settle(t);
    expect(worker.starts()).toHaveLength(2);
    expect((await job(t, jobId)).status).toBe("dispatched");
  });

  it("may come from a worker that accepted but never claimed", async () => {
    const t = newT();
    const { jobId, c } = await dispatched(t);
    expect(await t.mutation(api.fondation.fail, { ...c, code: "interrupted", message: "SIGTERM", retryable: true })).toEqual({ ok: true });
    expect((await job(t, jobId)).attempt).toBe(2);
  });

  it("retryable but out of attempts: failed", async () => {
    const t = newT();
    const worker = fakeWorker();
    const jobId = await createAndDispatch(t, worker, { maxAttempts: 1 });
    const c = await creds(t, jobId);
    await t.mutation(api.fondation.claim, c);
    await t.mutation(api.fondation.fail, { ...c, code: "timeout", message: "too slow", retryable: true });
    const j = await job(t, jobId);
    expect(j.status).toBe("failed");
    expect(j.error).toEqual({ code: "timeout", message: "too slow" });
  });

  it("refuses a wrong token and a canceled job", async () => {
    const t = newT();
    const { jobId, c } = await claimed(t);
    const before = await snapshot(t, jobId);
    expect(await t.mutation(api.fondation.fail, { ...c, callbackToken: "z", code: "internal", message: "m", retryable: true })).toEqual({
      ok: false,
      reason: "unauthorized",
    });
    expect(await snapshot(t, jobId)).toEqual(before);
    await t.mutation(api.fondation.cancel, { jobId });
    expect(await t.mutation(api.fondation.fail, { ...c, code: "canceled", message: "m", retryable: false })).toEqual({
      ok: false,
      reason: "canceled",
    });
    expect((await job(t, jobId)).status).toBe("canceled");
  });
});

describe("get", () => {
  it("never returns the callback token", async () => {
    const t = newT();
    const { jobId, c } = await claimed(t);
    await t.mutation(api.fondation.fail, { ...c, code: "interrupted", message: "x", retryable: true });
    await settle(t);
    const j = await t.query(api.fondation.get, { jobId });
    expect(j).not.toBeNull();
    expect(JSON.stringify(j)).not.toContain(c.callbackToken);
    expect(JSON.stringify(j)).not.toContain((await job(t, jobId)).callbackToken!);
    expect(j).not.toHaveProperty("callbackToken");
    expect(j!.attempt).toBe(2);
    expect(await t.query(api.fondation.get, { jobId: "not-an-id" })).toBeNull();
  });
});
