/**
 * Value shapes shared by the schema, the functions and the client. Imports nothing beyond
 * `convex/values`, so the schema never pulls in function code.
 */
import { v, type Infer } from "convex/values";

export const RUN_STATUSES = [
  "pending",
  "dispatched",
  "claimed",
  "cloning",
  "analyzing",
  "gathering",
  "completed",
  "failed",
  "canceled",
  "dead",
] as const;
export type RunStatus = (typeof RUN_STATUSES)[number];

export const vRunStatus = v.union(
  v.literal("pending"),
  v.literal("dispatched"),
  v.literal("claimed"),
  v.literal("cloning"),
  v.literal("analyzing"),
  v.literal("gathering"),
  v.literal("completed"),
  v.literal("failed"),
  v.literal("canceled"),
  v.literal("dead"),
);

/** Statuses a worker may report through `progress`, in the only order it may move through them. */
export const RUNNING_PHASES = ["claimed", "cloning", "analyzing", "gathering"] as const;
export type RunningPhase = (typeof RUNNING_PHASES)[number];
export const vRunningPhase = v.union(
  v.literal("claimed"),
  v.literal("cloning"),
  v.literal("analyzing"),
  v.literal("gathering"),
);

/** Statuses that hold one of the `maxParallel` slots. */
export const ACTIVE_STATUSES = ["dispatched", ...RUNNING_PHASES] as const;
export const FINAL_STATUSES = ["completed", "failed", "canceled", "dead"] as const;

export function isRunning(s: RunStatus): s is RunningPhase {
  return (RUNNING_PHASES as readonly string[]).includes(s);
}
export function isActive(s: RunStatus): boolean {
  return (ACTIVE_STATUSES as readonly string[]).includes(s);
}
export function isFinal(s: RunStatus): boolean {
  return (FINAL_STATUSES as readonly string[]).includes(s);
}
export function phaseIndex(s: RunStatus): number {
  return (RUNNING_PHASES as readonly string[]).indexOf(s);
}

export const vRunOptions = v.object({
  model: v.optional(v.string()),
  steps: v.optional(v.array(v.string())),
});
export type RunOptions = Infer<typeof vRunOptions>;

/** Failure codes a worker reports through `fail` (docs/CONTRACT.md §4). */
export const vFailureCode = v.union(
  v.literal("clone_failed"),
  v.literal("cli_failed"),
  v.literal("timeout"),
  v.literal("canceled"),
  v.literal("interrupted"),
  v.literal("output_invalid"),
  v.literal("internal"),
);
export type FailureCode = Infer<typeof vFailureCode>;

/** Every `error.code` a run can end with: the worker's codes plus the queue's own. */
export const vErrorCode = v.union(
  vFailureCode,
  /** The worker answered the webhook with a 4xx other than 429: it will never take this run. */
  v.literal("dispatch_rejected"),
  /** The webhook could not be delivered (network error, timeout, 5xx). */
  v.literal("dispatch_failed"),
  /** Delivered, but no worker claimed the attempt before the claim deadline. */
  v.literal("claim_timeout"),
  /** The worker stopped reporting (claim/progress/putDocs) for longer than the lease. */
  v.literal("lease_expired"),
);
export type ErrorCode = Infer<typeof vErrorCode>;

export const vRunError = v.object({ code: vErrorCode, message: v.string() });
export type RunError = Infer<typeof vRunError>;

/** Codes of the `ConvexError({code, message})` that `enqueue` throws on bad input. */
export const vEnqueueErrorCode = v.union(
  v.literal("invalid_repository_url"),
  v.literal("invalid_ref"),
  v.literal("invalid_model"),
  v.literal("invalid_steps"),
  v.literal("invalid_priority"),
  v.literal("invalid_max_attempts"),
);
export type EnqueueErrorCode = Infer<typeof vEnqueueErrorCode>;

export const vDocKind = v.union(v.literal("yaml"), v.literal("chapter"), v.literal("tutorial"));
export type DocKind = Infer<typeof vDocKind>;

/** One generated file as the worker sends it (`putDocs`). Partial docs also carry `path`,
 * the file's place in the CLI's output directory: the key of the run's checkpoint. */
export const vDocInput = v.object({
  slug: v.string(),
  title: v.string(),
  kind: vDocKind,
  chapterIndex: v.union(v.number(), v.null()),
  content: v.string(),
  path: v.optional(v.string()),
});
export type DocInput = Infer<typeof vDocInput>;

/** The run's checkpoint as a claim announces it: the commit its files were made from, the
 * steps whose files were all stored, and how many files to fetch (`checkpointPage`). */
export const vCheckpointInfo = v.object({
  commit: v.string(),
  ended: v.array(v.string()),
  files: v.number(),
});
export type CheckpointInfo = Infer<typeof vCheckpointInfo>;

/** The four fields every worker callback carries. `jobId` (the run id) is a plain string so a
 * malformed id gets `{ok:false, reason:"unauthorized"}` instead of an argument-validation error. */
