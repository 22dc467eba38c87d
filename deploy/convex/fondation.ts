/**
 * `fondation:*` — the functions the contract names: UI mutations/queries, the worker's
 * callbacks (public: the container holds no deploy key, it proves itself with the per-attempt
 * callback token), and the internal queue pump and sweeper.
 */
import { ConvexError, v } from "convex/values";
import type { Id } from "./_generated/dataModel";
import { internalMutation, mutation, query } from "./_generated/server";
import { settings } from "./config";
import {
  appendLogs,
  authorize,
  backoffMs,
  isRepeatOfPrevious,
  phaseIndex,
  publicJob,
  pumpQueue,
  retryOrFinish,
  runningRefusal,
  scheduleCancelWebhook,
} from "./model";
import { sweepExpired } from "./sweeper";
import { callbackAuth, docKind, failureCode, isActive, isFinal, isRunning, jobOptions, runningPhase } from "./validators";

const MAX_ATTEMPTS_CAP = 20;

// ───────────────────────────── UI ─────────────────────────────

/** Queue a job. Returns its id; dispatch starts at once if a slot is free. */
export const create = mutation({
  args: {
    repositoryUrl: v.string(),
    ref: v.optional(v.string()),
    options: v.optional(jobOptions),
    priority: v.optional(v.number()),
    maxAttempts: v.optional(v.number()),
  },
  handler: async (ctx, args): Promise<Id<"jobs">> => {
    const url = args.repositoryUrl.trim();
    // The worker does the real allow-listing; refusing obvious junk here keeps it out of the queue.
    if (!/^https?:\/\/[^\s]+$/i.test(url) || url.length > 2048) {
      throw new ConvexError({ code: "invalid_repository_url", message: "repositoryUrl must be an http(s) URL" });
    }
    if (args.ref !== undefined && (args.ref === "" || args.ref.startsWith("-") || args.ref.length > 255)) {
      throw new ConvexError({ code: "invalid_ref", message: "ref must be a non-empty name not starting with '-'" });
    }
    // Same rules as the worker's webhook schema (app/payload.py), so a job it would refuse
    // with a 422 (and so end `dead`) is refused here instead.
    const model = args.options?.model;
    if (model !== undefined && !/^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$/.test(model)) {
      throw new ConvexError({ code: "invalid_model", message: "options.model is not a valid model name" });
    }
    const steps = args.options?.steps;
    if (steps !== undefined && (steps.length > 16 || !steps.every((s) => /^[a-z][a-z0-9_-]{0,31}$/.test(s)))) {
      throw new ConvexError({ code: "invalid_steps", message: "options.steps must be at most 16 step names" });
    }
    const priority = args.priority ?? 0;
    // The worker accepts integers in ±1e6 only (its webhook schema); anything else would
    // come back as a 422 and kill the job, so refuse it here, where the UI can show why.
    if (!Number.isInteger(priority) || Math.abs(priority) > 1_000_000) {
      throw new ConvexError({ code: "invalid_priority", message: "priority must be an integer within ±1000000" });
    }
    const maxAttempts = Math.min(
      MAX_ATTEMPTS_CAP,
      Math.max(1, Math.floor(args.maxAttempts ?? settings().defaultMaxAttempts)),
    );
    const now = Date.now();
    const jobId = await ctx.db.insert("jobs", {
      status: "pending",
      repositoryUrl: url,
      ref: args.ref,
      options: args.options,
      priority,
      queueRank: priority === 0 ? 0 : -priority, // no -0: it would sort apart from 0
      progress: 0,
      currentStep: 0,
      totalSteps: 0,
      message: "queued",
      lastSeq: 0,
      docsCount: 0,
      storedDocs: 0,
      attempt: 1,
      maxAttempts,
      nextAttemptAt: now,
      logSeq: 0,
      logCount: 0,
      createdAt: now,
      updatedAt: now,
    });
    await pumpQueue(ctx);
    return jobId;
  },
});

