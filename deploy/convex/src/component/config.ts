/**
 * Settings live in one `globals` row, written from what the host's client passes (its options
 * and its `FONDATION_*` environment: a component cannot read the host's environment).
 */
import type { MutationCtx, QueryCtx } from "./_generated/server.js";
import { DEFAULT_CONFIG, type Config } from "./shared.js";

export async function getConfig(ctx: QueryCtx): Promise<Config> {
  const row = await ctx.db.query("globals").first();
  if (row === null) return DEFAULT_CONFIG;
  const { _id: _i, _creationTime: _c, ...config } = row;
  return config;
}

/** Store `config` if it differs from the stored row; reads only when nothing changed, so
 * concurrent enqueues with the same settings do not conflict here. */
export async function ensureConfig(ctx: MutationCtx, config: Config): Promise<Config> {
  const row = await ctx.db.query("globals").first();
  if (row === null) {
    await ctx.db.insert("globals", config);
    return config;
  }
  const { _id, _creationTime: _c, ...stored } = row;
  if (!sameConfig(stored, config)) await ctx.db.replace(_id, config);
  return config;
}

function sameConfig(a: Config, b: Config): boolean {
  const keys = new Set([...Object.keys(a), ...Object.keys(b)]) as Set<keyof Config>;
  for (const k of keys) if (k === "overflow" ? !sameFlat(a[k], b[k]) : a[k] !== b[k]) return false;
  return true;
}

/** Equality of two flat objects (or both undefined), whatever their key order. */
function sameFlat(a: object | undefined, b: object | undefined): boolean {
  if (a === undefined || b === undefined) return a === b;
  const x = a as Record<string, unknown>;
  const y = b as Record<string, unknown>;
  const keys = new Set([...Object.keys(x), ...Object.keys(y)]);
  for (const k of keys) if (x[k] !== y[k]) return false;
  return true;
}
