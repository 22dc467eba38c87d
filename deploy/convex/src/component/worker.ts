/**
 * The worker's callbacks (docs/CONTRACT.md §3), called through the host's re-exports
 * (`fondation:claim`, …). Each passes the gate first; on any refusal nothing is written.
 * A status or step change updates `runs` (and tells the host); a bare heartbeat only renews
 * the lease in `leases`.
 */
import { v } from "convex/values";
import { internal } from "./_generated/api.js";
import { mutation, type QueryCtx } from "./_generated/server.js";
import { emit } from "./events.js";
import { kick } from "./kick.js";
import {
  MAX_DOC_CONTENT_BYTES,
  MAX_LOG_LINE,
  MAX_LOGS_PER_CALL,
  MAX_MESSAGE,
  backoffMs,
  docOrder,
  finishRun,
  leaseOf,
  retryOrFinish,
  scheduleDocsCleanup,
  type Lease,
  type Run,
} from "./model.js";
import { getConfig } from "./config.js";
import { constantTimeEqual, hashToken } from "./signing.js";
import {
  callbackAuth,
  isFinal,
  isRunning,
  phaseIndex,
  vCheckpointInfo,
  vRefusal,
  workerCallbacks,
  type Refusal,
} from "./shared.js";

const UNAUTHORIZED: Refusal = { ok: false, reason: "unauthorized" };
/** A full commit SHA (SHA-1 or SHA-256), lower case as git prints it. */
const SHA = /^(?:[0-9a-f]{40}|[0-9a-f]{64})$/;
/** A path of the CLI's output layout: a file at the top (the YAML plans) or in one of its
 * three directories; no other directory, no `..`, no control character. The worker checks the
 * exact names again before it restores them. */
const PATH = /^(?:(?:chapters|reviewed-chapters|tutorials)\/)?(?!\.\.?$)[^/\\\u0000-\u001f\u007f]{1,255}$/;
const STEPS = new Set(["extract", "analyze", "order", "generate-chapters", "review-chapters", "generate-tutorials"]);
const encoder = new TextEncoder();

type Gate =
  | { run: Run; lease: Lease }
  | { refusal: Refusal; previousOutcome?: string };

/**
 * Common gate of every callback. The token is hashed and compared (in constant time) before
 * anything about the run is told: an unknown run, a wrong token, or a token with the wrong
 * attempt number all get the same `unauthorized`. Only the previous attempt's own token learns
 * `stale_attempt`.
 */
async function authorize(
  ctx: QueryCtx,
  args: { jobId: string; attempt: number; callbackToken: string },
): Promise<Gate> {
  const hash = await hashToken(args.callbackToken);
  const id = ctx.db.normalizeId("runs", args.jobId);
  const run = id === null ? null : await ctx.db.get(id);
  const lease = run === null ? null : await leaseOf(ctx, run._id);
  if (run === null || lease === null) return { refusal: UNAUTHORIZED };
  if (lease.tokenHash !== undefined && constantTimeEqual(hash, lease.tokenHash) && args.attempt === lease.attempt) {
    return { run, lease };
  }
  const prev = lease.previous;
  if (
    prev?.tokenHash !== undefined &&
    constantTimeEqual(hash, prev.tokenHash) &&
    args.attempt === prev.attempt
  ) {
    return { refusal: { ok: false, reason: "stale_attempt" }, previousOutcome: prev.outcome };
  }
  return { refusal: UNAUTHORIZED };
}

/** Refusal for a run that is not (or no longer) running under this worker, if any. */
function runningRefusal(run: Run, workerId: string): Refusal | null {
  if (run.status === "canceled") return { ok: false, reason: "canceled" };
  if (isFinal(run.status)) return { ok: false, reason: "final" };
  if (run.status === "pending") return { ok: false, reason: "not_dispatched" };
  if (run.status === "dispatched") return { ok: false, reason: "not_claimed" };
  if (run.claimedBy !== workerId) return { ok: false, reason: "already_claimed" };
  return null;
}

/** The gate, then `runningRefusal`: what every callback of a claimed, running attempt checks. */
async function authorizeRunning(
  ctx: QueryCtx,
  args: { jobId: string; attempt: number; callbackToken: string; workerId: string },
): Promise<{ run: Run; lease: Lease } | { refusal: Refusal }> {
  const gate = await authorize(ctx, args);
  if ("refusal" in gate) return { refusal: gate.refusal };
  const refusal = runningRefusal(gate.run, args.workerId);
  return refusal ? { refusal } : gate;
}

