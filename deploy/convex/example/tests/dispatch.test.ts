/** How the dispatch reads the worker's answers (docs/CONTRACT.md §2). */
import { describe, expect, it, vi } from "vitest";
import { parseRetryAfter } from "../../src/component/model";
import { createJob, creds, fakeWorker, hostJob, lease, newT, problem, run, settle, api, START, useFakeHost } from "./helpers";

useFakeHost();

describe("worker answers", () => {
  it("a 4xx other than 429 ends the run dead at once (the worker will never take it)", async () => {
    const t = newT();
    const worker = fakeWorker(() => problem(422, "repository host not allowed"));
    const { runId, jobId } = await createJob(t, { maxAttempts: 3 });
    await settle(t, 60_000);
    expect(worker.starts()).toHaveLength(1);
    expect(await run(t, runId)).toMatchObject({
      status: "dead",
      attempt: 1,
      error: { code: "dispatch_rejected", message: "worker answered 422: repository host not allowed" },
    });
    expect((await hostJob(t, jobId)).error).toBe("worker answered 422: repository host not allowed");
  });

  it("without a worker URL nothing is sent and no attempt is spent; setting it later delivers", async () => {
    vi.stubEnv("FONDATION_WORKER_URL", "");
    const t = newT();
    const worker = fakeWorker();
    const { runId } = await createJob(t);
    expect(worker.sent).toHaveLength(0);
    expect(await run(t, runId)).toMatchObject({ status: "pending", attempt: 1 });
    expect((await run(t, runId)).message).toMatch(/FONDATION_WORKER_URL/);
    // The host's settings reach the component with its next call (here, another enqueue).
    vi.stubEnv("FONDATION_WORKER_URL", "http://worker.test");
    await createJob(t, { repositoryUrl: "https://github.com/owner/other.git" });
    await settle(t, 61_000);
    expect(worker.starts().map((s) => s.json.data.jobId)).toContain(runId);
    expect((await run(t, runId)).attempt).toBe(1);
  });

  it("a network error spends the attempt; the next one gets a new token", async () => {
    const t = newT();
    let down = true;
    const worker = fakeWorker(() => {
      if (down) throw new TypeError("fetch failed");
      return new Response("{}", { status: 202 });
    });
    const { runId } = await createJob(t);
    expect(await run(t, runId)).toMatchObject({ status: "pending", attempt: 2, lastError: { code: "dispatch_failed", message: "network error: fetch failed" } });
    down = false;
    await settle(t, 5_000);
    expect(await run(t, runId)).toMatchObject({ status: "dispatched", attempt: 2 });
    const [a, b] = worker.starts();
    expect(a!.json.data.callbackToken).not.toBe(b!.json.data.callbackToken);
    expect((await lease(t, runId)).previous).toMatchObject({ attempt: 1, outcome: "dispatch_failed" });
    expect(await t.mutation(api.fondation.claim, creds(worker, runId))).toEqual({ ok: true });
    // The first attempt's token is stale now, and says so only to its own holder.
    expect(await t.mutation(api.fondation.claim, { ...creds(worker, runId), attempt: 1, callbackToken: a!.json.data.callbackToken })).toEqual({
      ok: false,
      reason: "stale_attempt",
    });
  });
});

describe("Retry-After", () => {
  it("reads seconds and HTTP dates, and bounds both", () => {
    const now = Date.parse(START);
    expect(parseRetryAfter("7", now)).toBe(7_000);
    expect(parseRetryAfter("Sat, 28 Nov 2026 10:00:20 GMT", now)).toBe(20_000);
    expect(parseRetryAfter(null, now)).toBe(30_000);
    expect(parseRetryAfter("0", now)).toBe(1_000);
    expect(parseRetryAfter("999999", now)).toBe(3_600_000);
    expect(parseRetryAfter("soon", now)).toBe(30_000);
  });
});
