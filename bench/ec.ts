/**
 * bench ec: one process saves an embedding into a shared encoder-cache store, other
 * processes load it. Each loader reports its load latency and GB/s next to memcpy
 * of the same number of bytes measured in the same process in the same run
 * (`ratio`), and how many hit / miss lookups per second one process makes. The
 * reference and the loads alternate in slices of 16 copies each; `ratio` is the
 * median over runs of (median load GB/s ÷ median reference GB/s) within a run.
 *
 *   epd-transfer bench ec --bytes 18MiB|64MiB [--processes n] [--runs 5] [--json]
 *
 * Loaders are measured one after another, so on a small machine they do not share
 * cores with each other. Every loader verifies the bytes it loaded against the
 * saver's SHA-256 before it measures anything.
 */
import { fork } from 'node:child_process';
import { createHash } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { EncoderCacheStore } from '../lib/ec/store.js';
import { TransferError } from '../lib/errors.js';
import { native } from '../lib/native.js';
import { formatBytes } from '../lib/validate.js';
import { environment, fillPattern, nextMessage, printTable, round, spread, type Spread } from './common.js';

export interface EcBenchOptions {
  bytes: number;
  /** Loader processes. */
  processes: number;
  runs: number;
  /** Length of one measured run, ms. */
  runMillis: number;
}

interface LoaderResult {
  pid: number;
  verified: boolean;
  loadMs: Spread;
  loadGbps: Spread;
  referenceGbps: Spread;
  ratio: number;
  acquireReleasePerSec: number;
  hitLookupsPerSec: number;
  missLookupsPerSec: number;
}

export interface EcBenchResult {
  bytes: number;
  processes: number;
  runs: number;
  loadMs: number;
  loadMsMin: number;
  loadMsMax: number;
  loadGbps: number;
  referenceGbps: number;
  reference: string;
  ratio: number;
  saveMs: number;
  firstSaveMs: number;
  acquireReleasePerSec: number;
  hitLookupsPerSec: number;
  missLookupsPerSec: number;
  verified: boolean;
  loaders: LoaderResult[];
  environment: Record<string, unknown>;
}

const ROLE = 'EPD_BENCH_EC_ROLE';
const KEY = 'bench-embedding';

function sha256(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}

/** Calls `fn` for `ms` and returns calls per second. */
function rate(ms: number, fn: (i: number) => void): number {
  let n = 0;
  const start = performance.now();
  const until = start + ms;
  while (performance.now() < until) {
    for (let i = 0; i < 1000; i++) fn(n++);
  }
  return n / ((performance.now() - start) / 1000);
}

/** Saver: saves once into fresh memory, then repeatedly into reused memory, and stays attached. */
async function runSaver(): Promise<void> {
  const o = JSON.parse(process.env.EPD_BENCH_EC!) as { name: string; bytes: number; runs: number };
  const store = await EncoderCacheStore.open({ name: o.name });
  const src = Buffer.allocUnsafe(o.bytes);
  fillPattern(src, 0x5eed);
  let t = performance.now();
  await store.save(KEY, src);
  const firstSaveMs = performance.now() - t;
  const warm: number[] = [];
  for (let r = 0; r < Math.max(3, o.runs); r++) {
    const key = `${KEY}-again`;
    t = performance.now();
    await store.save(key, src);
    warm.push(performance.now() - t);
    store.delete(key);
  }
  process.send!({ hash: sha256(src), firstSaveMs, saveMs: spread(warm).median });
  process.on('message', async () => {
    await store.close();
    process.exit(0);
  });
  process.on('disconnect', () => process.exit(0));
}

/** Loader: verifies, then measures loads, the memcpy reference, and lookups. */
async function runLoader(): Promise<void> {
  const o = JSON.parse(process.env.EPD_BENCH_EC!) as { name: string; bytes: number; runs: number; runMillis: number; hash: string };
  const store = await EncoderCacheStore.open({ name: o.name });
  const target = Buffer.alloc(o.bytes); // zero-filled: its pages are touched
  const loaded = await store.load(KEY, target);
  const verified = loaded?.bytes === o.bytes && sha256(target) === o.hash;
  if (!verified) throw new TransferError('verification failed: loaded bytes differ from the saved ones', 'ERR_SYSTEM');
  // The reference copies the same number of bytes between two private buffers.
  const refSrc = Buffer.from(target);
  const refDst = Buffer.alloc(o.bytes);
  for (let i = 0; i < 3; i++) await store.load(KEY, target); // warm-up

  // Reference and loads alternate in short slices (16 copies each), so both see the
  // same machine: a neighbour's burst slows both sides of a pair, not one figure.
  const loadMs: number[] = [];
  const loadGbps: number[] = [];
  const referenceGbps: number[] = [];
  const ratios: number[] = [];
  for (let r = 0; r < o.runs; r++) {
    const until = performance.now() + o.runMillis;
    const times: number[] = [];
    const refSlices: number[] = [];
    const loadSlices: number[] = [];
    do {
      refSlices.push(native.memcpyBandwidth(refDst, refSrc, o.bytes, 0)); // 16 copies
      let elapsed = 0;
      for (let i = 0; i < 16; i++) {
        const t = performance.now();
        await store.load(KEY, target);
        const dt = performance.now() - t;
        times.push(dt);
        elapsed += dt;
      }
      loadSlices.push((16 * o.bytes) / (elapsed / 1000) / 1e9);
    } while (performance.now() < until);
    loadMs.push(spread(times).median);
    const load = spread(loadSlices).median;
    const ref = spread(refSlices).median;
    loadGbps.push(load);
    referenceGbps.push(ref);
    ratios.push(load / ref);
  }
  const misses = Array.from({ length: 1024 }, (_, i) => `absent-${i.toString(16).padStart(60, '0')}`);
  const hitLookupsPerSec = rate(300, () => {
    if (!store.has(KEY)) throw new TransferError('lost the entry', 'ERR_SYSTEM');
  });
  const missLookupsPerSec = rate(300, (i) => {
    if (store.has(misses[i & 1023])) throw new TransferError('found an absent key', 'ERR_SYSTEM');
  });
  const acquireReleasePerSec = rate(300, () => store.acquire(KEY)!.release());
  const g = spread(loadGbps);
  const ref = spread(referenceGbps);
  const result: LoaderResult = {
    pid: process.pid,
    verified,
    loadMs: spread(loadMs),
    loadGbps: g,
    referenceGbps: ref,
    ratio: spread(ratios).median,
    acquireReleasePerSec,
    hitLookupsPerSec,
    missLookupsPerSec,
  };
  await store.close();
  process.send!(result);
  process.disconnect();
}