/** Cancel a job. If a worker may hold it, a signed `job.cancel` webhook is sent. */
export const cancel = mutation({
  args: { jobId: v.id("jobs") },
  handler: async (ctx, { jobId }): Promise<{ ok: boolean; status: string }> => {
    const job = await ctx.db.get(jobId);
    if (job === null) return { ok: false, status: "not_found" };
    if (job.status === "canceled") return { ok: true, status: "canceled" };
    if (isFinal(job.status)) return { ok: false, status: job.status };
    const now = Date.now();
    // Only a job whose webhook may have gone out has a worker to tell (token minted = sent or sending).
    const tellWorker = isActive(job.status) && job.callbackToken !== undefined;
    await ctx.db.patch(jobId, {
      status: "canceled",
      message: "canceled",
      leaseUntil: undefined,
      finishedAt: now,
      updatedAt: now,
    });
    if (tellWorker) await scheduleCancelWebhook(ctx, jobId, job.attempt);
    await pumpQueue(ctx);
    return { ok: true, status: "canceled" };
  },
});

/** The job with its progress, without secrets; null when unknown. */
export const get = query({
  args: { jobId: v.string() },
  handler: async (ctx, { jobId }) => {
    const id = ctx.db.normalizeId("jobs", jobId);
    const job = id === null ? null : await ctx.db.get(id);
    return job === null ? null : publicJob(job);
  },
});

const KIND_ORDER = { yaml: 0, chapter: 1, tutorial: 2 } as const;

/** The current attempt's docs: yaml first, then chapters and tutorials by chapterIndex. */
export const listDocs = query({
  args: { jobId: v.string() },
  handler: async (ctx, { jobId }) => {
    const id = ctx.db.normalizeId("jobs", jobId);
    const job = id === null ? null : await ctx.db.get(id);
    if (job === null) return [];
    const docs = await ctx.db
      .query("docs")
      .withIndex("by_job_attempt_slug", (q) => q.eq("jobId", job._id).eq("attempt", job.attempt))
      .collect();
    docs.sort(
      (a, b) =>
        KIND_ORDER[a.kind] - KIND_ORDER[b.kind] ||
        (a.chapterIndex ?? Number.MAX_SAFE_INTEGER) - (b.chapterIndex ?? Number.MAX_SAFE_INTEGER) ||
        (a.slug < b.slug ? -1 : a.slug > b.slug ? 1 : 0),
    );
    return docs.map((d) => ({
      slug: d.slug,
      title: d.title,
      kind: d.kind,
      chapterIndex: d.chapterIndex,
      content: d.content,
      attempt: d.attempt,
    }));
  },
});

/** The last `limit` (default 100, at most 1000) log lines, oldest first. */
export const recentLogs = query({
  args: { jobId: v.string(), limit: v.optional(v.number()) },
  handler: async (ctx, { jobId, limit }) => {
    const id = ctx.db.normalizeId("jobs", jobId);
    if (id === null) return [];
    const n = Math.min(1000, Math.max(1, Math.floor(limit ?? 100)));
    const rows = await ctx.db
      .query("jobLogs")
      .withIndex("by_job_seq", (q) => q.eq("jobId", id))
      .order("desc")
      .take(n);
    return rows.reverse().map((r) => ({ seq: r.seq, attempt: r.attempt, line: r.line, at: r.at }));
  },
});

// ───────────────────────── worker callbacks ─────────────────────────

