// @vitest-environment node
/**
 * End to end through the HTTP bridge: a real child process serving the Convex HTTP API, and a
 * tiny local HTTP server standing in for the worker. Every wait is bounded.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createServer, type IncomingMessage, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { verify } from "../convex/src/component/signing";

const SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

const deployDir = fileURLToPath(new URL("..", import.meta.url));
type Hook = { headers: IncomingMessage["headers"]; body: string; json: any };

let bridge: ChildProcess;
let bridgeUrl: string;
let worker: Server;
const hooks: Hook[] = [];
let workerStatus = 202;

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return Promise.race([
    p,
    new Promise<T>((_, reject) => setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms)),
  ]);
}

async function waitFor<T>(what: string, probe: () => T | undefined | Promise<T | undefined>, ms = 10_000): Promise<T> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    const v = await probe();
    if (v !== undefined) return v;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`timed out waiting for ${what}`);
}

async function post(path: string, body: unknown): Promise<{ status: number; json: any }> {
  const res = await fetch(`${bridgeUrl}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: typeof body === "string" ? body : JSON.stringify(body),
    signal: AbortSignal.timeout(5_000),
  });
  return { status: res.status, json: await res.json() };
}
const mutation = (path: string, args: unknown) => post("/api/mutation", { path, args, format: "json" });
const query = (path: string, args: unknown) => post("/api/query", { path, args, format: "json" });
const run = (path: string, args: unknown) => post("/__test/run", { path, args });
const get = async (path: string) => (await fetch(`${bridgeUrl}${path}`, { signal: AbortSignal.timeout(5_000) })).json();

beforeAll(async () => {
  worker = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks).toString("utf8");
      hooks.push({ headers: req.headers, body, json: JSON.parse(body) });
      res.writeHead(workerStatus, { "content-type": "application/json" });
      res.end(JSON.stringify({ status: "accepted" }));
    });
  });
  await new Promise<void>((r) => worker.listen(0, "127.0.0.1", r));
  const workerPort = (worker.address() as AddressInfo).port;

  bridge = spawn(process.execPath, ["--import", "tsx", "bridge/server.ts"], {
    cwd: deployDir,
    env: {
      ...process.env,
      PORT: "0",
      FONDATION_WORKER_URL: `http://127.0.0.1:${workerPort}`,
      FONDATION_WEBHOOK_SECRET: SECRET,
      FONDATION_MAX_PARALLEL: "1",
      FONDATION_CLAIM_TIMEOUT_MS: "300",
      FONDATION_SWEEP_INTERVAL_MS: "100",
      FONDATION_RETRY_BASE_MS: "50",
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  bridge.stderr!.on("data", (c: Buffer) => (stderr += c.toString()));
  bridgeUrl = await withTimeout(
    new Promise<string>((resolve, reject) => {
      let out = "";
      bridge.stdout!.on("data", (c: Buffer) => {
        out += c.toString();
        const m = /^bridge listening on (http:\/\/127\.0\.0\.1:\d+)\n/.exec(out);
        if (m) resolve(m[1]!);
      });
      bridge.on("exit", (code) => reject(new Error(`bridge exited ${code}: ${stderr}`)));
    }),
    15_000,
    "the bridge to listen",
  );
}, 20_000);

afterAll(async () => {
  if (bridge && bridge.exitCode === null) {
    const exited = new Promise((r) => bridge.once("exit", r));
    bridge.kill("SIGTERM");
    await withTimeout(exited, 5_000, "the bridge to exit").catch(() => bridge.kill("SIGKILL"));
  }
  await new Promise((r) => worker?.close(r));
});

describe("HTTP bridge", () => {
  it("a host job dispatches a signed webhook to the worker; callbacks work over /api/mutation", async () => {
    const created = await run("jobs:create", { userId: "u1", repositoryUrl: "https://github.com/owner/repo.git", ref: "main" });
    expect(created.status).toBe(200);
    expect(created.json).toMatchObject({ status: "success", logLines: [] });
    const { jobId: hostJobId, runId: jobId } = created.json.value as { jobId: string; runId: string };

    const hook = await waitFor("the job.start webhook", () => hooks.find((h) => h.json.data?.jobId === jobId));
    expect(hook.headers["webhook-id"]).toBe(`${jobId}:1`);
    expect(
      await verify(SECRET, String(hook.headers["webhook-id"]), Number(hook.headers["webhook-timestamp"]), hook.body, String(hook.headers["webhook-signature"])),
    ).toBe(true);
    const { attempt, callbackToken } = hook.json.data;
    const auth = { jobId, attempt, workerId: "w1", callbackToken };

    expect((await mutation("fondation:claim", auth)).json.value).toEqual({ ok: true });
    expect((await mutation("fondation:claim", { ...auth, callbackToken: "wrong" })).json.value).toEqual({ ok: false, reason: "unauthorized" });
    const prog = await mutation("fondation:progress", { ...auth, seq: 1, status: "cloning", currentStep: 1, totalSteps: 2, message: "cloning", logs: ["hello"] });
    expect(prog.json.value).toEqual({ ok: true });
    const put = await mutation("fondation:putDocs", {
      ...auth,
      docs: [{ slug: "step1_abstractions", title: "Abstractions", kind: "yaml", chapterIndex: null, content: "a: 1" }],
    });
    expect(put.json.value).toEqual({ ok: true, stored: 1 });
    expect((await mutation("fondation:complete", { ...auth, docsCount: 1, durationMs: 10 })).json.value).toEqual({ ok: true });

    const got = await run("jobs:runStatus", { runId: jobId });
    expect(got.status).toBe(200);
    expect(got.json.value.status).toBe("completed");
    const docs = await run("jobs:runDocs", { runId: jobId, paginationOpts: { numItems: 10, cursor: null } });
    expect(docs.json.value.page).toHaveLength(1);

    const calls = await get("/__test/calls");
    expect(calls.map((c: any) => c.path)).toContain("fondation:claim");
    expect(JSON.stringify(calls)).not.toContain(callbackToken);
    // Nothing stored anywhere holds the token in clear.
    for (const table of ["runs", "leases", "docs"]) {
      expect(JSON.stringify(await get(`/__test/component/${table}`))).not.toContain(callbackToken);
    }

    // The host's own rows, in the host's shape.
    const job = (await get("/__test/table/jobs")).find((j: any) => j._id === hostJobId);
    expect(job).toMatchObject({ status: "completed", userId: "u1", docsCount: 1 });
    expect(typeof job.progress).toBe("string");
    expect(typeof job.completedAt).toBe("number");
    expect((await get("/__test/table/jobLogs")).map((l: any) => l.msg)).toEqual(["hello"]);
  });

  it("answers errors the way the Convex HTTP API does", async () => {
    const invalidArgs = await mutation("fondation:claim", {});
    expect(invalidArgs.status).toBe(560);
    expect(invalidArgs.json.status).toBe("error");
    expect(invalidArgs.json.errorMessage).toMatch(/jobId/);

    const convexError = await run("jobs:create", { userId: "u1", repositoryUrl: "file:///etc/passwd" });
    expect(convexError.status).toBe(560);
    expect(convexError.json.errorData).toEqual({ code: "invalid_repository_url", message: "repositoryUrl must be an http(s) URL" });

    // The host's internal functions and everything of the component are out of reach.
    for (const path of ["jobs:create", "jobs:onFondationEvent", "lib:enqueue", "fondation/lib:enqueue", "loop:main"]) {
      const r = await mutation(path, {});
      expect(r.status).toBe(560);
      expect(r.json.errorMessage).toMatch(/Could not find public function/);
    }
    // A public host function still applies the host's auth.
    const anonymous = await mutation("jobs:request", { repositoryUrl: "https://github.com/owner/repo.git" });
    expect(anonymous.status).toBe(560);
    expect(anonymous.json.errorData).toMatchObject({ code: "unauthenticated" });

    const wrongKind = await post("/api/mutation", { path: "jobs:get", args: { jobId: "x" } });
    expect(wrongKind.status).toBe(560);

    const badJson = await post("/api/query", "{not json");
    expect(badJson.status).toBe(400);
    expect(badJson.json.code).toBe("BadJsonBody");
  });

  it("the component's loop re-dispatches an unclaimed run on real timers", async () => {
    const created = await run("jobs:create", { userId: "u1", repositoryUrl: "https://github.com/owner/other.git" });
    const jobId = created.json.value.runId as string;
    // Nobody claims: past the claim deadline the loop's lease check sends attempt 2.
    const second = await waitFor("attempt 2", () => hooks.find((h) => h.json.data?.jobId === jobId && h.json.data.attempt === 2));
    expect(second.headers["webhook-id"]).toBe(`${jobId}:2`);
    const cancel = await waitFor("job.cancel of attempt 1", () => hooks.find((h) => h.json.type === "job.cancel" && h.json.data.jobId === jobId));
    expect(cancel.json.data.attempt).toBe(1);
  });
});
