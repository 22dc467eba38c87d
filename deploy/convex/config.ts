/**
 * Deployment settings, read from the Convex environment (`npx convex env set NAME value`).
 *
 * Read on every call rather than at module load: Convex may reuse a module instance across
 * env changes, and the tests change the environment between cases.
 */

function intEnv(name: string, fallback: number, min: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw.trim() === "") return fallback;
  const n = Number(raw);
  // A typo in an env var must not silently turn into NaN arithmetic on deadlines.
  if (!Number.isFinite(n) || n < min) return fallback;
  return Math.floor(n);
}

export interface Settings {
  /** Base URL of the worker container; the webhook goes to `${workerUrl}/v1/webhooks`. */
  workerUrl: string | undefined;
  /** `whsec_…` secret shared with the worker (its WEBHOOK_SECRETS). */
  webhookSecret: string | undefined;
  /** Optional token handed to the worker on claim so it can clone private repositories. */
  gitCloneToken: string | undefined;
  /** Most jobs in dispatched/claimed/cloning/analyzing/gathering at once. */
  maxParallel: number;
  /** How long a claim or a progress call keeps the job ours without news from the worker. */
  leaseMs: number;
  /** How long a dispatched job may stay unclaimed before the sweeper re-dispatches it. */
  claimTimeoutMs: number;
  /** Timeout of one webhook POST. */
  dispatchTimeoutMs: number;
  /** Exponential backoff: first delay, and the cap. */
  retryBaseMs: number;
  retryMaxMs: number;
  /** Attempts per job when `create` does not say. */
  defaultMaxAttempts: number;
  /** Log lines kept per job (older ones are deleted). */
  logLimit: number;
}

export function settings(): Settings {
  const workerUrl = process.env.WORKER_URL?.trim();
  const webhookSecret = process.env.WEBHOOK_SECRET?.trim();
  const gitCloneToken = process.env.GIT_CLONE_TOKEN?.trim();
  return {
    workerUrl: workerUrl ? workerUrl.replace(/\/+$/, "") : undefined,
    webhookSecret: webhookSecret || undefined,
    gitCloneToken: gitCloneToken || undefined,
    maxParallel: intEnv("MAX_PARALLEL", 2, 1),
    leaseMs: intEnv("LEASE_MS", 60_000, 1),
    claimTimeoutMs: intEnv("CLAIM_TIMEOUT_MS", 60_000, 1),
    dispatchTimeoutMs: intEnv("DISPATCH_TIMEOUT_MS", 10_000, 1),
    retryBaseMs: intEnv("RETRY_BASE_MS", 5_000, 0),
    retryMaxMs: intEnv("RETRY_MAX_MS", 300_000, 0),
    defaultMaxAttempts: intEnv("MAX_ATTEMPTS", 3, 1),
    logLimit: intEnv("LOG_LIMIT", 500, 1),
  };
}
