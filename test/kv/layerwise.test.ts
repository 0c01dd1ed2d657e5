// Layerwise push between a prefill and a decode engine in this process: bytes land in
// the right blocks, ordering and completion rules, integrity, release safety, tracing.
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { KvRequestError } from '../../lib/kv/protocol.js';
import { LayerwiseReceiver } from '../../lib/kv/receiver.js';
import { LayerwiseSender } from '../../lib/kv/sender.js';
import { KvTracer, layersOf } from '../../lib/kv/trace.js';
import { mlaTensors } from '../../lib/kv/layout.js';
import type { Region, TransferEngine } from '../../lib/index.js';
import { closeEngines, expectCode, openEngine, waitFor } from '../helpers.js';
import { allLayersReady, cache, deferred, mismatches, pair, range, SMALL, track, untouched, type Geometry, type Side } from './kv-helpers.js';

const closers: Array<() => unknown> = [];
afterEach(async () => {
  for (const c of closers.splice(0)) await c();
  vi.restoreAllMocks();
  await closeEngines();
});

async function setup(g: Geometry = SMALL, o: Parameters<typeof pair>[1] = {}) {
  const x = await pair(g, o);
  closers.push(() => x.receiver.close(), () => x.sender.close());
  return x;
}

const acked = (trace: KvTracer) => trace.events.filter((e) => e.phase === 'acked').length;

