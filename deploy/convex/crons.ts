import { cronJobs } from "convex/server";
import { internal } from "./_generated/api";

const crons = cronJobs();

// Lease/claim deadlines are checked here; 30 s keeps detection well inside the default 60 s lease.
crons.interval("fondation sweep", { seconds: 30 }, internal.fondation.sweep, {});

export default crons;
