/**
 * Overflow to Scaleway Serverless Jobs (docs/SCALING.md). The loop (`loop.ts`) decides which
 * runner gets an attempt; this module carries out its "run" choice: `startRun` starts one run
 * of the job definition (`POST …/job-definitions/{id}/start`) with the attempt's signed
 * `job.start` as environment overrides, `recordStart` records the run's id on the lease (or
 * puts the attempt back in the queue), and `stopRun` stops a run (`POST …/job-runs/{id}/stop`)
 * on cancel, or when the sweeper gives its attempt to someone else.
 *
 * A run's environment is readable through the Scaleway API and kept in the run history, so it
 * gets only the message and its signature headers: the message's one credential, the callback
 * token, dies with the attempt. The webhook secret reaches the run through a Secret Manager
 * reference on the job definition; the IAM key's token stays here (`X-Auth-Token`).
 */
import { v } from "convex/values";
import { internal } from "./_generated/api.js";
import { internalAction, internalMutation, internalQuery } from "./_generated/server.js";
import { getConfig } from "./config.js";
import { startBody } from "./dispatch.js";
import { emit } from "./events.js";
import { MISCONFIGURED_RETRY_MS, enqueueRun, leaseOf, overflowOf, parseRetryAfter, scheduleStopRun } from "./model.js";
import { vOverflowConfig, type OverflowConfig } from "./shared.js";
import { randomToken, sign } from "./signing.js";

/** The two environment variables `fondation-worker run-one` reads its message from. */
export const MESSAGE_ENV = "FONDATION_JOB_MESSAGE";
export const HEADERS_ENV = "FONDATION_JOB_HEADERS";
const STOP_TRIES = 5;
const MAX_ANSWER = 65_536;

const vStartResult = v.union(
  v.object({ jobRunId: v.string() }),
  v.object({ error: v.string(), retryAfterMs: v.number() }),
);
type StartResult = { jobRunId: string } | { error: string; retryAfterMs: number };

function jobsBase(o: OverflowConfig): string {
  const api = o.apiUrl.trim().replace(/\/+$/, "");
  return `${api}/serverless-jobs/v1alpha2/regions/${encodeURIComponent(o.region)}`;
}

/** A run's environment overrides: the signed message, nothing that outlives the attempt. */
export async function runEnvironment(
  secret: string,
  webhookId: string,
  body: string,
  nowMs: number,
): Promise<Record<string, string>> {
  const ts = Math.floor(nowMs / 1000);
  const headers = {
    "content-type": "application/json",
    "webhook-id": webhookId,
    "webhook-timestamp": String(ts),
    "webhook-signature": await sign(secret, webhookId, ts, body),
  };
  return { [MESSAGE_ENV]: body, [HEADERS_ENV]: JSON.stringify(headers) };
}

