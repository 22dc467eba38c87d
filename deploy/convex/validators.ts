/** Value shapes shared by the schema and the functions. No imports beyond `convex/values`, so
 * the schema never pulls in function code. */
import { v, type Infer } from "convex/values";

export const JOB_STATUSES = [
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
export type JobStatus = (typeof JOB_STATUSES)[number];

export const jobStatus = v.union(
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
export const runningPhase = v.union(
  v.literal("claimed"),
  v.literal("cloning"),
  v.literal("analyzing"),
  v.literal("gathering"),
);

/** Statuses that hold one of the MAX_PARALLEL slots. */
export const ACTIVE_STATUSES = ["dispatched", ...RUNNING_PHASES] as const;
export const FINAL_STATUSES = ["completed", "failed", "canceled", "dead"] as const;

export function isRunning(s: JobStatus): s is RunningPhase {
  return (RUNNING_PHASES as readonly string[]).includes(s);
}
export function isActive(s: JobStatus): boolean {
  return (ACTIVE_STATUSES as readonly string[]).includes(s);
}
export function isFinal(s: JobStatus): boolean {
  return (FINAL_STATUSES as readonly string[]).includes(s);
}

export const jobOptions = v.object({
  model: v.optional(v.string()),
  steps: v.optional(v.array(v.string())),
});
export type JobOptions = Infer<typeof jobOptions>;

export const jobError = v.object({ code: v.string(), message: v.string() });
export type JobError = Infer<typeof jobError>;

export const docKind = v.union(v.literal("yaml"), v.literal("chapter"), v.literal("tutorial"));
export type DocKind = Infer<typeof docKind>;

export const failureCode = v.union(
  v.literal("clone_failed"),
  v.literal("cli_failed"),
  v.literal("timeout"),
  v.literal("canceled"),
  v.literal("interrupted"),
  v.literal("output_invalid"),
  v.literal("internal"),
);

/** The four fields every worker callback carries. `jobId` is a plain string so a malformed id
 * gets `{ok:false, reason:"not_found"}` instead of an argument-validation error. */
export const callbackAuth = {
  jobId: v.string(),
  attempt: v.number(),
  workerId: v.string(),
  callbackToken: v.string(),
};

/** What `dispatch:deliver` learned from one webhook POST. */
export const deliveryOutcome = v.union(
  v.object({ kind: v.literal("accepted"), status: v.number() }),
  v.object({ kind: v.literal("busy"), status: v.number(), retryAfterMs: v.number() }),
  v.object({ kind: v.literal("rejected"), status: v.number(), detail: v.string() }),
  v.object({ kind: v.literal("transient"), detail: v.string() }),
  v.object({ kind: v.literal("misconfigured"), detail: v.string() }),
);
export type DeliveryOutcome = Infer<typeof deliveryOutcome>;
