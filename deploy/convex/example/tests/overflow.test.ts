/** Overflow to Serverless Jobs runs (docs/SCALING.md), with `fetch` stubbed: the warm worker's
 * webhook and the Jobs API's start and stop. */
import { describe, expect, it, vi } from "vitest";
import { verify } from "../../src/component/signing";
import { SECRET, api, createJob, lease, newT, problem, run, settle, table, useFakeHost } from "./helpers";

const JOBS = "http://jobs.test/serverless-jobs/v1alpha2/regions/fr-par";
const TOKEN = "22222222-3333-4444-8555-666666666666";

useFakeHost({
    FONDATION_SCW_API_URL: "http://jobs.test",
    FONDATION_SCW_REGION: "fr-par",
    FONDATION_SCW_JOB_DEFINITION_ID: "def-1",
    FONDATION_SCW_JOBS_TOKEN: TOKEN,
    FONDATION_MAX_RUNS: "3",
    FONDATION_RUN_CLAIM_TIMEOUT_MS: "120000",
  });

type Req = { url: string; headers: Record<string, string>; body: string; json: any };

/** The warm worker at http://worker.test and the Jobs API at http://jobs.test, recorded. */
function fakeScaleway(warm: (req: Req) => Response = () => new Response("{}", { status: 202 })) {
  const sent: Req[] = [];
  let runs = 0;
  let startAnswer: ((req: Req) => Response) | null = null;
  vi.stubGlobal(
    "fetch",
    vi.fn(async (input: RequestInfo | URL, init?: RequestInit) => {
      const headers: Record<string, string> = {};
      new Headers(init?.headers).forEach((value, key) => (headers[key] = value));
      const body = String(init?.body ?? "");
      const req = { url: String(input), headers, body, json: JSON.parse(body) };
      sent.push(req);
      if (req.url.startsWith("http://worker.test/")) return warm(req);
      if (req.url === `${JOBS}/job-definitions/def-1/start`) {
        if (startAnswer) return startAnswer(req);
        runs += 1;
        return new Response(JSON.stringify({ job_runs: [{ id: `run-${runs}`, state: "queued" }] }), { status: 200 });
      }
      if (/\/job-runs\/[^/]+\/stop$/.test(req.url)) return new Response("{}", { status: 200 });
      return new Response("{}", { status: 404 });
    }),
  );
  return {
    sent,
    webhooks: () => sent.filter((r) => r.url.startsWith("http://worker.test/")),
    starts: () => sent.filter((r) => r.url.endsWith("/start")),
    stops: () => sent.filter((r) => r.url.endsWith("/stop")).map((r) => r.url.split("/").at(-2)),
    answerStarts: (fn: ((req: Req) => Response) | null) => (startAnswer = fn),
  };
}

/** The message a run got, as `run-one` reads it. */
function runMessage(start: Req): { body: string; headers: Record<string, string>; data: any } {
  const env = start.json.environment_variables as Record<string, string>;
  const body = env.FONDATION_JOB_MESSAGE!;
  return { body, headers: JSON.parse(env.FONDATION_JOB_HEADERS!), data: JSON.parse(body).data };
}

