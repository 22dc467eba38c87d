/// <reference types="vite/client" />
/**
 * For convex-test: register the component on a test instance of the host app.
 *
 *   const t = convexTest({ schema, modules, transactionLimits: true });
 *   register(t);           // same name as in the host's convex.config.ts
 */
import type { TestConvex } from "convex-test";
import type { GenericSchema, SchemaDefinition } from "convex/server";
import schema from "./component/schema.js";

export const modules = import.meta.glob("./component/**/*.*s");

/**
 * @param t    A test instance (`convexTest(...)`).
 * @param name The component's name, as installed by the host (`app.use(fondation)`: "fondation").
 */
export function register<Schema extends SchemaDefinition<GenericSchema, boolean>>(
  t: TestConvex<Schema>,
  name: string = "fondation",
): void {
  t.registerComponent(name, schema, modules);
}

export default { register, schema, modules };
