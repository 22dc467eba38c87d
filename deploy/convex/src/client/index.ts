/**
 * The host's side of the Fondation worker component.
 *
 *   export const fondation = new Fondation(components.fondation, { cloneToken: internal.jobs.cloneToken });
 *   export const { claim, checkpointPage, progress, putDocs, complete, fail } = fondation.workerApi();
 *   export const { boardSnapshot, boardJob, retry, cancelJob, setPriority } = fondation.operatorApi();
 *   const runId = await fondation.enqueue(ctx, { repositoryUrl, onEvent: internal.jobs.onEvent, context });
 *
 * Settings come from the options, else from the host's environment (`FONDATION_*`), read at
 * call time in the host (a component cannot read the host's environment) and passed in.
 */
import {
  createFunctionHandle,
  mutationGeneric,
  queryGeneric,
  type FunctionReference,
  type GenericDataModel,
  type GenericMutationCtx,
  type GenericQueryCtx,
  type PaginationOptions,
  type PaginationResult,
} from "convex/server";
import { v, type Infer } from "convex/values";
import type { ComponentApi } from "../component/_generated/component.js";
import { vActionResult, vBoardJob, vBoardSnapshot } from "../component/boardShapes.js";
import {
  DEFAULT_CONFIG,
  callbackAuth,
  vCheckpointInfo,
  vRefusal,
  vDocView,
  workerCallbacks,
  type Config,
  type FondationEvent,
  type RunOptions,
  type RunView,
} from "../component/shared.js";

export {
  vDocKind,
  vEnqueueErrorCode,
  vErrorCode,
  vFailureCode,
  vFondationChange,
  vFondationEvent,
  vRunError,
  vRunStatus,
  vRunView,
  vDocView,
  RUN_STATUSES,
  type DocKind,
  type EnqueueErrorCode,
  type ErrorCode,
  type FailureCode,
  type FondationChange,
  type FondationEvent,
  type RunError,
  type RunOptions,
  type RunStatus,
  type RunView,
} from "../component/shared.js";
export type { ComponentApi } from "../component/_generated/component.js";
export { vActionResult, vBoardJob, vBoardJobRow, vBoardSnapshot, type BoardJobRow } from "../component/boardShapes.js";

export type RunId = string;
export type DocView = Infer<typeof vDocView>;

type RunQueryCtx = { runQuery: GenericQueryCtx<GenericDataModel>["runQuery"] };
type RunMutationCtx = {
  runQuery: GenericQueryCtx<GenericDataModel>["runQuery"];
  runMutation: GenericMutationCtx<GenericDataModel>["runMutation"];
};

/** The host mutation that receives events: `internalMutation({ args: vFondationEvent, … })`. */
export type OnEventHandler = FunctionReference<"mutation", "internal", FondationEvent, unknown>;

/**
 * The host query that gives the clone token for one run (e.g. the user's GitHub token), or
 * null. Called at claim time, in the claim's transaction; the token goes to the worker that
 * holds the run's callback token and is never stored by the component. Return a token only
 * for the host of `repositoryUrl` it is meant for: the worker sends it only to that origin.
 */
export type CloneTokenQuery = FunctionReference<
  "query",
  "internal",
  { runId: string; repositoryUrl: string; context?: any },
  string | null
>;

/**
 * Overflow to Scaleway Serverless Jobs (docs/SCALING.md): when every warm slot is taken, or the
 * warm worker answers 503, a run of the job definition takes the attempt. Configured when a job
 * definition id is given (here or in env FONDATION_SCW_JOB_DEFINITION_ID).
 */
export interface OverflowOptions {
  /** Scaleway API base URL. Default: env FONDATION_SCW_API_URL, else https://api.scaleway.com. */
  apiUrl?: string;
  /** Region of the job definition. Default: env FONDATION_SCW_REGION, else fr-par. */
  region?: string;
  /** Job definition id (`python -m deploy --job-definition` prints it). Default: env FONDATION_SCW_JOB_DEFINITION_ID. */
  jobDefinitionId?: string;
  /** Name of the host env var holding the secret key of an IAM key limited to Serverless Jobs
   * in one project. Default: FONDATION_SCW_JOBS_TOKEN. The key itself is never an option. */
  tokenEnv?: string;
  /** Most runs at once (on top of `maxParallel` warm slots). Default: env FONDATION_MAX_RUNS, else 10. */
  maxRuns?: number;
  /** How long a started run may take to claim (queueing, image pull). Default: env
   * FONDATION_RUN_CLAIM_TIMEOUT_MS, else 600 000. */
  claimTimeoutMs?: number;
}

