/** Health checks, an instance killed mid-run, and instance add/remove with draining. */
import OpenAI from 'openai';
import { describe, expect, it } from 'vitest';
import { signBody } from '../../lib/proxy/auth.js';
import { childWorker, client, collectChat, expectNoLoad, proxy, waitFor, worker } from './helpers.js';

const TEXT = 'tok0 tok1 tok2 tok3 tok4 ';

function state(px: { instances(): Array<{ url: string; state: string }> }, url: string): string | undefined {
  return px.instances().find((i) => i.url === url)?.state;
}

describe('health checks', () => {
  it('an instance failing its checks is taken out, and put back when healthy', async () => {
    const p = await worker({ role: 'prefill' });
    const d1 = await worker({ role: 'decode' });
    const d2 = await worker({ role: 'decode' });
    const px = await proxy({ instances: { prefill: [p.url], decode: [d1.url, d2.url] } });
    const c = client(px);
    d1.behave({ healthy: false });
    await waitFor(() => state(px, d1.url) === 'unhealthy', 'd1 to be taken out');
    for (let i = 0; i < 4; i++) await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }] });
    expect(d1.log).toHaveLength(0);
    expect(d2.log).toHaveLength(4);
    d1.behave({ healthy: true });
    await waitFor(() => state(px, d1.url) === 'healthy', 'd1 to come back');
    for (let i = 0; i < 4; i++) await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }] });
    expect(d1.log.length).toBeGreaterThan(0);
    const metrics = await (await fetch(`${px.url}/metrics`)).text();
    expect(metrics).toMatch(/epd_proxy_instance_state_changes_total\{role="decode",to="unhealthy"\} 1/);
  });

  it('an instance that is down at start is not routable; /healthcheck tells', async () => {
    const p = await worker({ role: 'prefill' });
    const d = await worker({ role: 'decode' });
    await d.close();
    const px = await proxy({ instances: { prefill: [p.url], decode: [d.url] } });
    expect(state(px, d.url)).toBe('unhealthy');
    const health = await fetch(`${px.url}/healthcheck`);
    expect(health.status).toBe(503);
    expect(await health.json()).toMatchObject({ status: 'unavailable', instances: { decode: { healthy: 0, total: 1 } } });
    const err = await client(px).chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }] }).catch((e) => e);
    expect(err.status).toBe(503);
  });
});

describe('an instance killed mid-run', () => {
  it('its requests fail cleanly, the others continue, and health checks take it out', async () => {
    const p = await worker({ role: 'prefill' });
    const d1 = await childWorker({ role: 'decode', behaviour: { tokens: 40, tokenDelayMs: 25 } });
    const d2 = await childWorker({ role: 'decode', behaviour: { tokens: 40, tokenDelayMs: 25 } });
    const px = await proxy({ instances: { prefill: [p.url], decode: [d1.url, d2.url] }, health: { intervalMs: 100, unhealthyAfter: 2 } });
    const c = client(px);
    let streaming = 0;
    const run = async (id: string) => {
      let text = '';
      try {
        const stream = await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }], stream: true }, { headers: { 'X-Request-Id': id } });
        for await (const chunk of stream) {
          if (text === '') streaming++;
          text += chunk.choices[0]?.delta?.content ?? '';
        }
        return { id, ok: true as const, text };
      } catch (err) {
        return { id, ok: false as const, text, err: err as Error };
      }
    };
    const inFlight = Array.from({ length: 6 }, (_, i) => run(`k${i}`));
    // Every request is streaming (three on each instance) before the kill.
    await waitFor(() => streaming === 6, 'six streams under way');
    const onKilled = new Set((await d1.log()).map((e) => e.id));
    expect(onKilled.size).toBe(3);
    await d1.kill();
    const results = await Promise.all(inFlight);
    for (const r of results) {
      if (!onKilled.has(r.id)) {
        expect(r, `${r.id} on the surviving instance`).toMatchObject({ ok: true, text: Array.from({ length: 40 }, (_, i) => `tok${i} `).join('') });
      } else {
        // Bytes had gone out: no retry, a clean error for the client (not a hang, not a silent truncation).
        expect(r.ok, `${r.id} on the killed instance`).toBe(false);
        if (!r.ok) expect(r.err).toBeInstanceOf(OpenAI.APIError);
      }
    }
    expect(results.filter((r) => !r.ok)).toHaveLength(3);
    // New requests all succeed on the survivor, whether or not the health check has run yet.
    for (let i = 0; i < 4; i++) expect(await collectChat(await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }], stream: true }))).toMatch(/^tok0 /);
    await waitFor(() => state(px, d1.url) === 'unhealthy', 'the killed instance to be marked unhealthy');
    await expectNoLoad(px);
  });
});

