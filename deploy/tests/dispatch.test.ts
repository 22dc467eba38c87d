import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { verify } from "../convex/signing";
import {
  SECRET,
  accepted,
  api,
  createAndDispatch,
  fakeWorker,
  internal,
  job,
  newT,
  problem,
  settle,
  setupEnv,
} from "./helpers";

beforeEach(() => {
  vi.useFakeTimers({ now: new Date("2026-11-28T10:00:00Z") });
  setupEnv();
});
afterEach(() => {
  vi.useRealTimers();
  vi.unstubAllEnvs();
  vi.unstubAllGlobals();
});

describe("job.start delivery", () => {
  it("sends a signed Standard Webhooks envelope and marks the job dispatched", async () => {
    const t = newT();
    const worker = fakeWorker();
    const jobId = await t.mutation(api.fondation.create, {
      repositoryUrl: "https://github.com/owner/repo.git",
      ref: "main",
      options: { model: "claude-sonnet-4-20250514", steps: ["extract", "analyze"] },
      priority: 3,
    });
    await settle(t);
    expect(worker.sent).toHaveLength(1);
    const req = worker.sent[0]!;
    const j = await job(t, jobId);
    expect(req.url).toBe("http://worker.test/v1/webhooks");
    expect(req.headers["content-type"]).toBe("application/json");
    expect(req.headers["webhook-id"]).toBe(`${jobId}:1`);
    const ts = Number(req.headers["webhook-timestamp"]);
    expect(ts).toBe(Math.floor(Date.now() / 1000));
    expect(await verify(SECRET, `${jobId}:1`, ts, req.body, req.headers["webhook-signature"]!)).toBe(true);
    expect(req.json).toEqual({
      type: "job.start",
      timestamp: "2026-11-28T10:00:00Z",
      data: {
        jobId,
        attempt: 1,
        callbackToken: j.callbackToken,
        repository: { url: "https://github.com/owner/repo.git", ref: "main" },
        options: { model: "claude-sonnet-4-20250514", steps: ["extract", "analyze"] },
        priority: 3,
      },
    });
    expect(j.callbackToken!.length).toBeGreaterThanOrEqual(32);
    expect(j.status).toBe("dispatched");
    expect(j.deliveredAt).toBeDefined();
  });

  it("omits options when none were given", async () => {
    const t = newT();
    const worker = fakeWorker();
    await createAndDispatch(t, worker);
    expect(worker.sent[0]!.json.data).not.toHaveProperty("options");
  });

  it("treats 200 duplicate as delivered", async () => {
    const t = newT();
    const worker = fakeWorker(() => new Response(JSON.stringify({ duplicate: true }), { status: 200 }));
    const jobId = await createAndDispatch(t, worker);
    expect((await job(t, jobId)).status).toBe("dispatched");
  });

  it("on 503 waits Retry-After, consumes no attempt, re-sends the identical body", async () => {
    const t = newT();
    let busy = true;
    const worker = fakeWorker(() => (busy ? problem(503, "full", { "retry-after": "7" }) : accepted()));
    const jobId = await createAndDispatch(t, worker);
    let j = await job(t, jobId);
    expect(j.status).toBe("pending");
    expect(j.attempt).toBe(1);
    expect(j.nextAttemptAt - j.updatedAt).toBe(7000);
    busy = false;
    await settle(t, 6_800);
    expect(worker.sent).toHaveLength(1); // not before Retry-After
    await settle(t, 300);
    expect(worker.sent).toHaveLength(2);
    j = await job(t, jobId);
    expect(j.status).toBe("dispatched");
    expect(j.attempt).toBe(1);
    expect(worker.sent[1]!.body).toBe(worker.sent[0]!.body);
    expect(worker.sent[1]!.headers["webhook-id"]).toBe(`${jobId}:1`);
  });

  it("on 429 without Retry-After uses the default wait", async () => {
    const t = newT();
    const worker = fakeWorker(() => new Response("slow down", { status: 429 }));
    const jobId = await createAndDispatch(t, worker);
    const j = await job(t, jobId);
    expect(j.status).toBe("pending");
    expect(j.nextAttemptAt - j.updatedAt).toBe(30_000);
  });

  it("on another 4xx the job is dead with the problem detail", async () => {
    const t = newT();
    const worker = fakeWorker(() => problem(422, "repository URL not allowed"));
    const jobId = await createAndDispatch(t, worker);
    const j = await job(t, jobId);
    expect(j.status).toBe("dead");
    expect(j.error).toEqual({ code: "dispatch_rejected", message: "worker answered 422: repository URL not allowed" });
    await settle(t, 3_600_000);
    expect(worker.sent).toHaveLength(1);
  });

  it("on 5xx / network errors backs off exponentially with jitter, new attempt each time, then dead", async () => {
    const t = newT();
    let n = 0;
    const worker = fakeWorker(() => {
      n++;
      if (n === 2) throw new TypeError("connection refused");
      return problem(500, "boom");
    });
    const jobId = await createAndDispatch(t, worker, { maxAttempts: 3 });
    let j = await job(t, jobId);
    expect(j.status).toBe("pending");
    expect(j.attempt).toBe(2);
    expect(j.callbackToken).toBeUndefined();
    // attempt 1 failed: delay in [base/2, base] = [500, 1000]
    const d1 = j.nextAttemptAt - j.updatedAt;
    expect(d1).toBeGreaterThanOrEqual(500);
    expect(d1).toBeLessThanOrEqual(1000);
    await settle(t, d1);
    expect(worker.sent).toHaveLength(2);
    expect(worker.sent[1]!.headers["webhook-id"]).toBe(`${jobId}:2`);
    expect(worker.sent[1]!.json.data.callbackToken).not.toBe(worker.sent[0]!.json.data.callbackToken);
    j = await job(t, jobId);
    expect(j.attempt).toBe(3);
    expect(j.lastError?.message).toContain("connection refused");
    const d2 = j.nextAttemptAt - j.updatedAt;
    expect(d2).toBeGreaterThanOrEqual(1000);
    expect(d2).toBeLessThanOrEqual(2000);
    await settle(t, d2);
    j = await job(t, jobId);
    expect(worker.sent).toHaveLength(3);
    expect(j.status).toBe("dead");
    expect(j.error?.code).toBe("dispatch_failed");
    expect(j.error?.message).toContain("500");
  });

  it("times out a worker that does not answer", async () => {
    // Real timers: the abort timer lives inside the running action, out of settle()'s reach.
    vi.useRealTimers();
    setupEnv({ DISPATCH_TIMEOUT_MS: "50" });
    const t = newT();
    // A worker that never answers; like real fetch, the abort signal ends the wait.
    const worker = fakeWorker(
      (req) =>
        new Promise<Response>((_, reject) => {
          req.signal!.addEventListener("abort", () =>
            reject(Object.assign(new Error("aborted"), { name: "AbortError" })),
          );
        }),
    );
    const jobId = await t.mutation(api.fondation.create, { repositoryUrl: "https://github.com/o/r.git" });
    await vi.waitFor(async () => expect((await job(t, jobId)).attempt).toBe(2), { timeout: 5_000 });
    await t.finishInProgressScheduledFunctions();
    expect(worker.sent).toHaveLength(1);
    const j = await job(t, jobId);
    expect(j.attempt).toBe(2);
    expect(j.lastError?.message).toContain("timeout after 50 ms");
  });

  it("keeps the job pending without consuming an attempt when WORKER_URL is missing", async () => {
    vi.stubEnv("WORKER_URL", "");
    const t = newT();
    const worker = fakeWorker();
    const jobId = await createAndDispatch(t, worker);
    const j = await job(t, jobId);
    expect(worker.sent).toHaveLength(0);
    expect(j.status).toBe("pending");
    expect(j.attempt).toBe(1);
    expect(j.message).toContain("WORKER_URL");
  });

  it("a late 2xx after the worker already claimed does not undo the claim", async () => {
    const t = newT();
    fakeWorker();
    const jobId = await createAndDispatch(t, fakeWorker());
    const j = await job(t, jobId);
    await t.mutation(api.fondation.claim, { jobId, attempt: 1, workerId: "w1", callbackToken: j.callbackToken! });
    await t.mutation(internal.dispatch.recordOutcome, {
      jobId,
      attempt: 1,
      outcome: { kind: "transient", detail: "late timeout" },
      jitter: 0.5,
    });
    expect((await job(t, jobId)).status).toBe("claimed");
  });
});

