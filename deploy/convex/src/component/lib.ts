/**
 * What the host calls, through its `Fondation` client (`components.fondation.lib.*`). These
 * are reachable only from the host's own functions, never from a browser: the host applies
 * its auth before calling them.
 */
import { paginationOptsValidator, paginationResultValidator } from "convex/server";
import { v } from "convex/values";
import { mutation, query, type MutationCtx } from "./_generated/server.js";
import { noteChange } from "./board.js";
import { ensureConfig } from "./config.js";
import { emit } from "./events.js";
import {
  enqueueRun,
  finishRun,
  leaseOf,
  runView,
  stopHolder,
  validateEnqueue,
} from "./model.js";
import { isActive, isFinal, vConfig, vDocView, vRunOptions, vRunView } from "./shared.js";

/** Queue a run; returns its id. The loop dispatches it as soon as a slot is free. */
export const enqueue = mutation({
  args: {
    config: vConfig,
    repositoryUrl: v.string(),
    ref: v.optional(v.string()),
    options: v.optional(vRunOptions),
    priority: v.optional(v.number()),
    maxAttempts: v.optional(v.number()),
    onEvent: v.optional(v.object({ fnHandle: v.string(), context: v.optional(v.any()) })),
  },
  returns: v.id("runs"),
  handler: async (ctx, args) => {
    const { repositoryUrl, priority } = validateEnqueue(args);
    const config = await ensureConfig(ctx, args.config);
    const now = Date.now();
    const runId = await ctx.db.insert("runs", {
      status: "pending",
      repositoryUrl,
      ref: args.ref,
      options: args.options,
      priority,
      attempt: 1,
      maxAttempts: args.maxAttempts ?? config.maxAttempts,
      currentStep: 0,
      totalSteps: 0,
      progress: 0,
      message: "queued",
      storedDocs: 0,
      docsCount: 0,
      onEvent: args.onEvent,
      createdAt: now,
      updatedAt: now,
    });
    await ctx.db.insert("leases", { runId, attempt: 1, sends: 0, lastSeq: 0, logSeq: 0 });
    await noteChange(ctx, runId, { kind: "enqueued" });
    await enqueueRun(ctx, (await ctx.db.get(runId))!, now);
    return runId;
  },
});

/** Cancel a run. If a worker may hold it, it is told: a signed `job.cancel` webhook to the warm
 * worker, or a stop of the Serverless Jobs run. */
export const cancel = mutation({
  args: { runId: v.string() },
  returns: v.object({ ok: v.boolean(), status: v.string() }),
  handler: async (ctx, args) => await cancelRun(ctx, args.runId),
});

/** `cancel`'s rule, shared with the operator's `cancelJob`. */
export async function cancelRun(ctx: MutationCtx, runId: string): Promise<{ ok: boolean; status: string }> {
  const id = ctx.db.normalizeId("runs", runId);
  const run = id === null ? null : await ctx.db.get(id);
  if (run === null) return { ok: false, status: "not_found" };
  if (run.status === "canceled") return { ok: true, status: "canceled" };
  if (isFinal(run.status)) return { ok: false, status: run.status };
  const lease = await leaseOf(ctx, run._id);
  // Only an attempt whose webhook may have gone out has a worker to tell.
  const tellWorker = isActive(run.status) && lease?.tokenHash !== undefined;
  await finishRun(ctx, run, lease, "canceled", undefined, "canceled");
  // A run is stopped through the Jobs API (and its next callback is refused as canceled).
  if (tellWorker && lease !== null) await stopHolder(ctx, run, lease);
  return { ok: true, status: "canceled" };
}

/** The run as the host may show it (never a token); null when unknown. */
export const status = query({
  args: { runId: v.string() },
  returns: v.union(v.null(), vRunView),
  handler: async (ctx, args) => {
    const id = ctx.db.normalizeId("runs", args.runId);
    const run = id === null ? null : await ctx.db.get(id);
    return run === null ? null : runView(run);
  },
});

/**
 * The current attempt's docs in reading order (yaml, then chapters and tutorials by index).
 * Paginated by hand over the `order` key (the cursor is the last key returned) rather than with
 * `.paginate()`, which components could not use for long and which would tie the host's page
 * boundaries to ours.
 */
export const listDocs = query({
  args: { runId: v.string(), paginationOpts: paginationOptsValidator },
  returns: paginationResultValidator(vDocView),
  handler: async (ctx, args) => {
    const id = ctx.db.normalizeId("runs", args.runId);
    const run = id === null ? null : await ctx.db.get(id);
    if (run === null) return { page: [], isDone: true, continueCursor: "" };
    const after = args.paginationOpts.cursor;
    const numItems = Math.max(1, Math.min(100, Math.floor(args.paginationOpts.numItems)));
    const rows = await ctx.db
      .query("docs")
      .withIndex("by_run_attempt_order", (q) => {
        const same = q.eq("runId", run._id).eq("attempt", run.attempt);
        return after ? same.gt("order", after) : same;
      })
      .take(numItems + 1);
    const page = rows.slice(0, numItems);
    return {
      page: page.map((d) => ({
        slug: d.slug,
        title: d.title,
        kind: d.kind,
        chapterIndex: d.chapterIndex,
        content: d.content,
        attempt: d.attempt,
      })),
      isDone: rows.length <= numItems,
      continueCursor: page.at(-1)?.order ?? after ?? "",
    };
  },
});