describe('instance add/remove', () => {
  it('remove drains: in-flight requests finish, new ones go elsewhere, then the instance is forgotten', async () => {
    const p = await worker({ role: 'prefill' });
    const d1 = await worker({ role: 'decode' });
    const d2 = await worker({ role: 'decode' });
    const logs: string[] = [];
    const px = await proxy({ instances: { prefill: [p.url], decode: [d1.url, d2.url] }, log: (m) => logs.push(m) });
    const c = client(px);
    d1.behave({ tokens: 6, tokenDelayMs: 60 });
    d2.behave({ tokens: 6, tokenDelayMs: 60 });
    const first = await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }], stream: true });
    const it = first[Symbol.asyncIterator]();
    let text = ((await it.next()).value as OpenAI.Chat.ChatCompletionChunk).choices[0].delta.content ?? '';
    const busy = d1.log.length === 1 ? d1 : d2;
    const other = busy === d1 ? d2 : d1;
    const res = await fetch(`${px.url}/instances/remove`, { method: 'POST', body: JSON.stringify({ role: 'decode', url: busy.url }) });
    expect(res.status).toBe(200);
    expect((await res.json()).instances[0]).toMatchObject({ url: busy.url, state: 'draining', activeRequests: 1 });
    expect(state(px, busy.url)).toBe('draining');
    other.behave({ tokenDelayMs: 0 });
    for (let i = 0; i < 3; i++) await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'y' }] });
    expect(busy.log).toHaveLength(1);
    for (let n = await it.next(); !n.done; n = await it.next()) text += n.value.choices[0].delta.content ?? '';
    expect(text).toBe('tok0 tok1 tok2 tok3 tok4 tok5 ');
    await waitFor(() => state(px, busy.url) === undefined, 'the drained instance to be forgotten');
    expect(logs.some((m) => m.includes('drained and forgotten'))).toBe(true);
  });

  it('add: a new instance takes traffic once its first check passes', async () => {
    const p = await worker({ role: 'prefill' });
    const d1 = await worker({ role: 'decode' });
    const px = await proxy({ instances: { prefill: [p.url], decode: [d1.url] } });
    const d2 = await worker({ role: 'decode' });
    const res = await fetch(`${px.url}/instances/add`, { method: 'POST', body: JSON.stringify({ role: 'decode', urls: [d2.url] }) });
    expect(res.status).toBe(200);
    expect((await res.json()).instances[0]).toMatchObject({ url: d2.url, role: 'decode', state: 'healthy' });
    const c = client(px);
    for (let i = 0; i < 4; i++) expect((await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }] })).choices[0].message.content).toBe(TEXT);
    expect(d2.log.length).toBeGreaterThan(0);
    const listed = await (await fetch(`${px.url}/instances`)).json();
    expect(listed.instances.map((i: { url: string }) => i.url).sort()).toEqual([p.url, d1.url, d2.url].sort());
  });

  it('bad admin requests: 400 / 404, nothing half-applied', async () => {
    const d = await worker({ role: 'decode' });
    const px = await proxy({ instances: { decode: [d.url] } });
    const post = async (path: string, body: unknown) => (await fetch(`${px.url}${path}`, { method: 'POST', body: JSON.stringify(body) })).status;
    expect(await post('/instances/add', { role: 'teapot', url: 'http://127.0.0.1:1' })).toBe(400);
    expect(await post('/instances/add', { role: 'decode' })).toBe(400);
    expect(await post('/instances/add', { role: 'decode', url: 'ftp://x' })).toBe(400);
    expect(await post('/instances/remove', { urls: [d.url, 'http://127.0.0.1:1'] })).toBe(404);
    expect(state(px, d.url)).toBe('healthy');
  });

  it('with a secret, the admin endpoints require it', async () => {
    const d = await worker({ role: 'decode' });
    const px = await proxy({ secret: 'admin-secret', instances: { decode: [d.url] } });
    expect((await fetch(`${px.url}/instances`)).status).toBe(401);
    const body = JSON.stringify({ url: d.url });
    expect((await fetch(`${px.url}/instances/remove`, { method: 'POST', body })).status).toBe(401);
    expect((await fetch(`${px.url}/instances/remove`, { method: 'POST', body, headers: { 'x-epd-signature': signBody('wrong', body) } })).status).toBe(401);
    expect(state(px, d.url)).toBe('healthy');
    expect((await fetch(`${px.url}/instances`, { headers: { authorization: 'Bearer admin-secret' } })).status).toBe(200);
    expect((await fetch(`${px.url}/instances/remove`, { method: 'POST', body, headers: { 'x-epd-signature': signBody('admin-secret', body) } })).status).toBe(200);
    expect(state(px, d.url)).toBeUndefined();
  });
});
