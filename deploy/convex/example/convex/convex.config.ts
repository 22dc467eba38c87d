import fondation from "@fondation/convex-worker/convex.config";
import { defineApp } from "convex/server";

const app = defineApp();
app.use(fondation);

export default app;
