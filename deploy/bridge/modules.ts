/**
 * The Convex modules for convex-test outside vite (no `import.meta.glob` there). Keys follow
 * the glob's shape: convex-test finds the root from the `_generated` entry and then looks
 * modules up as `<root><module path>` without extension.
 */
export const modules: Record<string, () => Promise<any>> = {
  "../convex/_generated/api.js": () => import("../convex/_generated/api.js"),
  "../convex/_generated/server.js": () => import("../convex/_generated/server.js"),
  "../convex/schema.ts": () => import("../convex/schema.ts"),
  "../convex/config.ts": () => import("../convex/config.ts"),
  "../convex/crons.ts": () => import("../convex/crons.ts"),
  "../convex/dispatch.ts": () => import("../convex/dispatch.ts"),
  "../convex/fondation.ts": () => import("../convex/fondation.ts"),
  "../convex/model.ts": () => import("../convex/model.ts"),
  "../convex/signing.ts": () => import("../convex/signing.ts"),
  "../convex/sweeper.ts": () => import("../convex/sweeper.ts"),
  "../convex/validators.ts": () => import("../convex/validators.ts"),
};
