/**
 * The operator's board (docs/BOARD.md): two queries and three actions, called through the
 * host's re-exports (`fondation:boardSnapshot` … `fondation:setPriority`, from the client's
 * `operatorApi()`), which the worker's board calls over the Convex HTTP API.
 *
 * Every call carries `boardSecret`, compared here in constant time with the secret the host
 * configured (`configuredSecret`, passed by the client from FONDATION_BOARD_SECRET); a wrong or
 * missing one is `ConvexError({code: "forbidden"})` before anything is read or written.
 *
 * Reads are bounded whatever the number of runs: counts and version come from the
 * `boardState` shards, lists from index ranges with `take`. The actions write their own rows and
 * kick the loop, as every producer does; a retried run is dispatched by the loop.
 */
import { ConvexError, v } from "convex/values";
import type { Doc } from "./_generated/dataModel.js";
import { mutation, query, type MutationCtx, type QueryCtx } from "./_generated/server.js";
import { LOG_TAIL, boardTotals, noteChange } from "./board.js";
import { emit } from "./events.js";
import { kick } from "./kick.js";
import { cancelRun } from "./lib.js";
import { enqueueRun, leaseOf, queueRank, resetLeaseForAttempt, scheduleDocsCleanup } from "./model.js";
import { vActionResult, vBoardJob, vBoardSnapshot, type BoardJobRow } from "./boardShapes.js";
import { constantTimeEqual, hashToken } from "./signing.js";
import { ACTIVE_STATUSES, isActive, type RunError, type RunStatus } from "./shared.js";

/** A board secret shorter than this is treated as not configured. */
export const MIN_SECRET_LENGTH = 16;
export const PENDING_SHOWN = 10;
export const RUNNING_SHOWN = 20;
export const MAX_PAGE_SIZE = 50;
/** Finished runs reachable by paging (offset reads): older ones are not served. */
export const MAX_RECENT_OFFSET = 1_000;
export const MIN_PRIORITY = -1_000;
export const MAX_PRIORITY = 1_000;
/** Trail rows read for one job page (attempts and steps), and docs shown. */
const TRAIL_LIMIT = 200;
const DOCS_SHOWN = 50;
/** Queue entries looked at to find the first PENDING_SHOWN pending runs (stale ones are skipped). */
const QUEUE_SCAN = 50;

const auth = { boardSecret: v.string(), configuredSecret: v.optional(v.string()) };

/** Refuse unless `boardSecret` is the configured secret. SHA-256 first, so the comparison
 * takes the same time whatever the lengths. */
async function gate(args: { boardSecret: string; configuredSecret?: string }): Promise<void> {
  const configured = args.configuredSecret ?? "";
  const given = await hashToken(args.boardSecret);
  const expected = await hashToken(configured);
  const same = constantTimeEqual(given, expected);
  if (!same || configured.length < MIN_SECRET_LENGTH) {
    throw new ConvexError({ code: "forbidden", message: "board secret refused" });
  }
}

async function boardRow(ctx: QueryCtx, run: Doc<"runs">): Promise<BoardJobRow> {
  const lease = isActive(run.status) ? await leaseOf(ctx, run._id) : null;
  return {
    jobId: run._id,
    attempt: run.attempt,
    status: run.status,
    repositoryUrl: run.repositoryUrl,
    ref: run.ref ?? null,
    priority: run.priority,
    currentStep: run.currentStep,
    totalSteps: run.totalSteps,
    message: run.message,
    claimedBy: run.claimedBy ?? null,
    // The lease says who holds an active attempt: the warm container, or a Serverless Jobs run.
    runner: lease?.runner === "run" ? "overflow" : lease?.runner === "warm" || run.claimedBy !== undefined ? "warm" : null,
    leaseUntil: lease?.leaseUntil ?? null,
    createdAt: run.createdAt,
    updatedAt: run.updatedAt,
    error: run.error ?? null,
  };
}

async function versionOf(ctx: QueryCtx): Promise<{ version: string; counts: Record<string, number> }> {
  const { version, counts } = await boardTotals(ctx);
  return { version: String(version), counts };
}

async function runOf(ctx: QueryCtx, jobId: string): Promise<Doc<"runs"> | null> {
  const id = ctx.db.normalizeId("runs", jobId);
  return id === null ? null : await ctx.db.get(id);
}