/** First call of an attempt: the worker takes the run. Idempotent for the same worker.
 * Returns what the host's `cloneToken` function needs; the host's re-export adds the token. */
export const claim = mutation({
  args: callbackAuth,
  returns: v.union(
    v.object({
      ok: v.literal(true),
      repositoryUrl: v.string(),
      context: v.optional(v.any()),
      checkpoint: v.optional(vCheckpointInfo),
    }),
    vRefusal,
  ),
  handler: async (ctx, args) => {
    const gate = await authorize(ctx, args);
    if ("refusal" in gate) return gate.refusal;
    const { run, lease } = gate;
    const config = await getConfig(ctx);
    // What earlier attempts left: the worker fetches the files with `checkpointPage`.
    const cp = run.checkpoint;
    const checkpoint = cp === undefined ? undefined : { commit: cp.commit, ended: cp.ended, files: cp.files };
    const granted = {
      ok: true as const,
      repositoryUrl: run.repositoryUrl,
      context: run.onEvent?.context,
      ...(checkpoint === undefined ? {} : { checkpoint }),
    };
    const now = Date.now();
    if (isRunning(run.status)) {
      if (run.claimedBy !== args.workerId) return { ok: false as const, reason: "already_claimed" };
      await ctx.db.patch(lease._id, { leaseUntil: now + config.leaseMs });
      return granted;
    }
    if (run.status !== "dispatched") return runningRefusal(run, args.workerId) ?? { ok: false as const, reason: "not_dispatched" };
    const message = `claimed by ${args.workerId.slice(0, 200)}`;
    await ctx.db.patch(run._id, { status: "claimed", claimedBy: args.workerId, claimedAt: now, message, updatedAt: now });
    await ctx.db.patch(lease._id, { leaseUntil: now + config.leaseMs });
    await emit(ctx, { ...run, status: "claimed" }, { kind: "status", status: "claimed", message });
    return granted;
  },
});

/** Step change and heartbeat. A stale `seq` is acknowledged and ignored. */
export const progress = mutation({
  ...workerCallbacks.progress,
  handler: async (ctx, args) => {
    const gate = await authorizeRunning(ctx, args);
    if ("refusal" in gate) return gate.refusal;
    const { run, lease } = gate;
    if (args.seq <= lease.lastSeq) return { ok: true as const, stale: true as const };
    if (phaseIndex(args.status) < phaseIndex(run.status)) return { ok: false as const, reason: "invalid_transition" };
    const now = Date.now();
    const config = await getConfig(ctx);
    const lines = (args.logs ?? []).slice(-MAX_LOGS_PER_CALL);
    await ctx.db.patch(lease._id, {
      lastSeq: args.seq,
      leaseUntil: now + config.leaseMs,
      logSeq: lease.logSeq + lines.length,
    });
    const message = args.message.slice(0, MAX_MESSAGE);
    if (args.commit !== undefined && args.commit !== run.commit) {
      if (!SHA.test(args.commit)) return { ok: false as const, reason: "invalid_commit" };
      await ctx.db.patch(run._id, { commit: args.commit, updatedAt: now });
    }
    const stepChanged =
      args.status !== run.status ||
      args.currentStep !== run.currentStep ||
      args.totalSteps !== run.totalSteps ||
      message !== run.message;
    if (stepChanged) {
      const computed =
        args.totalSteps > 0 ? Math.min(1, Math.max(0, args.currentStep / args.totalSteps)) : run.progress;
      // Monotonic within an attempt: a bar that goes backwards reads as a bug.
      const progress = Math.max(run.progress, computed);
      const step = {
        status: args.status,
        currentStep: args.currentStep,
        totalSteps: args.totalSteps,
        message,
        progress,
      };
      await ctx.db.patch(run._id, { ...step, updatedAt: now });
      await emit(ctx, run, { kind: "step", ...step });
    }
    if (lines.length > 0) {
      await emit(ctx, run, {
        kind: "logs",
        lines: lines.map((raw, i) => ({
          seq: lease.logSeq + i + 1,
          line: raw.length > MAX_LOG_LINE ? `${raw.slice(0, MAX_LOG_LINE)}…` : raw,
        })),
      });
    }
    return { ok: true as const };
  },
});

