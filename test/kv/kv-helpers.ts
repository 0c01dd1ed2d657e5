// Helpers of the layerwise KV tests: prefill/decode engine pairs in this process,
// per-block byte comparison, deferred ready signals.
import { fork, type ChildProcess } from 'node:child_process';
import { KvLayout, gqaTensors, type KvTensorShape } from '../../lib/kv/layout.js';
import { LayerwiseReceiver, type LayerwiseReceiverOptions } from '../../lib/kv/receiver.js';
import { LayerwiseSender, type LayerwiseSenderOptions } from '../../lib/kv/sender.js';
import type { Region, TransferEngine } from '../../lib/index.js';
import { fillPattern, fixture, openEngine } from '../helpers.js';

export interface Geometry {
  layers: number;
  tensors: KvTensorShape[];
  prefillBlockSize: number;
  decodeBlockSize: number;
  prefillBlocks: number;
  decodeBlocks: number;
  /** Put the caches in device memory (host device: importable shared memory). */
  device?: boolean;
}

export const SMALL: Geometry = {
  layers: 4,
  tensors: gqaTensors({ kvHeads: 2, headDim: 32 }),
  prefillBlockSize: 8,
  decodeBlockSize: 8,
  prefillBlocks: 48,
  decodeBlocks: 48,
};

export interface Side {
  engine: TransferEngine;
  region: Region;
  layout: KvLayout;
}

/** A KV cache of `blockSize` × `numBlocks` on `engine`, in host or device memory. */
export function cache(engine: TransferEngine, g: Geometry, blockSize: number, numBlocks: number, seed?: number): Side {
  const opts = { layers: g.layers, blockSize, numBlocks, tensors: g.tensors };
  const bytes = KvLayout.packedBytes(opts);
  let region: Region;
  if (g.device) {
    const { ptr } = engine.device.alloc(bytes);
    if (seed !== undefined) {
      const b = Buffer.alloc(bytes);
      fillPattern(b, seed);
      engine.device.write(ptr, b);
    }
    region = engine.register({ devicePtr: ptr, length: bytes });
  } else {
    region = engine.allocate(bytes);
    if (seed !== undefined) fillPattern(region.buffer!, seed);
  }
  return { engine, region, layout: KvLayout.packed(region, opts) };
}

/** The bytes of `region` at [offset, offset + length). */
export function bytesOf(side: Side, offset: number, length: number): Buffer {
  if (side.region.buffer) return Buffer.from(side.region.buffer.subarray(offset, offset + length));
  const out = Buffer.alloc(length);
  side.engine.device.read(out, side.region.devicePtr! + BigInt(offset));
  return out;
}

/**
 * Compares, for every layer and tensor, each logical block of a request in
 * [first, end) on prefill with where it must be on decode. Returns the mismatches.
 */
export function mismatches(p: Side, d: Side, local: readonly number[], remote: readonly number[], first: number, end: number): string[] {
  const ratio = d.layout.blockSize / p.layout.blockSize;
  const out: string[] = [];
  p.layout.layers.forEach((layer, l) =>
    layer.forEach((pt, t) => {
      const dt = d.layout.layers[l][t];
      const bb = pt.blockBytes;
      for (let k = first; k < end; k++) {
        const sub = remote[Math.floor(k / ratio)] * ratio + (k % ratio);
        const a = bytesOf(p, pt.offset + local[k] * bb, bb);
        const b = bytesOf(d, dt.offset + sub * bb, bb);
        if (!a.equals(b)) out.push(`layer ${l} tensor ${pt.name} block ${k}`);
      }
    }),
  );
  return out;
}

/** True when decode's sub-blocks of logical blocks [first, end) are all zero (never written). */
export function untouched(d: Side, remote: readonly number[], ratio: number, first: number, end: number): boolean {
  for (const layer of d.layout.layers) {
    for (const dt of layer) {
      const bb = dt.blockBytes / ratio;
      for (let k = first; k < end; k++) {
        const sub = remote[Math.floor(k / ratio)] * ratio + (k % ratio);
        if (bytesOf(d, dt.offset + sub * bb, bb).some((x) => x !== 0)) return false;
      }
    }
  }
  return true;
}

export interface Pair {
  p: Side;
  d: Side;
  sender: LayerwiseSender;
  receiver: LayerwiseReceiver;
}