/** POST one Jobs API call with the IAM token; never throws (transport errors → `error`). */
async function callJobs(
  o: OverflowConfig,
  path: string,
  body: unknown,
  timeoutMs: number,
): Promise<{ status: number; text: string; retryAfter: string | null } | { error: string }> {
  if (!o.token) return { error: "misconfigured: the Serverless Jobs token (FONDATION_SCW_JOBS_TOKEN) is not set" };
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  try {
    const response = await fetch(`${jobsBase(o)}${path}`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-auth-token": o.token },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    const text = (await response.text()).slice(0, MAX_ANSWER);
    return { status: response.status, text, retryAfter: response.headers.get("retry-after") };
  } catch (e) {
    const err = e as Error;
    return { error: err.name === "AbortError" ? `timeout after ${timeoutMs} ms` : `network error: ${err.message}` };
  } finally {
    clearTimeout(timer);
  }
}

/** What a `start` answer means for the attempt. */
export function startResult(
  answer: { status: number; text: string; retryAfter: string | null } | { error: string },
  nowMs: number,
): StartResult {
  if ("error" in answer) {
    const retryAfterMs = answer.error.startsWith("misconfigured") ? MISCONFIGURED_RETRY_MS : parseRetryAfter(null, nowMs);
    return { error: `run not started: ${answer.error}`, retryAfterMs };
  }
  if (answer.status >= 200 && answer.status < 300) {
    try {
      const id = (JSON.parse(answer.text) as { job_runs?: { id?: unknown }[] }).job_runs?.[0]?.id;
      if (typeof id === "string" && id !== "") return { jobRunId: id };
    } catch {
      // not JSON: below
    }
    return { error: `run start answered ${answer.status} without a job run id`, retryAfterMs: MISCONFIGURED_RETRY_MS };
  }
  // 429 and 5xx may pass; other 4xx (bad token, unknown definition) need the operator.
  const transient = answer.status === 429 || answer.status >= 500;
  return {
    error: `run start answered ${answer.status}: ${answer.text.slice(0, 300)}`,
    retryAfterMs: transient ? parseRetryAfter(answer.retryAfter, nowMs) : MISCONFIGURED_RETRY_MS,
  };
}

/** The overflow settings (with the token), for the actions. */
export const settings = internalQuery({
  args: {},
  returns: v.union(v.null(), vOverflowConfig),
  handler: async (ctx) => overflowOf(await getConfig(ctx)),
});

/** Start a run for one attempt the loop gave to "run". */
export const startRun = internalAction({
  args: { runId: v.id("runs"), attempt: v.number() },
  handler: async (ctx, { runId, attempt }): Promise<StartResult | null> => {
    const msg = await ctx.runMutation(internal.dispatch.prepare, {
      runId,
      attempt,
      freshKey: randomToken(),
      freshNonce: randomToken(),
      runner: "run",
    });
    if (msg === null) return null; // canceled, or the attempt moved on
    const o = await ctx.runQuery(internal.overflow.settings, {});
    let result: StartResult;
    if (o === null || !msg.target.webhookSecret) {
      result = {
        error: "run not started: misconfigured: overflow or FONDATION_WEBHOOK_SECRET is not set",
        retryAfterMs: MISCONFIGURED_RETRY_MS,
      };
    } else {
      const env = await runEnvironment(msg.target.webhookSecret, msg.webhookId, startBody(msg), Date.now());
      const path = `/job-definitions/${encodeURIComponent(o.jobDefinitionId)}/start`;
      const answer = await callJobs(o, path, { environment_variables: env }, msg.target.dispatchTimeoutMs);
      result = startResult(answer, Date.now());
    }
    await ctx.runMutation(internal.overflow.recordStart, { runId, attempt, result });
    return result;
  },
});

/** Record the started run on the lease, or put the attempt back in the queue (no attempt spent:
 * nothing ran). A run started for an attempt that moved on meanwhile is stopped at once. */
export const recordStart = internalMutation({
  args: { runId: v.id("runs"), attempt: v.number(), result: vStartResult },
  returns: v.null(),
  handler: async (ctx, { runId, attempt, result }) => {
    const run = await ctx.db.get(runId);
    const lease = await leaseOf(ctx, runId);
    const ours =
      run !== null && lease !== null && run.attempt === attempt && run.status === "dispatched" && lease.runner === "run";
    if ("jobRunId" in result) {
      if (!ours) {
        // Canceled (or swept) while the start was in flight: nobody will claim with it.
        await scheduleStopRun(ctx, result.jobRunId);
        if (lease !== null && run !== null && run.attempt === attempt && lease.runner === "run") {
          await ctx.db.patch(lease._id, { jobRunId: result.jobRunId });
        }
        return null;
      }
      const now = Date.now();
      const config = await getConfig(ctx);
      const claimMs = config.overflow?.claimTimeoutMs ?? config.claimTimeoutMs;
      const message = `attempt ${attempt} started in Serverless Jobs run ${result.jobRunId}`;
      await ctx.db.patch(runId, { deliveredAt: now, message, updatedAt: now });
      await ctx.db.patch(lease!._id, { jobRunId: result.jobRunId, leaseUntil: now + claimMs });
      return null;
    }
    if (!ours) return null;
    const now = Date.now();
    const message = `${result.error}; back in the queue`;
    await ctx.db.patch(runId, { status: "pending", dispatchedAt: undefined, message, updatedAt: now });
    await ctx.db.patch(lease!._id, { leaseUntil: undefined, runner: undefined });
    const next = (await ctx.db.get(runId))!;
    await emit(ctx, next, { kind: "status", status: "pending", message });
    await enqueueRun(ctx, next, now + result.retryAfterMs);
    return null;
  },
});

/** Stop a run (best effort): retried a few times on network errors, 429 and 5xx; a 404 means
 * it is gone already. */
export const stopRun = internalAction({
  args: { jobRunId: v.string(), tries: v.number() },
  handler: async (ctx, { jobRunId, tries }): Promise<string> => {
    const o = await ctx.runQuery(internal.overflow.settings, {});
    if (o === null) return "misconfigured";
    const answer = await callJobs(o, `/job-runs/${encodeURIComponent(jobRunId)}/stop`, {}, 10_000);
    const status = "error" in answer ? 0 : answer.status;
    const again = status === 0 || status === 429 || status >= 500;
    if (again && !("error" in answer && answer.error.startsWith("misconfigured")) && tries + 1 < STOP_TRIES) {
      await ctx.scheduler.runAfter(1_000 * 2 ** tries, internal.overflow.stopRun, { jobRunId, tries: tries + 1 });
      return "retrying";
    }
    return status >= 200 && status < 300 ? "stopped" : status === 404 ? "gone" : `failed (${status || "network"})`;
  },
});