/** First call of an attempt: the worker takes the job. Idempotent for the same worker. */
export const claim = mutation({
  args: callbackAuth,
  handler: async (ctx, args): Promise<{ ok: true; cloneToken?: string } | { ok: false; reason: string }> => {
    const auth = await authorize(ctx, args);
    if ("refusal" in auth) return auth.refusal;
    const { job } = auth;
    const s = settings();
    const granted = s.gitCloneToken ? { ok: true as const, cloneToken: s.gitCloneToken } : { ok: true as const };
    const now = Date.now();
    if (isRunning(job.status)) {
      if (job.claimedBy !== args.workerId) return { ok: false, reason: "already_claimed" };
      await ctx.db.patch(job._id, { leaseUntil: now + s.leaseMs, updatedAt: now });
      return granted;
    }
    if (job.status !== "dispatched") {
      const refusal = runningRefusal(job, args.workerId);
      return refusal ?? { ok: false, reason: "not_dispatched" };
    }
    await ctx.db.patch(job._id, {
      status: "claimed",
      claimedBy: args.workerId,
      claimedAt: now,
      leaseUntil: now + s.leaseMs,
      message: `claimed by ${args.workerId}`,
      updatedAt: now,
    });
    return granted;
  },
});

/** Step change and heartbeat. Stale `seq` is acknowledged and ignored. */
export const progress = mutation({
  args: {
    ...callbackAuth,
    seq: v.number(),
    status: runningPhase,
    currentStep: v.number(),
    totalSteps: v.number(),
    message: v.string(),
    logs: v.optional(v.array(v.string())),
  },
  handler: async (ctx, args): Promise<{ ok: true; stale?: true } | { ok: false; reason: string }> => {
    const auth = await authorize(ctx, args);
    if ("refusal" in auth) return auth.refusal;
    const { job } = auth;
    const refusal = runningRefusal(job, args.workerId);
    if (refusal) return refusal;
    if (args.seq <= job.lastSeq) return { ok: true, stale: true };
    if (phaseIndex(args.status) < phaseIndex(job.status)) {
      return { ok: false, reason: "invalid_transition" };
    }
    const now = Date.now();
    const computed =
      args.totalSteps > 0 ? Math.min(1, Math.max(0, args.currentStep / args.totalSteps)) : job.progress;
    const logState = args.logs && args.logs.length > 0 ? await appendLogs(ctx, job, args.logs) : {};
    await ctx.db.patch(job._id, {
      status: args.status,
      lastSeq: args.seq,
      currentStep: args.currentStep,
      totalSteps: args.totalSteps,
      message: args.message.slice(0, 2_000),
      // Monotonic within an attempt: a UI bar that goes backwards reads as a bug.
      progress: Math.max(job.progress, computed),
      leaseUntil: now + settings().leaseMs,
      updatedAt: now,
      ...logState,
    });
    return { ok: true };
  },
});

/** Store generated docs; re-sending a slug replaces it. */
export const putDocs = mutation({
  args: {
    ...callbackAuth,
    docs: v.array(
      v.object({
        slug: v.string(),
        title: v.string(),
        kind: docKind,
        chapterIndex: v.union(v.number(), v.null()),
        content: v.string(),
      }),
    ),
  },
  handler: async (ctx, args): Promise<{ ok: true; stored: number } | { ok: false; reason: string }> => {
    const auth = await authorize(ctx, args);
    if ("refusal" in auth) return auth.refusal;
    const { job } = auth;
    const refusal = runningRefusal(job, args.workerId);
    if (refusal) return refusal;
    if (args.docs.some((d) => d.slug.trim() === "" || d.slug.length > 512)) {
      return { ok: false, reason: "invalid_doc" };
    }
    const now = Date.now();
    let added = 0;
    for (const d of args.docs) {
      const existing = await ctx.db
        .query("docs")
        .withIndex("by_job_attempt_slug", (q) =>
          q.eq("jobId", job._id).eq("attempt", job.attempt).eq("slug", d.slug),
        )
        .unique();
      const row = { ...d, jobId: job._id, attempt: job.attempt, updatedAt: now };
      if (existing) await ctx.db.replace(existing._id, row);
      else {
        await ctx.db.insert("docs", row);
        added++;
      }
    }
    await ctx.db.patch(job._id, {
      storedDocs: job.storedDocs + added,
      leaseUntil: now + settings().leaseMs,
      updatedAt: now,
    });
    return { ok: true, stored: args.docs.length };
  },
});