/** Store generated docs; re-sending a slug replaces it. With `partial`: files of the running
 * attempt (each with `path`, made from `commit`), kept per path as the run's checkpoint and
 * shown to the host (`partialDocs` event); `endedStep` (on a step's last batch) joins the
 * checkpoint's ended steps. */
export const putDocs = mutation({
  ...workerCallbacks.putDocs,
  handler: async (ctx, args) => {
    const gate = await authorizeRunning(ctx, args);
    if ("refusal" in gate) return gate.refusal;
    const { run, lease } = gate;
    if (args.docs.some((d) => d.slug.trim() === "" || d.slug.length > 512 || d.title.length > 2_000)) {
      return { ok: false as const, reason: "invalid_doc" };
    }
    // Convex refuses a document over 1 MiB; the worker checks first (MAX_DOC_BYTES), this
    // gives a clear refusal instead of a function error if it did not.
    if (args.docs.some((d) => encoder.encode(d.content).length > MAX_DOC_CONTENT_BYTES)) {
      return { ok: false as const, reason: "doc_too_large" };
    }
    const now = Date.now();
    if (args.partial) {
      const { commit, endedStep } = args;
      if (commit === undefined || !SHA.test(commit)) return { ok: false as const, reason: "invalid_commit" };
      if (args.docs.some((d) => d.path === undefined || !PATH.test(d.path))) {
        return { ok: false as const, reason: "invalid_doc" };
      }
      if (endedStep !== undefined && !STEPS.has(endedStep)) return { ok: false as const, reason: "invalid_step" };
      const previous = run.checkpoint;
      const sameCommit = previous?.commit === commit;
      let files = sameCommit ? previous.files : 0;
      for (const d of args.docs) {
        const path = d.path!;
        const existing = await ctx.db
          .query("checkpointFiles")
          .withIndex("by_run_commit_path", (q) => q.eq("runId", run._id).eq("commit", commit).eq("path", path))
          .unique();
        const row = { runId: run._id, commit, path, content: d.content, attempt: run.attempt, updatedAt: now };
        if (existing) await ctx.db.replace(existing._id, row);
        else {
          await ctx.db.insert("checkpointFiles", row);
          files++;
        }
      }
      const ended = sameCommit ? [...previous.ended] : [];
      if (endedStep !== undefined && !ended.includes(endedStep)) ended.push(endedStep);
      const config = await getConfig(ctx);
      await ctx.db.patch(lease._id, { leaseUntil: now + config.leaseMs });
      await ctx.db.patch(run._id, { checkpoint: { commit, attempt: run.attempt, ended, files }, updatedAt: now });
      // Another commit: this attempt runs in full; the old commit's files go in the background.
      if (previous !== undefined && !sameCommit) {
        await ctx.scheduler.runAfter(0, internal.docs.dropCheckpoint, { runId: run._id, keepCommit: commit });
      }
      await emit(ctx, run, {
        kind: "partialDocs",
        docs: args.docs,
        commit,
        ...(endedStep === undefined ? {} : { stepEnded: endedStep }),
      });
      return { ok: true as const, stored: args.docs.length };
    }
    let added = 0;
    for (const d of args.docs) {
      const existing = await ctx.db
        .query("docs")
        .withIndex("by_run_attempt_slug", (q) => q.eq("runId", run._id).eq("attempt", run.attempt).eq("slug", d.slug))
        .unique();
      const { path: _path, ...fields } = d; // a final doc is keyed by slug, not by path
      const row = { ...fields, runId: run._id, attempt: run.attempt, order: docOrder(d), updatedAt: now };
      if (existing) await ctx.db.replace(existing._id, row);
      else {
        await ctx.db.insert("docs", row);
        added++;
      }
    }
    const config = await getConfig(ctx);
    await ctx.db.patch(lease._id, { leaseUntil: now + config.leaseMs });
    const storedDocs = run.storedDocs + added;
    if (args.docs.length > 0) {
      await ctx.db.patch(run._id, { storedDocs, updatedAt: now });
      await emit(ctx, run, { kind: "docs", docs: args.docs, storedDocs });
    }
    return { ok: true as const, stored: args.docs.length };
  },
});

