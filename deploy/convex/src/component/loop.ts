/**
 * The one loop that owns the queue (as Workpool's `loop.ts`). Each run of `main`:
 *  1. recovery: runs whose deadline (`leases.leaseUntil`) passed go to their next attempt, or
 *     `dead` once attempts are used up (a dispatched run never claimed, a running one whose
 *     worker went silent); at most SWEEP_BATCH of them;
 *  2. dispatch: fills free slots from `queue`, highest priority then oldest, due entries only;
 *     at most DISPATCH_BATCH runs, scanning at most SCAN_LIMIT entries. A free warm slot
 *     first (a webhook to the warm worker); when none is free, or the warm worker said 503
 *     for that entry, a Serverless Jobs run if overflow is configured and under `maxRuns`;
 *  3. picks its next run: at once if a batch was cut short, else at the next due entry or the
 *     next lease check while runs are active, else idle until a producer kicks it.
 */
import { internal } from "./_generated/api.js";
import type { Id } from "./_generated/dataModel.js";
import { internalMutation, type MutationCtx, type QueryCtx } from "./_generated/server.js";
import { getConfig } from "./config.js";
import { emit } from "./events.js";
import { loopStateRow } from "./kick.js";
import { leaseOf, overflowOf, retryOrFinish, stopHolder } from "./model.js";
import { ACTIVE_STATUSES, isActive, type Runner } from "./shared.js";

export const SWEEP_BATCH = 50;
export const DISPATCH_BATCH = 50;
export const SCAN_LIMIT = 500;

/** Active runs per runner, counted up to `cap` in all (one lease read per active run: there
 * are at most `maxParallel + maxRuns` of them). A lease without a runner is warm. */
export async function countActiveByRunner(ctx: QueryCtx, cap: number): Promise<Record<Runner, number>> {
  const out: Record<Runner, number> = { warm: 0, run: 0 };
  let n = 0;
  for (const status of ACTIVE_STATUSES) {
    const rows = await ctx.db
      .query("runs")
      .withIndex("by_status", (q) => q.eq("status", status))
      .take(cap - n);
    for (const run of rows) out[(await leaseOf(ctx, run._id))?.runner ?? "warm"] += 1;
    n += rows.length;
    if (n >= cap) return out;
  }
  return out;
}

async function recover(ctx: MutationCtx, now: number): Promise<{ handled: number; full: boolean }> {
  // `gt(0)` leaves out leases with no deadline (runs holding no slot).
  const expired = await ctx.db
    .query("leases")
    .withIndex("by_lease", (q) => q.gt("leaseUntil", 0).lt("leaseUntil", now))
    .take(SWEEP_BATCH);
  for (const lease of expired) {
    const run = await ctx.db.get(lease.runId);
    if (run === null || !isActive(run.status) || run.attempt !== lease.attempt) {
      await ctx.db.patch(lease._id, { leaseUntil: undefined });
      continue;
    }
    const error =
      run.status === "dispatched"
        ? { code: "claim_timeout" as const, message: `attempt ${run.attempt} was not claimed in time` }
        : { code: "lease_expired" as const, message: `attempt ${run.attempt} stopped reporting (${run.status})` };
    const hadWorker = lease.tokenHash !== undefined;
    await retryOrFinish(ctx, run, lease, error, { delayMs: 0, finalStatus: "dead", outcome: "swept" });
    // In case it is still alive behind a partition: its callbacks now get `stale_attempt`,
    // and a run (which may also be stuck before its claim, still billed) is stopped.
    if (hadWorker) await stopHolder(ctx, run, lease);
  }
  return { handled: expired.length, full: expired.length === SWEEP_BATCH };
}