export const callbackAuth = {
  jobId: v.string(),
  attempt: v.number(),
  workerId: v.string(),
  callbackToken: v.string(),
};

/** Refusal of a worker callback (docs/CONTRACT.md §3). */
export const vRefusal = v.object({ ok: v.literal(false), reason: v.string() });
export type Refusal = Infer<typeof vRefusal>;

const vOk = v.object({ ok: v.literal(true) });

/**
 * Arguments and results of the worker callbacks the host re-exports unchanged: the component
 * registers them (worker.ts) and the client's `workerApi` exposes them, from this one definition
 * so the two cannot drift. (`claim` differs: the host adds the clone token.)
 */
export const workerCallbacks = {
  /** Step change and heartbeat. */
  progress: {
    args: {
      ...callbackAuth,
      seq: v.number(),
      status: vRunningPhase,
      currentStep: v.number(),
      totalSteps: v.number(),
      message: v.string(),
      logs: v.optional(v.array(v.string())),
      /** The commit SHA the attempt cloned, once known: the run records it. */
      commit: v.optional(v.string()),
    },
    returns: v.union(v.object({ ok: v.literal(true), stale: v.optional(v.literal(true)) }), vRefusal),
  },
  putDocs: {
    args: {
      ...callbackAuth,
      docs: v.array(vDocInput),
      partial: v.optional(v.boolean()),
      commit: v.optional(v.string()),
      endedStep: v.optional(v.string()),
    },
    returns: v.union(v.object({ ok: v.literal(true), stored: v.number() }), vRefusal),
  },
  complete: {
    args: { ...callbackAuth, docsCount: v.number(), durationMs: v.number() },
    returns: v.union(vOk, vRefusal),
  },
  fail: {
    args: { ...callbackAuth, code: vFailureCode, message: v.string(), retryable: v.boolean() },
    returns: v.union(vOk, vRefusal),
  },
  checkpointPage: {
    args: { ...callbackAuth, after: v.optional(v.string()) },
    returns: v.union(
      v.object({
        ok: v.literal(true),
        commit: v.string(),
        files: v.array(v.object({ path: v.string(), content: v.string() })),
        next: v.union(v.string(), v.null()),
      }),
      vRefusal,
    ),
  },
};

/** Which runner holds an attempt: the warm worker (webhook) or a Serverless Jobs run. */
export const vRunner = v.union(v.literal("warm"), v.literal("run"));
export type Runner = Infer<typeof vRunner>;

/** Overflow to Scaleway Serverless Jobs (docs/SCALING.md): where to start runs, and how many. */
export const vOverflowConfig = v.object({
  /** Scaleway API base URL, e.g. https://api.scaleway.com. */
  apiUrl: v.string(),
  /** Region of the job definition, e.g. fr-par. */
  region: v.string(),
  /** The job definition made by `python -m deploy --job-definition` (its id). */
  jobDefinitionId: v.string(),
  /** Secret key of an IAM key limited to Serverless Jobs (`X-Auth-Token`), from the host's env. */
  token: v.optional(v.string()),
  /** Most attempts held by runs at once (on top of `maxParallel` warm slots). */
  maxRuns: v.number(),
  /** How long a started run may take to claim (Scaleway queueing and image pull included). */
  claimTimeoutMs: v.number(),
});
export type OverflowConfig = Infer<typeof vOverflowConfig>;

/** Settings the host passes with its calls (the client reads them from its options and the
 * host's environment: a component cannot read the host's environment). Stored in `globals`. */
export const vConfig = v.object({
  /** Base URL of the worker; the webhook goes to `${workerUrl}/v1/webhooks`. */
  workerUrl: v.optional(v.string()),
  /** `whsec_…` secret shared with the worker (its WEBHOOK_SECRETS). */
  webhookSecret: v.optional(v.string()),
  /** Most runs in dispatched/claimed/cloning/analyzing/gathering at once. */
  maxParallel: v.number(),
  /** How long a claim, progress or putDocs keeps the run ours without news from the worker. */
  leaseMs: v.number(),
  /** How long a delivered run may stay unclaimed before it is re-dispatched. */
  claimTimeoutMs: v.number(),
  /** Timeout of one webhook POST. */
  dispatchTimeoutMs: v.number(),
  /** Exponential backoff between attempts: first delay, and the cap. */
  retryBaseMs: v.number(),
  retryMaxMs: v.number(),
  /** Attempts per run when `enqueue` does not say. */
  maxAttempts: v.number(),
  /** How often the loop checks leases while runs are active. */
  sweepIntervalMs: v.number(),
  /** Overflow to Serverless Jobs runs; unset: warm only. */
  overflow: v.optional(vOverflowConfig),
});
export type Config = Infer<typeof vConfig>;

