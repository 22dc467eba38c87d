/**
 * Background deletion of docs that no longer belong to the course (earlier attempts'). Docs
 * can be close to 1 MiB each, so a transaction deletes a few at a time and schedules the rest.
 */
import { v } from "convex/values";
import { internal } from "./_generated/api.js";
import { internalMutation } from "./_generated/server.js";

/** 8 docs of up to 1 MiB stay well under a transaction's read and write limits. */
export const DELETE_BATCH = 8;

export const cleanup = internalMutation({
  args: { runId: v.id("runs"), keepAttempt: v.number() },
  returns: v.number(),
  handler: async (ctx, { runId, keepAttempt }) => {
    const older = await ctx.db
      .query("docs")
      .withIndex("by_run_attempt_slug", (q) => q.eq("runId", runId).lt("attempt", keepAttempt))
      .take(DELETE_BATCH);
    for (const d of older) await ctx.db.delete(d._id);
    if (older.length === DELETE_BATCH) {
      await ctx.scheduler.runAfter(0, internal.docs.cleanup, { runId, keepAttempt });
    }
    return older.length;
  },
});

/** Deletes the run's checkpoint files except those of `keepCommit` (all when unset). */
export const dropCheckpoint = internalMutation({
  args: { runId: v.id("runs"), keepCommit: v.optional(v.string()) },
  returns: v.number(),
  handler: async (ctx, { runId, keepCommit }) => {
    let deleted = 0;
    let scanned = 0;
    // Kept files come first or last in the index: skip them by range, never by reading them.
    const ranges =
      keepCommit === undefined
        ? [ctx.db.query("checkpointFiles").withIndex("by_run_commit_path", (q) => q.eq("runId", runId))]
        : [
            ctx.db.query("checkpointFiles").withIndex("by_run_commit_path", (q) => q.eq("runId", runId).lt("commit", keepCommit)),
            ctx.db.query("checkpointFiles").withIndex("by_run_commit_path", (q) => q.eq("runId", runId).gt("commit", keepCommit)),
          ];
    for (const range of ranges) {
      const rows = await range.take(DELETE_BATCH - scanned);
      scanned += rows.length;
      for (const f of rows) {
        await ctx.db.delete(f._id);
        deleted++;
      }
      if (scanned >= DELETE_BATCH) break;
    }
    if (scanned >= DELETE_BATCH) {
      await ctx.scheduler.runAfter(0, internal.docs.dropCheckpoint, { runId, keepCommit });
    }
    return deleted;
  },
});