describe('layerwise push', () => {
  it('lands every layer of a chunked request in decode blocks twice as large, skipping the prefix hit', async () => {
    const g: Geometry = { ...SMALL, prefillBlockSize: 8, decodeBlockSize: 16, decodeBlocks: 24 };
    const { p, d, sender, receiver } = await setup(g);
    const local = [40, 41, 42, 3, 4, 5, 6, 7, 20, 21, 22];
    const remote = [9, 2, 3, 10, 11, 1];
    const tokens = 85; // 11 prefill blocks (the last one partial), 6 decode blocks
    const layers: number[] = [];
    receiver.on('layer', (e: { requestId: string; layer: number }) => layers.push(e.layer));
    const received = receiver.expect('r1', { blocks: remote, deadlineMs: 10_000, cachedTokens: 16 });
    const h = sender.add({ requestId: 'r1', peer: d.engine.address!, localBlocks: local, remoteBlocks: remote, tokens, remoteCachedTokens: 16 });
    for (const computed of [30, 64, 85]) {
      sender.step([{ requestId: 'r1', computedTokens: computed }]);
      allLayersReady(sender, g.layers);
    }
    const result = await h.result;
    const got = await received;
    expect(mismatches(p, d, local, remote, 2, 11)).toEqual([]);
    // The cached prefix (logical blocks 0 and 1 = decode block 9) was not written.
    expect(untouched(d, remote, 2, 0, 2)).toBe(true);
    expect(result.bytes).toBe(9 * g.layers * p.layout.layerBlockBytes());
    // Chunk 1 sends block 2 only (3 full blocks, 2 cached); chunk 2 blocks 3–7; chunk 3 blocks 8–10.
    expect(got).toMatchObject({ requestId: 'r1', chunks: 3 * g.layers, verifiedChunks: 0 });
    expect(layers).toEqual(range(0, g.layers));
    await h.released;
  });

  it('moves MLA caches between device memories and verifies a checksum per layer', async () => {
    const g: Geometry = { ...SMALL, tensors: mlaTensors({ kvLoraRank: 64, ropeHeadDim: 16 }), device: true, layers: 5 };
    const { p, d, sender, receiver } = await setup(g, { sender: { integrity: true }, receiver: { requireIntegrity: true } });
    const local = range(10, 5);
    const remote = [30, 31, 7, 8, 9];
    const received = receiver.expect('mla', { blocks: remote, deadlineMs: 10_000 });
    const h = sender.add({ requestId: 'mla', peer: d.engine.address!, localBlocks: local, remoteBlocks: remote, tokens: 37 });
    allLayersReady(sender, g.layers);
    await h.result;
    expect((await received).verifiedChunks).toBe(g.layers);
    expect(mismatches(p, d, local, remote, 0, 5)).toEqual([]);
  });

  it('waits for device events recorded after each layer\'s (simulated) compute, in layer order', async () => {
    const trace = new KvTracer();
    const { p, d, sender, receiver } = await setup(SMALL, { sender: { trace } });
    const stream = p.engine.device.createStream();
    const events = range(0, SMALL.layers).map(() => p.engine.device.createEvent());
    const received = receiver.expect('dev', { blocks: [1, 2], deadlineMs: 10_000 });
    const h = sender.add({ requestId: 'dev', peer: d.engine.address!, localBlocks: [3, 4], remoteBlocks: [1, 2], tokens: 16 });
    events.forEach((ev, l) => {
      stream.sleep(2_000); // the layer's compute
      ev.record(stream);
      sender.layerReady(l, ev);
    });
    await h.result;
    await received;
    // Each layer went out only after its event completed.
    const ready = trace.events.filter((e) => e.phase === 'ready').map((e) => e.layer);
    expect(ready).toEqual(range(0, SMALL.layers));
    for (let l = 0; l < SMALL.layers; l++) {
      const readyAt = trace.events.find((e) => e.phase === 'ready' && e.layer === l)!.ts;
      const sentAt = trace.events.find((e) => e.phase === 'sendStart' && layersOf(e).includes(l))!.ts; // alone or fused
      expect(sentAt).toBeGreaterThanOrEqual(readyAt);
    }
    expect(mismatches(p, d, [3, 4], [1, 2], 0, 2)).toEqual([]);
    stream.destroy();
  });

  it('fails the step when a device event does not complete within signalTimeoutMs', async () => {
    const { p, d, sender, receiver } = await setup(SMALL, { sender: { signalTimeoutMs: 100 } });
    const stream = p.engine.device.createStream();
    const event = p.engine.device.createEvent();
    stream.sleep(600_000); // a compute far slower than the signal deadline
    event.record(stream);
    const received = receiver.expect('hung', { blocks: [0], deadlineMs: 10_000 });
    const h = sender.add({ requestId: 'hung', peer: d.engine.address!, localBlocks: [0], remoteBlocks: [0], tokens: 8 });
    sender.layerReady(0, event);
    await expect(h.result).rejects.toMatchObject({ code: 'ERR_TIMEOUT' });
    await expect(received).rejects.toMatchObject({ code: 'ERR_TIMEOUT', invalidBlockIds: [0] });
    await stream.synchronize();
    stream.destroy();
  });

  it('fuses the requests of a step that go to one decode engine into one batch per layer', async () => {
    const trace = new KvTracer();
    // Layer fusing off: all layers are ready at once here, and this is about one layer's batch.
    const { p, d, sender, receiver } = await setup(SMALL, { sender: { trace, fuseLayers: false } });
    const reqs = [0, 1, 2].map((i) => ({ id: `f${i}`, local: range(i * 10, 3), remote: range(40 - i * 5, 3) }));
    const received = reqs.map((r) => receiver.expect(r.id, { blocks: r.remote, deadlineMs: 10_000 }));
    const handles = reqs.map((r) => sender.add({ requestId: r.id, peer: d.engine.address!, localBlocks: r.local, remoteBlocks: r.remote, tokens: 24 }));
    allLayersReady(sender, SMALL.layers);
    await Promise.all([...handles.map((h) => h.result), ...received]);
    const starts = trace.events.filter((e) => e.phase === 'sendStart');
    expect(starts.map((e) => e.layer)).toEqual(range(0, SMALL.layers));
    expect(starts.every((e) => e.requests.length === 3)).toBe(true);
    for (const r of reqs) expect(mismatches(p, d, r.local, r.remote, 0, 3)).toEqual([]);
  });

  it('sends DONE only after the last layer of the final chunk', async () => {
    const trace = new KvTracer();
    const { d, sender, receiver } = await setup(SMALL, { sender: { trace } });
    const remote = range(0, 5);
    const received = track(receiver.expect('late', { blocks: remote, deadlineMs: 10_000 }));
    const h = track(sender.add({ requestId: 'late', peer: d.engine.address!, localBlocks: range(5, 5), remoteBlocks: remote, tokens: 40 }).result);
    let acks = 0;
    for (const [step, computed] of [[0, 16], [1, 40]]) {
      sender.step([{ requestId: 'late', computedTokens: computed }]);
      for (let l = 0; l < SMALL.layers; l++) {
        const ready = deferred();
        sender.layerReady(l, ready.promise);
        ready.resolve();
        await waitFor(() => acked(trace) > acks, `layer ${l} of step ${step} acknowledged`);
        acks = acked(trace);
        if (step === 1 && l === SMALL.layers - 1) break;
        await sleep(20); // room for a premature DONE to arrive
        expect(received.settled, `decode completed after layer ${l} of step ${step}`).toBe(false);
        expect(h.settled).toBe(false);
      }
    }
    await received.promise;
    await h.promise;
  });

  it('lets a decode engine start early: per-layer arrival in layer order', async () => {
    const { d, sender, receiver } = await setup();
    const remote = range(0, 2);
    const received = receiver.expect('early', { blocks: remote, deadlineMs: 10_000 });
    const arrived = range(0, SMALL.layers).map((l) => track(receiver.layerArrived('early', l)));
    sender.add({ requestId: 'early', peer: d.engine.address!, localBlocks: [0, 1], remoteBlocks: remote, tokens: 16 });
    const gates = range(0, SMALL.layers).map(() => deferred());
    gates.forEach((g, l) => sender.layerReady(l, g.promise));
    gates[0].resolve();
    await arrived[0].promise;
    await sleep(20);
    expect(arrived.map((a) => a.settled)).toEqual([true, false, false, false]);
    gates.slice(1).forEach((g) => g.resolve());
    await received;
    expect(arrived.every((a) => a.settled && a.error === undefined)).toBe(true);
  });

  it('completes a request with two senders only after both sent DONE', async () => {
    const { p, d, receiver } = await setup();
    const remote = range(20, 3);
    const received = track(receiver.expect('tp', { blocks: remote, deadlineMs: 10_000, senders: 2 }));
    const a = new LayerwiseSender(p.engine, p.layout, { senderId: 'tp0' });
    const b = new LayerwiseSender(p.engine, p.layout, { senderId: 'tp1' });
    closers.push(() => a.close(), () => b.close());
    const ha = a.add({ requestId: 'tp', peer: d.engine.address!, localBlocks: [1, 2, 3], remoteBlocks: remote, tokens: 20 });
    allLayersReady(a, SMALL.layers);
    await ha.result;
    await sleep(20);
    expect(received.settled).toBe(false);
    const hb = b.add({ requestId: 'tp', peer: d.engine.address!, localBlocks: [1, 2, 3], remoteBlocks: remote, tokens: 20 });
    allLayersReady(b, SMALL.layers);
    await hb.result;
    expect((await received.promise).senders.sort()).toEqual(['tp0', 'tp1']);
  });
});

