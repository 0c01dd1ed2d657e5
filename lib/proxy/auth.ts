/**
 * The shared secret of the proxy's control endpoints (/v1/metaserver and the
 * instance admin API). Two ways to prove it:
 *
 * - **HMAC** (any network): header `X-EPD-Signature: t=<unix ms>,v1=<hex>` where
 *   `v1 = HMAC-SHA256(secret, "<t>." + raw body)`. The timestamp must be within
 *   ±60 s of the proxy's clock. The secret never travels; the body cannot be altered.
 * - **Bearer** (loopback only): `Authorization: Bearer <secret>`. Accepted only when
 *   the connection comes from 127.0.0.0/8 or ::1, where nobody can sniff it.
 *
 * Comparisons are constant-time.
 */
import { createHash, createHmac, timingSafeEqual } from 'node:crypto';
import type { IncomingHttpHeaders } from 'node:http';

/** Header carrying the HMAC proof: `t=<unix ms>,v1=<hex>`. */
export const SIGNATURE_HEADER = 'x-epd-signature';

/** How far a signature's timestamp may be from the proxy's clock. */
export const MAX_SIGNATURE_SKEW_MS = 60_000;

/** Signs a request body; put the result in the `X-EPD-Signature` header. */
export function signBody(secret: string, body: string | Buffer, now = Date.now()): string {
  const t = Math.floor(now);
  return `t=${t},v1=${mac(secret, t, body)}`;
}

function mac(secret: string, t: number, body: string | Buffer): string {
  return createHmac('sha256', secret).update(`${t}.`).update(body).digest('hex');
}

/** True for 127.0.0.0/8, ::1 and their IPv4-mapped forms. */
export function isLoopback(address: string | undefined): boolean {
  if (!address) return false;
  const a = address.startsWith('::ffff:') ? address.slice(7) : address;
  return a === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(a);
}

function equalSecrets(given: string, expected: string): boolean {
  // Hash first so the comparison has a fixed length and leaks nothing about the secret's.
  const a = createHash('sha256').update(given).digest();
  const b = createHash('sha256').update(expected).digest();
  return timingSafeEqual(a, b);
}

/** Why a request was refused, or undefined when it proved the secret. */
export function checkSecret(
  secret: string,
  headers: IncomingHttpHeaders,
  body: Buffer,
  remoteAddress: string | undefined,
  now = Date.now(),
): string | undefined {
  const signature = headers[SIGNATURE_HEADER];
  if (typeof signature === 'string') {
    const m = /^t=(\d{1,16}),v1=([0-9a-f]{64})$/.exec(signature.trim());
    if (!m) return 'malformed X-EPD-Signature (expected t=<unix ms>,v1=<64 hex>)';
    const t = Number(m[1]);
    if (Math.abs(now - t) > MAX_SIGNATURE_SKEW_MS) return 'X-EPD-Signature timestamp is too far from the proxy clock';
    const expected = Buffer.from(mac(secret, t, body), 'hex');
    return timingSafeEqual(Buffer.from(m[2], 'hex'), expected) ? undefined : 'X-EPD-Signature does not match';
  }
  const authorization = headers.authorization;
  if (typeof authorization === 'string' && /^Bearer /i.test(authorization)) {
    if (!isLoopback(remoteAddress)) return 'a bearer secret is accepted over loopback only; sign the body (X-EPD-Signature) instead';
    return equalSecrets(authorization.slice(7).trim(), secret) ? undefined : 'wrong secret';
  }
  return 'this endpoint requires the shared secret (X-EPD-Signature, or a bearer token over loopback)';
}
