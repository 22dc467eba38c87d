/**
 * Test helpers over the example host app with the component registered as a host would:
 * `convexTest({ schema, modules, transactionLimits: true })` then `register(t)`.
 */
import { register } from "@fondation/convex-worker/test";
import { convexTest } from "convex-test";
import { afterEach, beforeEach, vi } from "vitest";
import { api, internal } from "../convex/_generated/api";
import type { Id } from "../convex/_generated/dataModel";
import schema from "../convex/schema";

export const modules = import.meta.glob("../convex/**/*.*s");

export const SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

export function setupEnv(overrides: Record<string, string> = {}): void {
  const env: Record<string, string> = {
    FONDATION_WORKER_URL: "http://worker.test",
    FONDATION_WEBHOOK_SECRET: SECRET,
    FONDATION_MAX_PARALLEL: "2",
    FONDATION_LEASE_MS: "60000",
    FONDATION_CLAIM_TIMEOUT_MS: "60000",
    FONDATION_RETRY_BASE_MS: "1000",
    FONDATION_RETRY_MAX_MS: "60000",
    FONDATION_SWEEP_INTERVAL_MS: "10000",
    ...overrides,
  };
  for (const [k, v] of Object.entries(env)) vi.stubEnv(k, v);
}

/** When every test starts: fake timers stand at this instant. */
export const START = "2026-11-28T10:00:00Z";

/**
 * Call at the top of a test file: before each test, fake timers at `START` and the host's
 * environment stubbed (`setupEnv(overrides)`); after each, real timers and every env and global
 * stub undone.
 */
export function useFakeHost(overrides: Record<string, string> = {}): void {
  beforeEach(() => {
    vi.useFakeTimers({ now: new Date(START) });
    setupEnv(overrides);
  });
  afterEach(() => {
    vi.useRealTimers();
    vi.unstubAllEnvs();
    vi.unstubAllGlobals();
  });
}

export function newT() {
  const t = convexTest({ schema, modules, transactionLimits: true });
  register(t);
  return t;
}
export type T = ReturnType<typeof newT>;

export type Sent = { url: string; headers: Record<string, string>; body: string; json: any; at: number };

/** Replace `fetch` with a fake worker. `answer` decides each response; every request is recorded. */
export function fakeWorker(answer: (req: Sent) => Response | Promise<Response> = () => accepted()) {
  const sent: Sent[] = [];
  const fetchMock = vi.fn(async (input: RequestInfo | URL, init?: RequestInit) => {
    init?.signal?.throwIfAborted();
    const headers: Record<string, string> = {};
    new Headers(init?.headers).forEach((value, key) => (headers[key] = value));
    const body = String(init?.body ?? "");
    const req = { url: String(input), headers, body, json: JSON.parse(body), at: Date.now() };
    sent.push(req);
    return await answer(req);
  });
  vi.stubGlobal("fetch", fetchMock);
  const starts = () => sent.filter((s) => s.json.type === "job.start");
  return { sent, fetchMock, starts };
}
export type Worker = ReturnType<typeof fakeWorker>;

export function accepted(): Response {
  return new Response(JSON.stringify({ status: "accepted" }), { status: 202 });
}

export function problem(status: number, detail: string, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify({ type: "about:blank", title: "x", status, detail }), {
    status,
    headers: { "content-type": "application/problem+json", ...headers },
  });
}

/**
 * Run, under fake timers, every scheduled function due within `ms` from now, including the ones
 * they schedule in turn. Jumps the clock from due time to due time rather than all at once,
 * because functions do real async work (Web Crypto) and compute their delays from "now".
 */
export async function settle(t: T, ms = 0): Promise<void> {
  const target = Date.now() + ms + 5;
  for (let i = 0; i < 400; i++) {
    await t.finishInProgressScheduledFunctions();
    const due = await scheduled(t);
    const next = Math.min(...due);
    if (next > target) {
      if (Date.now() >= target) return;
      await vi.advanceTimersByTimeAsync(target - Date.now());
      continue;
    }
    await vi.advanceTimersByTimeAsync(Math.max(1, next - Date.now() + 1));
  }
  throw new Error("settle: scheduled functions keep coming");
}

/** Due times of pending scheduled functions, in the host and in the component. */
async function scheduled(t: T): Promise<number[]> {
  const pending = (rows: { state: { kind: string }; scheduledTime: number }[]) =>
    rows.filter((f) => f.state.kind === "pending").map((f) => f.scheduledTime);
  const host = await t.run(async (ctx) => ctx.db.system.query("_scheduled_functions").collect());
  const comp = await inComponent(t, async (ctx) => ctx.db.system.query("_scheduled_functions").collect());
  return [...pending(host), ...pending(comp as any)];
}

/** Run `fn` against the component's tables (convex-test's `runInComponent`). */
export async function inComponent<R>(t: T, fn: (ctx: any) => Promise<R>): Promise<R> {
  return await (t as unknown as { runInComponent: (p: string, f: typeof fn) => Promise<R> }).runInComponent(
    "fondation",
    fn,
  );
}

export async function table(t: T, name: string): Promise<any[]> {
  return await inComponent(t, async (ctx) => ctx.db.query(name).collect());
}

export async function run(t: T, runId: string): Promise<any> {
  return await inComponent(t, async (ctx) => ctx.db.get(runId));
}

export async function lease(t: T, runId: string): Promise<any> {
  return await inComponent(t, async (ctx) =>
    ctx.db
      .query("leases")
      .withIndex("by_run", (q: any) => q.eq("runId", runId))
      .unique(),
  );
}

/** Create a job the way the host's server code does, and let its dispatch run. */
export async function createJob(
  t: T,
  args: { repositoryUrl?: string; priority?: number; maxAttempts?: number; userId?: string } = {},
  settleAfter = true,
): Promise<{ jobId: Id<"jobs">; runId: string }> {
  const ids = await t.mutation(internal.jobs.create, {
    userId: args.userId ?? "user-1",
    repositoryUrl: args.repositoryUrl ?? "https://github.com/owner/repo.git",
    ref: "main",
    prompt: "make a course",
    priority: args.priority,
    maxAttempts: args.maxAttempts,
  });
  if (settleAfter) await settle(t);
  return ids;
}

/** The auth fields a worker would send, from the last job.start the fake worker received. */
export function creds(worker: Worker, runId: string, workerId = "w1") {
  const start = worker
    .starts()
    .filter((s) => s.json.data.jobId === runId)
    .at(-1);
  if (!start) throw new Error(`no job.start for ${runId}`);
  const { attempt, callbackToken } = start.json.data;
  return { jobId: runId, attempt, workerId, callbackToken: callbackToken as string };
}

export async function hostJob(t: T, jobId: Id<"jobs">) {
  const j = await t.run(async (ctx) => ctx.db.get(jobId));
  if (!j) throw new Error("job vanished");
  return j;
}

export { api, internal };
