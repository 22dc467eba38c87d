/**
 * The queue's rules: plain functions (pure, or over a mutation context) that the registered
 * functions (lib, worker, loop, dispatch) wrap thinly.
 */
import { ConvexError } from "convex/values";
import { internal } from "./_generated/api.js";
import type { Doc, Id } from "./_generated/dataModel.js";
import type { MutationCtx, QueryCtx } from "./_generated/server.js";
import { emit } from "./events.js";
import { kick } from "./kick.js";
import type {
  Config,
  DocKind,
  EnqueueErrorCode,
  OverflowConfig,
  RunError,
  RunOptions,
  RunView,
} from "./shared.js";

export type Run = Doc<"runs">;
export type Lease = Doc<"leases">;

/** Most attempts a run may ask for. */
export const MAX_ATTEMPTS_CAP = 20;
/** Retry-After bounds: a bogus header must neither hammer the worker nor park a run for days. */
export const MIN_RETRY_AFTER_MS = 1_000;
export const MAX_RETRY_AFTER_MS = 3_600_000;
export const DEFAULT_RETRY_AFTER_MS = 30_000;
/** How long a run waits when the worker URL or secret is missing or unusable. */
export const MISCONFIGURED_RETRY_MS = 60_000;
/** Longest log line handed to the host, and most lines taken from one progress call. */
export const MAX_LOG_LINE = 2_000;
export const MAX_LOGS_PER_CALL = 200;
/** Longest step message kept. */
export const MAX_MESSAGE = 2_000;
/** Convex's document limit is 1 MiB; a doc's content must leave room for its other fields.
 * The worker refuses bigger files before sending (its MAX_DOC_BYTES, 800 000 by default). */
export const MAX_DOC_CONTENT_BYTES = 1_000_000;

/**
 * Delay before attempt `failedAttempt + 1`: base * 2^(failedAttempt-1), capped, with "equal
 * jitter" (half fixed, half random) so a burst of failures does not come back as a burst.
 */
