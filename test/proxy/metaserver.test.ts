/** POST /v1/metaserver: the decode-first rendezvous, its deadline and its shared secret. */
import { createHmac } from 'node:crypto';
import OpenAI from 'openai';
import { describe, expect, it } from 'vitest';
import { checkSecret, signBody } from '../../lib/proxy/auth.js';
import { Rendezvous } from '../../lib/proxy/rendezvous.js';
import { client, expectNoLoad, proxy, waitFor, worker } from './helpers.js';

const SECRET = 's3cret-for-tests';

async function secured(auth: 'hmac' | 'bearer' = 'hmac', extra: { metaserverMs?: number } = {}) {
  const p = await worker({ role: 'prefill' });
  const d = await worker({ role: 'decode', secret: SECRET, auth });
  const px = await proxy({ secret: SECRET, instances: { prefill: [p.url], decode: [d.url] }, timeouts: { metaserverMs: extra.metaserverMs ?? 30_000 } });
  return { p, d, px, c: client(px) };
}

describe('metaserver', () => {
  it('an HMAC-signed call from D runs the prefill', async () => {
    const { p, d, px, c } = await secured('hmac');
    const r = await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }] });
    expect(r.choices[0].message.content).toMatch(/^tok0/);
    expect(d.log[0].metaserver).toMatchObject({ status: 200, body: { status: 'ok', request_id: d.log[0].id, prefill: p.url } });
    await expectNoLoad(px);
  });

  it('a bearer secret is accepted over loopback', async () => {
    const { d, c } = await secured('bearer');
    await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }] });
    expect(d.log[0].metaserver?.status).toBe(200);
  });

  it('a wrong secret gets 401, P never runs, and the client request fails cleanly', async () => {
    const { p, d, px, c } = await secured('hmac');
    d.behave({ metaserverSecret: 'not-the-secret' });
    const err = await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }] }).catch((e) => e);
    expect(err).toBeInstanceOf(OpenAI.APIError);
    expect(d.log[0].metaserver).toMatchObject({ status: 401, body: { error: { code: 'ERR_AUTH', type: 'authentication_error' } } });
    expect(p.log).toHaveLength(0);
    const metrics = await (await fetch(`${px.url}/metrics`)).text();
    expect(metrics).toMatch(/epd_proxy_metaserver_calls_total\{outcome="401"\} 1/);
    await expectNoLoad(px);
  });

  it('a missing, malformed, stale or non-matching signature is refused before the body is looked at', async () => {
    const { px } = await secured();
    const url = `${px.url}/v1/metaserver`;
    const body = JSON.stringify({ request_id: 'whatever' });
    const t = Date.now();
    const cases: Array<[Record<string, string>, RegExp]> = [
      [{}, /requires the shared secret/],
      [{ 'x-epd-signature': 'nonsense' }, /malformed/],
      [{ 'x-epd-signature': signBody(SECRET, body, t - 10 * 60_000) }, /too far/],
      [{ 'x-epd-signature': signBody(SECRET, '{"request_id":"other"}', t) }, /does not match/],
      [{ 'x-epd-signature': signBody('wrong', body, t) }, /does not match/],
      [{ authorization: 'Bearer wrong' }, /wrong secret/],
    ];
    for (const [headers, why] of cases) {
      const res = await fetch(url, { method: 'POST', headers, body });
      expect(res.status).toBe(401);
      expect((await res.json()).error.message).toMatch(why);
    }
    // The right signature reaches the lookup (unknown request: 404).
    const ok = await fetch(url, { method: 'POST', headers: { 'x-epd-signature': signBody(SECRET, body) }, body });
    expect(ok.status).toBe(404);
  });

  it('a bearer secret from a non-loopback address is refused', () => {
    const headers = { authorization: `Bearer ${SECRET}` };
    expect(checkSecret(SECRET, headers, Buffer.alloc(0), '10.1.2.3')).toMatch(/loopback only/);
    expect(checkSecret(SECRET, headers, Buffer.alloc(0), '127.0.0.1')).toBeUndefined();
    expect(checkSecret(SECRET, headers, Buffer.alloc(0), '::ffff:127.0.0.1')).toBeUndefined();
    expect(checkSecret(SECRET, headers, Buffer.alloc(0), '::1')).toBeUndefined();
  });

  it('the signature is HMAC-SHA256 over "<t>." and the raw body', () => {
    const body = '{"request_id":"abc"}';
    const t = 1_700_000_000_000;
    const expected = createHmac('sha256', SECRET).update(`${t}.${body}`).digest('hex');
    expect(signBody(SECRET, body, t)).toBe(`t=${t},v1=${expected}`);
    expect(checkSecret(SECRET, { 'x-epd-signature': `t=${t},v1=${expected}` }, Buffer.from(body), '10.0.0.1', t + 1000)).toBeUndefined();
  });

  it('D that never calls: the request fails with 504 at the deadline and D is cancelled', async () => {
    const { d, px, c } = await secured('hmac', { metaserverMs: 300 });
    d.behave({ skipMetaserver: true });
    const err = await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }], stream: true }).catch((e) => e);
    expect(err.status).toBe(504);
    expect(err.message).toMatch(/did not call \/v1\/metaserver within 300 ms/);
    await waitFor(() => d.log[0].aborted, 'D to be cancelled');
    await expectNoLoad(px);
  });

  it('D that calls after the deadline gets 404 and P never runs', async () => {
    const { p, d, px, c } = await secured('hmac', { metaserverMs: 200 });
    d.behave({ metaserverDelayMs: 400 });
    const err = await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }] }).catch((e) => e);
    expect(err.status).toBe(504);
    // D's own request was cancelled with the deadline; its late call (if it still makes it) finds nothing.
    const late = await fetch(`${px.url}/v1/metaserver`, {
      method: 'POST',
      headers: { 'x-epd-signature': signBody(SECRET, JSON.stringify({ request_id: d.log[0].id })) },
      body: JSON.stringify({ request_id: d.log[0].id }),
    });
    expect(late.status).toBe(404);
    expect(p.log).toHaveLength(0);
    await expectNoLoad(px);
  });

  it('bad bodies get 400', async () => {
    const { px } = await secured();
    for (const body of ['not json', '[]', '{"request_id": 5}', '{}']) {
      const res = await fetch(`${px.url}/v1/metaserver`, { method: 'POST', headers: { 'x-epd-signature': signBody(SECRET, body) }, body });
      expect(res.status, body).toBe(400);
    }
  });
});

