/**
 * Delivery of signed webhooks to the worker (docs/CONTRACT.md §2). The action does the network
 * I/O; the internal mutations around it read and record state, so every decision is
 * transactional and the action itself holds no truth.
 */
import { v } from "convex/values";
import { internal } from "./_generated/api.js";
import { internalAction, internalMutation, internalQuery } from "./_generated/server.js";
import { getConfig } from "./config.js";
import { emit } from "./events.js";
import {
  MISCONFIGURED_RETRY_MS,
  backoffMs,
  enqueueRun,
  finishRun,
  leaseOf,
  overflowOf,
  parseRetryAfter,
  retryOrFinish,
} from "./model.js";
import { DEFAULT_CONFIG, vDeliveryOutcome, vRunOptions, vRunner, type DeliveryOutcome } from "./shared.js";
import { deriveToken, hashToken, randomToken, sign } from "./signing.js";

/** Where and how to send: what the action needs from `globals`. */
const vTarget = v.object({
  workerUrl: v.optional(v.string()),
  webhookSecret: v.optional(v.string()),
  dispatchTimeoutMs: v.number(),
});
type Target = { workerUrl?: string; webhookSecret?: string; dispatchTimeoutMs: number };

/** What the job.start body is built from. */
const vStartMessage = v.object({
  webhookId: v.string(),
  callbackToken: v.string(),
  jobId: v.string(),
  attempt: v.number(),
  messageAt: v.number(),
  repository: v.object({ url: v.string(), ref: v.optional(v.string()) }),
  options: v.optional(vRunOptions),
  priority: v.number(),
  target: vTarget,
});

/** The raw JSON body of `job.start`; key order fixed (docs/CONTRACT.md §2). */
export function startBody(m: {
  jobId: string;
  attempt: number;
  callbackToken: string;
  messageAt: number;
  repository: { url: string; ref?: string };
  options?: { model?: string; steps?: string[] };
  priority: number;
}): string {
  const repository: { url: string; ref?: string } = { url: m.repository.url };
  if (m.repository.ref !== undefined) repository.ref = m.repository.ref;
  const data: Record<string, unknown> = {
    jobId: m.jobId,
    attempt: m.attempt,
    callbackToken: m.callbackToken,
    repository,
  };
  if (m.options !== undefined && Object.keys(m.options).length > 0) data.options = m.options;
  data.priority = m.priority;
  return JSON.stringify({ type: "job.start", timestamp: isoSeconds(m.messageAt), data });
}

export function cancelBody(jobId: string, attempt: number, messageAt: number): string {
  return JSON.stringify({ type: "job.cancel", timestamp: isoSeconds(messageAt), data: { jobId, attempt } });
}

function isoSeconds(ms: number): string {
  return new Date(Math.floor(ms / 1000) * 1000).toISOString().replace(".000Z", "Z");
}

/** POST one signed webhook. Never throws: transport problems come back as `error`. */
export async function postWebhook(
  target: Target,
  webhookId: string,
  body: string,
): Promise<{ response: Response; text: string } | { error: string }> {
  const workerUrl = target.workerUrl?.trim().replace(/\/+$/, "");
  if (!workerUrl || !target.webhookSecret) {
    return { error: "misconfigured: FONDATION_WORKER_URL and FONDATION_WEBHOOK_SECRET must be set" };
  }
  const ts = Math.floor(Date.now() / 1000);
  let signature: string;
  try {
    signature = await sign(target.webhookSecret, webhookId, ts, body);
  } catch (e) {
    return { error: `misconfigured: ${(e as Error).message}` };
  }
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), target.dispatchTimeoutMs);
  try {
    const response = await fetch(`${workerUrl}/v1/webhooks`, {
      method: "POST",
      headers: {
        "content-type": "application/json",
        "webhook-id": webhookId,
        "webhook-timestamp": String(ts),
        "webhook-signature": signature,
      },
      body,
      signal: controller.signal,
    });
    // Read under the same timeout: a worker that sends headers and stalls is a network error.
    const text = (await response.text()).slice(0, 4_096);
    return { response, text };
  } catch (e) {
    const err = e as Error;
    return {
      error: err.name === "AbortError" ? `timeout after ${target.dispatchTimeoutMs} ms` : `network error: ${err.message}`,
    };
  } finally {
    clearTimeout(timer);
  }
}

