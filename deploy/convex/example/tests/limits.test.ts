/** Transaction limits (convex-test `transactionLimits: true`): big docs, batched deletion. */
import { describe, expect, it } from "vitest";
import { api, createJob, creds, fakeWorker, hostJob, inComponent, internal, newT, run, settle, useFakeHost, type T } from "./helpers";

useFakeHost();

const KB900 = 900 * 1024;
const bigDoc = (i: number, attempt: number) => ({
  slug: `chapter_${i}`,
  title: `Chapter ${i}`,
  kind: "chapter" as const,
  chapterIndex: i,
  content: `${attempt}`.repeat(KB900),
});

/** (attempt, first char of content) of every doc, a few per transaction: reading them all in
 * one would pass the 16 MiB read limit, in the test as in a real deployment. */
async function docsSeen(t: T, host: boolean): Promise<string[]> {
  const out: string[] = [];
  let cursor: string | null = null;
  for (;;) {
    const read = async (ctx: any) => await ctx.db.query("docs").paginate({ numItems: 4, cursor });
    const page: any = host ? await t.run(read) : await inComponent(t, read);
    out.push(...page.page.map((d: any) => `${d.attempt}:${d.content[0]}`));
    if (page.isDone) return out;
    cursor = page.continueCursor;
  }
}

/** The worker's batching (app/adapters/convex_store.py: at most 4 MiB per call). */
function batches<T>(docs: T[], perBatch: number): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < docs.length; i += perBatch) out.push(docs.slice(i, i + perBatch));
  return out;
}

describe("an attempt with 20 docs of 900 KB", () => {
  it("completes within the limits; a retry's leftover docs are deleted in batches", async () => {
    const t = newT();
    const worker = fakeWorker();
    const { runId, jobId } = await createJob(t);
    let c = creds(worker, runId);
    await t.mutation(api.fondation.claim, c);
    const docs1 = Array.from({ length: 20 }, (_, i) => bigDoc(i + 1, 1));
    for (const batch of batches(docs1, 4)) {
      expect(await t.mutation(api.fondation.putDocs, { ...c, docs: batch })).toEqual({ ok: true, stored: 4 });
    }
    // Attempt 1 dies after its upload; attempt 2 uploads the same 20 and completes.
    await t.mutation(api.fondation.fail, { ...c, code: "interrupted", message: "SIGTERM", retryable: true });
    await settle(t);
    c = creds(worker, runId);
    expect(c.attempt).toBe(2);
    await t.mutation(api.fondation.claim, c);
    const docs2 = Array.from({ length: 20 }, (_, i) => bigDoc(i + 1, 2));
    for (const batch of batches(docs2, 4)) await t.mutation(api.fondation.putDocs, { ...c, docs: batch });
    expect(await t.mutation(api.fondation.complete, { ...c, docsCount: 20, durationMs: 1 })).toEqual({ ok: true });
    await settle(t);
    expect(await docsSeen(t, false)).toEqual(Array(20).fill("2:2"));
    expect((await run(t, runId)).status).toBe("completed");
    // Four pages of 5, in chapter order (a page of 900 KB docs stays under the read limit).
    const slugs: string[] = [];
    let cursor: string | null = null;
    for (let pages = 1; ; pages++) {
      const page: any = await t.query(internal.jobs.runDocs, { runId, paginationOpts: { numItems: 5, cursor } });
      slugs.push(...page.page.map((d: any) => d.slug));
      if (page.isDone) {
        expect(pages).toBe(4);
        break;
      }
      cursor = page.continueCursor;
    }
    expect(slugs).toEqual(Array.from({ length: 20 }, (_, i) => `chapter_${i + 1}`));
    const host = await hostJob(t, jobId);
    expect(host).toMatchObject({ status: "completed", docsCount: 20 });
    expect(await docsSeen(t, true)).toEqual(Array(20).fill("2:2"));
  });
});
