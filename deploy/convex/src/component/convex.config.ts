import { defineComponent } from "convex/server";

/** The Fondation worker queue, installed by a host app with `app.use(fondation)`. */
const component = defineComponent("fondation");

export default component;
