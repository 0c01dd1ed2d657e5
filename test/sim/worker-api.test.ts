/**
 * The simulated workers' HTTP API (the contract the proxy relies on, docs/PROXY.md
 * "The worker contract"), each worker a real `epd-transfer worker` process, with a
 * stand-in for the proxy's /v1/metaserver so each hop can be driven and observed.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { EncoderCacheStore } from '../../lib/ec/store.js';
import { checkSecret } from '../../lib/proxy/auth.js';
import { embeddingKey, findMismatch } from '../../lib/sim/content.js';
import { getProfile, imageEmbedding } from '../../lib/sim/profiles.js';
import { pngDataUrl } from '../../lib/demo/images.js';
import { post, runPrefillOn, sseEvents, startMetaserver, startWorker, storeName, type Metaserver, type WorkerProcess } from './helpers.js';

const SECRET = 'test-secret-0123456789abcdef';
const profile = getProfile('qwen2.5-vl-7b');
const store = storeName();
let e: WorkerProcess;
let p: WorkerProcess;
let d: WorkerProcess;
let cache: EncoderCacheStore;
const servers: Metaserver[] = [];

beforeAll(async () => {
  [e, p, d] = await Promise.all([
    startWorker('encode', ['--ec-store', store]),
    startWorker('prefill', ['--ec-store', store, '--corrupt-kv', 'corrupt-me,also-corrupt']),
    startWorker('decode', ['--kv-timeout', '3s', '--kv-quiesce', '500ms'], { EPD_PROXY_SECRET: SECRET }),
  ]);
  cache = await EncoderCacheStore.open({ name: store });
});

afterAll(async () => {
  for (const s of servers) await s.close();
  await cache?.close();
});

async function metaserver(answer: Parameters<typeof startMetaserver>[0]): Promise<Metaserver> {
  const m = await startMetaserver(answer);
  servers.push(m);
  return m;
}

/** Waits (bounded) until every KV block of `w` is free again. */
async function blocksFree(w: WorkerProcess): Promise<void> {
  let s = await w.stats();
  for (let i = 0; i < 250 && (s.cache.free !== s.cache.blocks || s.requests.active > 0); i++) {
    await new Promise((r) => setTimeout(r, 20));
    s = await w.stats();
  }
  expect(s.cache.free).toBe(s.cache.blocks);
}

function imageRequest(uuid: string, image = pngDataUrl(672, 448, 11)) {
  return {
    model: 'qwen2.5-vl-7b',
    messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: image }, uuid }] }],
    max_tokens: 1,
    stream: false,
  };
}

function decodeRequest(metaserverUrl: string, extra: Record<string, unknown> = {}) {
  return {
    model: 'qwen2.5-vl-7b',
    messages: [{ role: 'user', content: 'Explain layerwise KV transfer in two sentences, please.' }],
    max_tokens: 6,
    stream: true,
    stream_options: { include_usage: true },
    kv_transfer_params: { do_remote_decode: false, do_remote_prefill: true, metaserver: metaserverUrl },
    ...extra,
  };
}

describe('every role', () => {
  it('answers /health and /v1/models, and says it is a simulation', async () => {
    for (const w of [e, p, d]) {
      const health = await fetch(`${w.url}/health`);
      expect(health.status).toBe(200);
      expect(health.headers.get('x-epd-simulation')).toBe('1');
      expect(await health.json()).toMatchObject({ status: 'ok', simulated: true });
      const models = (await (await fetch(`${w.url}/v1/models`)).json()) as { data: Array<{ id: string; owned_by: string }> };
      expect(models.data[0]).toMatchObject({ id: 'qwen2.5-vl-7b', owned_by: 'epd-transfer-simulation' });
      expect((await w.stats()).simulation).toMatch(/^SIMULATION: /);
    }
  });

  it('answers 404 for an unknown path, 405 for a wrong method and 400 for a body that is not JSON', async () => {
    expect((await fetch(`${e.url}/nope`)).status).toBe(404);
    expect((await fetch(`${e.url}/v1/chat/completions`)).status).toBe(405);
    const bad = await post(`${e.url}/v1/chat/completions`, '{not json');
    expect(bad.status).toBe(400);
    expect(JSON.parse(bad.text)).toMatchObject({ error: { code: 'ERR_BAD_ARGUMENT' } });
  });
});

