/**
 * bench layerwise: how much of the KV transfer the layerwise push hides behind
 * prefill compute.
 *
 *   epd-transfer bench layerwise --model llama3-8b --tokens 4096 [--link 4GB/s] [--transport shm] [--no-fuse] [--json]
 *
 * A *simulated* prefill runs in this process: per layer, a device stream sleeps the
 * layer's compute time from the model profile (lib/sim/profiles.ts, reference
 * accelerator stated there) and then really writes the layer's KV (a memcpy of
 * the layer's bytes into the paged cache, in device memory); an event recorded after
 * it is the layer's ready signal. A decode engine with a LayerwiseReceiver runs in a
 * child process. Two modes are timed, alternating:
 *
 * - layerwise: the LayerwiseSender pushes each layer as soon as its event completes;
 *   TTFT ends when decode acknowledged DONE.
 * - bulk: after the last layer's event, all layers go in one batch, then one
 *   control round trip tells decode; TTFT ends at its acknowledgement.
 *
 * The exposed tail is the layerwise TTFT after the last layer's compute; tailRatio
 * divides it by the last layer's own transfer time (1.0 = only the last layer shows).
 * `batchesPerLayer` is the batches a layerwise push wrote per layer: 1 when every layer
 * went alone, less when layers that were ready together were fused (short prompts,
 * whose layers compute faster than a write round trip; `--no-fuse` turns fusing off).
 * At the end decode's blocks are checksummed against prefill's: a mismatch fails the run.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import zlib from 'node:zlib';
import { DeviceEvent } from '../lib/device.js';
import { DescriptorBatch, TransferEngine, type ConnectOptions } from '../lib/engine.js';
import { TransferError } from '../lib/errors.js';
import { KvLayout } from '../lib/kv/layout.js';
import { blockRuns, planLayer } from '../lib/kv/plan.js';
import { LayerwiseReceiver } from '../lib/kv/receiver.js';
import { LayerwiseSender } from '../lib/kv/sender.js';
import { KvTracer, mergeChromeTraces, type ChromeTraceEvent } from '../lib/kv/trace.js';
import { parseBandwidth } from '../lib/link.js';
import { getProfile, kvTensors, layerPrefillUs, REFERENCE_ACCELERATOR, type ModelProfile } from '../lib/sim/profiles.js';
import { formatBytes } from '../lib/validate.js';
import { environment, nextMessage, printTable, round, spread } from './common.js';

export interface LayerwiseBenchOptions {
  model: string;
  tokens: number;
  /** Emulated link bandwidth, e.g. '4GB/s'; undefined: unpaced. */
  link?: string;
  transport: 'shm' | 'tcp';
  /** Measured runs of each mode (median reported). */
  runs: number;
  /** Checksum every layer (verified by decode). */
  integrity: boolean;
  /** Write a Chrome trace (prefill + decode) of the last layerwise run here. */
  trace?: string;
  /** Fuse layers that are ready together (the sender's `fuseLayers`). Default true. */
  fuse?: boolean;
}

export interface LayerwiseBenchResult {
  simulation: string;
  model: string;
  tokens: number;
  layers: number;
  transport: string;
  link: string | null;
  linkGBps: number | null;
  integrity: boolean;
  /** KV bytes of the request (all layers). */
  bytes: number;
  bytesPerLayer: number;
  /** Profile compute time of one layer. */
  layerComputeMs: number;
  /** Measured prefill compute (all layers, including the KV writes). */
  computeMs: number;
  ttftLayerwiseMs: number;
  ttftBulkMs: number;
  /** ttftBulkMs / ttftLayerwiseMs. */
  speedup: number;
  /** Bulk: TTFT after the last layer's compute (the whole transfer is exposed). */
  bulkExposedMs: number;
  /** Layerwise: TTFT after the last layer's compute. */
  exposedTailMs: number;
  lastLayerTransferMs: number;
  tailRatio: number;
  /** The sender's `fuseLayers`. */
  fuseLayers: boolean;
  /** Batches (engine writes, each with one notice) of one layerwise push, median over runs. */
  batches: number;
  /** batches ÷ layers: 1 = one batch per layer; less = layers fused. */
  batchesPerLayer: number;
  /** Bulk transfer rate, GB/s (1e9 bytes/s). */
  gbps: number;
  bulkTransferMs: number;
  ttftLayerwiseSpread: [number, number];
  ttftBulkSpread: [number, number];
  runs: number;
  verified: boolean;
  reference: string;
  environment: Record<string, unknown>;
}

