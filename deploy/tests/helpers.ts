import { convexTest } from "convex-test";
import { vi } from "vitest";
import { api, internal } from "../convex/_generated/api";
import type { Id } from "../convex/_generated/dataModel";
import schema from "../convex/schema";

export const modules = import.meta.glob("../convex/**/*.*s");

export const SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

export function setupEnv(overrides: Record<string, string> = {}): void {
  const env: Record<string, string> = {
    WORKER_URL: "http://worker.test",
    WEBHOOK_SECRET: SECRET,
    MAX_PARALLEL: "2",
    LEASE_MS: "60000",
    CLAIM_TIMEOUT_MS: "60000",
    RETRY_BASE_MS: "1000",
    RETRY_MAX_MS: "60000",
    ...overrides,
  };
  for (const [k, v] of Object.entries(env)) vi.stubEnv(k, v);
}

export type Sent = {
  url: string;
  headers: Record<string, string>;
  body: string;
  json: any;
  signal?: AbortSignal | null;
};

/**
 * Replace `fetch` with a fake worker. `answer` decides each response; every request is recorded.
 */
export function fakeWorker(answer: (req: Sent) => Response | Promise<Response> = () => accepted()) {
  const sent: Sent[] = [];
  const fetchMock = vi.fn(async (input: RequestInfo | URL, init?: RequestInit) => {
    init?.signal?.throwIfAborted();
    const headers: Record<string, string> = {};
    new Headers(init?.headers).forEach((value, key) => (headers[key] = value));
    const body = String(init?.body ?? "");
    const req = { url: String(input), headers, body, json: JSON.parse(body), signal: init?.signal };
    sent.push(req);
    return await answer(req);
  });
  vi.stubGlobal("fetch", fetchMock);
  return { sent, fetchMock, starts: () => sent.filter((s) => s.json.type === "job.start") };
}

export function accepted(): Response {
  return new Response(JSON.stringify({ status: "accepted" }), { status: 202 });
}

export function problem(status: number, detail: string, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify({ type: "about:blank", title: "x", status, detail }), {
    status,
    headers: { "content-type": "application/problem+json", ...headers },
  });
}

export function newT() {
  return convexTest(schema, modules);
}
export type T = ReturnType<typeof newT>;

/** Create a job and let its dispatch run; returns the id and the delivered start message. */
export async function createAndDispatch(
  t: T,
  worker: ReturnType<typeof fakeWorker>,
  args: { repositoryUrl?: string; priority?: number; maxAttempts?: number } = {},
) {
  const jobId = await t.mutation(api.fondation.create, {
    repositoryUrl: args.repositoryUrl ?? "https://github.com/owner/repo.git",
    ref: "main",
    priority: args.priority,
    maxAttempts: args.maxAttempts,
  });
  await settle(t);
  return jobId;
}

/**
 * Run, under fake timers, every scheduled function due within `ms` from now, including the ones
 * they schedule in turn. Jumps the clock from due time to due time rather than all at once,
 * because functions do real async work (Web Crypto) and compute their delays from "now".
 */
export async function settle(t: T, ms = 0): Promise<void> {
  // convex-test stamps transactions 1 ms apart, so a function's "now" may trail ours slightly.
  const target = Date.now() + ms + 5;
  for (let i = 0; i < 200; i++) {
    await t.finishInProgressScheduledFunctions();
    const scheduled = await t.run(async (ctx) => ctx.db.system.query("_scheduled_functions").collect());
    const next = Math.min(
      ...scheduled.filter((f) => f.state.kind === "pending").map((f) => f.scheduledTime),
    );
    if (next > target) {
      if (Date.now() >= target) return;
      await vi.advanceTimersByTimeAsync(target - Date.now());
      continue;
    }
    await vi.advanceTimersByTimeAsync(Math.max(1, next - Date.now() + 1));
  }
  throw new Error("settle: scheduled functions keep coming");
}

export async function job(t: T, jobId: Id<"jobs">) {
  const j = await t.run(async (ctx) => ctx.db.get(jobId));
  if (!j) throw new Error("job vanished");
  return j;
}

/** The auth fields a worker would send for the job's current attempt. */
export async function creds(t: T, jobId: Id<"jobs">, workerId = "w1") {
  const j = await job(t, jobId);
  if (!j.callbackToken) throw new Error(`job ${jobId} has no token (status ${j.status})`);
  return { jobId: jobId as string, attempt: j.attempt, workerId, callbackToken: j.callbackToken };
}

export { api, internal };
