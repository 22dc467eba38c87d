/**
 * Recovery from silent workers. A job whose deadline (`leaseUntil`) has passed is given to the
 * next attempt with a fresh token, or declared `dead` once its attempts are used up:
 *  - `dispatched` and never claimed within CLAIM_TIMEOUT_MS (the webhook was lost or dropped);
 *  - running (claimed…gathering) with no claim/progress/putDocs renewing the lease in LEASE_MS.
 * The old attempt's callbacks then get `stale_attempt`, and it is sent a `job.cancel` in case
 * it is still alive behind a partition.
 */
import type { MutationCtx } from "./_generated/server";
import { retryOrFinish, scheduleCancelWebhook } from "./model";
import { ACTIVE_STATUSES } from "./validators";

/** Most jobs handled per status per run; the cron comes back in 30 s for the rest. */
const BATCH = 100;

export async function sweepExpired(
  ctx: MutationCtx,
): Promise<{ redispatched: number; dead: number }> {
  const now = Date.now();
  let redispatched = 0;
  let dead = 0;
  for (const status of ACTIVE_STATUSES) {
    const expired = await ctx.db
      .query("jobs")
      .withIndex("by_status_lease", (q) => q.eq("status", status).lt("leaseUntil", now))
      .take(BATCH);
    for (const job of expired) {
      // `lt` on an optional field also matches rows where it is unset; those are not expired.
      if (job.leaseUntil === undefined) continue;
      const error =
        status === "dispatched"
          ? { code: "claim_timeout", message: `attempt ${job.attempt} was not claimed in time` }
          : { code: "lease_expired", message: `attempt ${job.attempt} stopped reporting (${status})` };
      const hadWorker = job.callbackToken !== undefined;
      const result = await retryOrFinish(ctx, job, error, {
        delayMs: 0,
        finalStatus: "dead",
        outcome: "swept",
      });
      if (hadWorker) await scheduleCancelWebhook(ctx, job._id, job.attempt);
      if (result === "retry") redispatched++;
      else dead++;
    }
  }
  return { redispatched, dead };
}
