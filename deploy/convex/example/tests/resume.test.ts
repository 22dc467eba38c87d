/**
 * Resume (issue 12) through the component: partial docs reach the host while the run goes,
 * the run keeps them as its checkpoint with the commit, and the next attempt's claim returns
 * it (the files in pages).
 */
import { describe, expect, it } from "vitest";
import { api, createJob, creds, fakeWorker, hostJob, internal, newT, run, settle, setupEnv, table, useFakeHost } from "./helpers";

useFakeHost();

const SHA = "0123456789abcdef0123456789abcdef01234567";
const OTHER = "89abcdef0123456789abcdef0123456789abcdef";

const file = (path: string, content = `# ${path}`) => {
  const name = path.split("/").at(-1)!;
  const chapter = /^chapter_(\d+)/.exec(name);
  return {
    slug: name.replace(/\.(md|yaml)$/, "").replace(/[^a-z0-9]+/g, "-"),
    title: name,
    kind: (path.endsWith(".yaml") ? "yaml" : "chapter") as "yaml" | "chapter",
    chapterIndex: chapter ? Number(chapter[1]) : null,
    content,
    path,
  };
};

const step = (seq: number, currentStep: number, commit?: string) => ({
  seq,
  status: "analyzing" as const,
  currentStep,
  totalSteps: 6,
  message: `step ${currentStep}`,
  ...(commit ? { commit } : {}),
});

