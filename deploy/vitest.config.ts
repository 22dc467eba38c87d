import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    // Convex functions run in a Workers-like runtime; edge-runtime is the closest offline.
    environment: "edge-runtime",
    // The component comes from the example's node_modules (its packed tarball); inline it so
    // vite handles its `import.meta.glob` (src/test.ts), as for convex-test itself.
    server: { deps: { inline: ["convex-test", "@fondation/convex-worker"] } },
    include: ["tests/**/*.test.ts", "convex/example/tests/**/*.test.ts"],
    // The bridge test starts a child process; keep its own timeouts inside this bound.
    testTimeout: 30_000,
  },
});