/** Map the worker's answer to what the queue does next (docs/CONTRACT.md §2 response table). */
export function classify(
  result: { response: Response; text: string } | { error: string },
  nowMs: number,
): DeliveryOutcome {
  if ("error" in result) {
    return result.error.startsWith("misconfigured")
      ? { kind: "misconfigured", detail: result.error }
      : { kind: "transient", detail: result.error };
  }
  const { response, text } = result;
  const status = response.status;
  if (status >= 200 && status < 300) return { kind: "accepted", status };
  if (status === 503 || status === 429) {
    return { kind: "busy", status, retryAfterMs: parseRetryAfter(response.headers.get("retry-after"), nowMs) };
  }
  if (status >= 400 && status < 500) return { kind: "rejected", status, detail: problemDetail(text) };
  return { kind: "transient", detail: `worker answered ${status}: ${problemDetail(text)}` };
}

/** `detail` (else `title`) of an RFC 9457 problem+json body, else the start of the text. */
function problemDetail(text: string): string {
  try {
    const p = JSON.parse(text) as { detail?: unknown; title?: unknown };
    if (typeof p.detail === "string" && p.detail) return p.detail;
    if (typeof p.title === "string" && p.title) return p.title;
  } catch {
    // not JSON: fall through
  }
  return text.slice(0, 500) || "(empty body)";
}

/**
 * Send `job.start` for one attempt. Randomness comes from here, not from a mutation: mutations
 * get a seeded PRNG (deterministic for retries), an action gets real randomness.
 */
export const deliver = internalAction({
  args: { runId: v.id("runs"), attempt: v.number() },
  handler: async (ctx, { runId, attempt }): Promise<DeliveryOutcome | null> => {
    const msg = await ctx.runMutation(internal.dispatch.prepare, {
      runId,
      attempt,
      freshKey: randomToken(),
      freshNonce: randomToken(),
    });
    if (msg === null) return null; // canceled, or another attempt owns the run now
    const result = await postWebhook(msg.target, msg.webhookId, startBody(msg));
    const outcome = classify(result, Date.now());
    await ctx.runMutation(internal.dispatch.recordOutcome, { runId, attempt, outcome, jitter: Math.random() });
    return outcome;
  },
});

/**
 * Fix the attempt's token and message time (once per attempt: a re-send after 503/429 is
 * byte-identical, as the worker's dedupe on webhook-id + body requires), store the token's
 * hash, and return the message. The token is derived, never stored.
 */
export const prepare = internalMutation({
  args: {
    runId: v.id("runs"),
    attempt: v.number(),
    freshKey: v.string(),
    freshNonce: v.string(),
    /** Who sends: the webhook to the warm worker (default) or a run's start. */
    runner: v.optional(vRunner),
  },
  returns: v.union(v.null(), vStartMessage),
  handler: async (ctx, { runId, attempt, freshKey, freshNonce, runner }) => {
    const run = await ctx.db.get(runId);
    const lease = await leaseOf(ctx, runId);
    if (run === null || lease === null || run.status !== "dispatched" || run.attempt !== attempt) return null;
    // The loop gave the attempt to the other runner meanwhile: this sender has nothing to do.
    if ((lease.runner ?? "warm") !== (runner ?? "warm")) return null;
    let key = (await ctx.db.query("tokenKeys").first())?.key;
    if (key === undefined) {
      key = freshKey;
      await ctx.db.insert("tokenKeys", { key });
    }
    const nonce = lease.tokenNonce ?? freshNonce;
    const messageAt = lease.messageAt ?? Date.now();
    const callbackToken = await deriveToken(key, runId, attempt, nonce);
    await ctx.db.patch(lease._id, {
      tokenNonce: nonce,
      messageAt,
      tokenHash: await hashToken(callbackToken),
      sends: lease.sends + 1,
    });
    const config = await getConfig(ctx);
    return {
      webhookId: `${runId}:${attempt}`,
      callbackToken,
      jobId: runId,
      attempt,
      messageAt,
      repository: { url: run.repositoryUrl, ref: run.ref },
      options: run.options,
      priority: run.priority,
      target: {
        workerUrl: config.workerUrl,
        webhookSecret: config.webhookSecret,
        dispatchTimeoutMs: config.dispatchTimeoutMs,
      },
    };
  },
});

