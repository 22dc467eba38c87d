/**
 * The job queue's rules, as plain functions over a mutation context. The registered Convex
 * functions (fondation.ts, dispatch.ts) are thin wrappers around these.
 */
import { internal } from "./_generated/api";
import type { Doc, Id } from "./_generated/dataModel";
import type { MutationCtx, QueryCtx } from "./_generated/server";
import { settings } from "./config";
import { constantTimeEqual } from "./signing";
import {
  ACTIVE_STATUSES,
  isFinal,
  isRunning,
  type JobError,
  type JobStatus,
} from "./validators";

export type Job = Doc<"jobs">;
export type Refusal = { ok: false; reason: string };

/** Longest log line kept, and most lines taken from one progress call. */
export const MAX_LOG_LINE = 2_000;
export const MAX_LOGS_PER_CALL = 200;
/** Retry-After bounds: a bogus header must neither hammer the worker nor park a job for days. */
export const MIN_RETRY_AFTER_MS = 1_000;
export const MAX_RETRY_AFTER_MS = 3_600_000;
export const DEFAULT_RETRY_AFTER_MS = 30_000;
/** How long a job waits when WORKER_URL / WEBHOOK_SECRET are missing or unusable. */
export const MISCONFIGURED_RETRY_MS = 60_000;

/**
 * Delay before attempt `failedAttempt + 1`: base * 2^(failedAttempt-1), capped, with "equal
 * jitter" (half fixed, half random) so a burst of failures does not come back as a burst.
 */
export function backoffMs(failedAttempt: number, random: number = Math.random()): number {
  const { retryBaseMs, retryMaxMs } = settings();
  const exp = Math.min(retryMaxMs, retryBaseMs * 2 ** Math.max(0, failedAttempt - 1));
  return Math.round(exp / 2 + (exp / 2) * random);
}

/** Parse `Retry-After` (delta-seconds or an HTTP date) into a bounded delay in ms. */
export function parseRetryAfter(header: string | null, nowMs: number): number {
  let ms = DEFAULT_RETRY_AFTER_MS;
  if (header !== null && header.trim() !== "") {
    const h = header.trim();
    if (/^\d+$/.test(h)) ms = Number(h) * 1000;
    else {
      const at = Date.parse(h);
      if (!Number.isNaN(at)) ms = at - nowMs;
    }
  }
  return Math.min(MAX_RETRY_AFTER_MS, Math.max(MIN_RETRY_AFTER_MS, ms));
}

/** Number of jobs currently holding a slot. */
export async function countActive(ctx: QueryCtx, cap: number): Promise<number> {
  let n = 0;
  for (const status of ACTIVE_STATUSES) {
    // `take(cap)` per status: we only need to know whether the total reaches the cap.
    const rows = await ctx.db
      .query("jobs")
      .withIndex("by_status_rank", (q) => q.eq("status", status))
      .take(cap);
    n += rows.length;
    if (n >= cap) return n;
  }
  return n;
}

/**
 * Fill free slots: the highest-priority, then oldest, pending job that is due goes to
 * `dispatched` and a delivery action is scheduled for it. Runs inside the caller's transaction,
 * so a slot freed by complete/fail/cancel is reused atomically. Returns the jobs dispatched.
 */
export async function pumpQueue(ctx: MutationCtx): Promise<Id<"jobs">[]> {
  const s = settings();
  let free = s.maxParallel - (await countActive(ctx, s.maxParallel));
  const now = Date.now();
  const started: Id<"jobs">[] = [];
  if (free <= 0) return started;
  let scanned = 0;
  for await (const job of ctx.db
    .query("jobs")
    .withIndex("by_status_rank", (q) => q.eq("status", "pending"))) {
    // Bounded scan: jobs parked by backoff are skipped, not allowed to make this unbounded.
    if (++scanned > 1_000 || free <= 0) break;
    if (job.nextAttemptAt > now) continue;
    await ctx.db.patch(job._id, {
      status: "dispatched",
      dispatchedAt: now,
      deliveredAt: undefined,
      // Claim deadline; includes the POST's own timeout so a slow answer is not swept.
      leaseUntil: now + s.claimTimeoutMs + s.dispatchTimeoutMs,
      message: `dispatching attempt ${job.attempt}`,
      updatedAt: now,
    });
    await ctx.scheduler.runAfter(0, internal.dispatch.deliver, {
      jobId: job._id,
      attempt: job.attempt,
    });
    started.push(job._id);
    free--;
  }
  return started;
}

/** Wake the queue at `delayMs` from now (a deferred job becomes due then). */
export async function schedulePump(ctx: MutationCtx, delayMs: number): Promise<void> {
  await ctx.scheduler.runAfter(Math.max(0, delayMs), internal.fondation.pump, {});
}

/** Ask the worker holding `attempt` to stop (best effort, signed `job.cancel`). */
export async function scheduleCancelWebhook(
  ctx: MutationCtx,
  jobId: Id<"jobs">,
  attempt: number,
): Promise<void> {
  await ctx.scheduler.runAfter(0, internal.dispatch.deliverCancel, {
    jobId,
    attempt,
    messageAt: Date.now(),
    tries: 0,
  });
}

