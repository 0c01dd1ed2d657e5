/**
 * bench transfer: one process writes (or reads) blocks into another process's
 * registered region through the engine; the figure is printed next to a reference
 * measured in the same run: single-thread memcpy over a working set of the same
 * size (shm), or a raw loopback socket pump with the same number of connections,
 * block size and working set (tcp) — the most a TCP transport can get on this host.
 *
 *   epd-transfer bench transfer --transport shm --block 1MiB --batch 64 [--threads n] [--json]
 *   epd-transfer bench transfer --transport tcp --connections 2 --block 64KiB --batch 128 [--json]
 *
 * The working set (default 512 MiB per side) is larger than the CPU caches and the
 * offsets rotate through it, so both figures are DRAM-bound like real KV traffic.
 * At the end the whole region is written once more and its hash compared on both
 * sides: the run fails if one byte differs.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { DescriptorBatch, TransferEngine, type Peer, type Region } from '../lib/engine.js';
import { TransferError } from '../lib/errors.js';
import { native } from '../lib/native.js';
import { formatBytes, parseBytes } from '../lib/validate.js';
import { environment, fillPattern, nextMessage, printTable, round, spread } from './common.js';

export interface TransferBenchOptions {
  transport: 'shm' | 'tcp';
  /** tcp: data connections of the peer, and of the reference pump. */
  connections?: number;
  op: 'write' | 'read';
  blockBytes: number;
  batch: number;
  threads?: number;
  inflight: number;
  regionBytes: number;
  runs: number;
  runMillis: number;
}

export interface TransferBenchResult {
  transport: string;
  /** tcp only: data connections (and pump connections). */
  connections?: number;
  op: string;
  blockBytes: number;
  batch: number;
  threads: number;
  inflight: number;
  regionBytes: number;
  runs: number;
  gbps: number;
  gbpsMin: number;
  gbpsMax: number;
  referenceGbps: number;
  reference: string;
  ratio: number;
  descriptorsPerSec: number;
  verified: boolean;
  environment: Record<string, unknown>;
}

const TARGET_FLAG = '--bench-transfer-target';

function sha1(buf: Buffer): string {
  return createHash('sha1').update(buf).digest('hex');
}

/** The target's answer to `msg` (or, without one, its first message). */
function request<T>(child: ChildProcess, msg?: object): Promise<T> {
  return nextMessage<T>(child, 'bench target', msg);
}

/** Child side: an engine with one region, answering hash requests. */
async function runTarget(): Promise<void> {
  const regionBytes = Number(process.env.EPD_BENCH_REGION);
  const engine = await TransferEngine.open();
  const region = engine.allocate(regionBytes);
  fillPattern(region.buffer!, 7);
  let pumpHandle: object | null = null;
  process.on('message', async (m: { cmd: string; connections?: number; blockBytes?: number }) => {
    if (m.cmd === 'hash') process.send!({ hash: sha1(region.buffer!) });
    // The receiving end of the reference pump lives here, where the transport's does.
    if (m.cmd === 'pump-listen') {
      const r = native.tcpPumpReceiver(m.connections!, m.blockBytes!, region.buffer!);
      pumpHandle = r.handle;
      process.send!({ port: r.port });
    }
    if (m.cmd === 'pump-close') {
      if (pumpHandle) native.tcpPumpReceiverClose(pumpHandle);
      pumpHandle = null;
      process.send!({});
    }
    if (m.cmd === 'exit') {
      await engine.close();
      process.exit(0);
    }
  });
  process.on('disconnect', () => process.exit(0));
  process.send!({ address: engine.address, region: region.id });
}

function slotsOf(opts: TransferBenchOptions): number {
  return Math.floor(opts.regionBytes / opts.blockBytes);
}

async function pump(
  engine: TransferEngine,
  peer: Peer,
  local: Region,
  remoteRegion: number,
  opts: TransferBenchOptions,
  state: { slot: number },
  untilMs: number,
): Promise<{ bytes: number; descriptors: number; seconds: number }> {
  const slots = slotsOf(opts);
  const batches = Array.from({ length: opts.inflight }, () => new DescriptorBatch(opts.batch));
  let bytes = 0;
  let descriptors = 0;
  const start = performance.now();
  const lane = async (b: DescriptorBatch) => {
    while (performance.now() < untilMs) {
      b.clear();
      for (let i = 0; i < opts.batch; i++) {
        const off = state.slot * opts.blockBytes;
        b.add(local, off, remoteRegion, off, opts.blockBytes);
        state.slot = state.slot + 1 === slots ? 0 : state.slot + 1;
      }
      const r = opts.op === 'write' ? await engine.write(peer, b) : await engine.read(peer, b);
      bytes += r.bytes;
      descriptors += r.descriptors;
    }
  };
  await Promise.all(batches.map(lane));
  return { bytes, descriptors, seconds: (performance.now() - start) / 1000 };
}

/** One full pass over the region in slot order, so every byte is written once. */
async function fullPass(engine: TransferEngine, peer: Peer, local: Region, remoteRegion: number, opts: TransferBenchOptions): Promise<void> {
  const slots = slotsOf(opts);
  const b = new DescriptorBatch(opts.batch);
  for (let s = 0; s < slots; ) {
    b.clear();
    for (let i = 0; i < opts.batch && s < slots; i++, s++) b.add(local, s * opts.blockBytes, remoteRegion, s * opts.blockBytes, opts.blockBytes);
    await (opts.op === 'write' ? engine.write(peer, b) : engine.read(peer, b));
  }
}