async function dispatch(
  ctx: MutationCtx,
  free: Record<Runner, number>,
  now: number,
): Promise<{ started: Id<"runs">[]; nextDue: number | undefined; full: boolean }> {
  const config = await getConfig(ctx);
  const started: Id<"runs">[] = [];
  let nextDue: number | undefined;
  let scanned = 0;
  if (free.warm <= 0 && free.run <= 0) return { started, nextDue, full: false };
  for await (const entry of ctx.db.query("queue").withIndex("by_rank")) {
    if (++scanned > SCAN_LIMIT) return { started, nextDue, full: true };
    const run = await ctx.db.get(entry.runId);
    if (run === null || run.status !== "pending") {
      await ctx.db.delete(entry._id); // canceled while queued
      continue;
    }
    if (entry.readyAt > now) {
      nextDue = Math.min(nextDue ?? Infinity, entry.readyAt);
      continue;
    }
    const warmBusy = entry.warmBusyUntil !== undefined && entry.warmBusyUntil > now;
    const runner: Runner | null = free.warm > 0 && !warmBusy ? "warm" : free.run > 0 ? "run" : null;
    if (runner === null) {
      // Only this entry's 503 keeps it from the free warm slot: try again then.
      if (warmBusy && free.warm > 0) nextDue = Math.min(nextDue ?? Infinity, entry.warmBusyUntil!);
      if (free.warm > 0) continue;
      return { started, nextDue, full: false };
    }
    free[runner] -= 1;
    const lease = (await leaseOf(ctx, run._id))!;
    await ctx.db.delete(entry._id);
    const message =
      runner === "warm" ? `dispatching attempt ${run.attempt}` : `starting a Serverless Jobs run for attempt ${run.attempt}`;
    await ctx.db.patch(run._id, { status: "dispatched", dispatchedAt: now, deliveredAt: undefined, message, updatedAt: now });
    if (runner === "warm") {
      // Claim deadline; includes the POST's own timeout so a slow answer is not swept.
      await ctx.db.patch(lease._id, {
        runner,
        jobRunId: undefined,
        leaseUntil: now + config.claimTimeoutMs + config.dispatchTimeoutMs,
      });
      await ctx.scheduler.runAfter(0, internal.dispatch.deliver, { runId: run._id, attempt: run.attempt });
    } else {
      // A run queues and pulls the image before it can claim: its own, longer deadline.
      const claimMs = config.overflow?.claimTimeoutMs ?? config.claimTimeoutMs;
      await ctx.db.patch(lease._id, {
        runner,
        jobRunId: undefined,
        leaseUntil: now + claimMs + config.dispatchTimeoutMs,
      });
      await ctx.scheduler.runAfter(0, internal.overflow.startRun, { runId: run._id, attempt: run.attempt });
    }
    await emit(ctx, { ...run, status: "dispatched" }, { kind: "status", status: "dispatched", message });
    started.push(run._id);
    if (free.warm <= 0 && free.run <= 0) return { started, nextDue, full: false };
    if (started.length >= DISPATCH_BATCH) return { started, nextDue, full: true };
  }
  return { started, nextDue, full: false };
}

export const main = internalMutation({
  args: {},
  handler: async (ctx): Promise<{ recovered: number; dispatched: number }> => {
    const now = Date.now();
    const config = await getConfig(ctx);
    const recovered = await recover(ctx, now);
    const maxRuns = overflowOf(config)?.maxRuns ?? 0;
    const active = await countActiveByRunner(ctx, config.maxParallel + maxRuns);
    const free = { warm: config.maxParallel - active.warm, run: maxRuns - active.run };
    const { started, nextDue, full } = await dispatch(ctx, free, now);
    const row = await loopStateRow(ctx);
    if (recovered.full || full) {
      const scheduledId = await ctx.scheduler.runAfter(0, internal.loop.main, {});
      await ctx.db.patch(row._id, { state: { kind: "running", scheduledId } });
    } else {
      const busy = active.warm + active.run + started.length > 0;
      const wakeAt = Math.min(nextDue ?? Infinity, busy ? now + config.sweepIntervalMs : Infinity);
      if (wakeAt === Infinity) {
        await ctx.db.patch(row._id, { state: { kind: "idle" } });
      } else {
        const scheduledId = await ctx.scheduler.runAt(wakeAt, internal.loop.main, {});
        await ctx.db.patch(row._id, { state: { kind: "scheduled", at: wakeAt, scheduledId } });
      }
    }
    return { recovered: recovered.handled, dispatched: started.length };
  },
});

/**
 * Safety net (cron, every minute): if the loop's scheduled run is gone without having
 * rescheduled itself (it threw), start it again. A healthy loop is left alone.
 */
export const watchdog = internalMutation({
  args: {},
  handler: async (ctx): Promise<boolean> => {
    const row = await loopStateRow(ctx);
    if (row.state.kind === "idle") return false;
    const scheduled = await ctx.db.system.get(row.state.scheduledId);
    if (scheduled !== null && (scheduled.state.kind === "pending" || scheduled.state.kind === "inProgress")) {
      return false;
    }
    const scheduledId = await ctx.scheduler.runAfter(0, internal.loop.main, {});
    await ctx.db.patch(row._id, { state: { kind: "running", scheduledId } });
    return true;
  },
});