describe('decode-side rules (raw control messages)', () => {
  async function rawSender(d: Side, sender: string) {
    const engine = await openEngine({ listen: false });
    const peer = await engine.connect(d.engine.address!);
    const session = `s-${sender}`;
    await peer.request('kv.hello', { sender, session, blockSize: d.layout.blockSize, layers: d.layout.layers.map((l) => l.map((t) => t.blockBytes)) });
    let seq = 0;
    return {
      layer: (layer: number, entries: unknown[], s = ++seq) => peer.request('kv.layer', { sender, session, seq: s, layer, bytes: 0, entries }),
      allLayers: async (id: string, end: number) => {
        for (let l = 0; l < d.layout.numLayers; l++) await peer.request('kv.layer', { sender, session, seq: ++seq, layer: l, bytes: 0, entries: [{ id, first: 0, end, last: true, final: true }] });
      },
      done: (id: string, end: number, chunks: number) => peer.request('kv.done', { sender, session, id, end, chunks }),
      failed: (id: string) => peer.request('kv.failed', { sender, session, id, code: 'ERR_ABORTED', message: 'test' }),
    };
  }

  it('ignores duplicates: a repeated DONE counts once, a repeated batch is dropped', async () => {
    const { d, receiver } = await setup();
    const received = track(receiver.expect('dup', { blocks: [3, 4], deadlineMs: 10_000, senders: 2 }));
    const a = await rawSender(d, 'A');
    const b = await rawSender(d, 'B');
    await a.allLayers('dup', 2);
    expect(await a.layer(0, [{ id: 'dup', first: 0, end: 2, last: true, final: true }], 1)).toEqual({ credit: 0, refused: [] });
    expect(receiver.stats.duplicates).toBe(1);
    expect(await a.done('dup', 2, SMALL.layers)).toEqual({ ok: true, complete: false });
    expect(await a.done('dup', 2, SMALL.layers)).toEqual({ ok: true, complete: false, duplicate: true });
    await sleep(20);
    expect(received.settled).toBe(false);
    await b.allLayers('dup', 2);
    expect(await b.done('dup', 2, SMALL.layers)).toEqual({ ok: true, complete: true });
    expect((await received.promise).senders).toEqual(['A', 'B']);
    // After completion a late repeat is still answered, and still idempotent.
    expect(await b.done('dup', 2, SMALL.layers)).toMatchObject({ ok: true, duplicate: true });
  });

  it('refuses DONE before every layer is in, failing the request with its invalid blocks', async () => {
    const { d, receiver } = await setup();
    const received = receiver.expect('early-done', { blocks: [5, 6, 7], deadlineMs: 10_000, cachedTokens: 8 });
    const a = await rawSender(d, 'A');
    for (let l = 0; l < SMALL.layers - 1; l++) await a.layer(l, [{ id: 'early-done', first: 1, end: 3, last: true, final: true }]);
    expect(await a.done('early-done', 3, SMALL.layers - 1)).toMatchObject({ ok: false, code: 'ERR_PROTOCOL' });
    const err = (await received.catch((e: unknown) => e)) as KvRequestError;
    expect(err).toBeInstanceOf(KvRequestError);
    expect(err.code).toBe('ERR_PROTOCOL');
    expect(err.invalidBlockIds).toEqual([6, 7]); // block 5 is decode's own prefix hit
  });

  it('refuses blocks outside the request, chunks out of order and messages before hello', async () => {
    const { d, receiver } = await setup();
    const outside = receiver.expect('outside', { blocks: [1, 2], deadlineMs: 10_000 });
    const gap = receiver.expect('gap', { blocks: [3, 4, 5], deadlineMs: 10_000 });
    const a = await rawSender(d, 'A');
    expect(await a.layer(0, [{ id: 'outside', first: 0, end: 3, last: true, final: true }])).toMatchObject({ refused: [{ id: 'outside', code: 'ERR_PROTOCOL' }] });
    await expect(outside).rejects.toMatchObject({ code: 'ERR_PROTOCOL', invalidBlockIds: [1, 2] });
    await a.layer(0, [{ id: 'gap', first: 0, end: 1, last: true, final: false }]);
    expect(await a.layer(0, [{ id: 'gap', first: 2, end: 3, last: true, final: true }])).toMatchObject({ refused: [{ id: 'gap' }] });
    await expect(gap).rejects.toMatchObject({ code: 'ERR_PROTOCOL' });
    const engine = await openEngine({ listen: false });
    const peer = await engine.connect(d.engine.address!);
    expect(await peer.request('kv.layer', { sender: 'nobody', session: 'x', seq: 1, layer: 0, bytes: 0, entries: [{ id: 'gap' }] })).toMatchObject({
      refused: [{ id: 'gap', code: 'ERR_PROTOCOL' }],
    });
    expect(await peer.request('kv.done', { sender: 'nobody', session: 'x', id: 'gap', end: 1, chunks: 1 })).toMatchObject({ ok: false, code: 'ERR_PROTOCOL' });
  });

  it('keeps a failed request\'s blocks unsettled until its senders confirm they stopped', async () => {
    const { d, receiver } = await setup(SMALL, { receiver: { quiesceMs: 60_000 } });
    const received = receiver.expect('q', { blocks: [1], deadlineMs: 10_000, senders: 2 });
    const a = await rawSender(d, 'A');
    const b = await rawSender(d, 'B');
    receiver.cancel('q');
    await expect(received).rejects.toMatchObject({ code: 'ERR_ABORTED', invalidBlockIds: [1] });
    const settled = track(receiver.settled('q'));
    await a.failed('q');
    await sleep(20);
    expect(settled.settled).toBe(false);
    await b.failed('q');
    await settled.promise;
  });
});

