/**
 * A local stand-in for a Convex deployment: one in-memory convex-test backend running the
 * example host app (deploy/convex/example/convex) with the component registered from its
 * installed tarball, exactly as a host installs it, served over the Convex HTTP API so the
 * worker (or any client) can talk to it as to `https://<name>.convex.cloud`.
 *
 *   npx tsx bridge/server.ts          (from deploy/, after convex/pack-example.sh)
 *
 * Env: PORT (0 = any free port), plus what the host's `Fondation` client reads:
 * FONDATION_WORKER_URL, FONDATION_WEBHOOK_SECRET, FONDATION_MAX_PARALLEL, FONDATION_LEASE_MS,
 * FONDATION_CLAIM_TIMEOUT_MS, FONDATION_DISPATCH_TIMEOUT_MS, FONDATION_RETRY_BASE_MS,
 * FONDATION_RETRY_MAX_MS, FONDATION_MAX_ATTEMPTS, FONDATION_SWEEP_INTERVAL_MS.
 *
 * `/api/{query,mutation,action}` reach only the host's public functions (as on Convex: the
 * component's functions are not reachable from outside). `/__test/*` is for tests: any host
 * function, host and component tables. Scheduled functions (the component's loop, dispatch,
 * backoff) run on real timers.
 */
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { convexTest } from "convex-test";
import { makeFunctionReference } from "convex/server";
import { ConvexError, convexToJson, jsonToConvex, type Value } from "convex/values";
import { readdirSync, statSync } from "node:fs";
import { join, relative } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import schema from "../convex/example/convex/schema.ts";

const HOST_DIR = fileURLToPath(new URL("../convex/example/convex/", import.meta.url));
const COMPONENT_DIR = fileURLToPath(
  new URL("../convex/example/node_modules/@fondation/convex-worker/dist/component/", import.meta.url),
);

/** `import.meta.glob` by hand (no vite here): module path → loader, for convex-test. */
function glob(dir: string, ext: ".ts" | ".js"): Record<string, () => Promise<any>> {
  const out: Record<string, () => Promise<any>> = {};
  const walk = (d: string) => {
    for (const name of readdirSync(d)) {
      const path = join(d, name);
      if (statSync(path).isDirectory()) walk(path);
      else if (name.endsWith(ext) && !name.endsWith(".d.ts") && !name.endsWith(".test.ts")) {
        const url = pathToFileURL(path).href;
        out[`./${relative(dir, path)}`] = () => import(url);
      }
    }
  };
  walk(dir);
  return out;
}
const modules = glob(HOST_DIR, ".ts");

type Kind = "query" | "mutation" | "action";
type Fn = { isQuery?: boolean; isMutation?: boolean; isAction?: boolean; isPublic?: boolean; isInternal?: boolean };

const MAX_BODY = 16 * 1024 * 1024; // Convex's argument size limit
const SECRET_KEYS = new Set(["callbackToken", "cloneToken", "boardSecret"]);

const t = convexTest({ schema, modules, transactionLimits: true });
const componentSchema = (await import(pathToFileURL(join(COMPONENT_DIR, "schema.js")).href)).default;
t.registerComponent("fondation", componentSchema, glob(COMPONENT_DIR, ".js"));
const inComponent = <R>(fn: (ctx: any) => Promise<R>): Promise<R> =>
  (t as unknown as { runInComponent: (p: string, f: typeof fn) => Promise<R> }).runInComponent("fondation", fn);

export interface CallRecord {
  endpoint: string;
  path: string;
  args: unknown;
  at: string;
  status: "success" | "error";
  errorMessage?: string;
}
const calls: CallRecord[] = [];
const MAX_CALLS = 10_000;

/** Copy of `value` with secret fields replaced, for the call log. */
function redact(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(redact);
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(
      Object.entries(value).map(([k, v]) => [k, SECRET_KEYS.has(k) ? "<redacted>" : redact(v)]),
    );
  }
  return value;
}

class BadRequest extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

async function readJson(req: IncomingMessage): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > MAX_BODY) throw new BadRequest("RequestTooLarge", "request body too large");
    chunks.push(chunk as Buffer);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  } catch (e) {
    throw new BadRequest("BadJsonBody", `Failed to deserialize request body: ${(e as Error).message}`);
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    throw new BadRequest("BadJsonBody", "Failed to deserialize request body: expected a JSON object");
  }
  return parsed as Record<string, unknown>;
}

/** Look a function up the way the backend does; errors read like Convex's. */
async function resolve(path: string, kind: Kind | "any", publicOnly: boolean): Promise<Kind> {
  const [modulePath, exportName = "default"] = path.replace(/\.(js|ts)(?=:|$)/, "").split(":");
  const loader = modules[`./${modulePath}.ts`];
  const fn = (loader ? ((await loader()) as Record<string, Fn | undefined>)[exportName] : undefined) ?? undefined;
  const found = fn && (fn.isQuery || fn.isMutation || fn.isAction) && (!publicOnly || fn.isPublic);
  if (!found) {
    throw new Error(
      `Could not find public function for '${path}'. Did you forget to run \`npx convex dev\` or \`npx convex deploy\`?`,
    );
  }
  const actual: Kind = fn.isQuery ? "query" : fn.isMutation ? "mutation" : "action";
  if (kind !== "any" && kind !== actual) {
    const cap = (k: string) => k[0]!.toUpperCase() + k.slice(1);
    throw new Error(`Trying to execute ${path} as ${cap(kind)}, but it is defined as ${cap(actual)}.`);
  }
  return actual;
}