export function backoffMs(config: Config, failedAttempt: number, random: number): number {
  const exp = Math.min(config.retryMaxMs, config.retryBaseMs * 2 ** Math.max(0, failedAttempt - 1));
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

function refuse(code: EnqueueErrorCode, message: string): never {
  throw new ConvexError({ code, message });
}

/**
 * Check what `enqueue` got against the worker's webhook schema (app/payload.py), so a run the
 * worker would refuse with a 422 (and so end `dead`) is refused here, where the host can say why.
 */
export function validateEnqueue(args: {
  repositoryUrl: string;
  ref?: string;
  options?: RunOptions;
  priority?: number;
  maxAttempts?: number;
}): { repositoryUrl: string; priority: number } {
  const url = args.repositoryUrl.trim();
  // The worker does the real allow-listing; refusing obvious junk keeps it out of the queue.
  if (!/^https?:\/\/[^\s]+$/i.test(url) || url.length > 2048) {
    refuse("invalid_repository_url", "repositoryUrl must be an http(s) URL");
  }
  if (args.ref !== undefined && (args.ref === "" || args.ref.startsWith("-") || args.ref.length > 255)) {
    refuse("invalid_ref", "ref must be a non-empty name not starting with '-'");
  }
  const model = args.options?.model;
  if (model !== undefined && !/^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$/.test(model)) {
    refuse("invalid_model", "options.model is not a valid model name");
  }
  const steps = args.options?.steps;
  if (steps !== undefined && (steps.length > 16 || !steps.every((s) => /^[a-z][a-z0-9_-]{0,31}$/.test(s)))) {
    refuse("invalid_steps", "options.steps must be at most 16 step names");
  }
  const priority = args.priority ?? 0;
  if (!Number.isInteger(priority) || Math.abs(priority) > 1_000_000) {
    refuse("invalid_priority", "priority must be an integer within ±1000000");
  }
  const m = args.maxAttempts;
  if (m !== undefined && (!Number.isInteger(m) || m < 1 || m > MAX_ATTEMPTS_CAP)) {
    refuse("invalid_max_attempts", `maxAttempts must be an integer in 1..${MAX_ATTEMPTS_CAP}`);
  }
  return { repositoryUrl: url, priority };
}

/** Convex indexes sort one way only, so "highest priority first" is ascending -priority. */
export function queueRank(priority: number): number {
  return priority === 0 ? 0 : -priority; // no -0: it would sort apart from 0
}

const KIND_ORDER: Record<DocKind, number> = { yaml: 0, chapter: 1, tutorial: 2 };

/** Sort key of a doc: yaml, then chapters and tutorials by chapterIndex, then slug. */
export function docOrder(d: { kind: DocKind; chapterIndex: number | null; slug: string }): string {
  const index =
    d.chapterIndex === null || !Number.isFinite(d.chapterIndex) || d.chapterIndex < 0
      ? "z"
      : Math.min(d.chapterIndex, 1e12).toFixed(0).padStart(13, "0");
  return `${KIND_ORDER[d.kind]}:${index}:${d.slug}`;
}

export function runView(run: Run): RunView {
  return {
    runId: run._id,
    status: run.status,
    repositoryUrl: run.repositoryUrl,
    ref: run.ref,
    priority: run.priority,
    attempt: run.attempt,
    maxAttempts: run.maxAttempts,
    currentStep: run.currentStep,
    totalSteps: run.totalSteps,
    progress: run.progress,
    message: run.message,
    storedDocs: run.storedDocs,
    docsCount: run.docsCount,
    error: run.error,
    lastError: run.lastError,
    result: run.result,
    claimedBy: run.claimedBy,
    commit: run.commit,
    createdAt: run.createdAt,
    updatedAt: run.updatedAt,
    finishedAt: run.finishedAt,
  };
}

export async function leaseOf(ctx: QueryCtx, runId: Id<"runs">): Promise<Lease | null> {
  return await ctx.db
    .query("leases")
    .withIndex("by_run", (q) => q.eq("runId", runId))
    .unique();
}

/** Put a pending run in the queue; the loop dispatches it once `readyAt` has passed (and, to
 * the warm worker, not before `warmBusyUntil`). */
export async function enqueueRun(ctx: MutationCtx, run: Run, readyAt: number, warmBusyUntil?: number): Promise<void> {
  await ctx.db.insert("queue", {
    runId: run._id,
    queueRank: queueRank(run.priority),
    enqueuedAt: run.createdAt,
    readyAt,
    ...(warmBusyUntil === undefined ? {} : { warmBusyUntil }),
  });
  await kick(ctx, readyAt);
}

/** Overflow settings when runs may be started, else null. */
export function overflowOf(config: Config): OverflowConfig | null {
  const o = config.overflow;
  return o !== undefined && o.maxRuns > 0 && o.jobDefinitionId !== "" ? o : null;
}

/** Stop the Serverless Jobs run holding an attempt (best effort, retried a few times). */
export async function scheduleStopRun(ctx: MutationCtx, jobRunId: string): Promise<void> {
  await ctx.scheduler.runAfter(0, internal.overflow.stopRun, { jobRunId, tries: 0 });
}

/** Tell whoever holds `lease`'s attempt to stop: a run is stopped through the Jobs API, the
 * warm worker gets a signed `job.cancel`. */
export async function stopHolder(ctx: MutationCtx, run: Run, lease: Lease): Promise<void> {
  if (lease.runner === "run") {
    // Not yet known while the start is in flight: `overflow.recordStart` stops it then.
    if (lease.jobRunId !== undefined) await scheduleStopRun(ctx, lease.jobRunId);
    return;
  }
  await scheduleCancelWebhook(ctx, run._id, run.attempt);
}

/** Ask the worker holding `attempt` to stop (best effort, signed `job.cancel`). */
export async function scheduleCancelWebhook(ctx: MutationCtx, runId: Id<"runs">, attempt: number): Promise<void> {
  await ctx.scheduler.runAfter(0, internal.dispatch.deliverCancel, {
    runId,
    attempt,
    messageAt: Date.now(),
    tries: 0,
  });
}

/** Delete, in batches, the docs of every attempt of `runId` but `keepAttempt`. */
export async function scheduleDocsCleanup(ctx: MutationCtx, runId: Id<"runs">, keepAttempt: number): Promise<void> {
  await ctx.scheduler.runAfter(0, internal.docs.cleanup, { runId, keepAttempt });
}

/** End the run in a final status other than `completed`; frees its slot. */
export async function finishRun(
  ctx: MutationCtx,
  run: Run,
  lease: Lease | null,
  status: "failed" | "dead" | "canceled",
  error: RunError | undefined,
  message: string,
): Promise<void> {
  const now = Date.now();
  await ctx.db.patch(run._id, {
    status,
    error,
    lastError: error ?? run.lastError,
    message,
    finishedAt: now,
    updatedAt: now,
    // A failed or dead run keeps its checkpoint: the operator's retry (`operator.retry`)
    // resumes from it. A canceled one is never retried: its files go, in the background.
    ...(status === "canceled" ? { checkpoint: undefined } : {}),
  });
  if (status === "canceled" && run.checkpoint !== undefined) {
    await ctx.scheduler.runAfter(0, internal.docs.dropCheckpoint, { runId: run._id });
  }
  if (lease !== null && lease.leaseUntil !== undefined) await ctx.db.patch(lease._id, { leaseUntil: undefined });
  await emit(ctx, run, { kind: "finished", status, error });
  await kick(ctx);
}

/**
 * End the current attempt. Retries remain: the run goes back to `pending` as attempt+1 with no
 * token (the dispatch action mints a new one), due after `delayMs`. None left: it ends in
 * `finalStatus` with `error`.
 */
export async function retryOrFinish(
  ctx: MutationCtx,
  run: Run,
  lease: Lease,
  error: RunError,
  opts: { delayMs: number; finalStatus: "failed" | "dead"; outcome: string },
): Promise<"retry" | "final"> {
  if (run.attempt >= run.maxAttempts) {
    const message = `${opts.finalStatus} after ${run.attempt} attempt(s): ${error.message}`;
    await finishRun(ctx, run, lease, opts.finalStatus, error, message);
    return "final";
  }
  const now = Date.now();
  const attempt = run.attempt + 1;
  const message = `attempt ${run.attempt} ended (${error.code}); attempt ${attempt} queued`;
  await ctx.db.patch(run._id, {
    status: "pending",
    attempt,
    claimedBy: undefined,
    claimedAt: undefined,
    dispatchedAt: undefined,
    deliveredAt: undefined,
    storedDocs: 0,
    progress: 0,
    currentStep: 0,
    lastError: error,
    message,
    updatedAt: now,
  });
  await resetLeaseForAttempt(ctx, lease, run.attempt, attempt, opts.outcome);
  const next = (await ctx.db.get(run._id))!;
  await emit(ctx, next, { kind: "status", status: "pending", message, lastError: error });
  await scheduleDocsCleanup(ctx, run._id, attempt);
  await enqueueRun(ctx, next, now + opts.delayMs);
  return "retry";
}

/** The lease of a run moving to `attempt`: no token, no holder (warm worker or Serverless Jobs
 * run) and no deadline yet; the previous attempt's token hash is kept so its worker repeating a
 * final report is still acknowledged. Shared by the automatic retry and the operator's. */
export async function resetLeaseForAttempt(
  ctx: MutationCtx,
  lease: Lease,
  previousAttempt: number,
  attempt: number,
  outcome: string,
): Promise<void> {
  await ctx.db.patch(lease._id, {
    attempt,
    previous: { attempt: previousAttempt, tokenHash: lease.tokenHash, outcome },
    tokenHash: undefined,
    tokenNonce: undefined,
    messageAt: undefined,
    sends: 0,
    leaseUntil: undefined,
    lastSeq: 0,
    runner: undefined,
    jobRunId: undefined,
  });
}
