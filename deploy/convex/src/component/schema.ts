/**
 * The component's tables. They live in the component's namespace: the host's own `jobs`,
 * `docs`, `jobLogs` are never touched, and nothing here is readable from a browser unless the
 * host exports a function that returns it.
 */
import { defineSchema, defineTable } from "convex/server";
import { v } from "convex/values";
import { runViewFields, vConfig, vDocKind, vRunError, vRunOptions, vRunStatus, vRunner } from "./shared.js";

export default defineSchema({
  /**
   * One row per requested course: what the host shows.
   * Writers: `lib.enqueue` (insert), `lib.cancel`, the worker callbacks on a status or step
   * change (never on a bare heartbeat), `loop.main` (dispatch, expiry), `dispatch.recordOutcome`.
   * Readers: `lib.status` (the host's queries subscribe to it), `loop.main` (active count).
   */
  runs: defineTable({
    ...runViewFields,
    options: v.optional(vRunOptions),
    claimedAt: v.optional(v.number()),
    /** The files of the furthest attempt (`checkpointFiles` of this commit), kept for the next
     * attempt to resume from; unset once the run completes. */
    checkpoint: v.optional(
      v.object({ commit: v.string(), attempt: v.number(), ended: v.array(v.string()), files: v.number() }),
    ),
    dispatchedAt: v.optional(v.number()),
    deliveredAt: v.optional(v.number()),
    /** The host's `onEvent` mutation (a function handle) and the context it gets back. */
    onEvent: v.optional(v.object({ fnHandle: v.string(), context: v.optional(v.any()) })),
    /** The status counted in `boardState.counts` (set by `board.noteChange`). */
    boardStatus: v.optional(vRunStatus),
  })
    .index("by_status", ["status"])
    /** The board's "recent" list: finished runs, newest first (unset sorts first, skipped). */
    .index("by_finished", ["finishedAt"]),

  /**
   * The current attempt's secrets and deadline, one row per run, kept apart from `runs` so a
   * heartbeat (which only renews the lease) does not re-run the host's queries.
   * Writers: `dispatch.prepare` (token hash), the worker callbacks (lease, seq), `loop.main`
   * and the run's own transitions (next attempt, end). Readers: the callback gate, `loop.main`
   * (expired leases, by index).
   */
  leases: defineTable({
    runId: v.id("runs"),
    attempt: v.number(),
    /** SHA-256 (hex) of the attempt's callback token; the token itself is never stored. */
    tokenHash: v.optional(v.string()),
    /** Random per attempt: with the component's `tokenKeys` key it derives the token again
     * for a byte-identical re-send (the worker dedupes on webhook-id + body). */
    tokenNonce: v.optional(v.string()),
    /** Time of the attempt's `job.start` message, fixed for re-sends like the token. */
    messageAt: v.optional(v.number()),
    /** Webhooks sent for this attempt (re-sends after 503/429 are byte-identical). */
    sends: v.number(),
    /** The deadline by which the worker must be heard from: the claim deadline while
     * `dispatched`, the lease while running; unset when the run holds no slot. */
    leaseUntil: v.optional(v.number()),
    /** Highest progress `seq` seen for this attempt. */
    lastSeq: v.number(),
    /** Sequence of the log lines handed to the host (across attempts). */
    logSeq: v.number(),
    /** Who holds this attempt, set when the loop dispatches it: the warm worker, or a
     * Serverless Jobs run (overflow). Kept after the attempt ends, as its record. */
    runner: v.optional(vRunner),
    /** The Serverless Jobs run's id once `start` answered (runner "run"). */
    jobRunId: v.optional(v.string()),
    /** The attempt before this one, so a repeated final report from it is acknowledged. */
    previous: v.optional(
      v.object({ attempt: v.number(), tokenHash: v.optional(v.string()), outcome: v.string() }),
    ),
  })
    .index("by_run", ["runId"])
    .index("by_lease", ["leaseUntil"]),

  /**
   * Runs waiting for a slot. Writers: producers insert (`enqueue`, a retry, a busy worker);
   * only `loop.main` reads it and deletes what it dispatches or finds stale.
   * Order: highest priority first (`queueRank` = -priority), then oldest run.
   */
  queue: defineTable({
    runId: v.id("runs"),
    queueRank: v.number(),
    enqueuedAt: v.number(),
    /** Not dispatched before this time (backoff, Retry-After). */
    readyAt: v.number(),
    /** Not sent to the warm worker before this time (it answered 503); a run may take it. */
    warmBusyUntil: v.optional(v.number()),
  })
    .index("by_rank", ["queueRank", "enqueuedAt"])
    /** For `operator.setPriority`, which re-ranks a pending run's entry. */
    .index("by_run", ["runId"]),

  /**
   * Generated files, per attempt; only the completed attempt's are kept (older attempts' are
   * deleted in batches by `docs.cleanup`). Writer: `worker.putDocs`. Reader: `lib.listDocs`.
   */
  docs: defineTable({
    runId: v.id("runs"),
    attempt: v.number(),
    slug: v.string(),
    title: v.string(),
    kind: vDocKind,
    chapterIndex: v.union(v.number(), v.null()),
    content: v.string(),
    /** Reading order: yaml, then chapters and tutorials by chapterIndex, then slug. */
    order: v.string(),
    updatedAt: v.number(),
  })
    .index("by_run_attempt_slug", ["runId", "attempt", "slug"])
    .index("by_run_attempt_order", ["runId", "attempt", "order"]),

  /**
   * The run's checkpoint: the output files its attempts uploaded as partial docs, one row per
   * commit and path (a resumed attempt continues the same files). Only rows of
   * `runs.checkpoint.commit` are read; others (an attempt that ran in full on another commit)
   * and, after `complete`, all of them are deleted in batches by `docs.dropCheckpoint`.
   * Writer: `worker.putDocs` (partial). Readers: `worker.checkpointPage`, `docs.dropCheckpoint`.
   */
  checkpointFiles: defineTable({
    runId: v.id("runs"),
    commit: v.string(),
    path: v.string(),
    content: v.string(),
    attempt: v.number(),
    updatedAt: v.number(),
  }).index("by_run_commit_path", ["runId", "commit", "path"]),

  /**
   * One random key (32 bytes) under which callback tokens are derived: token =
   * HMAC-SHA256(key, runId:attempt:nonce). Writer: `dispatch.prepare` (created on first use,
   * from the action's randomness). Reader: `dispatch.prepare`. Never leaves the component.
   */
  tokenKeys: defineTable({ key: v.string() }),

  /** Settings passed by the host's client, one row. Writer: `lib.enqueue` (when they change).
   * Readers: everything that needs a setting. */
  globals: defineTable(vConfig),

  /**
   * What the operator's board reads instead of scanning `runs`: a version bumped by every
   * change the host is told of, and the number of runs per status, summed over `board.SHARDS`
   * rows (one written per change, so concurrent producers seldom conflict).
   * Writer: `board.noteChange` (from `emit`, `lib.enqueue`, the operator's mutations).
   * Readers: `operator.boardSnapshot`, `operator.boardJob`.
   */
  boardState: defineTable({
    shard: v.number(),
    version: v.number(),
    /** Per status, this shard's share (may be negative; the sum over shards is the count). */
    counts: v.record(v.string(), v.number()),
  }).index("by_shard", ["shard"]),

  /**
   * The board's trail of each run: one row per status or step change, per attempt, so the job
   * page can show attempts and a step timeline. Writer: `board.noteChange`.
   * Reader: `operator.boardJob` (bounded).
   */
  boardSteps: defineTable({
    runId: v.id("runs"),
    attempt: v.number(),
    at: v.number(),
    status: vRunStatus,
    step: v.number(),
    totalSteps: v.number(),
    message: v.string(),
    error: v.optional(vRunError),
  }).index("by_run_at", ["runId", "at"]),

  /**
   * The last log lines of each run (at most `board.LOG_TAIL`). Writer: `board.noteChange`
   * (a progress call's lines, older ones trimmed). Reader: `operator.boardJob`.
   */
  boardLogs: defineTable({
    runId: v.id("runs"),
    seq: v.number(),
    line: v.string(),
  }).index("by_run_seq", ["runId", "seq"]),

  /**
   * State of the one loop that reads `queue` (as Workpool's `runStatus`). Writers: `kick`
   * (idle/scheduled → running) and `loop.main`. Readers: `kick`, which writes only when the
   * loop is not already due, so concurrent producers do not conflict on it.
   */
  loopState: defineTable({
    state: v.union(
      v.object({ kind: v.literal("idle") }),
      v.object({ kind: v.literal("running"), scheduledId: v.id("_scheduled_functions") }),
      v.object({ kind: v.literal("scheduled"), at: v.number(), scheduledId: v.id("_scheduled_functions") }),
    ),
  }),
});
