/**
 * What the operator's board functions return (docs/BOARD.md), shared by `operator.ts` and the
 * client's `operatorApi()`. Imports nothing beyond `convex/values` and `shared.ts`.
 */
import { v, type Infer } from "convex/values";
import { vRunError, vRunStatus } from "./shared.js";

/** One run as a board row. Times are Unix milliseconds. */
export const vBoardJobRow = v.object({
  jobId: v.string(),
  attempt: v.number(),
  status: vRunStatus,
  repositoryUrl: v.string(),
  ref: v.union(v.string(), v.null()),
  priority: v.number(),
  currentStep: v.number(),
  totalSteps: v.number(),
  message: v.string(),
  claimedBy: v.union(v.string(), v.null()),
  runner: v.union(v.literal("warm"), v.literal("overflow"), v.null()),
  leaseUntil: v.union(v.number(), v.null()),
  createdAt: v.number(),
  updatedAt: v.number(),
  error: v.union(vRunError, v.null()),
});
export type BoardJobRow = Infer<typeof vBoardJobRow>;

export const vBoardSnapshot = v.object({
  version: v.string(),
  now: v.number(),
  counts: v.record(v.string(), v.number()),
  pending: v.array(vBoardJobRow),
  pendingTotal: v.number(),
  running: v.array(vBoardJobRow),
  recent: v.array(vBoardJobRow),
  hasNext: v.boolean(),
});

export const vBoardJob = v.object({
  version: v.string(),
  now: v.number(),
  job: vBoardJobRow,
  attempts: v.array(
    v.object({
      attempt: v.number(),
      status: v.string(),
      startedAt: v.number(),
      updatedAt: v.number(),
      error: v.union(vRunError, v.null()),
    }),
  ),
  steps: v.array(v.object({ step: v.number(), totalSteps: v.number(), message: v.string(), at: v.number() })),
  logs: v.array(v.string()),
  docs: v.array(
    v.object({
      slug: v.string(),
      title: v.string(),
      kind: v.string(),
      chapterIndex: v.union(v.number(), v.null()),
      content: v.string(),
    }),
  ),
});

export const vActionResult = v.object({ ok: v.boolean(), message: v.string() });
