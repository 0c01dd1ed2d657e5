/**
 * Helpers of the encoder-cache tests: store names unique to this test process,
 * child processes running test/fixtures/ec-worker.mjs, and error-code assertions.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'vitest';
import { TransferError, type ErrorCode } from '../../lib/index.js';

export { ecPattern, ecSha256 } from '../fixtures/ec-pattern.mjs';

const fixtures = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', 'fixtures');
let seq = 0;

/** A store name no other test process uses. */
export function storeName(tag: string): string {
  return `t-${tag}-${process.pid}-${seq++}`;
}

/** Shared-memory objects of encoder-cache stores whose name contains `fragment`. */
export function storeObjects(fragment: string): string[] {
  return readdirSync('/dev/shm').filter((n) => n.startsWith('epdec-') && n.includes(fragment));
}

/** A child process running ec-worker.mjs. */
export interface EcWorker {
  child: ChildProcess;
  pid: number;
  call<T = unknown>(op: string, args?: Record<string, unknown>): Promise<T>;
  /** Resolves with everything printed so far once `text` appears on stdout. */
  stdoutIncludes(text: string): Promise<void>;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  kill(): Promise<void>;
}

const workers = new Set<EcWorker>();

/** Forks ec-worker.mjs and waits until it is ready. */
export async function startWorker(env: NodeJS.ProcessEnv = {}): Promise<EcWorker> {
  const child = fork(path.join(fixtures, 'ec-worker.mjs'), [], {
    stdio: ['ignore', 'pipe', 'inherit', 'ipc'],
    env: { ...process.env, ...env },
  });
  let stdout = '';
  const watchers: Array<() => void> = [];
  child.stdout!.on('data', (d) => {
    stdout += d;
    for (const w of watchers) w();
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once('exit', (code, signal) => resolve({ code, signal })),
  );
  const pending = new Map<number, { resolve(v: unknown): void; reject(e: Error): void }>();
  let nextId = 1;
  const ready = new Promise<number>((resolve, reject) => {
    child.on('message', (m: { type?: string; pid?: number; id?: number; result?: unknown; error?: { code?: string; message: string } }) => {
      if (m.type === 'ready') return resolve(m.pid!);
      const p = m.id === undefined ? undefined : pending.get(m.id);
      if (!p) return;
      pending.delete(m.id!);
      if (m.error) p.reject(new TransferError(`worker: ${m.error.message}`, (m.error.code ?? 'ERR_REMOTE') as ErrorCode));
      else p.resolve(m.result);
    });
    exited.then(({ code, signal }) => {
      const err = new Error(`ec worker exited (code ${code}, signal ${signal})`);
      reject(err);
      for (const p of pending.values()) p.reject(err);
      pending.clear();
    });
  });
  const pid = await ready;
  const worker: EcWorker = {
    child,
    pid,
    exited,
    call<T>(op: string, args?: Record<string, unknown>) {
      return new Promise<T>((resolve, reject) => {
        const id = nextId++;
        pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
        child.send({ id, op, args });
      });
    },
    stdoutIncludes(text: string) {
      return new Promise<void>((resolve, reject) => {
        const check = () => {
          if (stdout.includes(text)) resolve();
        };
        watchers.push(check);
        exited.then(() => reject(new Error(`worker exited before printing ${text}`)));
        check();
      });
    },
    async kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
  };
  workers.add(worker);
  exited.then(() => workers.delete(worker));
  return worker;
}

/** Kills every worker still running (afterEach). */
export async function stopWorkers(): Promise<void> {
  await Promise.all([...workers].map((w) => w.kill()));
}

/** Asserts that `fn` throws or rejects a TransferError with `code`; returns it. */
export async function expectCode(fn: () => unknown, code: ErrorCode): Promise<TransferError> {
  let result: unknown;
  try {
    result = await fn();
  } catch (err) {
    expect(err, `expected a TransferError, got ${String(err)}`).toBeInstanceOf(TransferError);
    expect((err as TransferError).code, (err as Error).message).toBe(code);
    return err as TransferError;
  }
  throw new Error(`expected ${code} but the call succeeded with ${String(result)}`);
}
