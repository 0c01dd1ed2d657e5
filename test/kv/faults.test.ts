// Layerwise push with prefill and decode in separate processes: a process frozen or
// killed mid-request, and a slow decode that must throttle prefill through its credits.
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { gqaTensors } from '../../lib/kv/layout.js';
import { LayerwiseReceiver } from '../../lib/kv/receiver.js';
import { LayerwiseSender } from '../../lib/kv/sender.js';
import { KvTracer, layersOf } from '../../lib/kv/trace.js';
import { digestBlocks } from '../fixtures/kv-digest.mjs';
import { closeEngines, openEngine, waitFor } from '../helpers.js';
import { cache, deferred, fixtureGeometry, range, SMALL, startKvProcess, stopKvProcesses, track, type Geometry } from './kv-helpers.js';

const closers: Array<() => unknown> = [];
afterEach(async () => {
  for (const c of closers.splice(0)) await c();
  await stopKvProcesses();
  await closeEngines();
});

type Outcome = { ok: boolean; code?: string; invalidBlockIds?: number[]; result?: { senders: string[] } };

describe('a process dies mid-request', () => {
  it('prefill frozen (SIGSTOP, connection still open): decode rejects at its deadline with the invalid blocks; layers that arrived stay reported', async () => {
    const D = await openEngine();
    const d = cache(D, SMALL, SMALL.decodeBlockSize, SMALL.decodeBlocks);
    const receiver = new LayerwiseReceiver(D, d.layout, { quiesceMs: 200 });
    closers.push(() => receiver.close());
    const arrived: number[] = [];
    receiver.on('layer', (e: { layer: number }) => arrived.push(e.layer));
    const blocks = [7, 8, 9, 10];
    const prefill = await startKvProcess('kv-prefill.mjs', { geometry: fixtureGeometry(SMALL, 'prefill') });
    // The deadline must outlast the two layers' push even on a loaded machine; it is what ends the test.
    const received = track(receiver.expect('orphan', { blocks, deadlineMs: 2_500 }));
    await prefill.call('add', { requestId: 'orphan', peer: D.address, localBlocks: range(0, 4), remoteBlocks: blocks, tokens: 32 });
    await prefill.call('ready', { upTo: 2 });
    await prefill.call('acked', { count: 2 });
    // A killed prefill is noticed at once (test/kv/prefill-lost.test.ts); a frozen one only by the deadline.
    prefill.child.kill('SIGSTOP');

    const err = await received.promise.catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_TIMEOUT', requestId: 'orphan', invalidBlockIds: blocks });
    expect(arrived).toEqual([0, 1]);
    await receiver.settled('orphan'); // nobody confirms: the quiesce period ends it
    expect(receiver.stats).toMatchObject({ requestsPending: 0, requestsFailed: 1 });
  });

  it('decode killed: only its requests fail and release; prefill keeps serving the other decode', async () => {
    const P = await openEngine({ listen: false });
    const p = cache(P, SMALL, SMALL.prefillBlockSize, SMALL.prefillBlocks, 21);
    const trace = new KvTracer();
    const sender = new LayerwiseSender(P, p.layout, { trace });
    closers.push(() => sender.close());
    const geometry = fixtureGeometry(SMALL, 'decode');
    const [d1, d2] = await Promise.all([startKvProcess('kv-decode.mjs', { geometry }), startKvProcess('kv-decode.mjs', { geometry })]);
    await d1.call('expect', { id: 'to-d1', blocks: [0, 1, 2], deadlineMs: 10_000 });
    await d2.call('expect', { id: 'to-d2', blocks: [5, 6, 7], deadlineMs: 10_000 });
    const h1 = sender.add({ requestId: 'to-d1', peer: d1.address!, localBlocks: [0, 1, 2], remoteBlocks: [0, 1, 2], tokens: 24 });
    const h2 = sender.add({ requestId: 'to-d2', peer: d2.address!, localBlocks: [10, 11, 12], remoteBlocks: [5, 6, 7], tokens: 24 });
    const gates = range(0, SMALL.layers).map(() => deferred());
    gates.forEach((g, l) => sender.layerReady(l, g.promise));
    gates[0].resolve();
    gates[1].resolve();
    await waitFor(() => trace.events.filter((e) => e.phase === 'acked').flatMap(layersOf).length >= 4, 'two layers acknowledged by both decodes');
    await d1.kill();
    gates.slice(2).forEach((g) => g.resolve());

    await expect(h1.result).rejects.toMatchObject({ requestId: 'to-d1', code: 'ERR_PEER_LOST' });
    await h1.released;
    await h2.result;
    expect(await d2.call<Outcome>('outcome', { id: 'to-d2' })).toMatchObject({ ok: true });
    expect(await d2.call('digest', { ids: [5, 6, 7] })).toBe(digestBlocks(p.layout, [10, 11, 12]));

    // The sender still serves the live decode.
    await d2.call('expect', { id: 'after', blocks: [20, 21], deadlineMs: 10_000 });
    const h3 = sender.add({ requestId: 'after', peer: d2.address!, localBlocks: [30, 31], remoteBlocks: [20, 21], tokens: 16 });
    for (let l = 0; l < SMALL.layers; l++) sender.layerReady(l, Promise.resolve());
    await h3.result;
    expect(await d2.call('digest', { ids: [20, 21] })).toBe(digestBlocks(p.layout, [30, 31]));
    expect(sender.stats).toMatchObject({ requestsDone: 2, requestsFailed: 1, requestsActive: 0 });
  });
});

