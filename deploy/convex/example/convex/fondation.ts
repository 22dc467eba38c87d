/**
 * The worker calls these mutations as `fondation:claim`, `fondation:checkpointPage`,
 * `fondation:progress`, `fondation:putDocs`, `fondation:complete` and `fondation:fail`
 * (docs/CONTRACT.md §3), and its jobs board the operator functions `fondation:boardSnapshot` …
 * `fondation:setPriority` (docs/BOARD.md), each with the board secret (FONDATION_BOARD_SECRET
 * here).
 */
import { Fondation } from "@fondation/convex-worker";
import { components, internal } from "./_generated/api";

// Annotated: the options name functions of this app, whose types depend on this module.
export const fondation: Fondation = new Fondation(components.fondation, {
  onEvent: internal.jobs.onFondationEvent,
  cloneToken: internal.jobs.cloneToken,
});

export const { claim, checkpointPage, progress, putDocs, complete, fail } = fondation.workerApi();

export const { boardSnapshot, boardJob, retry, cancelJob, setPriority } = fondation.operatorApi();