export const DEFAULT_MAX_RUNS = 10;
export const DEFAULT_RUN_CLAIM_TIMEOUT_MS = 600_000;

export interface FondationOptions {
  /** Worker base URL. Default: env FONDATION_WORKER_URL. */
  workerUrl?: string;
  /** `whsec_…` secret shared with the worker. Default: env FONDATION_WEBHOOK_SECRET. */
  webhookSecret?: string;
  /** Runs dispatched or running at once. Default: env FONDATION_MAX_PARALLEL, else 2. */
  maxParallel?: number;
  /** Attempts per run. Default: env FONDATION_MAX_ATTEMPTS, else 3. */
  maxAttempts?: number;
  /** Lease renewed by each worker callback. Default: env FONDATION_LEASE_MS, else 60 000. */
  leaseMs?: number;
  /** Time a delivered run may stay unclaimed. Default: env FONDATION_CLAIM_TIMEOUT_MS, else 60 000. */
  claimTimeoutMs?: number;
  /** Timeout of one webhook POST. Default: env FONDATION_DISPATCH_TIMEOUT_MS, else 10 000. */
  dispatchTimeoutMs?: number;
  /** Backoff between attempts. Defaults: env FONDATION_RETRY_BASE_MS / FONDATION_RETRY_MAX_MS, else 5 000 / 300 000. */
  retryBaseMs?: number;
  retryMaxMs?: number;
  /** Lease check interval while runs are active. Default: env FONDATION_SWEEP_INTERVAL_MS, else 10 000. */
  sweepIntervalMs?: number;
  /** Default `onEvent` for runs enqueued without one. */
  onEvent?: OnEventHandler;
  /** Per-run clone token from the host (see CloneTokenQuery). Without it, no token is handed out. */
  cloneToken?: CloneTokenQuery;
  /** Overflow to Serverless Jobs runs; without a job definition id: warm only. */
  overflow?: OverflowOptions;
  /** Secret shared with the worker's board (its BOARD_SECRET), at least 16 characters; the
   * operator functions refuse every call without it. Default: env FONDATION_BOARD_SECRET. */
  boardSecret?: string;
}

function envString(name: string): string | undefined {
  // Convex functions have `process.env`; read it without requiring Node's types in the host.
  const env = (globalThis as { process?: { env: Record<string, string | undefined> } }).process?.env;
  const raw = env?.[name];
  const value = raw?.trim();
  return value ? value : undefined;
}

function envInt(name: string, min: number): number | undefined {
  const raw = envString(name);
  if (raw === undefined) return undefined;
  const n = Number(raw);
  // A typo in an env var must not silently turn into NaN arithmetic on deadlines.
  return Number.isFinite(n) && n >= min ? Math.floor(n) : undefined;
}

export class Fondation {
  constructor(
    public component: ComponentApi,
    public options: FondationOptions = {},
  ) {}

  /** The settings passed to the component, read now (the environment may have changed). */
  config(): Config {
    const o = this.options;
    const d = DEFAULT_CONFIG;
    const config: Config = {
      maxParallel: o.maxParallel ?? envInt("FONDATION_MAX_PARALLEL", 1) ?? d.maxParallel,
      maxAttempts: o.maxAttempts ?? envInt("FONDATION_MAX_ATTEMPTS", 1) ?? d.maxAttempts,
      leaseMs: o.leaseMs ?? envInt("FONDATION_LEASE_MS", 1) ?? d.leaseMs,
      claimTimeoutMs: o.claimTimeoutMs ?? envInt("FONDATION_CLAIM_TIMEOUT_MS", 1) ?? d.claimTimeoutMs,
      dispatchTimeoutMs: o.dispatchTimeoutMs ?? envInt("FONDATION_DISPATCH_TIMEOUT_MS", 1) ?? d.dispatchTimeoutMs,
      retryBaseMs: o.retryBaseMs ?? envInt("FONDATION_RETRY_BASE_MS", 0) ?? d.retryBaseMs,
      retryMaxMs: o.retryMaxMs ?? envInt("FONDATION_RETRY_MAX_MS", 0) ?? d.retryMaxMs,
      sweepIntervalMs: o.sweepIntervalMs ?? envInt("FONDATION_SWEEP_INTERVAL_MS", 100) ?? d.sweepIntervalMs,
    };
    const workerUrl = o.workerUrl ?? envString("FONDATION_WORKER_URL");
    const webhookSecret = o.webhookSecret ?? envString("FONDATION_WEBHOOK_SECRET");
    if (workerUrl !== undefined) config.workerUrl = workerUrl;
    if (webhookSecret !== undefined) config.webhookSecret = webhookSecret;
    const overflow = this.overflowConfig();
    if (overflow !== undefined) config.overflow = overflow;
    return config;
  }