describe("resume", () => {
  it("shows the host step 1's YAML as partial docs before step 4 ends, and records the commit", async () => {
    const t = newT();
    const worker = fakeWorker();
    const { jobId, runId } = await createJob(t);
    const c = creds(worker, runId);
    await t.mutation(api.fondation.claim, c);
    expect(await t.mutation(api.fondation.progress, { ...c, ...step(1, 2, SHA) })).toEqual({ ok: true });
    expect((await run(t, runId)).commit).toBe(SHA);
    expect((await t.query(internal.jobs.runStatus, { runId }))?.commit).toBe(SHA);

    const stored = await t.mutation(api.fondation.putDocs, {
      ...c,
      docs: [file("step1_abstractions.yaml", "- name: a")],
      partial: true,
      commit: SHA,
      endedStep: "extract",
    });
    expect(stored).toEqual({ ok: true, stored: 1 });
    expect(await t.mutation(api.fondation.progress, { ...c, ...step(2, 4, SHA) })).toEqual({ ok: true });
    // Step 4 is running: the host already has step 1's plan.
    const job = await hostJob(t, jobId);
    expect(job.progress).toBe("Step 4/6: step 4");
    const docs = await t.run(async (ctx) => ctx.db.query("docs").collect());
    expect(docs.map((d) => [d.slug, d.kind, d.content])).toEqual([["step1-abstractions", "yaml", "- name: a"]]);
  });

  it("refuses partial docs without a commit, a layout path or a known step", async () => {
    const t = newT();
    const worker = fakeWorker();
    const { runId } = await createJob(t);
    const c = creds(worker, runId);
    await t.mutation(api.fondation.claim, c);
    const put = (extra: object, docs = [file("chapters/chapter_1_a.md")]) =>
      t.mutation(api.fondation.putDocs, { ...c, docs, partial: true, ...extra });
    expect(await put({})).toEqual({ ok: false, reason: "invalid_commit" });
    expect(await put({ commit: "main" })).toEqual({ ok: false, reason: "invalid_commit" });
    expect(await put({ commit: SHA }, [file("../etc/passwd")])).toEqual({ ok: false, reason: "invalid_doc" });
    expect(await put({ commit: SHA }, [{ ...file("x.yaml"), path: "notes/x.md" }])).toEqual({
      ok: false,
      reason: "invalid_doc",
    });
    expect(await put({ commit: SHA, endedStep: "deploy" })).toEqual({ ok: false, reason: "invalid_step" });
    expect(await table(t, "checkpointFiles")).toEqual([]);
  });

  it("returns the checkpoint to attempt 2's claim, its files in pages; complete drops it", async () => {
    const t = newT();
    const worker = fakeWorker();
    const { runId } = await createJob(t);
    const c1 = creds(worker, runId);
    await t.mutation(api.fondation.claim, c1);
    const plans = ["step1_abstractions.yaml", "step2_relationships.yaml", "step3_order.yaml"].map((p) => file(p));
    await t.mutation(api.fondation.putDocs, { ...c1, docs: plans, partial: true, commit: SHA, endedStep: "extract" });
    const chapters = Array.from({ length: 10 }, (_, i) => file(`chapters/chapter_${i + 1}_c.md`));
    await t.mutation(api.fondation.putDocs, {
      ...c1,
      docs: chapters,
      partial: true,
      commit: SHA,
      endedStep: "generate-chapters",
    });
    // A re-sent path replaces the file; it is not counted twice.
    await t.mutation(api.fondation.putDocs, {
      ...c1,
      docs: [file("chapters/chapter_1_c.md", "v2")],
      partial: true,
      commit: SHA,
    });
    await t.mutation(api.fondation.fail, { ...c1, code: "interrupted", message: "SIGTERM", retryable: true });
    await settle(t);

    const c2 = creds(worker, runId);
    expect(c2.attempt).toBe(2);
    const claim = await t.mutation(api.fondation.claim, c2);
    expect(claim).toEqual({
      ok: true,
      checkpoint: { commit: SHA, ended: ["extract", "generate-chapters"], files: 13 },
    });
    const files: { path: string; content: string }[] = [];
    let after: string | undefined;
    let pages = 0;
    for (;;) {
      const page: any = await t.mutation(api.fondation.checkpointPage, { ...c2, ...(after ? { after } : {}) });
      expect(page.ok).toBe(true);
      expect(page.commit).toBe(SHA);
      files.push(...page.files);
      pages++;
      if (page.next === null) break;
      after = page.next;
    }
    expect(pages).toBe(2);
    expect(files.map((f) => f.path).sort()).toEqual([...plans, ...chapters].map((f) => f.path).sort());
    expect(files.find((f) => f.path === "chapters/chapter_1_c.md")!.content).toBe("v2");
    // The attempt before may not read it any more.
    expect(await t.mutation(api.fondation.checkpointPage, c1)).toEqual({ ok: false, reason: "stale_attempt" });

    // Attempt 2 ran on another commit (the checkpoint's was gone): its files replace the old ones.
    await t.mutation(api.fondation.putDocs, { ...c2, docs: [plans[0]!], partial: true, commit: OTHER });
    await settle(t);
    expect((await run(t, runId)).checkpoint).toMatchObject({ commit: OTHER, attempt: 2, ended: [], files: 1 });
    expect((await table(t, "checkpointFiles")).map((f) => [f.commit, f.path])).toEqual([
      [OTHER, "step1_abstractions.yaml"],
    ]);

    await t.mutation(api.fondation.putDocs, { ...c2, docs: plans });
    await t.mutation(api.fondation.complete, { ...c2, docsCount: 3, durationMs: 10 });
    await settle(t);
    expect((await run(t, runId)).checkpoint).toBeUndefined();
    expect(await table(t, "checkpointFiles")).toEqual([]);
  });

  it("keeps a failed run's checkpoint for the operator's retry, which resumes; a cancel drops it", async () => {
    setupEnv({ FONDATION_BOARD_SECRET: "board-secret-shared-with-the-worker" });
    const t = newT();
    const worker = fakeWorker();
    const { runId } = await createJob(t, { maxAttempts: 1 });
    const c1 = creds(worker, runId);
    await t.mutation(api.fondation.claim, c1);
    const partial = { partial: true, commit: SHA, endedStep: "extract" };
    await t.mutation(api.fondation.putDocs, { ...c1, docs: [file("step1_abstractions.yaml")], ...partial });
    await t.mutation(api.fondation.fail, { ...c1, code: "cli_failed", message: "exit 3", retryable: false });
    await settle(t);
    expect((await run(t, runId)).status).toBe("failed");
    expect(await t.mutation(api.fondation.retry, { boardSecret: "board-secret-shared-with-the-worker", jobId: runId })).toMatchObject({
      ok: true,
    });
    await settle(t);
    const c2 = creds(worker, runId);
    expect(c2.attempt).toBe(2);
    expect(await t.mutation(api.fondation.claim, c2)).toEqual({
      ok: true,
      checkpoint: { commit: SHA, ended: ["extract"], files: 1 },
    });
  });

  it("drops the checkpoint when the run is canceled", async () => {
    const t = newT();
    const worker = fakeWorker();
    const { jobId, runId } = await createJob(t);
    const c = creds(worker, runId);
    await t.mutation(api.fondation.claim, c);
    await t.mutation(api.fondation.putDocs, {
      ...c,
      docs: [file("step1_abstractions.yaml")],
      partial: true,
      commit: SHA,
    });
    expect(await table(t, "checkpointFiles")).toHaveLength(1);
    expect(await t.mutation(internal.jobs.cancelFor, { userId: "user-1", jobId })).toMatchObject({ ok: true });
    await settle(t);
    expect((await run(t, runId)).status).toBe("canceled");
    expect((await run(t, runId)).checkpoint).toBeUndefined();
    expect(await table(t, "checkpointFiles")).toEqual([]);
  });
});
