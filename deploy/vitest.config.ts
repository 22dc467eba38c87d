import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    // Convex functions run in a Workers-like runtime; edge-runtime is the closest offline.
    environment: "edge-runtime",
    server: { deps: { inline: ["convex-test"] } },
    include: ["tests/**/*.test.ts"],
    // The bridge test starts a child process; keep its own timeouts inside this bound.
    testTimeout: 30_000,
  },
});