  /** The overflow settings, read now; undefined when no job definition is configured. */
  private overflowConfig(): Config["overflow"] {
    const o = this.options.overflow ?? {};
    const jobDefinitionId = o.jobDefinitionId ?? envString("FONDATION_SCW_JOB_DEFINITION_ID");
    if (jobDefinitionId === undefined) return undefined;
    const overflow: NonNullable<Config["overflow"]> = {
      apiUrl: o.apiUrl ?? envString("FONDATION_SCW_API_URL") ?? "https://api.scaleway.com",
      region: o.region ?? envString("FONDATION_SCW_REGION") ?? "fr-par",
      jobDefinitionId,
      maxRuns: o.maxRuns ?? envInt("FONDATION_MAX_RUNS", 0) ?? DEFAULT_MAX_RUNS,
      claimTimeoutMs: o.claimTimeoutMs ?? envInt("FONDATION_RUN_CLAIM_TIMEOUT_MS", 1) ?? DEFAULT_RUN_CLAIM_TIMEOUT_MS,
    };
    const token = envString(o.tokenEnv ?? "FONDATION_SCW_JOBS_TOKEN");
    if (token !== undefined) overflow.token = token;
    return overflow;
  }

  /**
   * Queue a run from a host mutation (after the host's own auth). `onEvent` is called in the
   * same transaction as each change the host must know; `context` comes back with every event.
   * Throws `ConvexError({code, message})` (codes: `vEnqueueErrorCode`) on bad input.
   */
  async enqueue(
    ctx: RunMutationCtx,
    args: {
      repositoryUrl: string;
      ref?: string;
      options?: RunOptions;
      priority?: number;
      maxAttempts?: number;
      onEvent?: OnEventHandler;
      context?: unknown;
    },
  ): Promise<RunId> {
    const handler = args.onEvent ?? this.options.onEvent;
    const onEvent =
      handler === undefined ? undefined : { fnHandle: await createFunctionHandle(handler), context: args.context };
    return await ctx.runMutation(this.component.lib.enqueue, {
      config: this.config(),
      repositoryUrl: args.repositoryUrl,
      ref: args.ref,
      options: args.options,
      priority: args.priority,
      maxAttempts: args.maxAttempts,
      onEvent,
    });
  }

  /** Cancel a run; a warm worker holding it gets a signed `job.cancel`, a run is stopped. */
  async cancel(ctx: RunMutationCtx, runId: RunId): Promise<{ ok: boolean; status: string }> {
    return await ctx.runMutation(this.component.lib.cancel, { runId });
  }

  /** The run without secrets, or null. Reactive: a heartbeat does not change it. */
  async status(ctx: RunQueryCtx, runId: RunId): Promise<RunView | null> {
    return await ctx.runQuery(this.component.lib.status, { runId });
  }

  /** The current attempt's docs in reading order, a page at a time. */
  async listDocs(ctx: RunQueryCtx, runId: RunId, paginationOpts: PaginationOptions): Promise<PaginationResult<DocView>> {
    return await ctx.runQuery(this.component.lib.listDocs, { runId, paginationOpts });
  }