export async function runTransferBench(opts: TransferBenchOptions): Promise<TransferBenchResult> {
  if (opts.transport !== 'shm' && opts.transport !== 'tcp') {
    throw new TransferError(`transport '${opts.transport}' is not built into this version`, 'ERR_BACKEND_UNAVAILABLE');
  }
  const tcp = opts.transport === 'tcp';
  const connections = opts.connections ?? 2;
  if (opts.blockBytes > opts.regionBytes) throw new TransferError('--block is larger than --region', 'ERR_BAD_ARGUMENT');
  // A whole number of blocks, so the final pass covers every byte that is hashed.
  opts = { ...opts, regionBytes: slotsOf(opts) * opts.blockBytes };
  const self = fileURLToPath(import.meta.url);
  const child = fork(self, [TARGET_FLAG], { env: { ...process.env, EPD_BENCH_REGION: String(opts.regionBytes) }, stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const engine = await TransferEngine.open({ threads: opts.threads, listen: false });
  try {
    const target = await request<{ address: string; region: number }>(child);
    const local = engine.allocate(opts.regionBytes);
    fillPattern(local.buffer!, 12345);
    const reference = engine.allocate(opts.regionBytes);
    const peer = await engine.connect(target.address, tcp ? { transport: 'tcp', connections } : { transport: 'shm' });

    // Warm-up: fault in both mappings and the code paths.
    await fullPass(engine, peer, local, target.region, opts);

    const refRuns: number[] = [];
    const rates: number[] = [];
    const state = { slot: 0 };
    let descriptors = 0;
    let seconds = 0;
    for (let r = 0; r < opts.runs; r++) {
      if (tcp) {
        // Sender here, receiver in the target process: the topology of the transport itself.
        const { port } = await request<{ port: number }>(child, { cmd: 'pump-listen', connections, blockBytes: opts.blockBytes });
        refRuns.push(native.tcpPumpSend(port, connections, opts.blockBytes, local.buffer!, Math.min(500, opts.runMillis)));
        await request(child, { cmd: 'pump-close' });
      } else {
        refRuns.push(native.memcpyBandwidth(reference.buffer!, local.buffer!, opts.blockBytes, Math.min(300, opts.runMillis)));
      }
      const run = await pump(engine, peer, local, target.region, opts, state, performance.now() + opts.runMillis);
      rates.push(run.bytes / run.seconds / 1e9);
      descriptors += run.descriptors;
      seconds += run.seconds;
    }

    // Verification: for writes the target must equal our source; for reads, we
    // overwrite our region from the target and compare with its hash.
    if (opts.op === 'write') fillPattern(local.buffer!, 999);
    await fullPass(engine, peer, local, target.region, opts);
    const { hash } = await request<{ hash: string }>(child, { cmd: 'hash' });
    const verified = hash === sha1(local.buffer!);
    if (!verified) throw new TransferError('verification failed: target bytes differ from the source', 'ERR_SYSTEM');

    const g = spread(rates);
    const ref = spread(refRuns);
    return {
      transport: opts.transport,
      ...(tcp ? { connections } : {}),
      op: opts.op,
      blockBytes: opts.blockBytes,
      batch: opts.batch,
      threads: engine.capabilities().threads,
      inflight: opts.inflight,
      regionBytes: opts.regionBytes,
      runs: opts.runs,
      gbps: round(g.median),
      gbpsMin: round(g.min),
      gbpsMax: round(g.max),
      referenceGbps: round(ref.median),
      reference: tcp
        ? `raw loopback TCP socket pump between the same two processes, ${connections} connection(s), same block size, same working-set size, same run`
        : 'single-thread memcpy, same block size, same working-set size, same run',
      ratio: round(g.median / ref.median, 3),
      descriptorsPerSec: Math.round(descriptors / seconds),
      verified,
      environment: environment(),
    };
  } finally {
    await engine.close();
    child.send({ cmd: 'exit' });
  }
}

export function printTransferResult(r: TransferBenchResult): void {
  printTable(`epd-transfer bench transfer (${r.transport}, ${r.op})`, [
    [
      'block × batch',
      `${formatBytes(r.blockBytes)} × ${r.batch}  (${r.inflight} batches in flight, ${r.connections ? `${r.connections} connections` : `${r.threads} threads`})`,
    ],
    ['working set', `${formatBytes(r.regionBytes)} per side`],
    ['transfer', `${r.gbps} GB/s  (median of ${r.runs}; ${r.gbpsMin}–${r.gbpsMax})`],
    [r.connections ? 'socket reference' : 'memcpy reference', `${r.referenceGbps} GB/s  (${r.reference})`],
    ['ratio', String(r.ratio)],
    ['descriptors/s', r.descriptorsPerSec.toLocaleString('en-US')],
    ['verified', r.verified ? 'yes (hash of the whole target region matches)' : 'NO'],
  ]);
}

export function defaultTransferOptions(): TransferBenchOptions {
  return { transport: 'shm', op: 'write', blockBytes: 1 << 20, batch: 64, inflight: 2, regionBytes: 512 << 20, runs: 5, runMillis: 600 };
}

export { parseBytes };

if (process.argv.includes(TARGET_FLAG)) {
  runTarget().catch((err) => {
    console.error(err);
    process.exit(1);
  });
}
