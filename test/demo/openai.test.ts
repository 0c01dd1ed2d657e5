/**
 * The official `openai` client against the EPD proxy in front of simulated
 * workers (each its own process): what a user's application sees.
 */
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { pngDataUrl } from '../../lib/demo/images.js';
import { EncoderCacheStore } from '../../lib/ec/store.js';
import { EpdProxy, type RequestTrace } from '../../lib/proxy/index.js';
import { SharedStoreLocator } from '../../lib/sim/locator.js';
import { startWorker, storeName, type WorkerProcess } from '../sim/helpers.js';

const SECRET = 'openai-test-secret-0123456789';
const store = storeName();
let e: WorkerProcess;
let p: WorkerProcess;
let d: WorkerProcess;
let stranger: WorkerProcess;
let cache: EncoderCacheStore;
let proxy: EpdProxy;
let client: OpenAI;
const traces: RequestTrace[] = [];

beforeAll(async () => {
  [e, p, d, stranger] = await Promise.all([
    startWorker('encode', ['--ec-store', store]),
    startWorker('prefill', ['--ec-store', store]),
    startWorker('decode', [], { EPD_PROXY_SECRET: SECRET }),
    // A decode instance that does not know the proxy's secret.
    startWorker('decode', ['--kv-timeout', '5s'], { EPD_PROXY_SECRET: 'some-other-secret-0123456789' }),
  ]);
  cache = await EncoderCacheStore.open({ name: store });
  proxy = await EpdProxy.start({
    port: 0,
    instances: { encode: [e.url], prefill: [p.url], decode: [d.url] },
    secret: SECRET,
    locator: new SharedStoreLocator(cache),
    onRequest: (t) => traces.push(t),
  });
  client = new OpenAI({ baseURL: `${proxy.url}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 60_000 });
}, 120_000);

afterAll(async () => {
  await proxy?.close();
  await cache?.close();
});

const image = pngDataUrl(896, 672, 5);

function imageMessages(text: string): OpenAI.Chat.ChatCompletionMessageParam[] {
  return [{ role: 'user', content: [{ type: 'text', text }, { type: 'image_url', image_url: { url: image } }] }];
}

describe('the openai client through the proxy', { timeout: 60_000 }, () => {
  it('lists the simulated model', async () => {
    const models = await client.models.list();
    expect(models.data.map((m) => m.id)).toEqual(['qwen2.5-vl-7b']);
  });

  it('streams a chat answer about an image (E → P → D), labelled as simulated', async () => {
    const stream = await client.chat.completions.create(
      { model: 'qwen2.5-vl-7b', messages: imageMessages('What is in this image?'), max_tokens: 8, stream: true, stream_options: { include_usage: true } },
      { headers: { 'x-request-id': 'oa-image-1' } },
    );
    let text = '';
    let usage: OpenAI.CompletionUsage | undefined | null;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta?.content ?? '';
      if (chunk.usage) usage = chunk.usage;
      expect(chunk.system_fingerprint).toBe('epd-transfer-simulation');
    }
    expect(text).toMatch(/^\[simulated\]( \w+){7}$/);
    expect(usage).toMatchObject({ completion_tokens: 8 });
    expect(usage!.prompt_tokens).toBeGreaterThan(32 * 24);
    const trace = traces.find((t) => t.id === 'oa-image-1')!;
    expect(trace).toMatchObject({ route: 'multimodal', path: 'p-d', status: 200, encode: { items: 1, encoded: 1, cacheHits: 0 } });
  });

  it('a second request with the same image skips the encoder: the proxy sees it in the shared cache', async () => {
    const answer = await client.chat.completions.create(
      { model: 'qwen2.5-vl-7b', messages: imageMessages('And now describe it in detail.'), max_tokens: 4 },
      { headers: { 'x-request-id': 'oa-image-2' } },
    );
    expect(answer.choices[0].message.content).toMatch(/^\[simulated\]/);
    expect(traces.find((t) => t.id === 'oa-image-2')!.encode).toMatchObject({ items: 1, encoded: 0, cacheHits: 1 });
    expect((await e.stats()).ec.items).toBe(1);
    const ps = await p.stats();
    expect(ps.ec.loaded).toBe(2);
    expect(ps.ec.missed).toBe(0);
  });

  it('completions, streamed and not (text bypasses the encoder)', async () => {
    const whole = await client.completions.create({ model: 'qwen2.5-vl-7b', prompt: 'Layerwise transfer means', max_tokens: 5 });
    expect(whole.choices[0].text).toMatch(/^\[simulated\]( \w+){4}$/);
    const stream = await client.completions.create({ model: 'qwen2.5-vl-7b', prompt: 'Layerwise transfer means', max_tokens: 5, stream: true });
    let text = '';
    for await (const chunk of stream) text += chunk.choices[0]?.text ?? '';
    expect(text).toMatch(/^\[simulated\]( \w+){4}$/);
    expect((await d.stats()).kv.verifyFailures).toBe(0);
  });

  it('a decode instance without the shared secret is refused by the metaserver, and the client gets the error', async () => {
    const other = await EpdProxy.start({ port: 0, instances: { prefill: [p.url], decode: [stranger.url] }, secret: SECRET });
    try {
      const c = new OpenAI({ baseURL: `${other.url}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 60_000 });
      const failure = await c.chat.completions.create({ model: 'qwen2.5-vl-7b', messages: [{ role: 'user', content: 'hello' }], max_tokens: 2 }).then(
        () => undefined,
        (err: unknown) => err,
      );
      expect(failure).toBeInstanceOf(OpenAI.APIError);
      expect((failure as Error).message).toMatch(/metaserver answered 401/);
      // P never ran for it.
      expect((await stranger.stats()).kv.received).toBe(0);
    } finally {
      await other.close();
    }
  });
});
