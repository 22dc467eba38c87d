import { defineSchema, defineTable } from "convex/server";
import { v } from "convex/values";
import { docKind, jobError, jobOptions, jobStatus } from "./validators";

export default defineSchema({
  /**
   * One row per requested course. Compatible with the Fondation `jobs` table: the UI reads
   * status/progress/currentStep/totalSteps/message/docsCount/error/result.
   */
  jobs: defineTable({
    status: jobStatus,
    repositoryUrl: v.string(),
    ref: v.optional(v.string()),
    options: v.optional(jobOptions),
    priority: v.number(),
    /** -priority: Convex indexes sort one way only, so "highest priority, then oldest" is
     * ascending (queueRank, _creationTime). */
    queueRank: v.number(),
    progress: v.number(),
    currentStep: v.number(),
    totalSteps: v.number(),
    message: v.string(),
    /** Highest progress `seq` seen for the current attempt. */
    lastSeq: v.number(),
    result: v.optional(
      v.object({ docsCount: v.number(), durationMs: v.number(), storedDocs: v.number() }),
    ),
    /** Set when the job ends failed/dead. */
    error: v.optional(jobError),
    /** Why the previous attempt ended, while a retry is pending or running. */
    lastError: v.optional(jobError),
    docsCount: v.number(),
    /** Docs stored for the current attempt. */
    storedDocs: v.number(),
    /** Current attempt number, from 1. A new number (and a new token) for every retry. */
    attempt: v.number(),
    maxAttempts: v.number(),
    /**
     * The deadline by which we must hear from the worker: the claim deadline while
     * `dispatched`, the lease while running. The sweeper re-dispatches past it.
     */
    leaseUntil: v.optional(v.number()),
    claimedBy: v.optional(v.string()),
    claimedAt: v.optional(v.number()),
    /** Secret of the current attempt; minted by the dispatch action (real randomness). */
    callbackToken: v.optional(v.string()),
    /** Creation time of the current attempt's job.start message, reused on re-sends so the
     * body stays byte-identical (the worker dedupes on webhook-id + body). */
    messageAt: v.optional(v.number()),
    /** The attempt before this one, so a repeated final report from it is acknowledged. */
    previousAttempt: v.optional(
      v.object({ attempt: v.number(), callbackToken: v.optional(v.string()), outcome: v.string() }),
    ),
    dispatchedAt: v.optional(v.number()),
    deliveredAt: v.optional(v.number()),
    /** A pending job is not dispatched before this time (backoff, Retry-After). */
    nextAttemptAt: v.number(),
    logSeq: v.number(),
    logCount: v.number(),
    createdAt: v.number(),
    updatedAt: v.number(),
    finishedAt: v.optional(v.number()),
  })
    .index("by_status_rank", ["status", "queueRank"])
    .index("by_status_lease", ["status", "leaseUntil"]),

  /** One generated file of a course. Unique on (jobId, attempt, slug). */
  docs: defineTable({
    jobId: v.id("jobs"),
    attempt: v.number(),
    slug: v.string(),
    title: v.string(),
    kind: docKind,
    chapterIndex: v.union(v.number(), v.null()),
    content: v.string(),
    updatedAt: v.number(),
  }).index("by_job_attempt_slug", ["jobId", "attempt", "slug"]),

  /** Worker log lines, bounded per job (LOG_LIMIT). */
  jobLogs: defineTable({
    jobId: v.id("jobs"),
    attempt: v.number(),
    seq: v.number(),
    line: v.string(),
    at: v.number(),
  }).index("by_job_seq", ["jobId", "seq"]),
});