/** Apply what the POST taught us, unless the run moved on meanwhile. */
export const recordOutcome = internalMutation({
  args: { runId: v.id("runs"), attempt: v.number(), outcome: vDeliveryOutcome, jitter: v.number() },
  returns: v.null(),
  handler: async (ctx, { runId, attempt, outcome, jitter }) => {
    const run = await ctx.db.get(runId);
    const lease = await leaseOf(ctx, runId);
    // The worker may have claimed (or the host canceled) before this answer came back.
    if (run === null || lease === null || run.attempt !== attempt || run.status !== "dispatched") return null;
    const now = Date.now();
    const config = await getConfig(ctx);
    switch (outcome.kind) {
      case "accepted": {
        const message = `attempt ${attempt} accepted by worker (${outcome.status})`;
        await ctx.db.patch(runId, { deliveredAt: now, message, updatedAt: now });
        await ctx.db.patch(lease._id, { leaseUntil: now + config.claimTimeoutMs });
        return null;
      }
      case "busy":
      case "misconfigured": {
        // Not the run's fault: same attempt later, no attempt consumed.
        const delay = outcome.kind === "busy" ? outcome.retryAfterMs : MISCONFIGURED_RETRY_MS;
        // With overflow, a full warm worker sends the attempt to a run at once (the loop
        // decides, by `maxRuns`), and keeps it from the warm worker until its Retry-After.
        const overflow = outcome.kind === "busy" && overflowOf(config) !== null;
        const message = overflow
          ? `worker busy (${outcome.status}); overflowing to a Serverless Jobs run`
          : outcome.kind === "busy"
            ? `worker busy (${outcome.status}); retrying in ${Math.round(delay / 1000)} s`
            : `${outcome.detail}; retrying in ${Math.round(delay / 1000)} s`;
        await ctx.db.patch(runId, { status: "pending", dispatchedAt: undefined, message, updatedAt: now });
        // The token stays: the re-send carries the same one.
        await ctx.db.patch(lease._id, { leaseUntil: undefined, runner: undefined });
        const next = (await ctx.db.get(runId))!;
        await emit(ctx, next, { kind: "status", status: "pending", message });
        if (overflow) await enqueueRun(ctx, next, now, now + delay);
        else await enqueueRun(ctx, next, now + delay);
        return null;
      }
      case "rejected": {
        const error = { code: "dispatch_rejected" as const, message: `worker answered ${outcome.status}: ${outcome.detail}` };
        await finishRun(ctx, run, lease, "dead", error, error.message);
        return null;
      }
      case "transient": {
        const error = { code: "dispatch_failed" as const, message: outcome.detail };
        await retryOrFinish(ctx, run, lease, error, {
          delayMs: backoffMs(config, attempt, jitter),
          finalStatus: "dead",
          outcome: "dispatch_failed",
        });
        return null;
      }
    }
  },
});

/** The webhook target, for the cancel action. */
export const target = internalQuery({
  args: {},
  returns: vTarget,
  handler: async (ctx) => {
    const config = await getConfig(ctx);
    return {
      workerUrl: config.workerUrl,
      webhookSecret: config.webhookSecret,
      dispatchTimeoutMs: config.dispatchTimeoutMs ?? DEFAULT_CONFIG.dispatchTimeoutMs,
    };
  },
});

const CANCEL_TRIES = 5;

/** Best-effort `job.cancel`; retried a few times on network errors, 5xx and 503/429. */
export const deliverCancel = internalAction({
  args: { runId: v.id("runs"), attempt: v.number(), messageAt: v.number(), tries: v.number() },
  handler: async (ctx, { runId, attempt, messageAt, tries }): Promise<DeliveryOutcome> => {
    const to = await ctx.runQuery(internal.dispatch.target, {});
    const result = await postWebhook(to, `${runId}:${attempt}:cancel`, cancelBody(runId, attempt, messageAt));
    const outcome = classify(result, Date.now());
    const again = outcome.kind === "transient" || outcome.kind === "busy";
    if (again && tries + 1 < CANCEL_TRIES) {
      const delay = outcome.kind === "busy" ? outcome.retryAfterMs : 1_000 * 2 ** tries;
      await ctx.scheduler.runAfter(delay, internal.dispatch.deliverCancel, {
        runId,
        attempt,
        messageAt,
        tries: tries + 1,
      });
    }
    return outcome;
  },
});
