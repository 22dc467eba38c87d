/**
 * The host's jobs: its own auth, its own rows; the component does the queueing. The worker
 * never sees these functions, and the component sees the host only through `onEvent` and
 * `cloneToken`.
 */
import { vFondationEvent, type DocView, type RunStatus, type RunView } from "@fondation/convex-worker";
import { paginationOptsValidator, type PaginationResult } from "convex/server";
import { ConvexError, v } from "convex/values";
import { internal } from "./_generated/api";
import type { Doc, Id } from "./_generated/dataModel";
import { internalMutation, internalQuery, mutation, query, type MutationCtx, type QueryCtx } from "./_generated/server";
import { fondation } from "./fondation";

async function userId(ctx: QueryCtx): Promise<string> {
  const identity = await ctx.auth.getUserIdentity();
  if (identity === null) throw new ConvexError({ code: "unauthenticated", message: "sign in first" });
  return identity.subject;
}

async function ownJob(ctx: QueryCtx, jobId: Id<"jobs">): Promise<Doc<"jobs">> {
  const job = await ctx.db.get(jobId);
  if (job === null || job.userId !== (await userId(ctx))) {
    throw new ConvexError({ code: "not_found", message: "no such job" });
  }
  return job;
}

const startArgs = {
  repositoryUrl: v.string(),
  ref: v.optional(v.string()),
  prompt: v.optional(v.string()),
  priority: v.optional(v.number()),
  maxAttempts: v.optional(v.number()),
};

async function start(
  ctx: MutationCtx,
  user: string,
  args: { repositoryUrl: string; ref?: string; prompt?: string; priority?: number; maxAttempts?: number },
): Promise<{ jobId: Id<"jobs">; runId: string }> {
  const url = args.repositoryUrl.trim();
  const existing = await ctx.db
    .query("repositories")
    .withIndex("by_user_url", (q) => q.eq("userId", user).eq("url", url))
    .unique();
  const repositoryId = existing?._id ?? (await ctx.db.insert("repositories", { userId: user, url }));
  const jobId = await ctx.db.insert("jobs", {
    userId: user,
    repositoryId,
    prompt: args.prompt ?? "",
    status: "pending",
    progress: "Queued",
  });
  const runId = await fondation.enqueue(ctx, {
    repositoryUrl: url,
    ref: args.ref,
    priority: args.priority,
    maxAttempts: args.maxAttempts,
    context: { jobId },
  });
  await ctx.db.patch(jobId, { runId });
  return { jobId, runId };
}

/** A signed-in user asks for a course. */
export const request = mutation({
  args: startArgs,
  handler: async (ctx, args): Promise<Id<"jobs">> => (await start(ctx, await userId(ctx), args)).jobId,
});

/** The same for the app's own server code (and the tests), for a given user. */
export const create = internalMutation({
  args: { userId: v.string(), ...startArgs },
  handler: async (ctx, { userId: user, ...args }): Promise<{ jobId: Id<"jobs">; runId: string }> =>
    await start(ctx, user, args),
});

export const cancel = mutation({
  args: { jobId: v.id("jobs") },
  handler: async (ctx, { jobId }): Promise<{ ok: boolean; status: string }> => {
    const job = await ownJob(ctx, jobId);
    if (job.runId === undefined) return { ok: false, status: job.status };
    return await fondation.cancel(ctx, job.runId);
  },
});

/** The same for the app's own server code (and the tests), on behalf of a given user. */
export const cancelFor = internalMutation({
  args: { userId: v.string(), jobId: v.id("jobs") },
  handler: async (ctx, { userId: user, jobId }): Promise<{ ok: boolean; status: string }> => {
    const job = await ctx.db.get(jobId);
    if (job === null || job.userId !== user) throw new ConvexError({ code: "not_found", message: "no such job" });
    if (job.runId === undefined) return { ok: false, status: job.status };
    return await fondation.cancel(ctx, job.runId);
  },
});

export const get = query({
  args: { jobId: v.id("jobs") },
  handler: async (ctx, { jobId }): Promise<Doc<"jobs">> => await ownJob(ctx, jobId),
});

/** The run behind a job, and its docs, for the app's server code and the tests. */
export const runStatus = internalQuery({
  args: { runId: v.string() },
  handler: async (ctx, { runId }): Promise<RunView | null> => await fondation.status(ctx, runId),
});

export const runDocs = internalQuery({
  args: { runId: v.string(), paginationOpts: paginationOptsValidator },
  handler: async (ctx, { runId, paginationOpts }): Promise<PaginationResult<DocView>> =>
    await fondation.listDocs(ctx, runId, paginationOpts),
});

