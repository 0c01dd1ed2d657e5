/**
 * Shared test helpers: peer engines in child processes, engines closed after each
 * file, error-code assertions, seeded byte patterns and process resource probes.
 */
import { fork, spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { expect } from 'vitest';
import { TransferEngine, TransferError, type EngineOptions, type ErrorCode, type Region } from '../lib/index.js';

import { pattern as patternBytes } from './fixtures/pattern.mjs';

export { pattern, fillPattern, sha256, shmObjectsOf } from './fixtures/pattern.mjs';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/** Absolute path of a file in test/fixtures. */
export function fixture(name: string): string {
  return path.join(root, 'test', 'fixtures', name);
}

/** A peer engine running test/fixtures/peer.mjs in its own process. */
export interface PeerProcess {
  child: ChildProcess;
  pid: number;
  /** Control address to connect to. */
  address: string;
  /** Ids of the regions it allocated at start. */
  regions: number[];
  /** Runs one fixture operation (see peer.mjs) and resolves with its result. */
  call<T = unknown>(op: string, args?: Record<string, unknown>): Promise<T>;
  /** Settles when the process has exited (and been reaped). */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

export interface PeerOptions {
  /** Sizes of regions to allocate at start. */
  regions?: number[];
  /** Fill region i with pattern(seed + i). */
  seed?: number;
  engine?: EngineOptions;
}

const peers = new Set<PeerProcess>();

/** Forks a peer process and waits until its engine listens. */
export async function startPeer(options: PeerOptions = {}): Promise<PeerProcess> {
  const child = fork(fixture('peer.mjs'), [JSON.stringify(options)], { serialization: 'advanced', stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once('exit', (code, signal) => resolve({ code, signal })),
  );
  const pending = new Map<number, { resolve(v: unknown): void; reject(e: Error): void }>();
  let nextId = 1;
  const ready = new Promise<{ address: string; pid: number; regions: number[] }>((resolve, reject) => {
    child.on('message', (m: { type?: string; id?: number; result?: unknown; error?: { code?: string; message: string } } & Record<string, never>) => {
      if (m.type === 'ready') {
        resolve(m as unknown as { address: string; pid: number; regions: number[] });
        return;
      }
      const p = m.id === undefined ? undefined : pending.get(m.id);
      if (!p) return;
      pending.delete(m.id!);
      if (m.error) p.reject(Object.assign(new Error(`peer: ${m.error.message}`), { code: m.error.code }));
      else p.resolve(m.result);
    });
    exited.then(({ code, signal }) => {
      const err = new Error(`peer process exited (code ${code}, signal ${signal})`);
      reject(err);
      for (const p of pending.values()) p.reject(err);
      pending.clear();
    });
  });
  const info = await ready;
  const peer: PeerProcess = {
    child,
    pid: info.pid,
    address: info.address,
    regions: info.regions,
    exited,
    call<T>(op: string, args?: Record<string, unknown>): Promise<T> {
      return new Promise<T>((resolve, reject) => {
        const id = nextId++;
        pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
        child.send({ id, op, args });
      });
    },
  };
  peers.add(peer);
  exited.then(() => peers.delete(peer));
  return peer;
}

/** SIGKILLs a peer (continuing it first if stopped) and waits until it is reaped. */
export async function killPeer(peer: PeerProcess): Promise<void> {
  if (peer.child.exitCode === null && peer.child.signalCode === null) {
    peer.child.kill('SIGCONT');
    peer.child.kill('SIGKILL');
  }
  await peer.exited;
}

/** Kills every peer still running (for afterEach/afterAll). */
export async function stopPeers(): Promise<void> {
  await Promise.all([...peers].map(killPeer));
}

const engines = new Set<TransferEngine>();

/** Opens an engine that {@link closeEngines} closes. */
export async function openEngine(options?: EngineOptions): Promise<TransferEngine> {
  const e = await TransferEngine.open(options);
  engines.add(e);
  return e;
}

/** Closes every engine opened with {@link openEngine} (for afterEach/afterAll). */
export async function closeEngines(): Promise<void> {
  const all = [...engines];
  engines.clear();
  await Promise.all(all.map((e) => e.close({ timeoutMs: 5_000 })));
}

/**
 * Runs `fn` (sync or async) and returns the TransferError it throws or rejects
 * with; fails the test when it succeeds or throws anything else.
 */
export async function errorOf(fn: () => unknown): Promise<TransferError> {
  let result: unknown;
  try {
    result = await fn();
  } catch (err) {
    expect(err, `expected a TransferError, got ${String(err)}`).toBeInstanceOf(TransferError);
    return err as TransferError;
  }
  throw new Error(`expected a TransferError but the call succeeded with ${String(result)}`);
}

/** Asserts that `fn` fails with a TransferError of `code`; returns it. */
export async function expectCode(fn: () => unknown, code: ErrorCode): Promise<TransferError> {
  const err = await errorOf(fn);
  expect(err.code, err.message).toBe(code);
  return err;
}

/** A snapshot of an engine's counters. */
export function counters(engine: TransferEngine): Record<string, number> {
  return { ...engine.counters };
}

/** A local host region filled with pattern(seed). */
export function patterned(engine: TransferEngine, bytes: number, seed: number): Region {
  const r = engine.allocate(bytes);
  r.buffer!.set(patternBytes(seed, bytes));
  return r;
}

/** Polls `predicate` until it holds; fails after `timeoutMs` (a bound for a hang, not a timing check). */
export async function waitFor(predicate: () => boolean | Promise<boolean>, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

/** Number of open file descriptors of this process. */
export function openFds(): number {
  return readdirSync('/proc/self/fd').length;
}

/** Resident set size of this process in bytes (from /proc, no allocation). */
export function rssBytes(): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'));
  return m ? Number(m[1]) * 1024 : process.memoryUsage().rss;
}

/** Runs `node <args>` to completion and collects its output. */
export function runNode(
  args: string[],
  options: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {},
): Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, args, { cwd: root, env: { ...process.env, ...options.env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 60_000);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/** The last JSON line a child printed (fixtures report results that way). */
export function lastJson<T = Record<string, unknown>>(stdout: string): T {
  const lines = stdout.trim().split('\n');
  return JSON.parse(lines[lines.length - 1]) as T;
}

/**
 * A batch that copies the same `length` bytes `copies` times: gigabytes of work
 * from small regions, so a deadline, abort or close reliably lands mid-batch.
 */
export function repeatedBatch(local: Region, remoteRegion: number, length: number, copies: number) {
  return Array.from({ length: copies }, () => ({ localRegion: local, localOffset: 0, remoteRegion, remoteOffset: 0, length }));
}
