/**
 * What the operator's board reads, kept up to date in the same transactions as the changes it
 * shows, so `operator.boardSnapshot` reads SHARDS rows for its counts and version instead of
 * scanning `runs`. Called from `emit` (every change the host is told of), from `lib.enqueue`
 * (a new run tells no one) and from the operator's own mutations.
 *
 * The counts follow each run's `boardStatus` (the status it is counted under): a change moves
 * the run from that count to its current status's, so a status change that skipped this (none
 * should) is corrected by the run's next change.
 */
import type { Doc, Id } from "./_generated/dataModel.js";
import type { MutationCtx, QueryCtx } from "./_generated/server.js";
import { isFinal, type FondationChange, type RunError } from "./shared.js";

/** Log lines kept per run for the board's job page. */
export const LOG_TAIL = 40;

/**
 * The version and counts are spread over SHARDS rows, each change writing one picked at random,
 * so concurrent producers (50 enqueues at once) mostly write different rows instead of all
 * conflicting on one, as Convex's sharded counter does. A shard's count may go negative (a run
 * counted in one shard and moved out in another): only the sum means something.
 */
export const SHARDS = 16;

/** The board's version (moves on every change) and the number of runs per status. */
export async function boardTotals(ctx: QueryCtx): Promise<{ version: number; counts: Record<string, number> }> {
  let version = 0;
  const counts: Record<string, number> = {};
  for (const row of await ctx.db.query("boardState").take(SHARDS)) {
    version += row.version;
    for (const [status, n] of Object.entries(row.counts)) counts[status] = (counts[status] ?? 0) + n;
  }
  for (const [status, n] of Object.entries(counts)) if (n <= 0) delete counts[status]; // none left
  return { version, counts };
}

/** Record a change of `runId` (already written): version, counts, trail, log tail. */
export async function noteChange(
  ctx: MutationCtx,
  runId: Id<"runs">,
  change: FondationChange | { kind: "enqueued" | "priority" },
): Promise<void> {
  const run = await ctx.db.get(runId);
  if (run === null) return;
  const now = Date.now();
  const shard = Math.floor(Math.random() * SHARDS);
  const state =
    (await ctx.db
      .query("boardState")
      .withIndex("by_shard", (q) => q.eq("shard", shard))
      .unique()) ?? (await ctx.db.get(await ctx.db.insert("boardState", { shard, version: 0, counts: {} })))!;
  const counts = { ...state.counts };
  if (run.boardStatus !== run.status) {
    if (run.boardStatus !== undefined) counts[run.boardStatus] = (counts[run.boardStatus] ?? 0) - 1;
    counts[run.status] = (counts[run.status] ?? 0) + 1;
    await ctx.db.patch(run._id, { boardStatus: run.status });
  }
  await ctx.db.patch(state._id, { version: state.version + 1, counts });
  if (change.kind === "logs") {
    await keepLogTail(ctx, run._id, change.lines);
  } else if (change.kind !== "docs" && change.kind !== "priority") {
    if (change.kind === "status" && change.lastError !== undefined) await closeAttempt(ctx, run, change.lastError, now);
    await ctx.db.insert("boardSteps", {
      runId: run._id,
      attempt: run.attempt,
      at: now,
      status: run.status,
      step: run.currentStep,
      totalSteps: run.totalSteps,
      message: run.message,
      error: run.error,
    });
  }
}

/** An attempt that ended in a retry was last recorded running: record how it ended. (One that
 * ended failed or dead, then retried by the operator, already has its final row.) */
async function closeAttempt(ctx: MutationCtx, run: Doc<"runs">, error: RunError, now: number): Promise<void> {
  const last = await ctx.db
    .query("boardSteps")
    .withIndex("by_run_at", (q) => q.eq("runId", run._id))
    .order("desc")
    .first();
  if (last === null || last.attempt >= run.attempt || isFinal(last.status)) return;
  await ctx.db.insert("boardSteps", { ...pick(last), at: now, status: "failed", message: error.message, error });
}

function pick(row: Doc<"boardSteps">) {
  return { runId: row.runId, attempt: row.attempt, step: row.step, totalSteps: row.totalSteps };
}

async function keepLogTail(ctx: MutationCtx, runId: Id<"runs">, lines: { seq: number; line: string }[]): Promise<void> {
  const kept = lines.slice(-LOG_TAIL);
  for (const l of kept) await ctx.db.insert("boardLogs", { runId, seq: l.seq, line: l.line });
  const last = kept.at(-1);
  if (last === undefined) return;
  // At most `kept.length` older lines fell out of the tail: delete that many, by index.
  const old = await ctx.db
    .query("boardLogs")
    .withIndex("by_run_seq", (q) => q.eq("runId", runId).lte("seq", last.seq - LOG_TAIL))
    .take(kept.length);
  for (const row of old) await ctx.db.delete(row._id);
}