describe('failures', () => {
  it('fails the request on a checksum mismatch (a misdirected block) — never reported complete', async () => {
    const { d, sender, receiver } = await setup(SMALL, { sender: { integrity: true } });
    sender._misdirect = (_id, layer) => layer === 1;
    const remote = range(0, 4);
    const received = receiver.expect('bad', { blocks: remote, deadlineMs: 10_000 });
    const h = sender.add({ requestId: 'bad', peer: d.engine.address!, localBlocks: range(8, 4), remoteBlocks: remote, tokens: 30 });
    allLayersReady(sender, SMALL.layers);
    await expect(received).rejects.toMatchObject({ code: 'ERR_INTEGRITY', invalidBlockIds: remote });
    await expect(h.result).rejects.toMatchObject({ code: 'ERR_INTEGRITY', requestId: 'bad' });
    await h.released;
    expect(receiver.stats).toMatchObject({ checksumFailures: 1, requestsDone: 0, requestsFailed: 1 });
  });

  it('without integrity the same fault goes unnoticed (the fault really corrupts)', async () => {
    const { p, d, sender, receiver } = await setup();
    sender._misdirect = (_id, layer) => layer === 1;
    const remote = range(0, 4);
    const received = receiver.expect('silent', { blocks: remote, deadlineMs: 10_000 });
    sender.add({ requestId: 'silent', peer: d.engine.address!, localBlocks: range(8, 4), remoteBlocks: remote, tokens: 30 });
    allLayersReady(sender, SMALL.layers);
    await received;
    expect(mismatches(p, d, range(8, 4), remote, 0, 4).some((m) => m.startsWith('layer 1'))).toBe(true);
  });

  it('fails the step\'s requests when a ready signal never completes', async () => {
    const { d, sender, receiver } = await setup(SMALL, { sender: { signalTimeoutMs: 100 } });
    const received = receiver.expect('stuck', { blocks: [0], deadlineMs: 10_000 });
    const h = sender.add({ requestId: 'stuck', peer: d.engine.address!, localBlocks: [0], remoteBlocks: [0], tokens: 8 });
    sender.layerReady(0, new Promise(() => {}));
    await expect(h.result).rejects.toMatchObject({ code: 'ERR_TIMEOUT' });
    await h.released;
    // Decode hears FAILED long before its own deadline.
    await expect(received).rejects.toMatchObject({ code: 'ERR_TIMEOUT', invalidBlockIds: [0] });
    expect(receiver.stats.requestsFailed).toBe(1);
  });

  it('rejects at the deadline with the invalid blocks when no sender ever comes', async () => {
    const { receiver } = await setup();
    const err = (await receiver.expect('nobody', { blocks: [4, 5, 6], deadlineMs: 150, cachedTokens: 8 }).catch((e: unknown) => e)) as KvRequestError;
    expect(err).toMatchObject({ code: 'ERR_TIMEOUT', requestId: 'nobody', invalidBlockIds: [5, 6] });
    await expect(receiver.layerArrived('nobody', 0)).rejects.toMatchObject({ code: 'ERR_TIMEOUT' });
  });

  it('fails on prefill a request decode does not expect', async () => {
    const { d, sender } = await setup();
    const h = sender.add({ requestId: 'unknown', peer: d.engine.address!, localBlocks: [0], remoteBlocks: [0], tokens: 8 });
    allLayersReady(sender, SMALL.layers);
    await expect(h.result).rejects.toMatchObject({ code: 'ERR_BAD_ARGUMENT' });
    await h.released;
  });

  it('fails only the requests of a decode engine whose layout does not match', async () => {
    const { p, d, sender, receiver } = await setup();
    const other = await openEngine();
    const wrong = cache(other, { ...SMALL, tensors: mlaTensors({ kvLoraRank: 64, ropeHeadDim: 16 }) }, 8, 16);
    const otherReceiver = new LayerwiseReceiver(other, wrong.layout);
    closers.push(() => otherReceiver.close());
    const bad = sender.add({ requestId: 'x', peer: other.address!, localBlocks: [0], remoteBlocks: [0], tokens: 8 });
    const received = receiver.expect('y', { blocks: [2], deadlineMs: 10_000 });
    const good = sender.add({ requestId: 'y', peer: d.engine.address!, localBlocks: [1], remoteBlocks: [2], tokens: 8 });
    allLayersReady(sender, SMALL.layers);
    await expect(bad.result).rejects.toMatchObject({ code: 'ERR_BAD_ARGUMENT' });
    await good.result;
    await received;
    expect(mismatches(p, d, [1], [2], 0, 1)).toEqual([]);
  });
});

