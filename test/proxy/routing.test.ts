import OpenAI from 'openai';
import { describe, expect, it } from 'vitest';
import { client, collectChat, expectNoLoad, imageMessage, pngDataUrl, proxy, worker } from './helpers.js';

const TEXT = 'tok0 tok1 tok2 tok3 tok4 ';

async function disaggregated(options: { encoders?: number } = {}) {
  const e = await Promise.all(Array.from({ length: options.encoders ?? 0 }, () => worker({ role: 'encode' })));
  const p = await worker({ role: 'prefill' });
  const d = await worker({ role: 'decode' });
  const px = await proxy({ instances: { encode: e.map((w) => w.url), prefill: [p.url], decode: [d.url] } });
  return { e, p, d, px, c: client(px) };
}

describe('text requests, decode-first (P/D)', () => {
  it('D gets do_remote_prefill and the metaserver URL; P gets a 1-token non-streamed prefill with D parameters', async () => {
    const { p, d, px, c } = await disaggregated();
    const res = await c.chat.completions
      .create({ model: 'fake-model', messages: [{ role: 'user', content: 'hello' }], max_tokens: 50, stream_options: undefined }, { headers: { 'X-Request-Id': 'req-text-1' } })
      .withResponse();
    expect(res.data.choices[0].message.content).toBe(TEXT);
    expect(res.response.headers.get('x-request-id')).toBe('req-text-1');

    expect(d.log).toHaveLength(1);
    expect(d.log[0].id).toBe('req-text-1');
    expect(d.log[0].body.kv_transfer_params).toEqual({ do_remote_decode: false, do_remote_prefill: true, metaserver: `${px.url}/v1/metaserver` });
    expect(d.log[0].body.max_tokens).toBe(50);
    expect(d.log[0].metaserver?.status).toBe(200);

    expect(p.log).toHaveLength(1);
    expect(p.log[0].id).toBe('req-text-1');
    expect(p.log[0].body).toMatchObject({ stream: false, max_tokens: 1, min_tokens: 1, messages: [{ role: 'user', content: 'hello' }] });
    expect(p.log[0].body.kv_transfer_params).toMatchObject({ request_id: 'req-text-1', remote_block_ids: [[1, 2, 3]], do_remote_decode: true, do_remote_prefill: false });
    await expectNoLoad(px);
  });

  it('streams through, and /v1/completions works the same way', async () => {
    const { p, d, px, c } = await disaggregated();
    const stream = await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'hi' }], stream: true });
    expect(await collectChat(stream)).toBe(TEXT);
    const done = await c.completions.create({ model: 'fake-model', prompt: 'once upon' });
    expect(done.choices[0].text).toBe(TEXT);
    const streamed = await c.completions.create({ model: 'fake-model', prompt: 'once upon', stream: true });
    let text = '';
    for await (const chunk of streamed) text += chunk.choices[0].text;
    expect(text).toBe(TEXT);
    expect(d.log.map((e) => e.path)).toEqual(['/v1/chat/completions', '/v1/completions', '/v1/completions']);
    expect(p.log.map((e) => e.path)).toEqual(['/v1/chat/completions', '/v1/completions', '/v1/completions']);
    expect(p.log.every((e) => e.body.stream === false && e.body.max_tokens === 1)).toBe(true);
    await expectNoLoad(px);
  });

  it('text requests bypass the encoders', async () => {
    const { e, px, c } = await disaggregated({ encoders: 1 });
    await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: [{ type: 'text', text: 'no media' }] }] });
    expect(e[0].log).toHaveLength(0);
    await expectNoLoad(px);
  });

  it('a client cannot inject its own kv_transfer_params', async () => {
    const { p, d, c } = await disaggregated();
    await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }], kv_transfer_params: { remote_host: 'evil' } } as never);
    expect(d.log[0].body.kv_transfer_params.remote_host).toBeUndefined();
    expect(p.log[0].body.kv_transfer_params.remote_host).toBe('127.0.0.1');
  });
});