/** Success. Repeating it is harmless. Frees the slot. */
export const complete = mutation({
  args: { ...callbackAuth, docsCount: v.number(), durationMs: v.number() },
  handler: async (ctx, args): Promise<{ ok: true } | { ok: false; reason: string }> => {
    const auth = await authorize(ctx, args);
    if ("refusal" in auth) return auth.refusal;
    const { job } = auth;
    if (job.status === "completed") return { ok: true };
    const refusal = runningRefusal(job, args.workerId);
    if (refusal) return refusal;
    const now = Date.now();
    // Only this attempt's docs belong to the course: drop what earlier attempts left behind.
    for await (const d of ctx.db.query("docs").withIndex("by_job_attempt_slug", (q) => q.eq("jobId", job._id))) {
      if (d.attempt !== job.attempt) await ctx.db.delete(d._id);
    }
    await ctx.db.patch(job._id, {
      status: "completed",
      progress: 1,
      docsCount: args.docsCount,
      result: { docsCount: args.docsCount, durationMs: args.durationMs, storedDocs: job.storedDocs },
      message: `completed: ${args.docsCount} docs`,
      leaseUntil: undefined,
      finishedAt: now,
      updatedAt: now,
    });
    await pumpQueue(ctx);
    return { ok: true };
  },
});

/** Failure. Retryable failures start the next attempt (at once for `interrupted`). */
export const fail = mutation({
  args: { ...callbackAuth, code: failureCode, message: v.string(), retryable: v.boolean() },
  handler: async (ctx, args): Promise<{ ok: true } | { ok: false; reason: string }> => {
    const id = ctx.db.normalizeId("jobs", args.jobId);
    const current = id === null ? null : await ctx.db.get(id);
    // The previous attempt's worker repeating its fail after we already moved on.
    if (current !== null && isRepeatOfPrevious(current, args, "fail")) return { ok: true };
    const auth = await authorize(ctx, args);
    if ("refusal" in auth) return auth.refusal;
    const { job } = auth;
    if (job.status === "failed") return { ok: true };
    // A worker may fail a job it accepted but never claimed (e.g. interrupted while queued).
    if (job.status !== "dispatched") {
      const refusal = runningRefusal(job, args.workerId);
      if (refusal) return refusal;
    } else if (job.claimedBy !== undefined && job.claimedBy !== args.workerId) {
      return { ok: false, reason: "already_claimed" };
    }
    const error = { code: args.code, message: args.message.slice(0, 4_000) };
    if (args.retryable) {
      const delayMs = args.code === "interrupted" ? 0 : backoffMs(job.attempt);
      await retryOrFinish(ctx, job, error, { delayMs, finalStatus: "failed", outcome: "fail" });
    } else {
      const now = Date.now();
      await ctx.db.patch(job._id, {
        status: "failed",
        error,
        lastError: error,
        message: `failed: ${error.message}`,
        leaseUntil: undefined,
        finishedAt: now,
        updatedAt: now,
      });
    }
    await pumpQueue(ctx);
    return { ok: true };
  },
});

// ───────────────────────────── internal ─────────────────────────────

/** Dispatch due pending jobs into free slots (scheduled when a deferred job becomes due). */
export const pump = internalMutation({
  args: {},
  handler: async (ctx): Promise<{ dispatched: number }> => ({ dispatched: (await pumpQueue(ctx)).length }),
});

/** Re-dispatch jobs never claimed or whose lease ran out; then fill free slots. Cron: 30 s. */
export const sweep = internalMutation({
  args: {},
  handler: async (ctx) => {
    const swept = await sweepExpired(ctx);
    const dispatched = (await pumpQueue(ctx)).length;
    return { ...swept, dispatched };
  },
});