/** Counts, the pending queue in dispatch order, running runs, one page of finished ones. */
export const boardSnapshot = query({
  args: { ...auth, page: v.number(), pageSize: v.number() },
  returns: vBoardSnapshot,
  handler: async (ctx, args) => {
    await gate(args);
    const { version, counts } = await versionOf(ctx);
    const pending: BoardJobRow[] = [];
    for (const entry of await ctx.db.query("queue").withIndex("by_rank").take(QUEUE_SCAN)) {
      const run = await ctx.db.get(entry.runId);
      // The loop deletes entries of runs canceled while queued only when it meets them.
      if (run === null || run.status !== "pending" || pending.some((p) => p.jobId === run._id)) continue;
      pending.push(await boardRow(ctx, run));
      if (pending.length >= PENDING_SHOWN) break;
    }
    const running: Doc<"runs">[] = [];
    for (const status of ACTIVE_STATUSES) {
      running.push(
        ...(await ctx.db
          .query("runs")
          .withIndex("by_status", (q) => q.eq("status", status))
          .take(RUNNING_SHOWN - running.length)),
      );
      if (running.length >= RUNNING_SHOWN) break;
    }
    running.sort((a, b) => a.createdAt - b.createdAt);
    const pageSize = Math.max(1, Math.min(MAX_PAGE_SIZE, Math.floor(args.pageSize)));
    const offset = (Math.max(1, Math.floor(args.page)) - 1) * pageSize;
    let recent: Doc<"runs">[] = [];
    let hasNext = false;
    if (offset < MAX_RECENT_OFFSET) {
      const rows = await ctx.db
        .query("runs")
        .withIndex("by_finished", (q) => q.gt("finishedAt", 0))
        .order("desc")
        .take(offset + pageSize + 1);
      recent = rows.slice(offset, offset + pageSize);
      hasNext = rows.length > offset + pageSize && offset + pageSize < MAX_RECENT_OFFSET;
    }
    return {
      version,
      now: Date.now(),
      counts,
      pending,
      pendingTotal: counts.pending ?? 0,
      running: await Promise.all(running.map((r) => boardRow(ctx, r))),
      recent: await Promise.all(recent.map((r) => boardRow(ctx, r))),
      hasNext,
    };
  },
});

/** One run: its attempts and the current attempt's steps (from the trail), logs, docs. */
export const boardJob = query({
  args: { ...auth, jobId: v.string() },
  returns: v.union(v.null(), vBoardJob),
  handler: async (ctx, args) => {
    await gate(args);
    const run = await runOf(ctx, args.jobId);
    if (run === null) return null;
    const { version } = await versionOf(ctx);
    const trail = (
      await ctx.db
        .query("boardSteps")
        .withIndex("by_run_at", (q) => q.eq("runId", run._id))
        .order("desc")
        .take(TRAIL_LIMIT)
    ).reverse();
    type Attempt = { attempt: number; status: RunStatus; startedAt: number; updatedAt: number; error: RunError | null };
    const attempts = new Map<number, Attempt>();
    for (const t of trail) {
      const seen = attempts.get(t.attempt);
      const last = { status: t.status, updatedAt: t.at, error: t.error ?? null };
      attempts.set(t.attempt, { attempt: t.attempt, startedAt: seen?.startedAt ?? t.at, ...last });
    }
    attempts.set(run.attempt, {
      attempt: run.attempt,
      startedAt: attempts.get(run.attempt)?.startedAt ?? run.createdAt,
      status: run.status,
      updatedAt: run.updatedAt,
      error: run.error ?? null,
    });
    const steps = trail
      .filter((t) => t.attempt === run.attempt && t.step > 0)
      .map((t) => ({ step: t.step, totalSteps: t.totalSteps, message: t.message, at: t.at }));
    const logs = (
      await ctx.db
        .query("boardLogs")
        .withIndex("by_run_seq", (q) => q.eq("runId", run._id))
        .order("desc")
        .take(LOG_TAIL)
    )
      .reverse()
      .map((l) => l.line);
    const docs = await ctx.db
      .query("docs")
      .withIndex("by_run_attempt_order", (q) => q.eq("runId", run._id).eq("attempt", run.attempt))
      .take(DOCS_SHOWN);
    return {
      version,
      now: Date.now(),
      job: await boardRow(ctx, run),
      attempts: [...attempts.values()].sort((a, b) => a.attempt - b.attempt),
      steps,
      logs,
      docs: docs.map((d) => ({ slug: d.slug, title: d.title, kind: d.kind, chapterIndex: d.chapterIndex, content: d.content })),
    };
  },
});