  /**
   * The operator's board functions (docs/BOARD.md). Export them from `convex/fondation.ts` so
   * their paths are `fondation:boardSnapshot`, `fondation:boardJob`, `fondation:retry`,
   * `fondation:cancelJob` and `fondation:setPriority`. Public on purpose (the worker has no
   * deploy key): each call carries `boardSecret`, which the component compares in constant time
   * with this client's `boardSecret` (read at call time) and refuses with
   * `ConvexError({code: "forbidden"})` when it differs or none is configured.
   */
  operatorApi() {
    const component = this.component;
    const configured = () => this.options.boardSecret ?? envString("FONDATION_BOARD_SECRET");
    const secret = { boardSecret: v.string() };
    const jobArgs = { ...secret, jobId: v.string() };
    return {
      boardSnapshot: queryGeneric({
        args: { ...secret, page: v.number(), pageSize: v.number() },
        returns: vBoardSnapshot,
        handler: async (ctx, args) =>
          await ctx.runQuery(component.operator.boardSnapshot, { ...args, configuredSecret: configured() }),
      }),
      boardJob: queryGeneric({
        args: jobArgs,
        returns: v.union(v.null(), vBoardJob),
        handler: async (ctx, args) =>
          await ctx.runQuery(component.operator.boardJob, { ...args, configuredSecret: configured() }),
      }),
      retry: mutationGeneric({
        args: jobArgs,
        returns: vActionResult,
        handler: async (ctx, args) =>
          await ctx.runMutation(component.operator.retry, { ...args, configuredSecret: configured() }),
      }),
      cancelJob: mutationGeneric({
        args: jobArgs,
        returns: vActionResult,
        handler: async (ctx, args) =>
          await ctx.runMutation(component.operator.cancelJob, { ...args, configuredSecret: configured() }),
      }),
      setPriority: mutationGeneric({
        args: { ...jobArgs, priority: v.number() },
        returns: vActionResult,
        handler: async (ctx, args) =>
          await ctx.runMutation(component.operator.setPriority, { ...args, configuredSecret: configured() }),
      }),
    };
  }

  /**
   * The public mutations the worker calls over the Convex HTTP API. Export them from
   * `convex/fondation.ts` so their paths are `fondation:claim` … `fondation:fail` (and
   * `fondation:checkpointPage`, which a resumed attempt reads its checkpoint with). They are
   * public on purpose (the worker has no deploy key); each call proves itself with the
   * attempt's callback token, which the component checks against its stored hash.
   */
  workerApi() {
    const component = this.component;
    const cloneToken = this.options.cloneToken;
    return {
      claim: mutationGeneric({
        args: callbackAuth,
        returns: v.union(
          v.object({
            ok: v.literal(true),
            cloneToken: v.optional(v.string()),
            checkpoint: v.optional(vCheckpointInfo),
          }),
          vRefusal,
        ),
        handler: async (ctx, args) => {
          const granted = await ctx.runMutation(component.worker.claim, args);
          if (!granted.ok) return { ok: false as const, reason: granted.reason };
          const resume = granted.checkpoint === undefined ? {} : { checkpoint: granted.checkpoint };
          if (cloneToken === undefined) return { ok: true as const, ...resume };
          const token = await ctx.runQuery(cloneToken, {
            runId: args.jobId,
            repositoryUrl: granted.repositoryUrl,
            context: granted.context,
          });
          return token ? { ok: true as const, cloneToken: token, ...resume } : { ok: true as const, ...resume };
        },
      }),
      checkpointPage: mutationGeneric({
        ...workerCallbacks.checkpointPage,
        handler: async (ctx, args) => await ctx.runMutation(component.worker.checkpointPage, args),
      }),
      progress: mutationGeneric({
        ...workerCallbacks.progress,
        handler: async (ctx, args) => await ctx.runMutation(component.worker.progress, args),
      }),
      putDocs: mutationGeneric({
        ...workerCallbacks.putDocs,
        handler: async (ctx, args) => await ctx.runMutation(component.worker.putDocs, args),
      }),
      complete: mutationGeneric({
        ...workerCallbacks.complete,
        handler: async (ctx, args) => await ctx.runMutation(component.worker.complete, args),
      }),
      fail: mutationGeneric({
        ...workerCallbacks.fail,
        handler: async (ctx, args) => await ctx.runMutation(component.worker.fail, args),
      }),
    };
  }
}
