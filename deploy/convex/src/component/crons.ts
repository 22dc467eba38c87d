import { cronJobs } from "convex/server";
import { internal } from "./_generated/api.js";

const crons = cronJobs();

// Only a safety net: the loop schedules itself; this restarts it if a run of it threw.
crons.interval("fondation loop watchdog", { minutes: 1 }, internal.loop.watchdog, {});

export default crons;
