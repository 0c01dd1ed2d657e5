// Layer fusing: when layers are ready faster than a lane's writes complete, the
// layers waiting in the lane go out as one batch with one notice. Decode must still
// learn every layer, in order, only once its bytes are in; the cap bounds each batch;
// a failed batch fails exactly its requests; a version-1 decode gets one layer per notice.
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { TransferError } from '../../lib/errors.js';
import { LayerwiseReceiver } from '../../lib/kv/receiver.js';
import { LayerwiseSender } from '../../lib/kv/sender.js';
import { KvTracer, layersOf, type KvTraceEvent } from '../../lib/kv/trace.js';
import type { TransferEngine } from '../../lib/index.js';
import { closeEngines, openEngine, waitFor } from '../helpers.js';
import { allLayersReady, cache, mismatches, pair, range, SMALL, type Geometry, type Side } from './kv-helpers.js';

const closers: Array<() => unknown> = [];
afterEach(async () => {
  for (const c of closers.splice(0)) await c();
  vi.restoreAllMocks();
  await closeEngines();
});

/** Eight layers of SMALL's tensors: 2 KiB per prefill block per layer. */
const G: Geometry = { ...SMALL, layers: 8 };
const LAYER_BLOCK_BYTES = 2048;

async function setup(g: Geometry = G, o: Parameters<typeof pair>[1] = {}) {
  const x = await pair(g, o);
  closers.push(() => x.receiver.close(), () => x.sender.close());
  return x;
}

/** Every write of `engine` takes `ms` longer: layers become ready faster than writes complete. */
function slowWrites(engine: TransferEngine, ms: number): void {
  const write = engine.write.bind(engine);
  vi.spyOn(engine, 'write').mockImplementation(async (peer, batch, options) => {
    await sleep(ms);
    return write(peer, batch, options);
  });
}

const batchesOf = (trace: KvTracer): KvTraceEvent[] => trace.events.filter((e) => e.phase === 'sendStart');

/** Decode's blocks of one layer hold prefill's bytes. */
function layerLanded(p: Side, d: Side, local: number[], remote: number[], layer: number): boolean {
  return !mismatches(p, d, local, remote, 0, local.length).some((m) => m.startsWith(`layer ${layer} `));
}

