/* Hand-written stand-in for `npx convex codegen` (which needs a deployment): the same shapes,
 * limited to the modules that register functions. */
import type { ApiFromModules, FilterApi, FunctionReference } from "convex/server";
import { anyApi } from "convex/server";
import type * as dispatch from "../dispatch.js";
import type * as docs from "../docs.js";
import type * as lib from "../lib.js";
import type * as loop from "../loop.js";
import type * as operator from "../operator.js";
import type * as overflow from "../overflow.js";
import type * as worker from "../worker.js";

type FullApi = ApiFromModules<{
  dispatch: typeof dispatch;
  docs: typeof docs;
  lib: typeof lib;
  loop: typeof loop;
  operator: typeof operator;
  overflow: typeof overflow;
  worker: typeof worker;
}>;

/** The component's public functions: callable by the host app that installs it, not by clients. */
export const api: FilterApi<FullApi, FunctionReference<any, "public">> = anyApi as any;
export const internal: FilterApi<FullApi, FunctionReference<any, "internal">> = anyApi as any;