describe("overflow", () => {
  it("fills the warm slots first, then starts runs up to maxRuns; the rest wait", async () => {
    const t = newT();
    const s = fakeScaleway();
    const ids = [];
    for (let i = 0; i < 6; i++) ids.push((await createJob(t, { repositoryUrl: `https://github.com/o/r${i}.git` })).runId);
    await settle(t);
    expect(s.webhooks()).toHaveLength(2);
    expect(s.starts()).toHaveLength(3);
    const runners = await Promise.all(ids.map(async (id) => (await lease(t, id)).runner ?? null));
    expect(runners.filter((r) => r === "warm")).toHaveLength(2);
    expect(runners.filter((r) => r === "run")).toHaveLength(3);
    expect(runners.filter((r) => r === null)).toHaveLength(1);
    const ran = ids.filter((_, i) => runners[i] === "run");
    for (const id of ran) {
      expect(await run(t, id)).toMatchObject({ status: "dispatched" });
      expect((await lease(t, id)).jobRunId).toMatch(/^run-\d$/);
      expect((await run(t, id)).message).toMatch(/started in Serverless Jobs run run-\d/);
    }
  });

  it("a run's environment holds the signed message only, and nothing that outlives the attempt", async () => {
    const t = newT();
    const s = fakeScaleway();
    for (let i = 0; i < 3; i++) await createJob(t, { repositoryUrl: `https://github.com/o/r${i}.git` });
    const start = s.starts()[0]!;
    expect(start.headers["x-auth-token"]).toBe(TOKEN);
    const env = start.json.environment_variables as Record<string, string>;
    expect(Object.keys(env).sort()).toEqual(["FONDATION_JOB_HEADERS", "FONDATION_JOB_MESSAGE"]);
    const { body, headers, data } = runMessage(start);
    // Verified exactly as the webhook route (and run-one) does.
    const ts = Number(headers["webhook-timestamp"]);
    expect(headers["content-type"]).toBe("application/json");
    expect(await verify(SECRET, headers["webhook-id"]!, ts, body, headers["webhook-signature"]!)).toBe(true);
    expect(headers["webhook-id"]).toBe(`${data.jobId}:${data.attempt}`);
    const text = JSON.stringify(env);
    expect(text).not.toContain(SECRET.slice("whsec_".length));
    expect(text).not.toContain(TOKEN);
    // The one credential is the attempt's callback token, stored only as a hash.
    const l = await lease(t, data.jobId);
    expect(l.tokenHash).toBeDefined();
    expect(JSON.stringify(l)).not.toContain(data.callbackToken);
  });

  it("a 503 from the warm worker sends the same attempt to a run at once", async () => {
    const t = newT();
    const s = fakeScaleway(() => problem(503, "no free job slot", { "retry-after": "30" }));
    const { runId } = await createJob(t);
    await settle(t);
    expect(s.webhooks()).toHaveLength(1);
    expect(s.starts()).toHaveLength(1);
    expect(await run(t, runId)).toMatchObject({ status: "dispatched", attempt: 1 });
    expect(await lease(t, runId)).toMatchObject({ runner: "run", jobRunId: "run-1" });
    // Byte-identical message: same token, same body (the warm worker recorded nothing).
    expect(runMessage(s.starts()[0]!).body).toBe(s.webhooks()[0]!.body);
  });

  it("a refused start puts the attempt back in the queue without spending it", async () => {
    const t = newT();
    const s = fakeScaleway(() => problem(503, "no free job slot", { "retry-after": "600" }));
    s.answerStarts(() => new Response(JSON.stringify({ message: "denied" }), { status: 401 }));
    const { runId } = await createJob(t);
    await settle(t);
    expect(await run(t, runId)).toMatchObject({ status: "pending", attempt: 1 });
    expect((await run(t, runId)).message).toMatch(/run start answered 401/);
    s.answerStarts(null);
    await settle(t, 61_000);
    expect(await run(t, runId)).toMatchObject({ status: "dispatched", attempt: 1 });
    expect(await lease(t, runId)).toMatchObject({ runner: "run", jobRunId: "run-1" });
  });

  it("a run that never claims is swept, re-dispatched, and stopped", async () => {
    const t = newT();
    const s = fakeScaleway(() => problem(503, "no free job slot", { "retry-after": "1" }));
    const { runId } = await createJob(t, { maxAttempts: 3 });
    await settle(t);
    expect(await lease(t, runId)).toMatchObject({ runner: "run", jobRunId: "run-1" });
    await settle(t, 135_000); // the run's claim deadline (120 s) plus a sweep
    expect((await run(t, runId)).attempt).toBeGreaterThanOrEqual(2);
    expect((await run(t, runId)).lastError).toMatchObject({ code: "claim_timeout" });
    expect(s.stops()).toContain("run-1");
    // Nothing was sent to the warm worker to cancel a run it never had.
    expect(s.webhooks().filter((w) => w.json.type === "job.cancel")).toHaveLength(0);
  });

  it("cancel stops the run that holds the attempt, and the run's next callback is refused", async () => {
    const t = newT();
    const s = fakeScaleway(() => problem(503, "no free job slot", { "retry-after": "30" }));
    const { jobId, runId } = await createJob(t);
    await settle(t);
    const { data } = runMessage(s.starts()[0]!);
    const auth = { jobId: runId, attempt: data.attempt, workerId: "run-1", callbackToken: data.callbackToken };
    expect(await t.mutation(api.fondation.claim, auth)).toMatchObject({ ok: true });
    await t.withIdentity({ subject: "user-1" }).mutation(api.jobs.cancel, { jobId });
    await settle(t);
    expect(await run(t, runId)).toMatchObject({ status: "canceled" });
    expect(s.stops()).toEqual(["run-1"]);
    expect(s.webhooks().filter((w) => w.json.type === "job.cancel")).toHaveLength(0);
    const refused = await t.mutation(api.fondation.progress, {
      ...auth,
      seq: 1,
      status: "cloning",
      currentStep: 0,
      totalSteps: 0,
      message: "cloning",
    });
    expect(refused).toMatchObject({ ok: false, reason: "canceled" });
  });

  it("an operator's retry of a job that ended in a run forgets that run", async () => {
    const board = "board-secret-shared-with-the-worker";
    vi.stubEnv("FONDATION_BOARD_SECRET", board);
    const t = newT();
    const s = fakeScaleway(() => problem(503, "no free job slot", { "retry-after": "30" }));
    const { runId } = await createJob(t, { maxAttempts: 1 });
    await settle(t);
    const { data } = runMessage(s.starts()[0]!);
    const auth = { jobId: runId, attempt: data.attempt, workerId: "run-1", callbackToken: data.callbackToken };
    expect(await t.mutation(api.fondation.claim, auth)).toMatchObject({ ok: true });
    await t.mutation(api.fondation.fail, { ...auth, code: "cli_failed", message: "exit 3", retryable: false });
    expect(await run(t, runId)).toMatchObject({ status: "failed" });
    expect(await t.mutation(api.fondation.retry, { boardSecret: board, jobId: runId })).toMatchObject({ ok: true });
    // Attempt 2 waits in the queue: no runner holds it, and the ended run is not its holder.
    const snap = await t.query(api.fondation.boardSnapshot, { boardSecret: board, page: 1, pageSize: 20 });
    expect(snap.pending.find((r) => r.jobId === runId)).toMatchObject({ runner: null });
    const held = await lease(t, runId);
    expect([held.attempt, held.runner, held.jobRunId]).toEqual([2, undefined, undefined]);
    await t.mutation(api.fondation.cancelJob, { boardSecret: board, jobId: runId });
    await settle(t);
    expect(s.stops()).toEqual([]);
  });

  it("without a job definition id there are no runs: a 503 waits for the warm worker", async () => {
    vi.stubEnv("FONDATION_SCW_JOB_DEFINITION_ID", "");
    const t = newT();
    const s = fakeScaleway(() => problem(503, "no free job slot", { "retry-after": "30" }));
    const { runId } = await createJob(t);
    await settle(t);
    expect(s.starts()).toHaveLength(0);
    expect(await run(t, runId)).toMatchObject({ status: "pending", attempt: 1 });
    expect((await table(t, "queue"))[0].readyAt).toBeGreaterThan(Date.now() + 25_000);
  });
});