describe('rendezvous', () => {
  it('runs the prefill once; a second call for the same request gets 409; vLLM id forms are recognised', async () => {
    const r = new Rendezvous();
    let runs = 0;
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    const close = r.open('abc-123', 10_000, () => {}, async () => {
      runs++;
      await gate;
      return { prefill: 'http://p' };
    });
    const first = r.arrive('chatcmpl-abc-123', {});
    await expect(r.arrive('abc-123', {})).rejects.toMatchObject({ status: 409 });
    release();
    await expect(first).resolves.toEqual({ prefill: 'http://p' });
    expect(runs).toBe(1);
    close();
    expect(r.size).toBe(0);
    const close2 = r.open('xyz', 10_000, () => {}, async () => ({ prefill: 'http://q' }));
    await expect(r.arrive('cmpl-xyz-0', {})).resolves.toEqual({ prefill: 'http://q' });
    close2();
    await expect(r.arrive('xyz', {})).rejects.toMatchObject({ status: 404 });
  });

  it('the deadline fires once and frees the entry; close() after it is harmless', async () => {
    const r = new Rendezvous();
    const fired: string[] = [];
    const close = r.open('late', 20, (err) => fired.push(err.code), async () => ({ prefill: '' }));
    await waitFor(() => fired.length === 1, 'the deadline');
    expect(fired).toEqual(['ERR_TIMEOUT']);
    expect(r.size).toBe(0);
    close();
    await expect(r.arrive('late', {})).rejects.toMatchObject({ status: 404 });
  });
});
