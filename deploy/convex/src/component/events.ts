/**
 * Calls the host's `onEvent` handle in the caller's transaction, so the host's rows change
 * together with the component's.
 */
import type { FunctionHandle } from "convex/server";
import type { Doc } from "./_generated/dataModel.js";
import type { MutationCtx } from "./_generated/server.js";
import { noteChange } from "./board.js";
import type { FondationChange, FondationEvent } from "./shared.js";

export async function emit(ctx: MutationCtx, run: Doc<"runs">, change: FondationChange): Promise<void> {
  // Every change the host is told of is one the operator's board shows.
  await noteChange(ctx, run._id, change);
  if (run.onEvent === undefined) return;
  const event: FondationEvent = {
    runId: run._id,
    context: run.onEvent.context,
    attempt: run.attempt,
    at: Date.now(),
    change,
  };
  try {
    await ctx.runMutation(run.onEvent.fnHandle as FunctionHandle<"mutation", FondationEvent>, event);
  } catch (e) {
    // The handler's writes are rolled back; the queue goes on, so a bug in the host cannot
    // wedge the worker's callbacks (which would otherwise fail and be retried forever).
    console.error(`fondation: onEvent handler failed for run ${run._id} (${change.kind}): ${(e as Error).message}`);
  }
}