describe('encoder', () => {
  it('answers only once the embedding is saved and visible, with its mm_hash; a repeat is a cache hit', async () => {
    const first = await post(`${e.url}/v1/chat/completions`, imageRequest('enc-item-1'), { 'x-request-id': 'enc-1:e0' });
    expect(first.status).toBe(200);
    const answer = JSON.parse(first.text);
    expect(answer).toMatchObject({ object: 'chat.completion', system_fingerprint: 'epd-transfer-simulation', ec_transfer_params: { mm_hashes: ['enc-item-1'], cache_hits: [false] } });
    // Visible to another process (this one) as soon as the encoder answered, every byte as computed.
    const entry = cache.acquire('enc-item-1');
    expect(entry).not.toBeNull();
    expect(entry!.size).toBe(imageEmbedding(profile, 672, 448).bytes);
    expect(findMismatch(entry!.bytes, embeddingKey('enc-item-1'))).toBe(-1);
    entry!.release();

    const again = JSON.parse((await post(`${e.url}/v1/chat/completions`, imageRequest('enc-item-1'))).text);
    expect(again.ec_transfer_params.cache_hits).toEqual([true]);
    const stats = await e.stats(true);
    expect(stats.ec).toMatchObject({ encoded: 1, hits: 1 });
    expect(stats.records!.find((r) => r.id === 'enc-1:e0')!.items).toMatchObject([{ mmHash: 'enc-item-1', hit: false }]);
  });

  it('refuses a request without an image, an image it cannot read and a remote URL', async () => {
    const text = await post(`${e.url}/v1/chat/completions`, { messages: [{ role: 'user', content: 'hi' }] });
    expect(text.status).toBe(400);
    expect(text.text).toMatch(/image parts/);
    expect((await post(`${e.url}/v1/chat/completions`, imageRequest('x', 'data:image/png;base64,AAAA'))).status).toBe(400);
    expect((await post(`${e.url}/v1/chat/completions`, imageRequest('x', 'https://example.com/cat.png'))).status).toBe(400);
  });
});