const DECODE_FLAG = '--bench-layerwise-decode';
const TOPIC_BULK = 'bench.bulk-done';

interface Geometry {
  layers: number;
  blockSize: number;
  numBlocks: number;
  tensors: ReturnType<typeof kvTensors>;
}

function geometryOf(profile: ModelProfile, tokens: number): Geometry {
  return { layers: profile.layers, blockSize: profile.blockSize, numBlocks: Math.ceil(tokens / profile.blockSize), tensors: kvTensors(profile) };
}

/** CRC-32 of every tensor's first `blocks` blocks, layer by layer, read with `read(offset, length)`. */
function digest(layout: KvLayout, blocks: number, read: (offset: number, length: number) => Buffer): number[] {
  return layout.layers.flatMap((layer) => layer.map((t) => zlib.crc32(read(t.offset, t.blockBytes * blocks))));
}

// ---- decode (child process) ------------------------------------------------------------------

async function runDecode(): Promise<void> {
  const { geometry, windowBytes } = JSON.parse(process.env.EPD_BENCH_LAYERWISE!) as { geometry: Geometry; windowBytes: number };
  const engine = await TransferEngine.open();
  const region = engine.allocate(KvLayout.packedBytes(geometry));
  const layout = KvLayout.packed(region, geometry);
  const trace = new KvTracer('decode (bench)');
  const receiver = new LayerwiseReceiver(engine, layout, { windowBytes, trace });
  engine.handle(TOPIC_BULK, () => ({ ok: true }));
  const pending = new Map<string, Promise<unknown>>();
  process.on('message', async (m: { cmd: string; id?: string; deadlineMs?: number }) => {
    if (m.cmd === 'expect') {
      trace.clear();
      const blocks = Array.from({ length: geometry.numBlocks }, (_, i) => i);
      pending.set(m.id!, receiver.expect(m.id!, { blocks, deadlineMs: m.deadlineMs! }));
      process.send!({ ok: true });
    } else if (m.cmd === 'outcome') {
      const p = pending.get(m.id!)!;
      pending.delete(m.id!);
      process.send!(await p.then(() => ({ ok: true }), (e: Error) => ({ ok: false, error: e.message })));
    } else if (m.cmd === 'digest') {
      process.send!({ digest: digest(layout, geometry.numBlocks, (o, n) => region.buffer!.subarray(o, o + n)) });
    } else if (m.cmd === 'trace') {
      process.send!({ trace: trace.toChromeTrace() });
    } else if (m.cmd === 'exit') {
      receiver.close();
      await engine.close();
      process.exit(0);
    }
  });
  process.on('disconnect', () => process.exit(0));
  process.send!({ address: engine.address, region: region.id });
}

function ask<T>(child: ChildProcess, msg: object | null): Promise<T> {
  return nextMessage<T>(child, 'bench decode process', msg ?? undefined);
}

// ---- prefill (this process) ------------------------------------------------------------------

interface Prefill {
  layout: KvLayout;
  basePtr: bigint;
  sourcePtr: bigint;
  /** Bytes of the request in one tensor of one layer. */
  usedBytes: number[];
  layerUs: number;
}

/** Enqueues the simulated prefill: per layer, compute (sleep) then the KV write, then the layer's event. */
function enqueuePrefill(pf: Prefill, stream: ReturnType<TransferEngine['device']['createStream']>, events: DeviceEvent[]): void {
  pf.layout.layers.forEach((layer, l) => {
    stream.sleep(Math.round(pf.layerUs));
    layer.forEach((t, i) => stream.copy(pf.basePtr + BigInt(t.offset), pf.sourcePtr + BigInt(l * 4096 + i * 64), pf.usedBytes[i]));
    events[l].record(stream);
  });
}

