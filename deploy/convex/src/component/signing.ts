/**
 * Standard Webhooks signatures (https://www.standardwebhooks.com/), Web Crypto only, so the same
 * code runs in the default Convex runtime, in Node and in the tests.
 *
 *   signature = "v1," + base64(HMAC-SHA256(key, `${id}.${timestamp}.${body}`))
 *   key       = base64-decode(secret without the "whsec_" prefix)
 */

const PREFIX = "whsec_";
const encoder = new TextEncoder();

function base64ToBytes(b64: string): Uint8Array {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function bytesToBase64(bytes: Uint8Array): string {
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin);
}

/** Decode a `whsec_…` secret to its key bytes. Throws on anything that is not base64. */
export function secretKeyBytes(secret: string): Uint8Array {
  const b64 = secret.startsWith(PREFIX) ? secret.slice(PREFIX.length) : secret;
  if (b64.length === 0 || !/^[A-Za-z0-9+/]+={0,2}$/.test(b64)) {
    throw new Error("webhook secret is not a whsec_<base64> string");
  }
  return base64ToBytes(b64);
}

async function hmac(secret: string, content: string): Promise<Uint8Array> {
  const key = await crypto.subtle.importKey(
    "raw",
    secretKeyBytes(secret) as BufferSource,
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["sign"],
  );
  return new Uint8Array(await crypto.subtle.sign("HMAC", key, encoder.encode(content)));
}

/** The `webhook-signature` value (`v1,<base64>`) for one delivery. */
export async function sign(
  secret: string,
  id: string,
  timestamp: number,
  body: string,
): Promise<string> {
  return `v1,${bytesToBase64(await hmac(secret, `${id}.${timestamp}.${body}`))}`;
}

/** Compare two strings without stopping at the first difference (token and MAC checks). */
export function constantTimeEqual(a: string, b: string): boolean {
  const ab = encoder.encode(a);
  const bb = encoder.encode(b);
  // Length is not secret here (tokens and MACs have fixed lengths); still walk the longer one.
  let diff = ab.length ^ bb.length;
  const n = Math.max(ab.length, bb.length);
  for (let i = 0; i < n; i++) diff |= (ab[i] ?? 0) ^ (bb[i] ?? 0);
  return diff === 0;
}

/**
 * True when any `v1,` entry of the space-separated `signatureHeader` matches. Other versions are
 * ignored, as the spec asks. Timestamp tolerance is the receiver's business and is optional here
 * (`toleranceS`, checked against `nowS`).
 */
export async function verify(
  secret: string,
  id: string,
  timestamp: number,
  body: string,
  signatureHeader: string,
  opts: { toleranceS?: number; nowS?: number } = {},
): Promise<boolean> {
  if (opts.toleranceS !== undefined) {
    const now = opts.nowS ?? Math.floor(Date.now() / 1000);
    if (Math.abs(now - timestamp) > opts.toleranceS) return false;
  }
  const expected = (await sign(secret, id, timestamp, body)).slice(3);
  let ok = false;
  for (const part of signatureHeader.split(" ")) {
    const comma = part.indexOf(",");
    if (comma < 0 || part.slice(0, comma) !== "v1") continue;
    if (constantTimeEqual(part.slice(comma + 1), expected)) ok = true;
  }
  return ok;
}

/** A fresh random string for a per-attempt callback token: 32 random bytes, base64url (43 chars). */
export function randomToken(): string {
  const bytes = new Uint8Array(32);
  crypto.getRandomValues(bytes);
  return bytesToBase64(bytes).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/**
 * SHA-256 of a callback token, hex. Only this is stored: a reader of the component's tables
 * (dashboard, backup, a bug in a query) learns no token it could call back with.
 */
export async function hashToken(token: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", encoder.encode(token));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * The callback token of one attempt: base64url(HMAC-SHA256(key, `${runId}:${attempt}:${nonce}`)),
 * 43 characters. Derived rather than stored, so the same attempt's webhook can be re-sent
 * byte-identical while only the token's hash is kept.
 */
export async function deriveToken(key: string, runId: string, attempt: number, nonce: string): Promise<string> {
  const cryptoKey = await crypto.subtle.importKey(
    "raw",
    encoder.encode(key),
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["sign"],
  );
  const mac = new Uint8Array(await crypto.subtle.sign("HMAC", cryptoKey, encoder.encode(`${runId}:${attempt}:${nonce}`)));
  return bytesToBase64(mac).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}
