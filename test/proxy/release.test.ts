/**
 * Loads are released on every exit path, and a client that goes away cancels the
 * upstream work it started.
 */
import { request } from 'node:http';
import OpenAI from 'openai';
import { describe, expect, it } from 'vitest';
import { client, collectChat, expectNoLoad, imageMessage, pngDataUrl, proxy, waitFor, worker } from './helpers.js';

async function system(encoders = 2) {
  const e = await Promise.all(Array.from({ length: encoders }, () => worker({ role: 'encode' })));
  const p = await worker({ role: 'prefill' });
  const d = await worker({ role: 'decode' });
  const px = await proxy({ instances: { encode: e.map((w) => w.url), prefill: [p.url], decode: [d.url] } });
  return { e, p, d, px, c: client(px) };
}

describe('loads are released on every exit path', () => {
  it('success, streamed and not', async () => {
    const { px, c } = await system();
    await c.chat.completions.create({ model: 'fake-model', messages: [imageMessage('x', pngDataUrl(10, 10))] });
    await collectChat(await c.chat.completions.create({ model: 'fake-model', messages: [imageMessage('x', pngDataUrl(20, 20))], stream: true }));
    await expectNoLoad(px);
  });

  it('decode instance error', async () => {
    const { d, px, c } = await system();
    d.behave({ failCount: 100, failStatus: 400 });
    await expect(c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }] })).rejects.toBeInstanceOf(OpenAI.BadRequestError);
    await expectNoLoad(px);
  });

  it('prefill error: the client gets 502, D is told and stopped, P is not retried', async () => {
    const { p, d, px, c } = await system();
    const p2 = await worker({ role: 'prefill' });
    await px.addInstance('prefill', p2.url);
    p.behave({ failCount: 100, failStatus: 500 });
    p2.behave({ failCount: 100, failStatus: 500 });
    const err = await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }], stream: true }).then(collectChat).catch((e) => e);
    expect(err).toBeInstanceOf(OpenAI.APIError);
    expect(err.status).toBe(502);
    expect(err.message).toMatch(/prefill instance .* answered 500/);
    // A prefill that started may have pushed KV into D: never sent to a second P.
    expect(p.log.length + p2.log.length).toBe(1);
    await waitFor(() => d.log[0].aborted || d.log[0].metaserver?.status === 502, 'D to learn the prefill failed');
    await expectNoLoad(px);
  });

  it('encoder failure fails fast: the other items are cancelled, D is never called', async () => {
    const { e, d, px, c } = await system(1);
    e[0].behave({ hang: true });
    const err = await c.chat.completions
      .create({ model: 'fake-model', messages: [imageMessage('x', pngDataUrl(10, 10, 1), 'data:image/png;base64,BAD', pngDataUrl(10, 10, 3))] })
      .catch((x) => x);
    expect(err).toBeInstanceOf(OpenAI.BadRequestError);
    expect(err.message).toMatch(/cannot decode image/);
    // The good items hang at the encoder: the request could only fail because their
    // sub-requests were cut (or never sent) when the bad one failed.
    const good = () => e[0].log.filter((x) => !x.body.messages[0].content[0].image_url.url.endsWith('BAD'));
    await waitFor(() => good().every((x) => x.aborted), 'the good items to be cancelled');
    expect(good().some((x) => x.finished)).toBe(false);
    expect(d.log).toHaveLength(0);
    await expectNoLoad(px);
  });

  it('metaserver deadline', async () => {
    const p = await worker({ role: 'prefill' });
    const d = await worker({ role: 'decode', behaviour: { skipMetaserver: true } });
    const px = await proxy({ instances: { prefill: [p.url], decode: [d.url] }, timeouts: { metaserverMs: 200 } });
    const err = await client(px).chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }] }).catch((e) => e);
    expect(err.status).toBe(504);
    await waitFor(() => d.log[0].aborted, 'D to be cancelled');
    await expectNoLoad(px);
  });

  it('the stream breaks in the middle', async () => {
    const { d, px, c } = await system();
    d.behave({ dropAfterChunks: 2 });
    const err = await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }], stream: true }).then(collectChat).catch((e) => e);
    expect(err).toBeInstanceOf(Error);
    await expectNoLoad(px);
  });
});

describe('client disconnect cancels upstream work', () => {
  it('while D streams', async () => {
    const { d, px, c } = await system();
    d.behave({ tokens: 100, tokenDelayMs: 50 });
    const controller = new AbortController();
    const stream = await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }], stream: true }, { signal: controller.signal });
    const it = stream[Symbol.asyncIterator]();
    await it.next();
    await it.next();
    controller.abort();
    await waitFor(() => d.log[0].aborted, 'D to see the request aborted');
    expect(d.log[0].finished).toBe(false);
    await expectNoLoad(px);
  });

  it('while P prefills: P and D are both cancelled', async () => {
    const { p, d, px, c } = await system();
    p.behave({ hang: true });
    const controller = new AbortController();
    const pending = c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }], stream: true }, { signal: controller.signal }).catch((e) => e);
    await waitFor(() => p.log.length === 1, 'the prefill to start');
    controller.abort();
    await pending;
    await waitFor(() => p.log[0].aborted && d.log[0].aborted, 'P and D to see their requests aborted');
    await expectNoLoad(px);
    // A metaserver call for the cancelled request is refused.
    const late = await fetch(`${px.url}/v1/metaserver`, { method: 'POST', body: JSON.stringify({ request_id: d.log[0].id }) });
    expect(late.status).toBe(404);
  });

  it('while the encoders run, before D was chosen', async () => {
    const { e, d, px, c } = await system();
    e[0].behave({ hang: true });
    e[1].behave({ hang: true });
    const controller = new AbortController();
    const pending = c.chat.completions.create({ model: 'fake-model', messages: [imageMessage('x', pngDataUrl(10, 10, 1), pngDataUrl(10, 10, 2))] }, { signal: controller.signal }).catch((err) => err);
    await waitFor(() => e[0].log.length + e[1].log.length === 2, 'both items at the encoders');
    controller.abort();
    await pending;
    await waitFor(() => [...e[0].log, ...e[1].log].every((x) => x.aborted), 'the encoders to see both aborted');
    expect(d.log).toHaveLength(0);
    await expectNoLoad(px);
  });

  it('a client that stops reading is cut after the idle timeout, and the upstream with it', async () => {
    const pd = await worker({ role: 'pd', behaviour: { tokens: 2000, tokenBytes: 64 * 1024 } });
    const px = await proxy({ instances: { pd: [pd.url] }, timeouts: { idleMs: 300 } });
    const body = JSON.stringify({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }], stream: true });
    // Headers arrive, then the client never reads the body (nor notices anything: its socket is paused).
    const req = request(`${px.url}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' } }, (res) => res.pause());
    req.on('error', () => {});
    req.end(body);
    await waitFor(() => pd.log[0]?.aborted === true, 'PD to be cancelled');
    expect(pd.log[0].finished).toBe(false);
    await expectNoLoad(px);
    req.destroy();
  });

  it('while PD answers a non-streamed request', async () => {
    const pd = await worker({ role: 'pd', behaviour: { hang: true } });
    const px = await proxy({ instances: { pd: [pd.url] } });
    const controller = new AbortController();
    const pending = client(px).completions.create({ model: 'fake-model', prompt: 'x' }, { signal: controller.signal }).catch((e) => e);
    await waitFor(() => pd.log.length === 1, 'PD to get the request');
    controller.abort();
    await pending;
    await waitFor(() => pd.log[0].aborted, 'PD to see it aborted');
    await expectNoLoad(px);
  });
});