describe('multimodal requests', () => {
  it('E → P → D: each item is its own encoder sub-request, all before D', async () => {
    const { e, p, d, px, c } = await disaggregated({ encoders: 2 });
    const a = pngDataUrl(640, 480, 1);
    const b = pngDataUrl(320, 240, 2);
    const r = await c.chat.completions.create({ model: 'fake-model', messages: [imageMessage('describe both', a, b)] }, { headers: { 'X-Request-Id': 'mm-1' } });
    expect(r.choices[0].message.content).toBe(TEXT);

    const subs = [...e[0].log, ...e[1].log].sort((x, y) => x.id.localeCompare(y.id));
    expect(subs.map((s) => s.id)).toEqual(['mm-1:e0', 'mm-1:e1']);
    // Least-loaded with idle encoders: one item each.
    expect(e[0].log).toHaveLength(1);
    expect(e[1].log).toHaveLength(1);
    for (const s of subs) {
      expect(s.body.messages).toHaveLength(1);
      expect(s.body.messages[0].content).toHaveLength(1);
      expect(s.body).toMatchObject({ max_tokens: 1, stream: false, model: 'fake-model' });
    }
    expect(subs[0].body.messages[0].content[0].image_url.url).toBe(a);
    expect(subs[1].body.messages[0].content[0].image_url.url).toBe(b);

    // P and D see the whole request, media carrying the uuid the encoders keyed them by.
    const uuids = subs.map((s) => s.body.messages[0].content[0].uuid);
    for (const hop of [p.log[0], d.log[0]]) {
      expect(hop.id).toBe('mm-1');
      const parts = hop.body.messages[0].content;
      expect(parts.filter((x: { type: string }) => x.type === 'image_url').map((x: { uuid: string }) => x.uuid)).toEqual(uuids);
    }
    await expectNoLoad(px);
  });

  it('E → PD: the PD instance gets the request without transfer parameters', async () => {
    const e = await worker({ role: 'encode' });
    const pd = await worker({ role: 'pd' });
    const px = await proxy({ instances: { encode: [e.url], pd: [pd.url] } });
    const c = client(px);
    const stream = await c.chat.completions.create({ model: 'fake-model', messages: [imageMessage('what', pngDataUrl(100, 100))], stream: true });
    expect(await collectChat(stream)).toBe(TEXT);
    expect(e.log).toHaveLength(1);
    expect(pd.log).toHaveLength(1);
    expect(pd.log[0].body.kv_transfer_params).toBeUndefined();
    // Text goes straight to PD.
    await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'text only' }] });
    expect(e.log).toHaveLength(1);
    expect(pd.log).toHaveLength(2);
    await expectNoLoad(px);
  });

  it('an item whose embedding is already cached skips the encoder', async () => {
    const { e, px, c } = await disaggregated({ encoders: 1 });
    const img = pngDataUrl(200, 200, 7);
    await c.chat.completions.create({ model: 'fake-model', messages: [imageMessage('first', img)] });
    await c.chat.completions.create({ model: 'fake-model', messages: [imageMessage('again', img)] });
    await c.chat.completions.create({ model: 'fake-model', messages: [imageMessage('new one', pngDataUrl(200, 200, 8))] });
    expect(e[0].log).toHaveLength(2);
    const metrics = await (await fetch(`${px.url}/metrics`)).text();
    expect(metrics).toMatch(/epd_proxy_media_items_total\{result="cache_hit"\} 1/);
    expect(metrics).toMatch(/epd_proxy_media_items_total\{result="encoded"\} 2/);
  });

  it('the same item in concurrent requests is encoded once', async () => {
    const { e, px, c } = await disaggregated({ encoders: 2 });
    e[0].behave({ delayMs: 200 });
    e[1].behave({ delayMs: 200 });
    const img = pngDataUrl(300, 300, 9);
    await Promise.all([1, 2, 3].map((i) => c.chat.completions.create({ model: 'fake-model', messages: [imageMessage(`q${i}`, img)] })));
    expect(e[0].log.length + e[1].log.length).toBe(1);
    await expectNoLoad(px);
  });

  it('without a shared store, a repeated item goes back to the encoder that holds it', async () => {
    const { MemoryEmbeddingLocator } = await import('../../lib/proxy/index.js');
    const encoders = await Promise.all([worker({ role: 'encode' }), worker({ role: 'encode' }), worker({ role: 'encode' })]);
    const pd = await worker({ role: 'pd' });
    const px = await proxy({ instances: { encode: encoders.map((w) => w.url), pd: [pd.url] }, locator: new MemoryEmbeddingLocator({ sharedStore: false }) });
    const c = client(px);
    const img = pngDataUrl(64, 64, 11);
    await c.chat.completions.create({ model: 'fake-model', messages: [imageMessage('a', img)] });
    const holder = encoders.find((w) => w.log.length === 1)!;
    for (let i = 0; i < 4; i++) await c.chat.completions.create({ model: 'fake-model', messages: [imageMessage(`again ${i}`, img)] });
    expect(holder.log).toHaveLength(5);
    expect(encoders.reduce((n, w) => n + w.log.length, 0)).toBe(5);
  });

  it('a client-supplied uuid is the item identity', async () => {
    const { e, p, c } = await disaggregated({ encoders: 1 });
    const msg = { role: 'user', content: [{ type: 'image_url', image_url: { url: pngDataUrl(10, 10) }, uuid: 'my-image-1' }] };
    await c.chat.completions.create({ model: 'fake-model', messages: [msg] } as never);
    expect(e[0].log[0].body.messages[0].content[0].uuid).toBe('my-image-1');
    expect(p.log[0].body.messages[0].content[0].uuid).toBe('my-image-1');
  });

  it('audio and video items are encoded too', async () => {
    const { e, c } = await disaggregated({ encoders: 1 });
    const messages = [
      {
        role: 'user',
        content: [
          { type: 'input_audio', input_audio: { data: Buffer.alloc(32_000).toString('base64'), format: 'wav' } },
          { type: 'video_url', video_url: { url: 'http://media.invalid/v.mp4' } },
          { type: 'audio_url', audio_url: { url: 'http://media.invalid/a.wav' } },
        ],
      },
    ];
    await c.chat.completions.create({ model: 'fake-model', messages } as never);
    expect(e[0].log.map((s) => s.body.messages[0].content[0].type).sort()).toEqual(['audio_url', 'input_audio', 'video_url']);
  });
});