/**
 * A new attempt of a failed or dead run: next attempt number, no token (the dispatch mints
 * one), status `pending`, its error kept as `lastError`; queued now and dispatched by the loop.
 * It is one more attempt: the run's automatic retries stop at `maxAttempts` as before.
 */
export const retry = mutation({
  args: { ...auth, jobId: v.string() },
  returns: vActionResult,
  handler: async (ctx, args) => {
    await gate(args);
    const run = await runOf(ctx, args.jobId);
    if (run === null) return { ok: false, message: "unknown job" };
    if (run.status !== "failed" && run.status !== "dead") {
      return { ok: false, message: `only failed or dead jobs are retried (this one is ${run.status})` };
    }
    await startAnotherAttempt(ctx, run);
    return { ok: true, message: `attempt ${run.attempt + 1} queued` };
  },
});

async function startAnotherAttempt(ctx: MutationCtx, run: Doc<"runs">): Promise<void> {
  const now = Date.now();
  const attempt = run.attempt + 1;
  const message = `attempt ${attempt} queued by the operator`;
  const lease = await leaseOf(ctx, run._id);
  await ctx.db.patch(run._id, {
    status: "pending",
    attempt,
    claimedBy: undefined,
    claimedAt: undefined,
    dispatchedAt: undefined,
    deliveredAt: undefined,
    finishedAt: undefined,
    result: undefined,
    error: undefined,
    lastError: run.error ?? run.lastError,
    storedDocs: 0,
    docsCount: 0,
    progress: 0,
    currentStep: 0,
    message,
    updatedAt: now,
  });
  if (lease !== null) {
    // The old attempt's worker repeating its `fail` is still acknowledged (worker.fail); the
    // run or warm worker that held it holds nothing now.
    await resetLeaseForAttempt(ctx, lease, run.attempt, attempt, run.status === "failed" ? "fail" : "retried");
  } else {
    await ctx.db.insert("leases", { runId: run._id, attempt, sends: 0, lastSeq: 0, logSeq: 0 });
  }
  const next = (await ctx.db.get(run._id))!;
  await emit(ctx, next, { kind: "status", status: "pending", message, lastError: next.lastError });
  await scheduleDocsCleanup(ctx, run._id, attempt);
  await enqueueRun(ctx, next, now);
}

/** Cancel a pending or running run; a worker holding it gets the usual `job.cancel`. */
export const cancelJob = mutation({
  args: { ...auth, jobId: v.string() },
  returns: vActionResult,
  handler: async (ctx, args) => {
    await gate(args);
    const { ok, status } = await cancelRun(ctx, args.jobId);
    if (ok) return { ok, message: "canceled" };
    return { ok, message: status === "not_found" ? "unknown job" : `already ${status}` };
  },
});

/** Change a pending run's priority (higher runs first) and move its queue entry. */
export const setPriority = mutation({
  args: { ...auth, jobId: v.string(), priority: v.number() },
  returns: vActionResult,
  handler: async (ctx, args) => {
    await gate(args);
    const { priority } = args;
    if (!Number.isInteger(priority) || priority < MIN_PRIORITY || priority > MAX_PRIORITY) {
      return { ok: false, message: `priority must be an integer in [${MIN_PRIORITY}, ${MAX_PRIORITY}]` };
    }
    const run = await runOf(ctx, args.jobId);
    if (run === null) return { ok: false, message: "unknown job" };
    if (run.status !== "pending") return { ok: false, message: `only pending jobs move (this one is ${run.status})` };
    await ctx.db.patch(run._id, { priority, updatedAt: Date.now() });
    const entries = await ctx.db
      .query("queue")
      .withIndex("by_run", (q) => q.eq("runId", run._id))
      .take(10);
    for (const e of entries) await ctx.db.patch(e._id, { queueRank: queueRank(priority) });
    await noteChange(ctx, run._id, { kind: "priority" });
    await kick(ctx);
    return { ok: true, message: `priority set to ${priority}` };
  },
});
