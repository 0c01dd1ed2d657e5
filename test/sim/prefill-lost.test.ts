/**
 * A simulated decode worker whose prefill dies mid-push fails that request at once
 * (ERR_PEER_LOST), long before its KV deadline, frees its blocks without waiting out
 * the quiesce period, and serves a request another prefill pushes at the same time.
 * The prefills are LayerwiseSender fixture processes playing the prefill worker's
 * part, so the test decides exactly when one dies.
 */
import { afterAll, beforeAll, expect, it } from 'vitest';
import { getProfile, kvTensors } from '../../lib/sim/profiles.js';
import { range, startKvProcess, stopKvProcesses, type KvProcess } from '../kv/kv-helpers.js';
import { post, startMetaserver, startWorker, type Metaserver, type MetaserverCall, type WorkerProcess } from './helpers.js';

const profile = getProfile('qwen2.5-vl-7b');
let d: WorkerProcess;
let meta: Metaserver;

beforeAll(async () => {
  // A 30 s KV deadline and the default 30 s quiesce: the test's 15 s timeout sees neither.
  d = await startWorker('decode', ['--kv-timeout', '30s']);
  // Takes decode's blocks and never answers: only the KV push can end the request.
  meta = await startMetaserver(() => new Promise(() => {}));
});

afterAll(async () => {
  await stopKvProcesses();
  await meta?.close();
});

function decodeRequest() {
  return {
    model: 'qwen2.5-vl-7b',
    messages: [{ role: 'user', content: 'Tell me about layerwise KV transfer, please.' }],
    max_tokens: 2,
    stream: false,
    kv_transfer_params: { do_remote_decode: false, do_remote_prefill: true, metaserver: meta.url },
  };
}

/** A prefill process holding the simulated KV of decode's request `call`, with its first `layers` layers pushed and acknowledged. */
async function prefillFor(call: MetaserverCall, name: string, layers: number): Promise<KvProcess> {
  const blocks = (call.body.remote_block_ids as number[][])[0];
  const requestId = String(call.body.request_id);
  const geometry = { layers: profile.layers, tensors: kvTensors(profile), blockSize: profile.blockSize, numBlocks: blocks.length };
  const p = await startKvProcess('kv-prefill.mjs', { geometry, engine: { name } });
  const localBlocks = range(0, blocks.length);
  await p.call('fillSim', { requestId, localBlocks });
  const peer = `${String(call.body.remote_host)}:${String(call.body.remote_port)}`;
  await p.call('add', { requestId, peer, localBlocks, remoteBlocks: blocks, tokens: blocks.length * profile.blockSize });
  await p.call('ready', { upTo: layers });
  await p.call('acked', { count: layers });
  return p;
}

it('the prefill of one request is killed mid-push: decode fails it ERR_PEER_LOST at once and frees its blocks; the other request completes verified', async () => {
  const victimRes = post(`${d.url}/v1/chat/completions`, decodeRequest(), { 'x-request-id': 'sim-victim' });
  const survivorRes = post(`${d.url}/v1/chat/completions`, decodeRequest(), { 'x-request-id': 'sim-survivor' });
  for (let i = 0; i < 500 && meta.calls.length < 2; i++) await new Promise((r) => setTimeout(r, 20));
  const call = (id: string) => meta.calls.find((c) => c.body.request_id === id)!;
  const victim = await prefillFor(call('sim-victim'), 'sim-prefill-victim', 2);
  const survivor = await prefillFor(call('sim-survivor'), 'sim-prefill-survivor', 2);

  await victim.kill();
  const failed = await victimRes;
  expect(failed.status).toBe(500);
  expect(JSON.parse(failed.text).error).toMatchObject({ code: 'ERR_PEER_LOST' });
  expect(JSON.parse(failed.text).error.message).toContain("'sim-prefill-victim'");

  await survivor.call('ready', { upTo: profile.layers });
  const served = await survivorRes;
  expect(served.status).toBe(200);
  expect(JSON.parse(served.text).choices[0].message.content).toMatch(/^\[simulated\]/);

  // Every layer that landed was checked byte for byte; the victim's blocks are free again.
  let s = await d.stats();
  for (let i = 0; i < 250 && (s.cache.free !== s.cache.blocks || s.requests.active > 0); i++) {
    await new Promise((r) => setTimeout(r, 20));
    s = await d.stats();
  }
  expect(s.kv.verifyFailures).toBe(0);
  expect(s.kv.received).toBe(1);
  expect(s.cache.free).toBe(s.cache.blocks);
}, 15_000);
