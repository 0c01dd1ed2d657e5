/** Another instance is tried only while nothing has reached the client. */
import OpenAI from 'openai';
import { describe, expect, it } from 'vitest';
import { client, collectChat, expectNoLoad, imageMessage, pngDataUrl, proxy, worker } from './helpers.js';

async function twoDecoders() {
  const p = await worker({ role: 'prefill' });
  const d1 = await worker({ role: 'decode' });
  const d2 = await worker({ role: 'decode' });
  const px = await proxy({ instances: { prefill: [p.url], decode: [d1.url, d2.url] } });
  return { p, d1, d2, px, c: client(px) };
}

const TEXT = 'tok0 tok1 tok2 tok3 tok4 ';

describe('retry before the first byte', () => {
  for (const stream of [false, true]) {
    it(`a decode instance answering 500 is replaced (${stream ? 'streamed' : 'not streamed'})`, async () => {
      const { p, d1, d2, px, c } = await twoDecoders();
      d1.behave({ failCount: 100 });
      for (const id of ['r1', 'r2']) {
        const text = stream
          ? await collectChat(await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }], stream: true }, { headers: { 'X-Request-Id': id } }))
          : (await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }] }, { headers: { 'X-Request-Id': id } })).choices[0].message.content;
        expect(text).toBe(TEXT);
      }
      // Idle instances take turns, so d1 was tried first at least once; each of its
      // failures was retried on d2 under a tagged id, and only d2 reached the prefill.
      expect(d1.log.length).toBeGreaterThan(0);
      for (const failed of d1.log) expect(d2.log.map((e) => e.id)).toContain(`${failed.id}:r1`);
      expect(d2.log).toHaveLength(2);
      expect(p.log.map((e) => e.id)).toEqual(d2.log.map((e) => e.id));
      await expectNoLoad(px);
    });
  }

  it('every retry goes to an instance not tried yet, and gives up after them', async () => {
    const { d1, d2, px, c } = await twoDecoders();
    d1.behave({ failCount: 100, failStatus: 503 });
    d2.behave({ failCount: 100, failStatus: 503 });
    const err = await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }] }).catch((e) => e);
    expect(err).toBeInstanceOf(OpenAI.APIError);
    expect(err.status).toBe(503);
    expect(d1.log).toHaveLength(1);
    expect(d2.log).toHaveLength(1);
    const metrics = await (await fetch(`${px.url}/metrics`)).text();
    expect(metrics).toMatch(/epd_proxy_retries_total\{role="decode"\} 1/);
    await expectNoLoad(px);
  });

  it('a stream that ends without a byte is retried (the original answered 200 with an empty body)', async () => {
    const { d1, d2, px, c } = await twoDecoders();
    d1.behave({ emptyStream: true });
    d2.behave({ emptyStream: true });
    const err = await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }], stream: true }).then(collectChat).catch((e) => e);
    expect(err).toBeInstanceOf(OpenAI.APIError);
    expect(err.status).toBe(502);
    expect(d1.log.length + d2.log.length).toBe(2);
    d2.behave({ emptyStream: false });
    d1.behave({ emptyStream: true });
    for (let i = 0; i < 2; i++) expect(await collectChat(await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }], stream: true }))).toBe(TEXT);
    await expectNoLoad(px);
  });

  it('no retry once the first byte went out: the client gets an error event', async () => {
    const { d1, d2, px, c } = await twoDecoders();
    d1.behave({ dropAfterChunks: 2 });
    d2.behave({ dropAfterChunks: 2 });
    const stream = await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }], stream: true });
    let text = '';
    const err = await (async () => {
      for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '';
    })().catch((e) => e);
    expect(text).toBe('tok0 tok1 ');
    expect(err).toBeInstanceOf(OpenAI.APIError);
    expect(err.message).toMatch(/closed the connection/);
    expect(d1.log.length + d2.log.length).toBe(1);
    // Counted as the failure it was, although the client had seen a 200.
    expect(await (await fetch(`${px.url}/metrics`)).text()).toMatch(/epd_proxy_requests_total\{endpoint="chat",route="text",path="p-d",status="502"\} 1/);
    await expectNoLoad(px);
  });

  it('a non-streamed answer cut in the middle is retried (nothing reached the client yet)', async () => {
    const pd1 = await worker({ role: 'pd', behaviour: { dropAfterChunks: 2 } });
    const pd2 = await worker({ role: 'pd', behaviour: { dropAfterChunks: 2 } });
    const px = await proxy({ instances: { pd: [pd1.url, pd2.url] } });
    const c = client(px);
    pd2.behave({ dropAfterChunks: -1 });
    for (let i = 0; i < 2; i++) expect((await c.completions.create({ model: 'fake-model', prompt: 'x' })).choices[0].text).toBe(TEXT);
    expect(pd1.log.length).toBeGreaterThan(0);
    expect(pd2.log.filter((e) => e.finished)).toHaveLength(2);
    await expectNoLoad(px);
  });

  it('a deadline is final: 504, no second instance', async () => {
    const pd1 = await worker({ role: 'pd', behaviour: { hang: true } });
    const pd2 = await worker({ role: 'pd', behaviour: { hang: true } });
    const px = await proxy({ instances: { pd: [pd1.url, pd2.url] }, timeouts: { responseMs: 200 } });
    const err = await client(px).completions.create({ model: 'fake-model', prompt: 'x' }).catch((e) => e);
    expect(err.status).toBe(504);
    expect(pd1.log.length + pd2.log.length).toBe(1);
    await expectNoLoad(px);
  });

  it('an encoder that is down is replaced; one that answered 4xx is not', async () => {
    const e1 = await worker({ role: 'encode' });
    const e2 = await worker({ role: 'encode' });
    const pd = await worker({ role: 'pd' });
    const px = await proxy({ instances: { encode: [e1.url, e2.url], pd: [pd.url] }, health: { intervalMs: 60_000 } });
    await e1.close();
    const c = client(px);
    for (let i = 0; i < 3; i++) await c.chat.completions.create({ model: 'fake-model', messages: [imageMessage('x', pngDataUrl(8, 8, i))] });
    expect(e2.log).toHaveLength(3);
    // The refused connection took e1 out at once, without waiting for a health round.
    expect(px.instances().find((i) => i.url === e1.url)!.state).toBe('unhealthy');
    await expectNoLoad(px);
  });

  it('a prefill that was never accepted goes to another P; one that ran does not', async () => {
    const p1 = await worker({ role: 'prefill' });
    const p2 = await worker({ role: 'prefill' });
    const d = await worker({ role: 'decode' });
    const px = await proxy({ instances: { prefill: [p1.url, p2.url], decode: [d.url] }, health: { intervalMs: 60_000 } });
    const c = client(px);
    p1.behave({ failCount: 100, failStatus: 503 });
    // 503 = refused before starting: retried on the other P.
    await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }] });
    await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'y' }] });
    expect(p2.log.filter((e) => e.finished)).toHaveLength(2);
    expect(p1.log.length).toBeGreaterThan(0);
    // A P that answered 500 had started: the request fails rather than prefill twice into D.
    p1.behave({ failCount: 0 });
    p2.behave({ failCount: 100, failStatus: 500 });
    const before = p1.log.length + p2.log.length;
    const results = await Promise.all([0, 1, 2, 3].map((i) => c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: `z${i}` }] }).then(() => 200, (e) => e.status)));
    expect(results.filter((s) => s === 502).length).toBe(p2.log.length - 2);
    expect(p1.log.length + p2.log.length - before).toBe(4);
    await expectNoLoad(px);
  });
});
