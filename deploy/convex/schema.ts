import { defineSchema, defineTable } from "convex/server";
import { v } from "convex/values";
export default defineSchema({ jobs: defineTable({ a: v.string() }) });