export const DEFAULT_CONFIG: Config = {
  maxParallel: 2,
  leaseMs: 60_000,
  claimTimeoutMs: 60_000,
  dispatchTimeoutMs: 10_000,
  retryBaseMs: 5_000,
  retryMaxMs: 300_000,
  maxAttempts: 3,
  sweepIntervalMs: 10_000,
};

/**
 * The fields of a run the host may see: the `runs` table (schema.ts) spreads them and adds its
 * own (options, claim and dispatch times, checkpoint, onEvent, boardStatus), and `vRunView`
 * adds the id. Never a token.
 */
export const runViewFields = {
  status: vRunStatus,
  repositoryUrl: v.string(),
  ref: v.optional(v.string()),
  priority: v.number(),
  /** Current attempt number, from 1. A new number (and a new token) for every retry. */
  attempt: v.number(),
  maxAttempts: v.number(),
  currentStep: v.number(),
  totalSteps: v.number(),
  /** 0..1, monotonic within an attempt. */
  progress: v.number(),
  message: v.string(),
  storedDocs: v.number(),
  docsCount: v.number(),
  /** Set when the run ends failed/dead/canceled with a reason. */
  error: v.optional(vRunError),
  /** Why the previous attempt ended, while a retry is pending or running. */
  lastError: v.optional(vRunError),
  result: v.optional(v.object({ docsCount: v.number(), durationMs: v.number() })),
  claimedBy: v.optional(v.string()),
  /** The commit the current attempt cloned (the worker reports it with its progress). */
  commit: v.optional(v.string()),
  createdAt: v.number(),
  updatedAt: v.number(),
  finishedAt: v.optional(v.number()),
};

/** A run as the host sees it (`status`): never a token. */
export const vRunView = v.object({ runId: v.string(), ...runViewFields });
export type RunView = Infer<typeof vRunView>;

export const vDocView = v.object({
  slug: v.string(),
  title: v.string(),
  kind: vDocKind,
  chapterIndex: v.union(v.number(), v.null()),
  content: v.string(),
  attempt: v.number(),
});

/**
 * What changed, as the host's `onEvent` handler receives it. Heartbeats that change nothing the
 * host shows are not events.
 */
export const vFondationChange = v.union(
  /** The run moved to another non-final status (queued again for a retry: `pending` + lastError). */
  v.object({
    kind: v.literal("status"),
    status: vRunStatus,
    message: v.string(),
    lastError: v.optional(vRunError),
  }),
  /** The worker started another step (or phase) of the CLI. */
  v.object({
    kind: v.literal("step"),
    status: vRunningPhase,
    currentStep: v.number(),
    totalSteps: v.number(),
    progress: v.number(),
    message: v.string(),
  }),
  /** Worker log lines that came with a progress call (bounded per call). */
  v.object({
    kind: v.literal("logs"),
    lines: v.array(v.object({ seq: v.number(), line: v.string() })),
  }),
  /** Docs stored for this attempt (a re-sent slug replaces the earlier one). */
  v.object({
    kind: v.literal("docs"),
    docs: v.array(vDocInput),
    storedDocs: v.number(),
  }),
  /** Files the running attempt's CLI wrote so far (each with `path`): a step that ended
   * (`stepEnded`), or files finished within a step. Show them as the course grows; the
   * `docs` and `completed` events then give the final, ordered set. */
  v.object({
    kind: v.literal("partialDocs"),
    docs: v.array(vDocInput),
    commit: v.string(),
    stepEnded: v.optional(v.string()),
  }),
  v.object({
    kind: v.literal("completed"),
    docsCount: v.number(),
    durationMs: v.number(),
  }),
  /** Final failure: `failed` (the worker said so), `dead` (attempts used up), `canceled`. */
  v.object({
    kind: v.literal("finished"),
    status: v.union(v.literal("failed"), v.literal("dead"), v.literal("canceled")),
    error: v.optional(vRunError),
  }),
);
export type FondationChange = Infer<typeof vFondationChange>;

/**
 * The arguments of the host's `onEvent` mutation, called in the same transaction as the change
 * (`internalMutation({ args: vFondationEvent, handler })`).
 */
export const vFondationEvent = v.object({
  runId: v.string(),
  /** What the host passed as `context` to `enqueue` (e.g. its own job id). */
  context: v.optional(v.any()),
  /** The attempt the change belongs to. */
  attempt: v.number(),
  at: v.number(),
  change: vFondationChange,
});
export type FondationEvent = Infer<typeof vFondationEvent>;

/** What one webhook POST taught the dispatch action. */
export const vDeliveryOutcome = v.union(
  v.object({ kind: v.literal("accepted"), status: v.number() }),
  v.object({ kind: v.literal("busy"), status: v.number(), retryAfterMs: v.number() }),
  v.object({ kind: v.literal("rejected"), status: v.number(), detail: v.string() }),
  v.object({ kind: v.literal("transient"), detail: v.string() }),
  v.object({ kind: v.literal("misconfigured"), detail: v.string() }),
);
export type DeliveryOutcome = Infer<typeof vDeliveryOutcome>;
