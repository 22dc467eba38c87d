/**
 * Delivery of signed webhooks to the worker (CONTRACT §2). The action does the network I/O;
 * the two internal mutations around it read and record state, so every decision is
 * transactional and the action itself holds no truth.
 */
import { v } from "convex/values";
import { internal } from "./_generated/api";
import { internalAction, internalMutation } from "./_generated/server";
import { settings } from "./config";
import {
  MISCONFIGURED_RETRY_MS,
  backoffMs,
  parseRetryAfter,
  pumpQueue,
  retryOrFinish,
  schedulePump,
} from "./model";
import { randomToken, sign } from "./signing";
import { deliveryOutcome, jobOptions, type DeliveryOutcome } from "./validators";

/** What the job.start body is built from. */
const startMessage = v.object({
  jobId: v.string(),
  attempt: v.number(),
  callbackToken: v.string(),
  messageAt: v.number(),
  repository: v.object({ url: v.string(), ref: v.optional(v.string()) }),
  options: v.optional(jobOptions),
  priority: v.number(),
});

/** The raw JSON body of `job.start`; key order fixed so a re-send is byte-identical. */
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
  webhookId: string,
  body: string,
): Promise<{ response: Response; text: string } | { error: string }> {
  const s = settings();
  if (!s.workerUrl || !s.webhookSecret) return { error: "misconfigured: WORKER_URL and WEBHOOK_SECRET must be set" };
  const ts = Math.floor(Date.now() / 1000);
  let signature: string;
  try {
    signature = await sign(s.webhookSecret, webhookId, ts, body);
  } catch (e) {
    return { error: `misconfigured: ${(e as Error).message}` };
  }
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), s.dispatchTimeoutMs);
  try {
    const response = await fetch(`${s.workerUrl}/v1/webhooks`, {
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
    return { error: err.name === "AbortError" ? `timeout after ${s.dispatchTimeoutMs} ms` : `network error: ${err.message}` };
  } finally {
    clearTimeout(timer);
  }
}

/** Map the worker's answer to what the queue does next (CONTRACT §2 response table). */
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
 * Send `job.start` for one attempt. The token is minted here, not in a mutation: mutations get
 * a seeded PRNG (deterministic for retries), an action gets real randomness.
 */
export const deliver = internalAction({
  args: { jobId: v.id("jobs"), attempt: v.number() },
  handler: async (ctx, { jobId, attempt }): Promise<DeliveryOutcome | null> => {
    const msg = await ctx.runMutation(internal.dispatch.prepare, { jobId, attempt, freshToken: randomToken() });
    if (msg === null) return null; // canceled, or another attempt owns the job now
    const result = await postWebhook(`${jobId}:${attempt}`, startBody(msg));
    const outcome = classify(result, Date.now());
    await ctx.runMutation(internal.dispatch.recordOutcome, { jobId, attempt, outcome, jitter: Math.random() });
    return outcome;
  },
});

/** Fix the attempt's token and message time (once per attempt), return the message. */
export const prepare = internalMutation({
  args: { jobId: v.id("jobs"), attempt: v.number(), freshToken: v.string() },
  returns: v.union(v.null(), startMessage),
  handler: async (ctx, { jobId, attempt, freshToken }) => {
    const job = await ctx.db.get(jobId);
    if (job === null || job.status !== "dispatched" || job.attempt !== attempt) return null;
    let callbackToken = job.callbackToken;
    let messageAt = job.messageAt;
    if (callbackToken === undefined || messageAt === undefined) {
      callbackToken = freshToken;
      messageAt = Date.now();
      await ctx.db.patch(jobId, { callbackToken, messageAt });
    }
    return {
      jobId,
      attempt,
      callbackToken,
      messageAt,
      repository: { url: job.repositoryUrl, ref: job.ref },
      options: job.options,
      priority: job.priority,
    };
  },
});

/** Apply what the POST taught us, unless the job moved on meanwhile. */
export const recordOutcome = internalMutation({
  args: { jobId: v.id("jobs"), attempt: v.number(), outcome: deliveryOutcome, jitter: v.number() },
  handler: async (ctx, { jobId, attempt, outcome, jitter }) => {
    const job = await ctx.db.get(jobId);
    // The worker may have claimed (or the UI canceled) before this answer came back.
    if (job === null || job.attempt !== attempt || job.status !== "dispatched") return;
    const now = Date.now();
    const s = settings();
    switch (outcome.kind) {
      case "accepted":
        await ctx.db.patch(jobId, {
          deliveredAt: now,
          leaseUntil: now + s.claimTimeoutMs,
          message: `attempt ${attempt} accepted by worker (${outcome.status})`,
          updatedAt: now,
        });
        return;
      case "busy":
      case "misconfigured": {
        // Not the job's fault: same attempt, same token, same body later; no attempt consumed.
        const delay = outcome.kind === "busy" ? outcome.retryAfterMs : MISCONFIGURED_RETRY_MS;
        await ctx.db.patch(jobId, {
          status: "pending",
          dispatchedAt: undefined,
          leaseUntil: undefined,
          nextAttemptAt: now + delay,
          message:
            outcome.kind === "busy"
              ? `worker busy (${outcome.status}); retrying in ${Math.round(delay / 1000)} s`
              : `${outcome.detail}; retrying in ${Math.round(delay / 1000)} s`,
          updatedAt: now,
        });
        await schedulePump(ctx, delay);
        return;
      }
      case "rejected": {
        const error = { code: "dispatch_rejected", message: `worker answered ${outcome.status}: ${outcome.detail}` };
        await ctx.db.patch(jobId, {
          status: "dead",
          error,
          lastError: error,
          message: error.message,
          leaseUntil: undefined,
          finishedAt: now,
          updatedAt: now,
        });
        await pumpQueue(ctx);
        return;
      }
      case "transient": {
        const error = { code: "dispatch_failed", message: outcome.detail };
        await retryOrFinish(ctx, job, error, {
          delayMs: backoffMs(attempt, jitter),
          finalStatus: "dead",
          outcome: "dispatch_failed",
        });
        await pumpQueue(ctx);
        return;
      }
    }
  },
});

const CANCEL_TRIES = 5;

/** Best-effort `job.cancel`; retried a few times on network errors, 5xx and 503/429. */
export const deliverCancel = internalAction({
  args: { jobId: v.id("jobs"), attempt: v.number(), messageAt: v.number(), tries: v.number() },
  handler: async (ctx, { jobId, attempt, messageAt, tries }): Promise<DeliveryOutcome> => {
    const result = await postWebhook(`${jobId}:${attempt}:cancel`, cancelBody(jobId, attempt, messageAt));
    const outcome = classify(result, Date.now());
    const again = outcome.kind === "transient" || outcome.kind === "busy";
    if (again && tries + 1 < CANCEL_TRIES) {
      const delay = outcome.kind === "busy" ? outcome.retryAfterMs : backoffMs(tries + 1);
      await ctx.scheduler.runAfter(delay, internal.dispatch.deliverCancel, {
        jobId,
        attempt,
        messageAt,
        tries: tries + 1,
      });
    }
    return outcome;
  },
});