describe('other endpoints', () => {
  it('/v1/models, /healthcheck and /metrics', async () => {
    const { px, c } = await disaggregated({ encoders: 1 });
    const models = await c.models.list();
    expect(models.data.map((m) => m.id)).toEqual(['fake-model']);
    const health = await (await fetch(`${px.url}/healthcheck`)).json();
    expect(health).toMatchObject({ status: 'ok', instances: { encode: { healthy: 1, total: 1 }, prefill: { healthy: 1 }, decode: { healthy: 1 }, pd: { total: 0 } } });
    await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }] });
    const res = await fetch(`${px.url}/metrics`);
    expect(res.headers.get('content-type')).toMatch(/text\/plain/);
    const text = await res.text();
    expect(text).toMatch(/epd_proxy_requests_total\{endpoint="chat",route="text",path="p-d",status="200"\} 1/);
    expect(text).toMatch(/epd_proxy_upstream_requests_total\{role="decode",outcome="ok"\} 1/);
    expect(text).toMatch(/epd_proxy_upstream_requests_total\{role="prefill",outcome="ok"\} 1/);
    expect(text).toMatch(/epd_proxy_metaserver_calls_total\{outcome="ok"\} 1/);
    expect(text).toMatch(/epd_proxy_instance_healthy\{role="decode",instance="http:\/\/127\.0\.0\.1:\d+"\} 1/);
  });

  it('onRequest gets each request timeline', async () => {
    const e = await worker({ role: 'encode' });
    const p = await worker({ role: 'prefill' });
    const d = await worker({ role: 'decode' });
    const traces: import('../../lib/proxy/index.js').RequestTrace[] = [];
    const px = await proxy({ instances: { encode: [e.url], prefill: [p.url], decode: [d.url] }, onRequest: (t) => traces.push(t) });
    await client(px).chat.completions.create({ model: 'fake-model', messages: [imageMessage('x', pngDataUrl(56, 56))] }, { headers: { 'X-Request-Id': 'tl-1' } });
    expect(traces).toHaveLength(1);
    const t = traces[0];
    expect(t).toMatchObject({ id: 'tl-1', route: 'multimodal', path: 'p-d', status: 200, retries: 0, encode: { items: 1, encoded: 1 }, prefill: { instance: p.url }, decode: { instance: d.url } });
    expect(t.encode!.end).toBeLessThanOrEqual(t.decode!.start);
    expect(t.decode!.metaserver!).toBeLessThanOrEqual(t.prefill!.start);
    expect(t.prefill!.end!).toBeLessThanOrEqual(t.end);
  });
});

