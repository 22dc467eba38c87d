/** The worker's callbacks through the host's re-exports: the gate, leases, clone tokens. */
import { describe, expect, it, vi } from "vitest";
import { api, createJob, creds, fakeWorker, hostJob, inComponent, newT, run, settle, table, useFakeHost, type T } from "./helpers";

useFakeHost();

/** Everything a refused call must leave untouched, host and component. */
async function snapshot(t: T) {
  const host = await t.run(async (ctx) => ({
    jobs: await ctx.db.query("jobs").collect(),
    docs: await ctx.db.query("docs").collect(),
    logs: await ctx.db.query("jobLogs").collect(),
  }));
  return { host, runs: await table(t, "runs"), leases: await table(t, "leases"), docs: await table(t, "docs") };
}

async function claimed(t: T) {
  const worker = fakeWorker();
  const ids = await createJob(t);
  const c = creds(worker, ids.runId);
  expect(await t.mutation(api.fondation.claim, c)).toEqual({ ok: true });
  return { ...ids, worker, c };
}

describe("the callback gate", () => {
  it("refuses wrong tokens, wrong attempts and unknown runs alike, and changes nothing", async () => {
    const t = newT();
    const { c, runId } = await claimed(t);
    // A second run, dispatched, whose token must not open the first.
    const other = await createJob(t, { repositoryUrl: "https://github.com/owner/other.git" });
    const worker = fakeWorker();
    void worker;
    const before = await snapshot(t);
    const calls = [
      { ...c, callbackToken: c.callbackToken.slice(0, -1) },
      { ...c, callbackToken: "" },
      { ...c, attempt: 2 },
      { ...c, attempt: 0 },
      { ...c, jobId: other.runId },
      { ...c, jobId: "nope" },
      { ...c, jobId: runId.slice(0, -4) + "jobs" },
    ];
    for (const args of calls) {
      expect(await t.mutation(api.fondation.claim, args)).toEqual({ ok: false, reason: "unauthorized" });
      expect(
        await t.mutation(api.fondation.progress, { ...args, seq: 9, status: "analyzing", currentStep: 1, totalSteps: 2, message: "x" }),
      ).toEqual({ ok: false, reason: "unauthorized" });
      expect(await t.mutation(api.fondation.complete, { ...args, docsCount: 1, durationMs: 1 })).toEqual({
        ok: false,
        reason: "unauthorized",
      });
      expect(await t.mutation(api.fondation.fail, { ...args, code: "cli_failed", message: "x", retryable: false })).toEqual({
        ok: false,
        reason: "unauthorized",
      });
    }
    expect(await snapshot(t)).toEqual(before);
  });

  it("a heartbeat renews only the lease; a step change updates the run and the host", async () => {
    const t = newT();
    const { c, runId, jobId } = await claimed(t);
    const step = { status: "analyzing" as const, currentStep: 1, totalSteps: 6, message: "Extracting" };
    await t.mutation(api.fondation.progress, { ...c, seq: 1, ...step });
    const runBefore = await run(t, runId);
    const hostBefore = await hostJob(t, jobId);
    const leaseBefore = (await table(t, "leases"))[0];
    await vi.advanceTimersByTimeAsync(1_000);
    expect(await t.mutation(api.fondation.progress, { ...c, seq: 2, ...step })).toEqual({ ok: true });
    // Same run document (same fields, same updatedAt): subscribers are not re-run.
    expect(await run(t, runId)).toEqual(runBefore);
    expect(await hostJob(t, jobId)).toEqual(hostBefore);
    const leaseAfter = (await table(t, "leases"))[0];
    expect(leaseAfter.lastSeq).toBe(2);
    expect(leaseAfter.leaseUntil).toBeGreaterThan(leaseBefore.leaseUntil);
    // A stale seq is acknowledged and ignored; going back a phase is refused.
    expect(await t.mutation(api.fondation.progress, { ...c, seq: 1, ...step })).toEqual({ ok: true, stale: true });
    expect(await t.mutation(api.fondation.progress, { ...c, seq: 3, ...step, status: "cloning" })).toEqual({
      ok: false,
      reason: "invalid_transition",
    });
    await t.mutation(api.fondation.progress, { ...c, seq: 4, ...step, currentStep: 2 });
    expect((await run(t, runId)).currentStep).toBe(2);
    expect((await hostJob(t, jobId)).progress).toBe("Step 2/6: Extracting");
  });

  it("another worker cannot claim a run that is taken; the same worker may claim again", async () => {
    const t = newT();
    const { c } = await claimed(t);
    expect(await t.mutation(api.fondation.claim, c)).toEqual({ ok: true });
    expect(await t.mutation(api.fondation.claim, { ...c, workerId: "w2" })).toEqual({ ok: false, reason: "already_claimed" });
    expect(
      await t.mutation(api.fondation.putDocs, {
        ...c,
        workerId: "w2",
        docs: [{ slug: "a", title: "A", kind: "yaml", chapterIndex: null, content: "x" }],
      }),
    ).toEqual({ ok: false, reason: "already_claimed" });
  });

  it("refuses a doc over the size limit before writing anything", async () => {
    const t = newT();
    const { c } = await claimed(t);
    const big = "x".repeat(1_000_001);
    expect(
      await t.mutation(api.fondation.putDocs, { ...c, docs: [{ slug: "big", title: "Big", kind: "chapter", chapterIndex: 1, content: big }] }),
    ).toEqual({ ok: false, reason: "doc_too_large" });
    expect(await table(t, "docs")).toHaveLength(0);
  });
});

describe("clone tokens (per job, from the host)", () => {
  it("hands out the job's user's token for the repository's host only, and never stores it", async () => {
    const t = newT();
    await t.run(async (ctx) => {
      await ctx.db.insert("gitTokens", { userId: "user-1", host: "github.com", token: "ghp_user1" });
      await ctx.db.insert("gitTokens", { userId: "user-2", host: "github.com", token: "ghp_user2" });
    });
    const worker = fakeWorker();
    const mine = await createJob(t, { userId: "user-1" });
    const elsewhere = await createJob(t, { userId: "user-1", repositoryUrl: "https://gitlab.com/owner/repo.git" });
    await settle(t);
    expect(await t.mutation(api.fondation.claim, creds(worker, mine.runId))).toEqual({ ok: true, cloneToken: "ghp_user1" });
    // Same user, another host: no token (the GitHub token must not go to gitlab.com).
    expect(await t.mutation(api.fondation.claim, creds(worker, elsewhere.runId))).toEqual({ ok: true });
    // A wrong token gets nothing.
    expect(await t.mutation(api.fondation.claim, { ...creds(worker, mine.runId), callbackToken: "x" })).toEqual({
      ok: false,
      reason: "unauthorized",
    });
    const stored = JSON.stringify(
      await inComponent(t, async (ctx) => ({
        runs: await ctx.db.query("runs").collect(),
        leases: await ctx.db.query("leases").collect(),
        globals: await ctx.db.query("globals").collect(),
      })),
    );
    expect(stored).not.toContain("ghp_");
  });
});