export async function runLayerwiseBench(opts: LayerwiseBenchOptions): Promise<LayerwiseBenchResult> {
  const profile = getProfile(opts.model);
  const g = geometryOf(profile, opts.tokens);
  const linkBytesPerSec = opts.link === undefined ? null : parseBandwidth(opts.link, '--link');
  const bytesPerLayer = kvTensors(profile).reduce((s, t) => s + t.bytesPerToken, 0) * opts.tokens;
  const layerUs = layerPrefillUs(profile, opts.tokens);
  const windowBytes = Math.max(256 << 20, 2 * g.blockSize * g.numBlocks * kvTensors(profile).reduce((s, t) => s + t.bytesPerToken, 0));

  const engine = await TransferEngine.open({ listen: false });
  if (!engine.capabilities().transports.includes(opts.transport)) {
    await engine.close();
    throw new TransferError(`transport '${opts.transport}' is not built into this version`, 'ERR_BACKEND_UNAVAILABLE');
  }
  const child = fork(fileURLToPath(import.meta.url), [DECODE_FLAG], {
    env: { ...process.env, EPD_BENCH_LAYERWISE: JSON.stringify({ geometry: g, windowBytes }) },
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  const allocations: bigint[] = [];
  const registered: Array<{ free(): Promise<void> }> = [];
  try {
    const { address, region: decodeRegion } = await ask<{ address: string; region: number }>(child, null);
    const connectOptions: ConnectOptions = { transport: opts.transport };
    if (opts.link !== undefined) connectOptions.link = { bandwidth: opts.link };
    const peer = await engine.connect(address, connectOptions);

    // Prefill's paged cache in device memory, and the source of the KV it writes.
    const cacheBytes = KvLayout.packedBytes(g);
    const base = engine.device.alloc(cacheBytes);
    allocations.push(base.ptr);
    const region = engine.register({ devicePtr: base.ptr, length: cacheBytes });
    registered.push(region);
    const layout = KvLayout.packed(region, g);
    const usedBytes = layout.layers[0].map((t) => t.blockBytes * g.numBlocks);
    const sourceBytes = Math.max(...usedBytes) + g.layers * 4096 + 64 * usedBytes.length;
    const source = engine.device.alloc(sourceBytes);
    allocations.push(source.ptr);
    for (let off = 0; off < sourceBytes; off += 64 << 20) {
      const chunk = randomFillSync(Buffer.allocUnsafe(Math.min(64 << 20, sourceBytes - off)));
      engine.device.write(source.ptr + BigInt(off), chunk);
    }
    const blocks = Array.from({ length: g.numBlocks }, (_, i) => i);
    const pf: Prefill = { layout, basePtr: base.ptr, sourcePtr: source.ptr, usedBytes, layerUs };

    // The bulk batch: every layer's blocks, planned like the layerwise ones (decode packs its cache the same way).
    const runs = blockRuns(blocks, blocks, 0, g.numBlocks);
    const bulk = new DescriptorBatch(g.layers * layout.tensorsPerLayer);
    layout.layers.forEach((layer) => {
      const local = layer.map((t) => ({ region: region.id, offset: t.offset, blockBytes: t.blockBytes }));
      const remote = layer.map((t) => ({ region: decodeRegion, offset: t.offset, blockBytes: t.blockBytes }));
      const plan = planLayer([{ peer: 0, runs, remote }], local).get(0)!;
      for (let i = 0; i < plan.descriptors.length; i += 5) bulk.add(plan.descriptors[i], plan.descriptors[i + 1], plan.descriptors[i + 2], plan.descriptors[i + 3], plan.descriptors[i + 4]);
    });

    const trace = new KvTracer('prefill (bench)');
    const fuseLayers = opts.fuse !== false;
    const sender = new LayerwiseSender(engine, layout, { integrity: opts.integrity, trace, ackTimeoutMs: 30_000, signalTimeoutMs: 120_000, fuseLayers });
    const deadlineMs = Math.ceil(layerUs / 1000) * g.layers * 4 + 60_000;
    let seq = 0;

    const layerwise = async () => {
      const id = `lw-${process.pid}-${seq++}`;
      await ask(child, { cmd: 'expect', id, deadlineMs });
      trace.clear();
      const stream = engine.device.createStream();
      const events = layout.layers.map(() => engine.device.createEvent());
      const t0 = performance.now();
      const t0Epoch = (performance.timeOrigin + t0) * 1000;
      enqueuePrefill(pf, stream, events);
      const h = sender.add({ requestId: id, peer, localBlocks: blocks, remoteBlocks: blocks, tokens: opts.tokens });
      events.forEach((ev, l) => sender.layerReady(l, ev));
      await h.result;
      const tEnd = performance.now();
      const outcome = await ask<{ ok: boolean; error?: string }>(child, { cmd: 'outcome', id });
      if (!outcome.ok) throw new TransferError(`decode did not complete: ${outcome.error}`, 'ERR_REMOTE');
      const last = g.layers - 1;
      const ready = trace.events.find((e) => e.phase === 'ready' && e.layer === last)!;
      const computeEnd = (ready.ts - t0Epoch) / 1000;
      const lastLayer = trace.summary(id).find((s) => s.layer === last)!;
      const batches = trace.events.filter((e) => e.phase === 'sendStart').length;
      stream.destroy();
      events.forEach((e) => e.destroy());
      return { ttft: tEnd - t0, computeEnd, exposed: tEnd - t0 - computeEnd, lastTransfer: lastLayer.transferMs, batches };
    };

    const bulkRun = async () => {
      const stream = engine.device.createStream();
      const events = layout.layers.map(() => engine.device.createEvent());
      const t0 = performance.now();
      enqueuePrefill(pf, stream, events);
      await events[g.layers - 1].synchronize(deadlineMs);
      const computeEnd = performance.now() - t0;
      const w0 = performance.now();
      await engine.write(peer, bulk, { timeoutMs: deadlineMs });
      const transfer = performance.now() - w0;
      await peer.request(TOPIC_BULK, {}, { timeoutMs: 30_000 });
      const ttft = performance.now() - t0;
      stream.destroy();
      events.forEach((e) => e.destroy());
      return { ttft, computeEnd, transfer };
    };

    // Warm-up of both paths, then alternate.
    await bulkRun();
    await layerwise();
    const lw: Awaited<ReturnType<typeof layerwise>>[] = [];
    const bk: Awaited<ReturnType<typeof bulkRun>>[] = [];
    for (let r = 0; r < opts.runs; r++) {
      bk.push(await bulkRun());
      lw.push(await layerwise());
    }

    // Verification: decode's blocks hold exactly prefill's bytes.
    const scratch = Buffer.allocUnsafe(Math.min(64 << 20, Math.max(...usedBytes)));
    const local = digest(layout, g.numBlocks, (offset, length) => {
      const out = Buffer.allocUnsafe(length);
      for (let o = 0; o < length; o += scratch.length) {
        const n = Math.min(scratch.length, length - o);
        engine.device.read(out.subarray(o, o + n), base.ptr + BigInt(offset + o));
      }
      return out;
    });
    const remote = (await ask<{ digest: number[] }>(child, { cmd: 'digest' })).digest;
    const verified = local.length === remote.length && local.every((v, i) => v === remote[i]);
    if (!verified) throw new TransferError('verification failed: decode blocks differ from prefill blocks', 'ERR_INTEGRITY');

    if (opts.trace) {
      const decodeTrace = (await ask<{ trace: { traceEvents: ChromeTraceEvent[] } }>(child, { cmd: 'trace' })).trace;
      writeFileSync(opts.trace, JSON.stringify(mergeChromeTraces(trace.toChromeTrace(), decodeTrace)));
    }
    await sender.close();

    const ttftLw = spread(lw.map((r) => r.ttft));
    const ttftBulk = spread(bk.map((r) => r.ttft));
    const exposed = spread(lw.map((r) => r.exposed)).median;
    const lastTransfer = spread(lw.map((r) => r.lastTransfer)).median;
    const bulkTransfer = spread(bk.map((r) => r.transfer)).median;
    const batches = spread(lw.map((r) => r.batches)).median;
    const bytes = bytesPerLayer * g.layers;
    return {
      simulation: `simulated prefill: per-layer compute from the ${profile.id} profile on the ${REFERENCE_ACCELERATOR.name} (derived, see lib/sim/profiles.ts), real KV bytes written and transferred`,
      model: profile.id,
      tokens: opts.tokens,
      layers: g.layers,
      transport: opts.transport,
      link: opts.link ?? null,
      linkGBps: linkBytesPerSec === null ? null : round(linkBytesPerSec / 1e9, 3),
      integrity: opts.integrity,
      bytes,
      bytesPerLayer,
      layerComputeMs: round(layerUs / 1000, 3),
      computeMs: round(spread(bk.map((r) => r.computeEnd)).median),
      ttftLayerwiseMs: round(ttftLw.median),
      ttftBulkMs: round(ttftBulk.median),
      speedup: round(ttftBulk.median / ttftLw.median, 3),
      bulkExposedMs: round(spread(bk.map((r) => r.ttft - r.computeEnd)).median, 3),
      exposedTailMs: round(exposed, 3),
      lastLayerTransferMs: round(lastTransfer, 3),
      tailRatio: round(exposed / lastTransfer, 3),
      fuseLayers,
      batches,
      batchesPerLayer: round(batches / g.layers, 3),
      gbps: round(bytes / (bulkTransfer / 1000) / 1e9, 3),
      bulkTransferMs: round(bulkTransfer),
      ttftLayerwiseSpread: [round(ttftLw.min), round(ttftLw.max)],
      ttftBulkSpread: [round(ttftBulk.min), round(ttftBulk.max)],
      runs: opts.runs,
      verified,
      reference:
        linkBytesPerSec === null
          ? `unpaced ${opts.transport} (no link emulation): the transfer runs at memcpy speed`
          : `emulated link ${opts.link} = ${round(linkBytesPerSec / 1e9, 3)} GB/s over ${opts.transport}`,
      environment: { ...environment(), accelerator: REFERENCE_ACCELERATOR.name },
    };
  } finally {
    if (child.connected) child.send({ cmd: 'exit' });
    for (const r of registered) await r.free().catch(() => {});
    for (const ptr of allocations) engine.device.free(ptr);
    await engine.close();
  }
}

export function printLayerwiseResult(r: LayerwiseBenchResult): void {
  printTable(`epd-transfer bench layerwise (${r.model}, ${r.tokens} tokens, ${r.transport}${r.link ? `, link ${r.link}` : ''}) — simulated prefill`, [
    ['KV', `${formatBytes(r.bytes)} (${formatBytes(r.bytesPerLayer)} × ${r.layers} layers)`],
    ['compute', `${r.computeMs} ms (${r.layerComputeMs} ms per layer from the profile, plus the KV writes)`],
    ['TTFT layerwise', `${r.ttftLayerwiseMs} ms  (median of ${r.runs}; ${r.ttftLayerwiseSpread[0]}–${r.ttftLayerwiseSpread[1]})`],
    ['TTFT bulk', `${r.ttftBulkMs} ms  (${r.ttftBulkSpread[0]}–${r.ttftBulkSpread[1]}); bulk transfer ${r.bulkTransferMs} ms = ${r.gbps} GB/s`],
    ['speedup', `${r.speedup}× (bulk ÷ layerwise)`],
    ['exposed tail', `${r.exposedTailMs} ms after the last layer's compute (bulk: ${r.bulkExposedMs} ms)`],
    ['last layer transfer', `${r.lastLayerTransferMs} ms`],
    ['batches', `${r.batches} for ${r.layers} layers = ${r.batchesPerLayer} per layer (layer fusing ${r.fuseLayers ? 'on' : 'off'})`],
    ['tailRatio', `${r.tailRatio} (1.0 = only the last layer's transfer is exposed)`],
    ['reference', r.reference],
    ['verified', r.verified ? 'yes (CRC-32 of every decode tensor matches prefill)' : 'NO'],
  ]);
}

if (process.argv.includes(DECODE_FLAG)) {
  runDecode().catch((err) => {
    console.error(err);
    process.exit(1);
  });
}