describe('layer fusing', () => {
  it('sends layers that are ready while a write is in flight as one batch; decode sees each layer complete, in order, after its bytes', async () => {
    const trace = new KvTracer();
    const { p, d, sender, receiver } = await setup(G, { sender: { trace, integrity: true }, receiver: { requireIntegrity: true } });
    slowWrites(p.engine, 20);
    const local = range(10, 3);
    const remote = range(30, 3);
    const arrivals: Array<{ layer: number; landed: boolean }> = [];
    receiver.on('layer', (e: { requestId: string; layer: number }) => arrivals.push({ layer: e.layer, landed: layerLanded(p, d, local, remote, e.layer) }));
    const received = receiver.expect('fast', { blocks: remote, deadlineMs: 10_000 });
    const h = sender.add({ requestId: 'fast', peer: d.engine.address!, localBlocks: local, remoteBlocks: remote, tokens: 24 });
    allLayersReady(sender, G.layers); // every layer computes faster than one write

    const result = await h.result;
    const got = await received;
    const batches = batchesOf(trace);
    expect(sender.stats.batches).toBe(batches.length);
    expect(batches.length).toBeLessThan(G.layers);
    expect(sender.stats.fusedBatches).toBeGreaterThan(0);
    // The batches cover every layer exactly once, in order.
    expect(batches.flatMap(layersOf)).toEqual(range(0, G.layers));
    expect(sender.stats.fusedLayers).toBe(batches.filter((b) => b.lastLayer !== undefined).reduce((n, b) => n + layersOf(b).length, 0));
    // Decode learned every layer, in order, each only once its bytes were there; every layer was checksummed.
    expect(arrivals).toEqual(range(0, G.layers).map((layer) => ({ layer, landed: true })));
    expect(got).toMatchObject({ chunks: G.layers, verifiedChunks: G.layers });
    expect(result).toMatchObject({ chunks: G.layers, bytes: G.layers * 3 * LAYER_BLOCK_BYTES });
    expect(mismatches(p, d, local, remote, 0, 3)).toEqual([]);
    expect(receiver.stats.bytesReceived).toBe(G.layers * 3 * LAYER_BLOCK_BYTES);
  });

  it('with fuseLayers: false every layer is its own batch, however fast the layers come', async () => {
    const trace = new KvTracer();
    const { p, d, sender, receiver } = await setup(G, { sender: { trace, fuseLayers: false } });
    slowWrites(p.engine, 20);
    const received = receiver.expect('one-by-one', { blocks: [1, 2], deadlineMs: 10_000 });
    const h = sender.add({ requestId: 'one-by-one', peer: d.engine.address!, localBlocks: [5, 6], remoteBlocks: [1, 2], tokens: 16 });
    allLayersReady(sender, G.layers);
    await h.result;
    await received;
    expect(batchesOf(trace).map((b) => [b.layer, b.lastLayer])).toEqual(range(0, G.layers).map((l) => [l, undefined]));
    expect(sender.stats).toMatchObject({ batches: G.layers, fusedBatches: 0, fusedLayers: 0 });
  });

  it('fuses the layers of a chunked request chunk by chunk, never across steps', async () => {
    const trace = new KvTracer();
    const { p, d, sender, receiver } = await setup(G, { sender: { trace } });
    slowWrites(p.engine, 15);
    const local = range(0, 5);
    const remote = range(20, 5);
    const received = receiver.expect('chunks', { blocks: remote, deadlineMs: 10_000 });
    const h = sender.add({ requestId: 'chunks', peer: d.engine.address!, localBlocks: local, remoteBlocks: remote, tokens: 40 });
    sender.step([{ requestId: 'chunks', computedTokens: 16 }]);
    allLayersReady(sender, G.layers);
    sender.step([{ requestId: 'chunks', computedTokens: 40 }]);
    allLayersReady(sender, G.layers);
    await h.result;
    expect(await received).toMatchObject({ chunks: 2 * G.layers });
    const batches = batchesOf(trace);
    // Layers 0..L-1 of chunk 1, then 0..L-1 of chunk 2: no batch runs from one into the other.
    expect(batches.flatMap(layersOf)).toEqual([...range(0, G.layers), ...range(0, G.layers)]);
    expect(batches.length).toBeLessThan(2 * G.layers);
    expect(mismatches(p, d, local, remote, 0, 5)).toEqual([]);
  });
});

