/* Hand-written stand-in for `npx convex codegen` (which needs a deployment). */
import type { ComponentApi } from "@fondation/convex-worker";
import type { ApiFromModules, FilterApi, FunctionReference } from "convex/server";
import { anyApi, componentsGeneric } from "convex/server";
import type * as fondation from "../fondation";
import type * as jobs from "../jobs";

type FullApi = ApiFromModules<{ fondation: typeof fondation; jobs: typeof jobs }>;

export const api: FilterApi<FullApi, FunctionReference<any, "public">> = anyApi as any;
export const internal: FilterApi<FullApi, FunctionReference<any, "internal">> = anyApi as any;
export const components = componentsGeneric() as unknown as { fondation: ComponentApi<"fondation"> };
