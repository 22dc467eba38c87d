/**
 * The host app's own tables, shaped like the Fondation web app's: they share names with
 * nothing in the component (its tables live in its own namespace), so neither sees the other.
 */
import { defineSchema, defineTable } from "convex/server";
import { v } from "convex/values";

export const jobStatus = v.union(
  v.literal("pending"),
  v.literal("cloning"),
  v.literal("analyzing"),
  v.literal("gathering"),
  v.literal("completed"),
  v.literal("failed"),
  v.literal("canceled"),
);

export default defineSchema({
  repositories: defineTable({
    userId: v.string(),
    url: v.string(),
  }).index("by_user_url", ["userId", "url"]),

  jobs: defineTable({
    userId: v.string(),
    repositoryId: v.id("repositories"),
    prompt: v.string(),
    status: jobStatus,
    /** Human-readable, e.g. "Step 3/6: Generating chapter content". */
    progress: v.optional(v.string()),
    error: v.optional(v.string()),
    completedAt: v.optional(v.number()),
    /** The component's run for this job. */
    runId: v.optional(v.string()),
    docsCount: v.optional(v.number()),
  })
    .index("by_user", ["userId"])
    .index("by_run", ["runId"]),

  docs: defineTable({
    repositoryId: v.id("repositories"),
    jobId: v.id("jobs"),
    slug: v.string(),
    title: v.string(),
    kind: v.union(v.literal("toc"), v.literal("chapter"), v.literal("tutorial"), v.literal("yaml")),
    chapterIndex: v.number(),
    content: v.string(),
    attempt: v.number(),
  })
    .index("by_job_slug", ["jobId", "slug"])
    .index("by_job_attempt", ["jobId", "attempt"])
    .index("by_repository", ["repositoryId"]),

  jobLogs: defineTable({
    jobId: v.id("jobs"),
    ts: v.number(),
    seq: v.number(),
    level: v.union(v.literal("info"), v.literal("warn"), v.literal("error")),
    msg: v.string(),
  }).index("by_job_seq", ["jobId", "seq"]),

  /** Per-user Git tokens, each for one host; handed out per run through `cloneToken`. */
  gitTokens: defineTable({
    userId: v.string(),
    host: v.string(),
    token: v.string(),
  }).index("by_user_host", ["userId", "host"]),
});