/** Success. Repeating it is harmless. Frees the slot. */
export const complete = mutation({
  ...workerCallbacks.complete,
  handler: async (ctx, args) => {
    const gate = await authorize(ctx, args);
    if ("refusal" in gate) return gate.refusal;
    const { run, lease } = gate;
    if (run.status === "completed") return { ok: true as const };
    const refusal = runningRefusal(run, args.workerId);
    if (refusal) return refusal;
    const now = Date.now();
    const message = `completed: ${args.docsCount} docs`;
    await ctx.db.patch(run._id, {
      status: "completed",
      progress: 1,
      docsCount: args.docsCount,
      result: { docsCount: args.docsCount, durationMs: args.durationMs },
      message,
      finishedAt: now,
      updatedAt: now,
    });
    await ctx.db.patch(lease._id, { leaseUntil: undefined });
    await emit(ctx, run, { kind: "completed", docsCount: args.docsCount, durationMs: args.durationMs });
    // The final docs replace the checkpoint: no attempt will resume from it.
    if (run.checkpoint !== undefined) {
      await ctx.db.patch(run._id, { checkpoint: undefined });
      await ctx.scheduler.runAfter(0, internal.docs.dropCheckpoint, { runId: run._id });
    }
    // Only this attempt's docs belong to the course; earlier ones go in the background, in
    // batches (a few 900 KB docs per transaction).
    if (run.attempt > 1) await scheduleDocsCleanup(ctx, run._id, run.attempt);
    await kick(ctx);
    return { ok: true as const };
  },
});

/** Failure. Retryable failures start the next attempt (at once for `interrupted`). */
export const fail = mutation({
  ...workerCallbacks.fail,
  handler: async (ctx, args) => {
    const gate = await authorize(ctx, args);
    if ("refusal" in gate) {
      // The previous attempt's worker repeating its fail after we already moved on.
      if (gate.previousOutcome === "fail") return { ok: true as const };
      return gate.refusal;
    }
    const { run, lease } = gate;
    if (run.status === "failed") return { ok: true as const };
    // A worker may fail a run it accepted but never claimed (e.g. interrupted while queued).
    if (run.status !== "dispatched") {
      const refusal = runningRefusal(run, args.workerId);
      if (refusal) return refusal;
    }
    const error = { code: args.code, message: args.message.slice(0, 4_000) };
    if (args.retryable) {
      const config = await getConfig(ctx);
      const delayMs = args.code === "interrupted" ? 0 : backoffMs(config, run.attempt, Math.random());
      await retryOrFinish(ctx, run, lease, error, { delayMs, finalStatus: "failed", outcome: "fail" });
    } else {
      await finishRun(ctx, run, lease, "failed", error, `failed: ${error.message}`);
    }
    return { ok: true as const };
  },
});

/** Files of a checkpoint fetched per page: a few files of up to 1 MiB per call keep every
 * answer far below Convex's limits on a function's result and a transaction's reads. */
export const CHECKPOINT_PAGE = 8;

/**
 * The checkpoint's files in pages (path order), for the attempt that claimed the run: `after`
 * is the last path of the previous page. Only the claiming attempt gets them (the gate).
 */
export const checkpointPage = mutation({
  ...workerCallbacks.checkpointPage,
  handler: async (ctx, args) => {
    const gate = await authorizeRunning(ctx, args);
    if ("refusal" in gate) return gate.refusal;
    const { run } = gate;
    const cp = run.checkpoint;
    if (cp === undefined) return { ok: false as const, reason: "no_checkpoint" };
    const { after } = args;
    const rows = await ctx.db
      .query("checkpointFiles")
      .withIndex("by_run_commit_path", (q) => {
        const same = q.eq("runId", run._id).eq("commit", cp.commit);
        return after === undefined ? same : same.gt("path", after);
      })
      .take(CHECKPOINT_PAGE + 1);
    const page = rows.slice(0, CHECKPOINT_PAGE);
    return {
      ok: true as const,
      commit: cp.commit,
      files: page.map((f) => ({ path: f.path, content: f.content })),
      next: rows.length > CHECKPOINT_PAGE ? page.at(-1)!.path : null,
    };
  },
});
