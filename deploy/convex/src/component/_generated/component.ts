/* Hand-written stand-in for `npx convex codegen`: the type of `components.fondation` in a host
 * app. A component's public functions are "internal" to the host (only its functions call them). */
import type { FunctionReference, FunctionType } from "convex/server";
import type { api } from "./api.js";

type Mount<T, Name extends string | undefined> = {
  [K in keyof T]: T[K] extends FunctionReference<infer Type extends FunctionType, "public", infer Args, infer Returns>
    ? FunctionReference<Type, "internal", Args, Returns, Name>
    : Mount<T[K], Name>;
};

export type ComponentApi<Name extends string | undefined = string | undefined> = Mount<typeof api, Name>;