describe('prefill block lifetime', () => {
  it('releases the blocks only after the request\'s last write completed (freeing them at once cannot corrupt decode)', async () => {
    const { p, d, sender, receiver } = await setup();
    const original: Side = { ...p, region: { ...p.region, buffer: Buffer.from(p.region.buffer!) } as Region };
    let inFlight = 0;
    const write = p.engine.write.bind(p.engine);
    vi.spyOn(p.engine, 'write').mockImplementation(async (peer, batch, options) => {
      inFlight++;
      try {
        await sleep(15); // a slow link: the bytes are read late
        return await write(peer, batch, options);
      } finally {
        inFlight--;
      }
    });
    const local = range(30, 6);
    const remote = range(3, 6);
    const received = receiver.expect('life', { blocks: remote, deadlineMs: 10_000 });
    const h = sender.add({ requestId: 'life', peer: d.engine.address!, localBlocks: local, remoteBlocks: remote, tokens: 48 });
    const atRelease: number[] = [];
    void h.released.then(() => {
      atRelease.push(inFlight);
      p.region.buffer!.fill(0); // the caller frees and reuses the blocks
    });
    allLayersReady(sender, SMALL.layers);
    await h.result;
    await received;
    expect(atRelease).toEqual([0]);
    expect(mismatches(original, d, local, remote, 0, 6)).toEqual([]);
  });

  it('after an abort, releases only once the write in flight settled', async () => {
    const { p, d, sender, receiver } = await setup(SMALL, { sender: { fuseLayers: false } }); // one write per layer
    const gate = deferred();
    const entered = deferred();
    let calls = 0;
    let inFlight = 0;
    const write = p.engine.write.bind(p.engine);
    vi.spyOn(p.engine, 'write').mockImplementation(async (peer, batch, options) => {
      inFlight++;
      try {
        if (++calls === 2) {
          entered.resolve();
          await gate.promise;
        }
        return await write(peer, batch, options);
      } finally {
        inFlight--;
      }
    });
    const received = receiver.expect('abort', { blocks: [0, 1], deadlineMs: 10_000 });
    const h = sender.add({ requestId: 'abort', peer: d.engine.address!, localBlocks: [7, 8], remoteBlocks: [0, 1], tokens: 16 });
    const released = track(h.released.then(() => inFlight));
    allLayersReady(sender, SMALL.layers);
    await entered.promise;
    sender.abort('abort');
    await expect(h.result).rejects.toMatchObject({ code: 'ERR_ABORTED' });
    await sleep(20);
    expect(released.settled).toBe(false);
    gate.resolve();
    expect(await released.promise).toBe(0);
    expect(calls).toBe(2); // nothing more was written after the abort
    await expect(received).rejects.toMatchObject({ code: 'ERR_ABORTED', invalidBlockIds: [0, 1] });
  });
});

