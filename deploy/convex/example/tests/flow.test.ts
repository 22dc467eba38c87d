import { Webhook } from "standardwebhooks";
import { describe, expect, it } from "vitest";
import { SECRET, api, createJob, creds, fakeWorker, hostJob, internal, lease, newT, run, settle, table, useFakeHost } from "./helpers";

useFakeHost();

const doc = (slug: string, kind: "yaml" | "chapter" | "tutorial", chapterIndex: number | null) => ({
  slug,
  title: slug.toUpperCase(),
  kind,
  chapterIndex,
  content: `# ${slug}`,
});

describe("a job from enqueue to completion", () => {
  it("dispatches a signed webhook, takes callbacks and keeps the host's rows in the host's shape", async () => {
    const t = newT();
    const worker = fakeWorker();
    const t0 = Date.now();
    const { jobId, runId } = await createJob(t);

    // The webhook: signed with the host's FONDATION_WEBHOOK_SECRET, as docs/CONTRACT.md §2 says.
    const [start] = worker.starts();
    expect(start!.url).toBe("http://worker.test/v1/webhooks");
    expect(start!.headers["webhook-id"]).toBe(`${runId}:1`);
    const verified = new Webhook(SECRET).verify(start!.body, start!.headers) as any;
    expect(verified.data).toMatchObject({ jobId: runId, attempt: 1, repository: { url: "https://github.com/owner/repo.git", ref: "main" } });
    expect(verified.data.callbackToken).toMatch(/^[A-Za-z0-9_-]{43}$/);
    // Only the hash is stored.
    const l = await lease(t, runId);
    expect(JSON.stringify(await table(t, "leases"))).not.toContain(verified.data.callbackToken);
    expect(l.tokenHash).toMatch(/^[0-9a-f]{64}$/);

    const c = creds(worker, runId);
    expect(await t.mutation(api.fondation.claim, c)).toEqual({ ok: true });
    expect((await hostJob(t, jobId)).status).toBe("pending");

    const step = { seq: 1, status: "analyzing" as const, currentStep: 2, totalSteps: 6, message: "Extracting" };
    expect(await t.mutation(api.fondation.progress, { ...c, ...step, logs: ["cloned", "step 2"] })).toEqual({ ok: true });
    let job = await hostJob(t, jobId);
    expect(job.status).toBe("analyzing");
    expect(job.progress).toBe("Step 2/6: Extracting");
    const logs = await t.run(async (ctx) => ctx.db.query("jobLogs").collect());
    expect(logs.map((l) => [l.seq, l.level, l.msg])).toEqual([
      [1, "info", "cloned"],
      [2, "info", "step 2"],
    ]);

    expect(
      await t.mutation(api.fondation.putDocs, {
        ...c,
        docs: [doc("step1_abstractions", "yaml", null), doc("chapter_2_b", "chapter", 2), doc("chapter_1_a", "chapter", 1)],
      }),
    ).toEqual({ ok: true, stored: 3 });
    expect(await t.mutation(api.fondation.complete, { ...c, docsCount: 3, durationMs: 1234 })).toEqual({ ok: true });
    await settle(t);

    job = await hostJob(t, jobId);
    expect(job.status).toBe("completed");
    expect(typeof job.progress).toBe("string");
    expect(job.completedAt).toBeGreaterThanOrEqual(t0);
    expect(job.completedAt).toBeLessThanOrEqual(Date.now());
    expect(job.docsCount).toBe(3);
    const hostDocs = await t.run(async (ctx) => ctx.db.query("docs").collect());
    expect(hostDocs.map((d) => [d.slug, d.kind, d.chapterIndex, d.repositoryId])).toEqual([
      ["step1_abstractions", "yaml", -1, job.repositoryId],
      ["chapter_2_b", "chapter", 2, job.repositoryId],
      ["chapter_1_a", "chapter", 1, job.repositoryId],
    ]);
    // The component's own listing, in reading order.
    const page = await t.query(internal.jobs.runDocs, { runId, paginationOpts: { numItems: 10, cursor: null } });
    expect(page.page.map((d) => d.slug)).toEqual(["step1_abstractions", "chapter_1_a", "chapter_2_b"]);
    const status = await t.query(internal.jobs.runStatus, { runId });
    expect(status).toMatchObject({ status: "completed", attempt: 1, docsCount: 3, progress: 1 });
    expect(JSON.stringify(status)).not.toMatch(/token/i);
    expect((await run(t, runId)).status).toBe("completed");
  });
});