describe('DONE acknowledgement', () => {
  it('retries DONE on its own when the notice carrying it is not answered in time; decode counts it once', async () => {
    const decode = await startKvProcess('kv-decode.mjs', { geometry: fixtureGeometry(SMALL, 'decode'), doneDelayMs: 1_000 });
    const P = await openEngine({ listen: false });
    const p = cache(P, SMALL, SMALL.prefillBlockSize, SMALL.prefillBlocks, 3);
    const sender = new LayerwiseSender(P, p.layout, { ackTimeoutMs: 400, retries: 4, retryDelayMs: 100 });
    closers.push(() => sender.close());
    await decode.call('expect', { id: 'slow-done', blocks: [4, 5], deadlineMs: 10_000 });
    const h = sender.add({ requestId: 'slow-done', peer: decode.address!, localBlocks: [1, 2], remoteBlocks: [4, 5], tokens: 16 });
    for (let l = 0; l < SMALL.layers; l++) sender.layerReady(l, Promise.resolve());
    await h.result;
    expect(await decode.call<Outcome>('outcome', { id: 'slow-done' })).toMatchObject({ ok: true });
    const stats = await decode.call<{ requestsDone: number; requestsFailed: number; duplicates: number }>('stats');
    expect(stats).toMatchObject({ requestsDone: 1, requestsFailed: 0 });
    expect(stats.duplicates).toBeGreaterThanOrEqual(1); // the retried DONE arrived and changed nothing
    expect(await decode.call('digest', { ids: [4, 5] })).toBe(digestBlocks(p.layout, [1, 2]));
  });
});

describe('back-pressure', () => {
  it('a slow decode bounds the bytes prefill has written but not had acknowledged to its window', async () => {
    const g: Geometry = { ...SMALL, tensors: gqaTensors({ kvHeads: 2, headDim: 32 }), prefillBlockSize: 16, decodeBlockSize: 16, prefillBlocks: 160, decodeBlocks: 160 };
    const windowBytes = 64 * 1024;
    const tokens = 2048; // 512 KiB per layer: 8 batches per layer at this window
    const decode = await startKvProcess('kv-decode.mjs', { geometry: fixtureGeometry(g, 'decode'), receiver: { windowBytes }, ackDelayMs: 15 });
    const P = await openEngine({ listen: false });
    const p = cache(P, g, g.prefillBlockSize, g.prefillBlocks, 5);
    const trace = new KvTracer();
    const sender = new LayerwiseSender(P, p.layout, { trace, ackTimeoutMs: 10_000 });
    closers.push(() => sender.close());
    const local = range(10, 128);
    const remote = range(20, 128);
    await decode.call('expect', { id: 'big', blocks: remote, deadlineMs: 30_000 });
    const h = sender.add({ requestId: 'big', peer: decode.address!, localBlocks: local, remoteBlocks: remote, tokens });
    for (let l = 0; l < g.layers; l++) sender.layerReady(l, Promise.resolve());
    await h.result;
    expect(await decode.call<Outcome>('outcome', { id: 'big' })).toMatchObject({ ok: true });
    expect(await decode.call('digest', { ids: remote })).toBe(digestBlocks(p.layout, local));

    // Independent of the credit gate's own counter: replay the trace.
    let inFlight = 0;
    let peak = 0;
    for (const e of trace.events) {
      if (e.phase === 'sendStart') peak = Math.max(peak, (inFlight += e.bytes!));
      if (e.phase === 'acked') inFlight -= e.bytes!;
    }
    const total = g.layers * tokens * 256;
    expect(sender.stats.bytesSent).toBe(total);
    expect(peak).toBeLessThanOrEqual(windowBytes);
    expect(sender.stats.peakBytesInFlight).toBeLessThanOrEqual(windowBytes);
    expect(sender.stats.creditWaits).toBeGreaterThan(0);
    await sleep(0);
  });
});