describe("cancel", () => {
  it("cancels a pending job without a webhook", async () => {
    setupEnv({ MAX_PARALLEL: "1" });
    const t = newT();
    const worker = fakeWorker();
    await createAndDispatch(t, worker);
    const second = await createAndDispatch(t, worker);
    expect((await job(t, second)).status).toBe("pending");
    expect(await t.mutation(api.fondation.cancel, { jobId: second })).toEqual({ ok: true, status: "canceled" });
    await settle(t);
    expect(worker.sent).toHaveLength(1);
    expect((await job(t, second)).status).toBe("canceled");
  });

  it("sends a signed job.cancel for a dispatched job and frees the slot", async () => {
    setupEnv({ MAX_PARALLEL: "1" });
    const t = newT();
    const worker = fakeWorker();
    const first = await createAndDispatch(t, worker);
    const second = await createAndDispatch(t, worker);
    await t.mutation(api.fondation.cancel, { jobId: first });
    await settle(t);
    const cancel = worker.sent.find((s) => s.json.type === "job.cancel")!;
    expect(cancel.headers["webhook-id"]).toBe(`${first}:1:cancel`);
    expect(cancel.json.data).toEqual({ jobId: first, attempt: 1 });
    expect(
      await verify(SECRET, `${first}:1:cancel`, Number(cancel.headers["webhook-timestamp"]), cancel.body, cancel.headers["webhook-signature"]!),
    ).toBe(true);
    expect((await job(t, second)).status).toBe("dispatched");
    // Callbacks of the canceled attempt are refused.
    const j = await job(t, first);
    expect(
      await t.mutation(api.fondation.claim, { jobId: first, attempt: 1, workerId: "w1", callbackToken: j.callbackToken! }),
    ).toEqual({ ok: false, reason: "canceled" });
  });

  it("retries job.cancel on a network error, with the same body", async () => {
    const t = newT();
    let fails = 1;
    const worker = fakeWorker((req) => {
      if (req.json.type === "job.cancel" && fails-- > 0) throw new TypeError("down");
      return accepted();
    });
    const jobId = await createAndDispatch(t, worker);
    await t.mutation(api.fondation.cancel, { jobId });
    await settle(t, 2_000);
    const cancels = worker.sent.filter((s) => s.json.type === "job.cancel");
    expect(cancels).toHaveLength(2);
    expect(cancels[1]!.body).toBe(cancels[0]!.body);
  });

  it("does not cancel a finished job", async () => {
    const t = newT();
    const worker = fakeWorker(() => problem(400, "bad"));
    const jobId = await createAndDispatch(t, worker);
    expect(await t.mutation(api.fondation.cancel, { jobId })).toEqual({ ok: false, status: "dead" });
  });
});