const STATUS: Record<RunStatus, Doc<"jobs">["status"]> = {
  pending: "pending",
  dispatched: "pending",
  claimed: "pending",
  cloning: "cloning",
  analyzing: "analyzing",
  gathering: "gathering",
  completed: "completed",
  failed: "failed",
  dead: "failed",
  canceled: "canceled",
};

/** Docs can be close to 1 MiB: delete a few per transaction (Convex reads at most 16 MiB). */
const DELETE_BATCH = 8;

/** Deletes this job's docs left by earlier attempts, in batches. */
export const dropOlderDocs = internalMutation({
  args: { jobId: v.id("jobs"), attempt: v.number() },
  handler: async (ctx, { jobId, attempt }): Promise<null> => {
    const older = await ctx.db
      .query("docs")
      .withIndex("by_job_attempt", (q) => q.eq("jobId", jobId).lt("attempt", attempt))
      .take(DELETE_BATCH);
    for (const d of older) await ctx.db.delete(d._id);
    if (older.length === DELETE_BATCH) await ctx.scheduler.runAfter(0, internal.jobs.dropOlderDocs, { jobId, attempt });
    return null;
  },
});

/** Maps the component's events into the host's rows, in the host's shape. */
export const onFondationEvent = internalMutation({
  args: vFondationEvent,
  handler: async (ctx, { change, ...event }): Promise<null> => {
    const jobId = (event.context as { jobId: Id<"jobs"> } | undefined)?.jobId;
    const job = jobId === undefined ? null : await ctx.db.get(jobId);
    if (job === null) return null;
    switch (change.kind) {
      case "status":
        await ctx.db.patch(job._id, {
          status: STATUS[change.status],
          progress: change.lastError ? `Retrying (attempt ${event.attempt}): ${change.lastError.message}` : change.message,
        });
        break;
      case "step":
        await ctx.db.patch(job._id, {
          status: STATUS[change.status],
          progress:
            change.totalSteps > 0 ? `Step ${change.currentStep}/${change.totalSteps}: ${change.message}` : change.message,
        });
        break;
      case "logs":
        for (const l of change.lines) {
          await ctx.db.insert("jobLogs", { jobId: job._id, ts: event.at, seq: l.seq, level: "info", msg: l.line });
        }
        break;
      // The course as it grows: partial docs go where the final ones will (same slugs, a
      // reviewed chapter over its draft); the `docs` events of the final upload replace them.
      case "partialDocs":
      case "docs":
        for (const d of change.docs) {
          const row = {
            repositoryId: job.repositoryId,
            jobId: job._id,
            slug: d.slug,
            title: d.title,
            kind: d.kind,
            chapterIndex: d.chapterIndex ?? -1,
            content: d.content,
            attempt: event.attempt,
          };
          const existing = await ctx.db
            .query("docs")
            .withIndex("by_job_slug", (q) => q.eq("jobId", job._id).eq("slug", d.slug))
            .unique();
          if (existing) await ctx.db.replace(existing._id, row);
          else await ctx.db.insert("docs", row);
        }
        break;
      case "completed":
        if (event.attempt > 1) await ctx.scheduler.runAfter(0, internal.jobs.dropOlderDocs, { jobId: job._id, attempt: event.attempt });
        await ctx.db.patch(job._id, {
          status: "completed",
          progress: `Completed: ${change.docsCount} docs`,
          docsCount: change.docsCount,
          completedAt: event.at,
          error: undefined,
        });
        break;
      case "finished":
        await ctx.db.patch(job._id, {
          status: STATUS[change.status],
          error: change.error?.message ?? change.status,
          completedAt: event.at,
        });
        break;
    }
    return null;
  },
});

/** The token for this run's repository host, if the job's user stored one for that host. */
export const cloneToken = internalQuery({
  args: { runId: v.string(), repositoryUrl: v.string(), context: v.optional(v.any()) },
  handler: async (ctx, { repositoryUrl, context }): Promise<string | null> => {
    const jobId = (context as { jobId?: Id<"jobs"> } | undefined)?.jobId;
    const job = jobId === undefined ? null : await ctx.db.get(jobId);
    if (job === null) return null;
    let host: string;
    try {
      host = new URL(repositoryUrl).host.toLowerCase();
    } catch {
      return null;
    }
    const row = await ctx.db
      .query("gitTokens")
      .withIndex("by_user_host", (q) => q.eq("userId", job.userId).eq("host", host))
      .unique();
    return row?.token ?? null;
  },
});
