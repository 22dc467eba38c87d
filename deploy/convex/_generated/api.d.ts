/* eslint-disable */
/**
 * Generated `api` utility.
 *
 * THIS CODE IS AUTOMATICALLY GENERATED.
 *
 * To regenerate, run `npx convex dev`.
 * @module
 */

import type { ApiFromModules, FilterApi, FunctionReference } from "convex/server";
import type * as config from "../config.js";
import type * as crons from "../crons.js";
import type * as dispatch from "../dispatch.js";
import type * as fondation from "../fondation.js";
import type * as model from "../model.js";
import type * as signing from "../signing.js";
import type * as validators from "../validators.js";
import type * as sweeper from "../sweeper.js";

/**
 * A utility for referencing Convex functions in your app's API.
 *
 * Usage:
 * ```js
 * const myFunctionReference = api.myModule.myFunction;
 * ```
 */
declare const fullApi: ApiFromModules<{
  config: typeof config;
  crons: typeof crons;
  dispatch: typeof dispatch;
  fondation: typeof fondation;
  model: typeof model;
  signing: typeof signing;
  validators: typeof validators;
  sweeper: typeof sweeper;
}>;
export declare const api: FilterApi<typeof fullApi, FunctionReference<any, "public">>;
export declare const internal: FilterApi<typeof fullApi, FunctionReference<any, "internal">>;