describe('prefill block lifetime over a slowed link (link emulation)', () => {
  it('releases only when the engine has no write of the request in flight; freeing then cannot corrupt decode', async () => {
    const trace = new KvTracer();
    const { p, d, sender, receiver } = await setup(SMALL, { sender: { trace } });
    const original: Side = { ...p, region: { ...p.region, buffer: Buffer.from(p.region.buffer!) } as Region };
    const peer = await p.engine.connect(d.engine.address!, { link: { bandwidth: '2MB/s' } }); // 12 KiB per layer: ~6 ms each
    const local = range(30, 6);
    const remote = range(3, 6);
    const received = receiver.expect('slow-link', { blocks: remote, deadlineMs: 10_000 });
    const h = sender.add({ requestId: 'slow-link', peer, localBlocks: local, remoteBlocks: remote, tokens: 48 });
    const atRelease: number[] = [];
    void h.released.then(() => {
      atRelease.push(p.engine.inFlight);
      p.region.buffer!.fill(0);
    });
    allLayersReady(sender, SMALL.layers);
    await h.result;
    await received;
    expect(atRelease).toEqual([0]);
    expect(mismatches(original, d, local, remote, 0, 6)).toEqual([]);
  });

  it('an abort while a layer is on the wire releases only after that write completed', async () => {
    let inFlightAtAbort = -1;
    let sender!: LayerwiseSender;
    let engine!: TransferEngine;
    // Aborts right after layer 1's batch was submitted (the link keeps it on the wire ~300 ms).
    class AbortOnLayer1 extends KvTracer {
      override record(e: Parameters<KvTracer['record']>[0]): void {
        super.record(e);
        if (e.phase === 'sendStart' && e.layer === 1) {
          setImmediate(() => {
            inFlightAtAbort = engine.inFlight;
            sender.abort('wire');
          });
        }
      }
    }
    const trace = new AbortOnLayer1();
    const x = await setup(SMALL, { sender: { trace, fuseLayers: false } }); // one write per layer
    sender = x.sender;
    engine = x.p.engine;
    const peer = await engine.connect(x.d.engine.address!, { link: { bandwidth: '40kB/s' } }); // 12 KiB per layer
    const received = x.receiver.expect('wire', { blocks: range(0, 6), deadlineMs: 10_000 });
    const h = sender.add({ requestId: 'wire', peer, localBlocks: range(10, 6), remoteBlocks: range(0, 6), tokens: 48 });
    allLayersReady(sender, SMALL.layers);
    const atRelease = await h.released.then(() => ({ inFlight: engine.inFlight, ended: trace.events.some((e) => e.phase === 'sendEnd' && e.layer === 1) }));
    expect(inFlightAtAbort).toBe(1);
    expect(atRelease).toEqual({ inFlight: 0, ended: true });
    expect(trace.events.some((e) => e.phase === 'sendStart' && e.layer === 2)).toBe(false);
    await expect(received).rejects.toMatchObject({ code: 'ERR_ABORTED' });
  });
});