describe('prefill and decode', () => {
  it('refuse requests that do not come through the decode-first flow', async () => {
    const plain = { messages: [{ role: 'user', content: 'hello' }], max_tokens: 1 };
    const toP = await post(`${p.url}/v1/chat/completions`, plain);
    expect(toP.status).toBe(400);
    expect(toP.text).toMatch(/do_remote_decode/);
    const toD = await post(`${d.url}/v1/chat/completions`, plain);
    expect(toD.status).toBe(400);
    expect(toD.text).toMatch(/do_remote_prefill/);
    const streamed = await post(`${p.url}/v1/chat/completions`, { ...plain, stream: true, kv_transfer_params: { do_remote_decode: true, remote_block_ids: [[0]], remote_host: '127.0.0.1', remote_port: 1 } });
    expect(streamed.status).toBe(400);
  });

  it('decode publishes its blocks (signed), prefill pushes every layer into them, decode checks every byte and streams', async () => {
    // The image is in the shared cache (the encoder made it above): prefill loads it instead of encoding.
    const image = pngDataUrl(672, 448, 11);
    const client = {
      model: 'qwen2.5-vl-7b',
      messages: [{ role: 'user', content: [{ type: 'text', text: 'what is this?' }, { type: 'image_url', image_url: { url: image }, uuid: 'enc-item-1' }] }],
      max_tokens: 6,
      stream: true,
      stream_options: { include_usage: true },
    };
    const meta = await metaserver(runPrefillOn(p.url, () => client));
    const res = await post(`${d.url}/v1/chat/completions`, { ...client, kv_transfer_params: { do_remote_decode: false, do_remote_prefill: true, metaserver: meta.url } }, { 'x-request-id': 'pd-ok-1' });
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^text\/event-stream/);
    const events = sseEvents(res.text);
    expect(events.at(-1)).toBe('[DONE]');
    const chunks = events.slice(0, -1) as Array<{ id: string; choices: Array<{ delta: { role?: string; content?: string }; finish_reason: string | null }>; usage?: { prompt_tokens: number; completion_tokens: number } }>;
    const content = chunks.filter((c) => c.choices.length > 0);
    expect(content).toHaveLength(6);
    expect(content[0].choices[0].delta).toEqual({ role: 'assistant', content: '[simulated]' });
    expect(content[5].choices[0].finish_reason).toBe('length');
    expect(chunks.at(-1)!.usage!.completion_tokens).toBe(6);
    expect(content[0].id).toBe('chatcmpl-pd-ok-1');

    // D's call: vllm-ascend's kv_transfer_params, with its block ids and engine address, signed.
    expect(meta.calls).toHaveLength(1);
    const call = meta.calls[0];
    const promptTokens = chunks.at(-1)!.usage!.prompt_tokens;
    expect(call.body).toMatchObject({ request_id: 'pd-ok-1', do_remote_decode: true, do_remote_prefill: false, remote_block_size: [profile.blockSize], remote_host: '127.0.0.1', remote_cached_tokens: 0 });
    expect((call.body.remote_block_ids as number[][])[0]).toHaveLength(Math.ceil(promptTokens / profile.blockSize));
    expect(typeof call.body.remote_port).toBe('number');
    expect(checkSecret(SECRET, call.headers, Buffer.from(call.raw), '10.0.0.1')).toBeUndefined();

    const [ps, ds] = await Promise.all([p.stats(true), d.stats(true)]);
    expect(ps.ec.loaded).toBe(1);
    expect(ps.ec.missed).toBe(0);
    expect(ps.kv.pushed).toBe(1);
    expect(ps.kv.pushedBytes).toBeGreaterThan(0);
    // Every byte pushed was checked on arrival.
    expect(ds.kv.verifiedBytes).toBe(ps.kv.pushedBytes);
    expect(ds.kv.verifyFailures).toBe(0);
    const record = ps.records!.find((r) => r.id === 'pd-ok-1')!;
    expect(record.kv!.layers).toHaveLength(profile.layers);
    expect(record.kv!.done).toBeGreaterThan(0);
    expect(ds.cache.free).toBe(ds.cache.blocks);
    expect(ps.cache.free).toBe(ps.cache.blocks);
  });

  it('a corrupted KV byte fails the request on decode; the next request is fine', async () => {
    // The prefill worker corrupts the requests named by --corrupt-kv.
    const client = () => ({ model: 'qwen2.5-vl-7b', messages: [{ role: 'user', content: 'x'.repeat(900) }], max_tokens: 3 });
    const meta = await metaserver(runPrefillOn(p.url, client));
    const failed = (await post(`${d.url}/v1/chat/completions`, { ...client(), stream: true, kv_transfer_params: { do_remote_prefill: true, metaserver: meta.url } }, { 'x-request-id': 'corrupt-me' })).text;
    const error = sseEvents(failed).find((ev) => typeof ev === 'object' && ev !== null && 'error' in ev) as { error: { code: string; message: string } };
    expect(error.error.code).toBe('ERR_INTEGRITY');
    expect(error.error.message).toMatch(/KV verification failed: layer \d+/);
    const next = await post(`${d.url}/v1/chat/completions`, { ...client(), stream: false, kv_transfer_params: { do_remote_prefill: true, metaserver: meta.url } }, { 'x-request-id': 'after-corrupt' });
    expect(next.status).toBe(200);
    expect(JSON.parse(next.text).choices[0].message.content).toMatch(/^\[simulated\]/);
    expect((await d.stats()).kv.verifyFailures).toBe(1);
  });

  it('a failing metaserver answer fails decode at once (its status is not ignored)', async () => {
    const meta = await metaserver(async () => ({ status: 503, body: { error: { message: 'no prefill instance is available' } } }));
    const res = await post(`${d.url}/v1/chat/completions`, decodeRequest(meta.url), { 'x-request-id': 'meta-503' });
    const error = sseEvents(res.text).find((ev) => typeof ev === 'object' && ev !== null && 'error' in ev) as { error: { message: string } };
    expect(error.error.message).toMatch(/metaserver answered 503: no prefill instance is available/);
    const plain = await post(`${d.url}/v1/chat/completions`, decodeRequest(meta.url, { stream: false }), { 'x-request-id': 'meta-503-b' });
    expect(plain.status).toBe(502);
    // The blocks come back once the receiver let go of them (no sender ever wrote: after --kv-quiesce).
    await blocksFree(d);
  });

  it('decode fails at its deadline when no KV ever comes, and when the metaserver never answers', async () => {
    // --kv-timeout 3s on this worker.
    const lies = await metaserver(async (call) => ({ status: 200, body: { status: 'ok', request_id: call.body.request_id } }));
    const noKv = await post(`${d.url}/v1/chat/completions`, decodeRequest(lies.url, { stream: false }), { 'x-request-id': 'no-kv' });
    expect(noKv.status).toBe(504);
    expect(JSON.parse(noKv.text).error).toMatchObject({ code: 'ERR_TIMEOUT' });
    expect(JSON.parse(noKv.text).error.message).toMatch(/not complete within/);

    const hangs = await metaserver(() => new Promise(() => {}));
    const silent = await post(`${d.url}/v1/chat/completions`, decodeRequest(hangs.url, { stream: false }), { 'x-request-id': 'meta-hangs' });
    expect(silent.status).toBeGreaterThanOrEqual(500);
    expect(JSON.parse(silent.text).error.code).toBe('ERR_TIMEOUT');
  });

  it('a client that goes away cancels the decode and frees its blocks', async () => {
    const hangs = await metaserver(() => new Promise(() => {}));
    const ac = new AbortController();
    const pending = post(`${d.url}/v1/chat/completions`, decodeRequest(hangs.url), { 'x-request-id': 'walks-away' }, ac.signal).catch((err: Error) => err);
    // Wait until D has published its blocks, then leave.
    for (let i = 0; i < 200 && hangs.calls.length === 0; i++) await new Promise((r) => setTimeout(r, 20));
    expect(hangs.calls).toHaveLength(1);
    ac.abort();
    await pending;
    await blocksFree(d);
    expect((await d.stats()).requests.active).toBe(0);
  });
});