/**
 * End the current attempt. Retries remain: the job goes back to `pending` as attempt+1 with no
 * token (the dispatch action mints a new one) and becomes due after `delayMs`. None left: the job
 * ends in `finalStatus` with `error`. The caller pumps the queue afterwards (a slot was freed).
 */
export async function retryOrFinish(
  ctx: MutationCtx,
  job: Job,
  error: JobError,
  opts: { delayMs: number; finalStatus: "failed" | "dead"; outcome: string },
): Promise<"retry" | "final"> {
  const now = Date.now();
  if (job.attempt >= job.maxAttempts) {
    await ctx.db.patch(job._id, {
      status: opts.finalStatus,
      error,
      lastError: error,
      message: `${opts.finalStatus} after ${job.attempt} attempt(s): ${error.message}`,
      leaseUntil: undefined,
      finishedAt: now,
      updatedAt: now,
    });
    return "final";
  }
  await ctx.db.patch(job._id, {
    status: "pending",
    attempt: job.attempt + 1,
    previousAttempt: {
      attempt: job.attempt,
      callbackToken: job.callbackToken,
      outcome: opts.outcome,
    },
    callbackToken: undefined,
    messageAt: undefined,
    claimedBy: undefined,
    claimedAt: undefined,
    leaseUntil: undefined,
    dispatchedAt: undefined,
    deliveredAt: undefined,
    lastSeq: 0,
    storedDocs: 0,
    progress: 0,
    currentStep: 0,
    lastError: error,
    nextAttemptAt: now + opts.delayMs,
    message: `attempt ${job.attempt} ended (${error.code}); attempt ${job.attempt + 1} queued`,
    updatedAt: now,
  });
  if (opts.delayMs > 0) await schedulePump(ctx, opts.delayMs);
  return "retry";
}

/**
 * Common gate of every worker callback. Order matters: a call for another attempt is refused
 * before the token is looked at (the old attempt's token is no longer stored as current), and
 * nothing is written on any refusal.
 */
export async function authorize(
  ctx: QueryCtx,
  args: { jobId: string; attempt: number; callbackToken: string },
): Promise<{ job: Job } | { refusal: Refusal }> {
  const id = ctx.db.normalizeId("jobs", args.jobId);
  const job = id === null ? null : await ctx.db.get(id);
  if (job === null) return { refusal: { ok: false, reason: "not_found" } };
  if (args.attempt !== job.attempt) return { refusal: { ok: false, reason: "stale_attempt" } };
  if (job.callbackToken === undefined || !constantTimeEqual(args.callbackToken, job.callbackToken)) {
    return { refusal: { ok: false, reason: "unauthorized" } };
  }
  return { job };
}

/** Refusal for a job that is not (or no longer) running under this worker, if any. */
export function runningRefusal(job: Job, workerId: string): Refusal | null {
  if (job.status === "canceled") return { ok: false, reason: "canceled" };
  if (isFinal(job.status)) return { ok: false, reason: "final" };
  if (job.status === "pending") return { ok: false, reason: "not_dispatched" };
  if (job.status === "dispatched") return { ok: false, reason: "not_claimed" };
  if (job.claimedBy !== workerId) return { ok: false, reason: "already_claimed" };
  return null;
}

/** True when a previous attempt's worker repeats a report that was already applied. */
export function isRepeatOfPrevious(
  job: Job,
  args: { attempt: number; callbackToken: string },
  outcome: string,
): boolean {
  const prev = job.previousAttempt;
  return (
    prev !== undefined &&
    prev.attempt === args.attempt &&
    prev.outcome === outcome &&
    prev.callbackToken !== undefined &&
    constantTimeEqual(args.callbackToken, prev.callbackToken)
  );
}

/** Append worker log lines, then drop the oldest beyond LOG_LIMIT. Returns new counters. */
export async function appendLogs(
  ctx: MutationCtx,
  job: Job,
  lines: string[],
): Promise<{ logSeq: number; logCount: number }> {
  const now = Date.now();
  const kept = lines.slice(-MAX_LOGS_PER_CALL);
  let logSeq = job.logSeq;
  for (const raw of kept) {
    logSeq++;
    await ctx.db.insert("jobLogs", {
      jobId: job._id,
      attempt: job.attempt,
      seq: logSeq,
      line: raw.length > MAX_LOG_LINE ? `${raw.slice(0, MAX_LOG_LINE)}…` : raw,
      at: now,
    });
  }
  let logCount = job.logCount + kept.length;
  const excess = logCount - settings().logLimit;
  if (excess > 0) {
    const oldest = await ctx.db
      .query("jobLogs")
      .withIndex("by_job_seq", (q) => q.eq("jobId", job._id))
      .take(excess);
    for (const row of oldest) await ctx.db.delete(row._id);
    logCount -= oldest.length;
  }
  return { logSeq, logCount };
}

/** The job as the UI may see it: never the callback tokens. */
export function publicJob(job: Job) {
  const { callbackToken: _t, previousAttempt, messageAt: _m, queueRank: _q, ...rest } = job;
  return {
    ...rest,
    previousAttempt:
      previousAttempt === undefined
        ? undefined
        : { attempt: previousAttempt.attempt, outcome: previousAttempt.outcome },
  };
}

export function phaseIndex(s: JobStatus): number {
  return isRunning(s) ? ["claimed", "cloning", "analyzing", "gathering"].indexOf(s) : -1;
}