describe('tracing', () => {
  it('exports ready/send/ack per layer as Chrome-trace JSON and summarises it', async () => {
    const trace = new KvTracer('prefill');
    const receiverTrace = new KvTracer('decode');
    const { d, sender, receiver } = await setup(SMALL, { sender: { trace, fuseLayers: false }, receiver: { trace: receiverTrace } });
    const received = receiver.expect('t', { blocks: [0, 1], deadlineMs: 10_000 });
    sender.add({ requestId: 't', peer: d.engine.address!, localBlocks: [0, 1], remoteBlocks: [0, 1], tokens: 16 });
    allLayersReady(sender, SMALL.layers);
    await received;
    await waitFor(() => trace.events.some((e) => e.phase === 'done'), 'DONE acknowledged');
    const json = JSON.parse(JSON.stringify(trace.toChromeTrace(1)));
    const names = json.traceEvents.map((e: { name: string; ph: string }) => `${e.ph} ${e.name}`);
    for (let l = 0; l < SMALL.layers; l++) {
      expect(names).toContain(`i ready L${l}`);
      expect(names).toContain(`X send L${l}`);
      expect(names).toContain(`X ack L${l}`);
    }
    expect(names).toContain('b t');
    expect(names).toContain('e t');
    const x = json.traceEvents.find((e: { ph: string }) => e.ph === 'X');
    expect(x.dur).toBeGreaterThanOrEqual(0);
    const summary = trace.summary('t');
    expect(summary.map((s) => s.layer)).toEqual(range(0, SMALL.layers));
    expect(summary.every((s) => s.bytes === 2 * 8 * SMALL.tensors.reduce((a, t) => a + t.bytesPerToken, 0))).toBe(true);
    expect(receiverTrace.events.filter((e) => e.phase === 'arrived').map((e) => e.layer)).toEqual(range(0, SMALL.layers));
  });

  it('names a batch of several layers by its range and shares its bytes among them in the summary', async () => {
    const trace = new KvTracer('prefill');
    const { p, d, sender, receiver } = await setup(SMALL, { sender: { trace } });
    const write = p.engine.write.bind(p.engine);
    vi.spyOn(p.engine, 'write').mockImplementation(async (peer, batch, options) => {
      await sleep(15); // the layers are ready long before the first write completes
      return write(peer, batch, options);
    });
    const received = receiver.expect('tf', { blocks: [0, 1], deadlineMs: 10_000 });
    sender.add({ requestId: 'tf', peer: d.engine.address!, localBlocks: [0, 1], remoteBlocks: [0, 1], tokens: 16 });
    allLayersReady(sender, SMALL.layers);
    await received;
    await waitFor(() => trace.events.some((e) => e.phase === 'done'), 'DONE acknowledged');
    const fused = trace.events.find((e) => e.phase === 'sendStart' && e.lastLayer !== undefined)!;
    const names = trace.toChromeTrace(1).traceEvents.map((e) => e.name);
    expect(names).toContain(`send L${fused.layer}–${fused.lastLayer}`);
    expect(names).toContain(`ack L${fused.layer}–${fused.lastLayer}`);
    const summary = trace.summary('tf');
    expect(summary.map((s) => s.layer)).toEqual(range(0, SMALL.layers));
    expect(summary.every((s) => s.bytes === 2 * 8 * SMALL.tensors.reduce((a, t) => a + t.bytesPerToken, 0))).toBe(true);
  });
});

