import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { constantTimeEqual, randomToken, secretKeyBytes, sign, verify } from "../convex/src/component/signing";

type Vector = { name: string; secret: string; id: string; timestamp: number; body: string; signature: string };
const vectorsPath = fileURLToPath(new URL("../../tests/vectors/signatures.json", import.meta.url));
const vectors = JSON.parse(readFileSync(vectorsPath, "utf8")) as { valid: Vector[]; invalid: Vector[] };

describe("Standard Webhooks signer against the shared vectors", () => {
  it("has vectors to check", () => {
    expect(vectors.valid.length).toBeGreaterThan(0);
    expect(vectors.invalid.length).toBeGreaterThan(0);
  });

  for (const vec of vectors.valid) {
    it(`reproduces and verifies ${vec.name}`, async () => {
      expect(await sign(vec.secret, vec.id, vec.timestamp, vec.body)).toBe(vec.signature);
      expect(await verify(vec.secret, vec.id, vec.timestamp, vec.body, vec.signature)).toBe(true);
      // A list with another version and a wrong v1 first still verifies on the right entry.
      expect(
        await verify(vec.secret, vec.id, vec.timestamp, vec.body, `v1a,xyz v1,AAAA ${vec.signature}`),
      ).toBe(true);
    });
  }

  for (const vec of vectors.invalid) {
    it(`rejects ${vec.name}`, async () => {
      expect(await verify(vec.secret, vec.id, vec.timestamp, vec.body, vec.signature)).toBe(false);
    });
  }
});

describe("signing helpers", () => {
  it("enforces the timestamp tolerance when asked", async () => {
    const v = vectors.valid[0]!;
    const opts = { toleranceS: 300 };
    expect(await verify(v.secret, v.id, v.timestamp, v.body, v.signature, { ...opts, nowS: v.timestamp + 300 })).toBe(true);
    expect(await verify(v.secret, v.id, v.timestamp, v.body, v.signature, { ...opts, nowS: v.timestamp + 301 })).toBe(false);
    expect(await verify(v.secret, v.id, v.timestamp, v.body, v.signature, { ...opts, nowS: v.timestamp - 301 })).toBe(false);
  });

  it("refuses secrets that are not base64", () => {
    expect(() => secretKeyBytes("whsec_not base64!")).toThrow();
    expect(() => secretKeyBytes("whsec_")).toThrow();
    expect(secretKeyBytes("whsec_AAEC")).toEqual(new Uint8Array([0, 1, 2]));
  });

  it("compares in full", () => {
    expect(constantTimeEqual("abc", "abc")).toBe(true);
    expect(constantTimeEqual("abc", "abd")).toBe(false);
    expect(constantTimeEqual("abc", "abcd")).toBe(false);
    expect(constantTimeEqual("", "")).toBe(true);
  });

  it("mints distinct 43-char url-safe tokens", () => {
    const a = randomToken();
    const b = randomToken();
    expect(a).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(a).not.toBe(b);
  });
});

describe("interop with the standardwebhooks npm package", () => {
  it("signs what it signs and verifies what it verifies", async () => {
    const { Webhook } = await import("standardwebhooks");
    const secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const wh = new Webhook(secret);
    const body = JSON.stringify({ type: "job.start", data: { unicode: "café ☃ 😀" } });
    const ts = Math.floor(Date.now() / 1000);
    const ours = await sign(secret, "j1:1", ts, body);
    expect(wh.sign("j1:1", new Date(ts * 1000), body)).toBe(ours);
    expect(() =>
      wh.verify(body, { "webhook-id": "j1:1", "webhook-timestamp": String(ts), "webhook-signature": ours }),
    ).not.toThrow();
    expect(() =>
      wh.verify(`${body} `, { "webhook-id": "j1:1", "webhook-timestamp": String(ts), "webhook-signature": ours }),
    ).toThrow();
  });
});
