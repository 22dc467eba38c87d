/**
 * Producers (enqueue, cancel, the worker's final reports, a retry) only write their own rows
 * and call `kick`; the one loop (`loop.main`) reads the queue. `kick` writes `loopState` only
 * when the loop is neither running nor due by `dueAt`, so a burst of producers mostly reads it.
 */
import { internal } from "./_generated/api.js";
import type { Doc } from "./_generated/dataModel.js";
import type { MutationCtx } from "./_generated/server.js";

/** A loop run scheduled within this much of the due time counts as "soon enough". Small:
 * every millisecond here is dispatch latency (enqueue → webhook). */
const SOON_MS = 20;

export async function loopStateRow(ctx: MutationCtx): Promise<Doc<"loopState">> {
  const row = await ctx.db.query("loopState").first();
  if (row !== null) return row;
  const id = await ctx.db.insert("loopState", { state: { kind: "idle" } });
  return (await ctx.db.get(id))!;
}

/** Make sure the loop runs by `dueAt` (default: now). */
export async function kick(ctx: MutationCtx, dueAt: number = Date.now()): Promise<void> {
  const row = await loopStateRow(ctx);
  const { state } = row;
  const now = Date.now();
  // A running loop re-reads the queue before it goes idle or picks its next wake-up.
  if (state.kind === "running") return;
  if (state.kind === "scheduled") {
    if (state.at <= Math.max(dueAt, now + SOON_MS)) return;
    const scheduled = await ctx.db.system.get(state.scheduledId);
    if (scheduled !== null && scheduled.state.kind === "pending") await ctx.scheduler.cancel(state.scheduledId);
  }
  if (dueAt > now + SOON_MS) {
    const scheduledId = await ctx.scheduler.runAt(dueAt, internal.loop.main, {});
    await ctx.db.patch(row._id, { state: { kind: "scheduled", at: dueAt, scheduledId } });
    return;
  }
  const scheduledId = await ctx.scheduler.runAfter(0, internal.loop.main, {});
  await ctx.db.patch(row._id, { state: { kind: "running", scheduledId } });
}