export async function runEcBench(opts: EcBenchOptions): Promise<EcBenchResult> {
  const name = `bench-ec-${process.pid}`;
  const store = await EncoderCacheStore.open({ name, capacity: opts.bytes * 2 + (1 << 20) });
  const self = fileURLToPath(import.meta.url);
  const spawnRole = (role: string, extra: Record<string, unknown>) =>
    fork(self, [], {
      env: { ...process.env, [ROLE]: role, EPD_BENCH_EC: JSON.stringify({ name, ...opts, ...extra }) },
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    });
  const saver = spawnRole('saver', {});
  try {
    const saved = await nextMessage<{ hash: string; firstSaveMs: number; saveMs: number }>(saver, 'bench child');
    const loaders: LoaderResult[] = [];
    for (let i = 0; i < opts.processes; i++) {
      const loader = spawnRole('loader', { hash: saved.hash });
      loaders.push(await nextMessage<LoaderResult>(loader, 'bench child'));
    }
    const median = (f: (l: LoaderResult) => number) => spread(loaders.map(f)).median;
    const loadGbps = median((l) => l.loadGbps.median);
    const referenceGbps = median((l) => l.referenceGbps.median);
    return {
      bytes: opts.bytes,
      processes: opts.processes,
      runs: opts.runs,
      loadMs: round(median((l) => l.loadMs.median), 3),
      loadMsMin: round(Math.min(...loaders.map((l) => l.loadMs.min)), 3),
      loadMsMax: round(Math.max(...loaders.map((l) => l.loadMs.max)), 3),
      loadGbps: round(loadGbps),
      referenceGbps: round(referenceGbps),
      reference: 'single-thread memcpy of the same bytes between two buffers, in the loader process, interleaved with the loads',
      ratio: round(median((l) => l.ratio), 3),
      saveMs: round(saved.saveMs, 3),
      firstSaveMs: round(saved.firstSaveMs, 3),
      acquireReleasePerSec: Math.round(median((l) => l.acquireReleasePerSec)),
      hitLookupsPerSec: Math.round(median((l) => l.hitLookupsPerSec)),
      missLookupsPerSec: Math.round(median((l) => l.missLookupsPerSec)),
      verified: loaders.every((l) => l.verified),
      loaders: loaders.map((l) => ({ ...l, ratio: round(l.ratio, 3) })),
      environment: environment(),
    };
  } finally {
    if (saver.connected) saver.send('exit');
    await store.close();
  }
}

export function printEcResult(r: EcBenchResult): void {
  printTable(`epd-transfer bench ec (${formatBytes(r.bytes)}, ${r.processes} loader process${r.processes === 1 ? '' : 'es'})`, [
    ['load latency', `${r.loadMs} ms  (median of single loads; ${r.loadMsMin}–${r.loadMsMax})`],
    ['load', `${r.loadGbps} GB/s  (back-to-back loads)`],
    ['memcpy reference', `${r.referenceGbps} GB/s  (${r.reference})`],
    ['ratio', String(r.ratio)],
    ['save', `${r.saveMs} ms into reused memory; ${r.firstSaveMs} ms the first time (page faults)`],
    ['hit lookups/s', r.hitLookupsPerSec.toLocaleString('en-US')],
    ['miss lookups/s', r.missLookupsPerSec.toLocaleString('en-US')],
    ['acquire+release/s', r.acquireReleasePerSec.toLocaleString('en-US')],
    ['verified', r.verified ? 'yes (every loader hashed what it loaded)' : 'NO'],
  ]);
}

const role = process.env[ROLE];
if (role === 'saver' || role === 'loader') {
  (role === 'saver' ? runSaver() : runLoader()).catch((err) => {
    console.error(err);
    process.exit(1);
  });
}