describe('the cap of a fused batch', () => {
  async function pushFast(o: Parameters<typeof pair>[1], blocks: number) {
    const trace = new KvTracer();
    const x = await setup(G, { ...o, sender: { ...o?.sender, trace } });
    slowWrites(x.p.engine, 15);
    const local = range(0, blocks);
    const remote = range(blocks, blocks);
    const received = x.receiver.expect('cap', { blocks: remote, deadlineMs: 10_000 });
    const h = x.sender.add({ requestId: 'cap', peer: x.d.engine.address!, localBlocks: local, remoteBlocks: remote, tokens: blocks * 8 });
    allLayersReady(x.sender, G.layers);
    await h.result;
    await received;
    expect(mismatches(x.p, x.d, local, remote, 0, blocks)).toEqual([]);
    return batchesOf(trace);
  }

  it('holds a batch to maxFusedBytes', async () => {
    const layerBytes = 2 * LAYER_BLOCK_BYTES;
    const batches = await pushFast({ sender: { maxFusedBytes: Math.floor(2.5 * layerBytes) } }, 2);
    expect(batches.flatMap(layersOf)).toEqual(range(0, G.layers));
    expect(Math.max(...batches.map((b) => layersOf(b).length))).toBe(2);
    expect(batches.every((b) => b.bytes! <= 2.5 * layerBytes)).toBe(true);
  });

  it('holds a batch to maxFusedDescriptors', async () => {
    // Blocks 0 and 1 → decode blocks 2 and 3: one run, one descriptor per tensor, 2 per layer.
    const batches = await pushFast({ sender: { maxFusedDescriptors: 7 } }, 2);
    expect(batches.flatMap(layersOf)).toEqual(range(0, G.layers));
    expect(Math.max(...batches.map((b) => layersOf(b).length))).toBe(3);
  });

  it('holds a batch to half of decode\'s credit window', async () => {
    // 4 blocks = 8 KiB per layer; a 32 KiB window admits fused batches of 16 KiB: 2 layers.
    const batches = await pushFast({ receiver: { windowBytes: 32 * 1024 } }, 4);
    expect(batches.flatMap(layersOf)).toEqual(range(0, G.layers));
    expect(Math.max(...batches.map((b) => layersOf(b).length))).toBe(2);
    expect(batches.every((b) => b.bytes! <= 16 * 1024)).toBe(true);
  });

  it('sends a layer larger than the cap on its own, as before', async () => {
    const batches = await pushFast({ sender: { maxFusedBytes: LAYER_BLOCK_BYTES } }, 2);
    expect(batches.map((b) => [b.layer, b.lastLayer])).toEqual(range(0, G.layers).map((l) => [l, undefined]));
  });
});

describe('failures in fused batches', () => {
  it('a failed fused batch fails exactly its requests: the other step on the lane and the other lane complete', async () => {
    const trace = new KvTracer();
    const { p, d, sender, receiver } = await setup(G, { sender: { trace } });
    const D2 = await openEngine();
    const d2 = cache(D2, G, G.decodeBlockSize, G.decodeBlocks);
    const receiver2 = new LayerwiseReceiver(D2, d2.layout);
    closers.push(() => receiver2.close());
    const write = p.engine.write.bind(p.engine);
    let injected = 0;
    vi.spyOn(p.engine, 'write').mockImplementation(async (peer, batch, options) => {
      const start = trace.events.at(-1)!; // recorded just before the write is submitted
      await sleep(15);
      if (start.lastLayer !== undefined && start.requests.includes('b1')) {
        injected++;
        throw new TransferError('injected write failure', 'ERR_TIMEOUT');
      }
      return write(peer, batch, options);
    });

    const to = (id: string, engine: TransferEngine, remote: number[], local: number[]) =>
      sender.add({ requestId: id, peer: engine.address!, localBlocks: local, remoteBlocks: remote, tokens: 16 });
    const rA = receiver.expect('a1', { blocks: [0, 1], deadlineMs: 10_000 });
    const rB1 = receiver.expect('b1', { blocks: [2, 3], deadlineMs: 10_000 });
    const rB2 = receiver.expect('b2', { blocks: [4, 5], deadlineMs: 10_000 });
    const rC = receiver2.expect('c1', { blocks: [6, 7], deadlineMs: 10_000 });
    const a1 = to('a1', d.engine, [0, 1], [0, 1]);
    const b1 = to('b1', d.engine, [2, 3], [2, 3]);
    const b2 = to('b2', d.engine, [4, 5], [4, 5]);
    const c1 = to('c1', D2, [6, 7], [6, 7]);
    // Step A's layers are still queued on the lane when step B's become ready.
    sender.step([{ requestId: 'a1', computedTokens: 16 }]);
    allLayersReady(sender, G.layers);
    sender.step(['b1', 'b2', 'c1'].map((requestId) => ({ requestId, computedTokens: 16 })));
    allLayersReady(sender, G.layers);

    await a1.result;
    await c1.result;
    await rA;
    await rC;
    await expect(b1.result).rejects.toMatchObject({ code: 'ERR_TIMEOUT', requestId: 'b1' });
    await expect(b2.result).rejects.toMatchObject({ code: 'ERR_TIMEOUT', requestId: 'b2' });
    await expect(rB1).rejects.toMatchObject({ code: 'ERR_TIMEOUT', invalidBlockIds: [2, 3] });
    await expect(rB2).rejects.toMatchObject({ code: 'ERR_TIMEOUT', invalidBlockIds: [4, 5] });
    await b1.released;
    await b2.released;
    expect(injected).toBe(1); // nothing more of b1/b2 was written after their batch failed
    expect(mismatches(p, d, [0, 1], [0, 1], 0, 2)).toEqual([]);
    expect(mismatches(p, d2, [6, 7], [6, 7], 0, 2)).toEqual([]);
    await waitFor(() => sender.stats.requestsActive === 0, 'FAILED acknowledged by decode');
    expect(sender.stats).toMatchObject({ requestsDone: 2, requestsFailed: 2 });
  });

  it('a bad checksum of one layer inside a fused batch: the layers before it are reported, it and later ones never', async () => {
    const trace = new KvTracer();
    const { p, d, sender, receiver } = await setup(G, { sender: { trace, integrity: true } });
    slowWrites(p.engine, 20);
    sender._misdirect = (_id, layer) => layer === 4;
    const arrived: number[] = [];
    receiver.on('layer', (e: { layer: number }) => arrived.push(e.layer));
    const received = receiver.expect('crc', { blocks: [8, 9], deadlineMs: 10_000 });
    const h = sender.add({ requestId: 'crc', peer: d.engine.address!, localBlocks: [1, 2], remoteBlocks: [8, 9], tokens: 16 });
    allLayersReady(sender, G.layers);
    await expect(received).rejects.toMatchObject({ code: 'ERR_INTEGRITY' });
    await expect(h.result).rejects.toMatchObject({ code: 'ERR_INTEGRITY' });
    await h.released;
    expect(batchesOf(trace).some((b) => b.lastLayer !== undefined && b.layer < 4 && b.lastLayer >= 4)).toBe(true);
    expect(arrived).toEqual([0, 1, 2, 3]);
  });
});