async function run(kind: Kind, path: string, args: Record<string, Value>): Promise<Value> {
  const ref = makeFunctionReference<any>(path);
  if (kind === "query") return (await t.query(ref, args)) as Value;
  if (kind === "mutation") return (await t.mutation(ref, args)) as Value;
  return (await t.action(ref, args)) as Value;
}

function send(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
  res.end(text);
}

/**
 * One function call in the Convex HTTP API's shape: 200 `{status:"success", value, logLines}`,
 * or 560 `{status:"error", errorMessage, errorData?, logLines}` when the function fails
 * (unknown function, argument validation, thrown error).
 */
async function callFunction(
  res: ServerResponse,
  endpoint: string,
  body: Record<string, unknown>,
  kind: Kind | "any",
  publicOnly: boolean,
): Promise<void> {
  const path = body.path;
  if (typeof path !== "string" || path === "") throw new BadRequest("BadJsonBody", "missing field `path`");
  if (body.format !== undefined && body.format !== "json") {
    throw new BadRequest("BadJsonBody", `unsupported format ${JSON.stringify(body.format)}`);
  }
  const rawArgs = body.args ?? {};
  if (rawArgs === null || typeof rawArgs !== "object" || Array.isArray(rawArgs)) {
    throw new BadRequest("BadJsonBody", "`args` must be an object");
  }
  const at = new Date().toISOString();
  try {
    const args = jsonToConvex(rawArgs as any) as Record<string, Value>;
    const actual = await resolve(path, kind, publicOnly);
    const value = await run(actual, path, args);
    calls.push({ endpoint, path, args: redact(rawArgs), at, status: "success" });
    send(res, 200, { status: "success", value: convexToJson(value === undefined ? null : value), logLines: [] });
  } catch (e) {
    const err = e as Error;
    const errorMessage = err instanceof ConvexError ? `Uncaught ConvexError: ${err.message}` : `Uncaught ${err.name ?? "Error"}: ${err.message}`;
    calls.push({ endpoint, path, args: redact(rawArgs), at, status: "error", errorMessage });
    const payload: Record<string, unknown> = { status: "error", errorMessage, logLines: [] };
    if (err instanceof ConvexError) payload.errorData = convexToJson(err.data as Value);
    send(res, 560, payload);
  } finally {
    if (calls.length > MAX_CALLS) calls.splice(0, calls.length - MAX_CALLS);
  }
}

async function dumpTable(name: string, component: boolean): Promise<unknown[]> {
  if (!/^_?[A-Za-z][A-Za-z0-9_]*$/.test(name)) throw new BadRequest("BadTableName", `bad table name ${name}`);
  const read = async (ctx: any) =>
    name.startsWith("_") ? ctx.db.system.query(name).collect() : ctx.db.query(name).collect();
  const rows: any[] = component ? await inComponent(read) : await t.run(read);
  return rows.map((r) => convexToJson(r as Value));
}

/** The component's runs, each with its lease's counters (never the token hash). */
async function dumpRuns(): Promise<unknown[]> {
  const rows = await inComponent(async (ctx) => {
    const runs = await ctx.db.query("runs").collect();
    const leases = new Map<string, any>();
    for (const l of await ctx.db.query("leases").collect()) leases.set(l.runId, l);
    return runs.map((r: any) => {
      const l = leases.get(r._id);
      return { ...r, lastSeq: l?.lastSeq ?? 0, leaseUntil: l?.leaseUntil, sends: l?.sends ?? 0 };
    });
  });
  return rows.map((r: unknown) => convexToJson(r as Value));
}

async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
  const url = new URL(req.url ?? "/", "http://127.0.0.1");
  const route = url.pathname.replace(/\/+$/, "");
  try {
    if (req.method === "POST" && ["/api/query", "/api/mutation", "/api/action"].includes(route)) {
      const kind = route.slice("/api/".length) as Kind;
      return await callFunction(res, route, await readJson(req), kind, true);
    }
    if (req.method === "POST" && route === "/__test/run") {
      return await callFunction(res, route, await readJson(req), "any", false);
    }
    if (req.method === "GET" && route === "/__test/calls") return send(res, 200, calls);
    if (req.method === "DELETE" && route === "/__test/calls") {
      calls.length = 0;
      return send(res, 200, { ok: true });
    }
    if (req.method === "GET" && route.startsWith("/__test/table/")) {
      return send(res, 200, await dumpTable(decodeURIComponent(route.slice("/__test/table/".length)), false));
    }
    if (req.method === "GET" && route.startsWith("/__test/component/")) {
      return send(res, 200, await dumpTable(decodeURIComponent(route.slice("/__test/component/".length)), true));
    }
    if (req.method === "GET" && route === "/__test/runs") return send(res, 200, await dumpRuns());
    if (req.method === "GET" && route === "/__test/health") return send(res, 200, { ok: true });
    send(res, 404, { code: "NotFound", message: `no route ${req.method} ${url.pathname}` });
  } catch (e) {
    if (e instanceof BadRequest) return send(res, 400, { code: e.code, message: e.message });
    send(res, 500, { code: "InternalServerError", message: (e as Error).message });
  }
}

const server = createServer((req, res) => {
  void handle(req, res);
});

function shutdown(): void {
  server.close(() => process.exit(0));
  // Keep-alive clients must not hold the exit hostage.
  setTimeout(() => process.exit(0), 1_000).unref();
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);

const port = Number(process.env.PORT ?? "0");
server.listen(Number.isInteger(port) && port >= 0 ? port : 0, "127.0.0.1", () => {
  const { port: actual } = server.address() as AddressInfo;
  process.stdout.write(`bridge listening on http://127.0.0.1:${actual}\n`);
});