describe('bad input', () => {
  it('is refused with a typed error before anything starts', async () => {
    const { p, d, sender, receiver } = await setup();
    const peer = d.engine.address!;
    const ok = { requestId: 'ok', peer, localBlocks: [0], remoteBlocks: [0], tokens: 8 };
    await expectCode(() => sender.add({ ...ok, requestId: '' }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => sender.add({ ...ok, peer: 42 as never }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => sender.add({ ...ok, tokens: 0 }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => sender.add({ ...ok, tokens: 9 }), 'ERR_BAD_ARGUMENT'); // needs 2 blocks
    await expectCode(() => sender.add({ ...ok, localBlocks: [SMALL.prefillBlocks] }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => sender.add({ ...ok, localBlocks: [1, 1], tokens: 16 }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => sender.add({ ...ok, remoteBlocks: [] }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => sender.add({ ...ok, remoteCachedTokens: 3 }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => sender.add({ ...ok, remoteCachedTokens: 16 }), 'ERR_BAD_ARGUMENT');
    const other = await openEngine({ listen: false });
    const foreignPeer = await other.connect(peer);
    await expectCode(() => sender.add({ ...ok, peer: foreignPeer }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => new LayerwiseSender(other, p.layout), 'ERR_BAD_ARGUMENT');
    await expectCode(() => new LayerwiseSender(p.engine, {} as never), 'ERR_BAD_ARGUMENT');
    await expectCode(() => new LayerwiseSender(p.engine, p.layout, { signalTimeoutMs: -1 }), 'ERR_BAD_ARGUMENT');

    const received = receiver.expect('ok', { blocks: [0], deadlineMs: 10_000 });
    const h = sender.add(ok);
    await expectCode(() => sender.add(ok), 'ERR_BAD_ARGUMENT'); // already being sent
    await expectCode(() => sender.step([{ requestId: 'nope', computedTokens: 1 }]), 'ERR_BAD_ARGUMENT');
    await expectCode(() => sender.step([{ requestId: 'ok', computedTokens: 9 }]), 'ERR_BAD_ARGUMENT');
    await expectCode(() => sender.step([{ requestId: 'ok', computedTokens: 4 }, { requestId: 'ok', computedTokens: 8 }]), 'ERR_BAD_ARGUMENT');
    await expectCode(() => sender.layerReady(1, Promise.resolve()), 'ERR_BAD_ARGUMENT'); // layer 0 first
    await expectCode(() => sender.layerReady(0, 'now' as never), 'ERR_BAD_ARGUMENT');
    await expectCode(() => sender.layerReady(SMALL.layers, Promise.resolve()), 'ERR_BAD_ARGUMENT');
    sender.step([{ requestId: 'ok', computedTokens: 8 }]);
    await expectCode(() => sender.step([]), 'ERR_BAD_ARGUMENT'); // the open step has no layers yet
    sender.layerReady(0, Promise.resolve());
    await expectCode(() => sender.layerReady(0, Promise.resolve()), 'ERR_BAD_ARGUMENT'); // out of order
    for (let l = 1; l < SMALL.layers; l++) sender.layerReady(l, Promise.resolve());
    await h.result;
    await received;
    await expectCode(() => sender.step([{ requestId: 'ok', computedTokens: 8 }]), 'ERR_BAD_ARGUMENT'); // finished
    await expectCode(() => sender.released('never-added'), 'ERR_BAD_ARGUMENT');
    await sender.released('ok'); // recently finished: resolves

    await expectCode(() => receiver.expect('', { blocks: [0], deadlineMs: 1000 }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => receiver.expect('e', { blocks: [], deadlineMs: 1000 }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => receiver.expect('e', { blocks: [SMALL.decodeBlocks], deadlineMs: 1000 }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => receiver.expect('e', { blocks: [1, 1], deadlineMs: 1000 }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => receiver.expect('e', { blocks: [1], deadlineMs: 0 }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => receiver.expect('e', { blocks: [1], deadlineMs: 1000, senders: 0 }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => receiver.expect('e', { blocks: [1, 2], deadlineMs: 1000, cachedTokens: 4 }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => receiver.layerArrived('e', 0), 'ERR_BAD_ARGUMENT');
    await expectCode(() => receiver.settled('e'), 'ERR_BAD_ARGUMENT');
    await expectCode(() => new LayerwiseReceiver(d.engine, d.layout), 'ERR_BAD_ARGUMENT'); // handlers taken
    await expectCode(() => new LayerwiseReceiver(other, d.layout), 'ERR_BAD_ARGUMENT');

    await sender.close();
    await expectCode(() => sender.add({ ...ok, requestId: 'late' }), 'ERR_CLOSED');
    receiver.close();
    await expectCode(() => receiver.expect('late', { blocks: [0], deadlineMs: 1000 }), 'ERR_CLOSED');
  });
});