/** A prefill engine with a patterned cache and a decode engine with a zeroed one, in this process. */
export async function pair(g: Geometry = SMALL, o: { sender?: LayerwiseSenderOptions; receiver?: LayerwiseReceiverOptions; seed?: number } = {}): Promise<Pair> {
  const P = await openEngine({ listen: false });
  const D = await openEngine();
  const p = cache(P, g, g.prefillBlockSize, g.prefillBlocks, o.seed ?? 11);
  const d = cache(D, g, g.decodeBlockSize, g.decodeBlocks);
  const receiver = new LayerwiseReceiver(D, d.layout, o.receiver);
  const sender = new LayerwiseSender(P, p.layout, o.sender);
  return { p, d, sender, receiver };
}

/** A promise with its resolve/reject exposed. */
export function deferred<T = void>(): { promise: Promise<T>; resolve(v: T): void; reject(e: unknown): void } {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** Tracks whether a promise has settled, without unhandled rejections. */
export function track<T>(promise: Promise<T>): { settled: boolean; value?: T; error?: unknown; promise: Promise<T> } {
  const s: { settled: boolean; value?: T; error?: unknown; promise: Promise<T> } = { settled: false, promise };
  promise.then(
    (v) => Object.assign(s, { settled: true, value: v }),
    (e: unknown) => Object.assign(s, { settled: true, error: e }),
  );
  return s;
}

/** Reports every layer of the current step ready at once. */
export function allLayersReady(sender: LayerwiseSender, layers: number): void {
  for (let l = 0; l < layers; l++) sender.layerReady(l, Promise.resolve());
}

/** Block ids `start, start + 1, …` (count of them). */
export function range(start: number, count: number): number[] {
  return Array.from({ length: count }, (_, i) => start + i);
}

/** A fixture process (kv-decode.mjs / kv-prefill.mjs) driven over IPC. */
export interface KvProcess {
  child: ChildProcess;
  pid: number;
  address?: string;
  call<T = unknown>(op: string, args?: Record<string, unknown>): Promise<T>;
  kill(): Promise<void>;
}

const processes = new Set<KvProcess>();

/** Forks test/fixtures/<name> with JSON options and waits until it is ready. */
export async function startKvProcess(name: string, options: Record<string, unknown>): Promise<KvProcess> {
  const child = fork(fixture(name), [JSON.stringify(options)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const pending = new Map<number, { resolve(v: unknown): void; reject(e: Error): void }>();
  let nextId = 1;
  const ready = new Promise<{ address?: string; pid: number }>((resolve, reject) => {
    child.on('message', (m: { type?: string; id?: number; result?: unknown; error?: { code?: string; message: string }; address?: string; pid: number }) => {
      if (m.type === 'ready') return resolve(m);
      const p = m.id === undefined ? undefined : pending.get(m.id);
      if (!p) return;
      pending.delete(m.id!);
      if (m.error) p.reject(Object.assign(new Error(`${name}: ${m.error.message}`), { code: m.error.code }));
      else p.resolve(m.result);
    });
    void exited.then(() => {
      const err = new Error(`${name} exited`);
      reject(err);
      for (const p of pending.values()) p.reject(err);
      pending.clear();
    });
  });
  const info = await ready;
  const proc: KvProcess = {
    child,
    pid: info.pid,
    address: info.address,
    call<T>(op: string, args?: Record<string, unknown>) {
      return new Promise<T>((resolve, reject) => {
        const id = nextId++;
        pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
        child.send({ id, op, args });
      });
    },
    async kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
      processes.delete(proc);
    },
  };
  processes.add(proc);
  return proc;
}

/** Kills every fixture process still running. */
export async function stopKvProcesses(): Promise<void> {
  await Promise.all([...processes].map((p) => p.kill()));
}

/** The geometry fields fixtures take. */
export function fixtureGeometry(g: Geometry, side: 'prefill' | 'decode'): Record<string, unknown> {
  return {
    layers: g.layers,
    tensors: g.tensors,
    blockSize: side === 'prefill' ? g.prefillBlockSize : g.decodeBlockSize,
    numBlocks: side === 'prefill' ? g.prefillBlocks : g.decodeBlocks,
  };
}