describe('versions of the kv.* messages', () => {
  it('a version-1 decode (no version in its hello reply) gets one layer per notice', async () => {
    const trace = new KvTracer();
    const { p, d, sender, receiver } = await setup(G, { sender: { trace } });
    const notices: Array<Record<string, unknown>> = [];
    // The receiver's handlers, wrapped: its hello answer loses `version`, its notices are recorded.
    type Handler = (body: unknown, context: unknown) => unknown;
    const internals = receiver as unknown as { onHello: Handler; onLayer: Handler };
    const hello = internals.onHello.bind(receiver);
    const layer = internals.onLayer.bind(receiver);
    vi.spyOn(internals, 'onHello').mockImplementation((body, context) => {
      const { version: _dropped, ...v1 } = hello(body, context) as Record<string, unknown>;
      return v1;
    });
    vi.spyOn(internals, 'onLayer').mockImplementation((body, context) => {
      notices.push(body as Record<string, unknown>);
      return layer(body, context);
    });
    slowWrites(p.engine, 15);
    const received = receiver.expect('v1', { blocks: [3, 4], deadlineMs: 10_000 });
    const h = sender.add({ requestId: 'v1', peer: d.engine.address!, localBlocks: [7, 8], remoteBlocks: [3, 4], tokens: 16 });
    allLayersReady(sender, G.layers);
    await h.result;
    await received;
    expect(notices.map((n) => [n.layer, n.layers])).toEqual(range(0, G.layers).map((l) => [l, undefined]));
    expect(sender.stats.fusedBatches).toBe(0);
  });

  describe('raw multi-layer notices', () => {
    async function rawSender(d: Side) {
      const engine = await openEngine({ listen: false });
      const peer = await engine.connect(d.engine.address!);
      const session = 'raw';
      const reply = (await peer.request('kv.hello', { sender: 'R', session, blockSize: d.layout.blockSize, layers: d.layout.layers.map((l) => l.map((t) => t.blockBytes)), version: 2 })) as { version?: number };
      let seq = 0;
      return {
        version: reply.version,
        notice: (body: Record<string, unknown>) => peer.request('kv.layer', { sender: 'R', session, seq: ++seq, bytes: 0, ...body }),
      };
    }

    it('are applied layer by layer: arrivals in order, DONE counts every layer', async () => {
      const { d, receiver } = await setup();
      const raw = await rawSender(d);
      expect(raw.version).toBe(2);
      const arrived: number[] = [];
      receiver.on('layer', (e: { layer: number }) => arrived.push(e.layer));
      const received = receiver.expect('m', { blocks: [1, 2], deadlineMs: 10_000 });
      const entry = { id: 'm', first: 0, end: 2, last: true, final: true };
      expect(await raw.notice({ layer: 0, layers: 3, entries: [entry] })).toEqual({ credit: 0, refused: [] });
      expect(arrived).toEqual([0, 1, 2]);
      await raw.notice({ layer: 3, entries: [entry] }); // a one-layer notice (version 1 form) in between
      const last = await raw.notice({ layer: 4, layers: G.layers - 4, entries: [{ ...entry, done: { end: 2, chunks: G.layers } }] });
      expect(last).toMatchObject({ refused: [], done: [{ id: 'm', ok: true, complete: true }] });
      expect(arrived).toEqual(range(0, G.layers));
      expect(await received).toMatchObject({ chunks: G.layers });
    });

    it('are refused when they hold part of a layer, the wrong number of checksums, or layers past the last', async () => {
      const { d, receiver } = await setup();
      const raw = await rawSender(d);
      const partial = receiver.expect('partial', { blocks: [1], deadlineMs: 10_000 });
      const crcs = receiver.expect('crcs', { blocks: [2], deadlineMs: 10_000 });
      expect(await raw.notice({ layer: 0, layers: 2, entries: [{ id: 'partial', first: 0, end: 1, last: false, final: true }] })).toMatchObject({
        refused: [{ id: 'partial', code: 'ERR_PROTOCOL' }],
      });
      await expect(partial).rejects.toMatchObject({ code: 'ERR_PROTOCOL', invalidBlockIds: [1] });
      expect(await raw.notice({ layer: 0, layers: 2, entries: [{ id: 'crcs', first: 0, end: 1, last: true, final: true, crcs: [1] }] })).toMatchObject({
        refused: [{ id: 'crcs', code: 'ERR_PROTOCOL' }],
      });
      await expect(crcs).rejects.toMatchObject({ code: 'ERR_PROTOCOL' });
      await expect(raw.notice({ layer: G.layers - 1, layers: 2, entries: [] })).rejects.toMatchObject({ code: 'ERR_BAD_ARGUMENT' });
      await expect(raw.notice({ layer: 0, layers: 0, entries: [] })).rejects.toMatchObject({ code: 'ERR_BAD_ARGUMENT' });
    });
  });
});

describe('bad input', () => {
  it('refuses bad fusing options', async () => {
    const { p } = await setup();
    expect(() => new LayerwiseSender(p.engine, p.layout, { fuseLayers: 'yes' as never })).toThrow(expect.objectContaining({ code: 'ERR_BAD_ARGUMENT' }));
    expect(() => new LayerwiseSender(p.engine, p.layout, { maxFusedBytes: 0 })).toThrow(expect.objectContaining({ code: 'ERR_BAD_ARGUMENT' }));
    expect(() => new LayerwiseSender(p.engine, p.layout, { maxFusedDescriptors: 1.5 })).toThrow(expect.objectContaining({ code: 'ERR_BAD_ARGUMENT' }));
  });
});