describe('bad requests', () => {
  async function post(url: string, body: string | Buffer, headers: Record<string, string> = {}) {
    const res = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body });
    return { status: res.status, body: await res.json().catch(() => undefined) };
  }

  it('bad JSON, missing fields and wrong types get 400 with an OpenAI-shaped error', async () => {
    const { px, d } = await disaggregated();
    const url = `${px.url}/v1/chat/completions`;
    for (const body of ['{not json', '[]', '{"messages": []}', '{"messages": [{"content": "x"}]}', '{"messages": [{"role": "user", "content": 5}]}', '{"messages": [{"role":"user","content":"x"}], "stream": "yes"}', '{"messages": [{"role":"user","content":"x"}], "max_tokens": -1}', '{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}']) {
      const r = await post(url, body);
      expect(r.status, body).toBe(400);
      expect(r.body.error).toMatchObject({ type: 'invalid_request_error', code: 'ERR_BAD_ARGUMENT' });
      expect(typeof r.body.error.message).toBe('string');
    }
    const bad = await post(`${px.url}/v1/completions`, '{"prompt": {}}');
    expect(bad.status).toBe(400);
    expect(d.log).toHaveLength(0);
  });

  it('the openai client sees a typed error', async () => {
    const { c } = await disaggregated();
    await expect(c.chat.completions.create({ model: 'fake-model', messages: [] })).rejects.toBeInstanceOf(OpenAI.BadRequestError);
  });

  it('unknown route 404, wrong method 405, oversized body 413', async () => {
    const { px } = await disaggregated();
    expect((await fetch(`${px.url}/v2/nothing`)).status).toBe(404);
    const wrong = await fetch(`${px.url}/v1/chat/completions`);
    expect(wrong.status).toBe(405);
    expect(wrong.headers.get('allow')).toBe('POST');
    const small = await proxy({ maxBodyBytes: 1024, instances: { pd: [(await worker({ role: 'pd' })).url] } });
    const big = await post(`${small.url}/v1/completions`, JSON.stringify({ prompt: 'x'.repeat(4096) }));
    expect(big.status).toBe(413);
    expect(big.body.error.code).toBe('ERR_OUT_OF_RANGE');
  });

  it('a batched completions request cannot take the decode-first path', async () => {
    const { px, c } = await disaggregated();
    await expect(c.completions.create({ model: 'fake-model', prompt: ['a', 'b'] })).rejects.toMatchObject({ status: 400 });
    await expectNoLoad(px);
  });

  it('no routable instance: 503', async () => {
    const px = await proxy({ instances: {} });
    const r = await post(`${px.url}/v1/chat/completions`, JSON.stringify({ messages: [{ role: 'user', content: 'x' }] }));
    expect(r.status).toBe(503);
    expect(r.body.error.code).toBe('ERR_BACKEND_UNAVAILABLE');
    expect((await fetch(`${px.url}/healthcheck`)).status).toBe(503);
  });

  it('an encoder rejecting an item fails the request with its 4xx, and D is never called', async () => {
    const { d, px, c } = await disaggregated({ encoders: 1 });
    const err = await c.chat.completions.create({ model: 'fake-model', messages: [imageMessage('x', 'data:image/png;base64,BAD')] }).catch((e) => e);
    expect(err).toBeInstanceOf(OpenAI.BadRequestError);
    expect(err.message).toMatch(/cannot decode image/);
    expect(d.log).toHaveLength(0);
    await expectNoLoad(px);
  });
});
