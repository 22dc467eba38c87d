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
