// The addon loads and unloads in worker_threads: each worker opens its own
// engines, transfers and exits; workers run one after another and side by side;
// terminating a worker with transfers in flight does not crash the process.
import { Worker } from 'node:worker_threads';
import { expect, test } from 'vitest';
import { fixture, lastJson, pattern, runNode, sha256 } from '../helpers.js';

const MiB = 1 << 20;

interface Roundtrip {
  wrote: boolean;
  read: boolean;
  hash: string;
}

/** Runs test/fixtures/worker.mjs in a worker; resolves with its message and exit code. */
function runWorker(workerData: Record<string, unknown>): Promise<{ message: Roundtrip; code: number }> {
  return new Promise((resolve, reject) => {
    const w = new Worker(fixture('worker.mjs'), { workerData });
    let message: Roundtrip | undefined;
    w.on('message', (m: Roundtrip) => (message = m));
    w.on('error', reject);
    w.on('exit', (code) => (message ? resolve({ message, code }) : reject(new Error(`worker exited (${code}) without a result`))));
  });
}

test('a worker opens engines, transfers, closes them and exits', async () => {
  const { message, code } = await runWorker({ mode: 'roundtrip', seed: 3, bytes: 8 * MiB });
  expect(code).toBe(0);
  expect(message).toEqual({ wrote: true, read: true, hash: sha256(pattern(3, 8 * MiB)) });
});

test('several workers one after another each load the addon afresh', async () => {
  for (let i = 0; i < 4; i++) {
    const { message, code } = await runWorker({ mode: 'roundtrip', seed: 10 + i, bytes: MiB });
    expect(code).toBe(0);
    expect(message).toEqual({ wrote: true, read: true, hash: sha256(pattern(10 + i, MiB)) });
  }
});

test('several workers at once transfer independently', async () => {
  const runs = await Promise.all([0, 1, 2, 3].map((i) => runWorker({ mode: 'roundtrip', seed: 20 + i, bytes: 4 * MiB })));
  runs.forEach(({ message, code }, i) => {
    expect(code).toBe(0);
    expect(message).toEqual({ wrote: true, read: true, hash: sha256(pattern(20 + i, 4 * MiB)) });
  });
});

test('terminating workers with transfers in flight does not crash the process and releases their shm', async () => {
  const run = await runNode([fixture('worker-terminate.mjs')], { timeoutMs: 60_000 });
  expect(run.signal, run.stderr).toBeNull();
  expect(run.code, run.stderr).toBe(0);
  const r = lastJson<Record<string, unknown>>(run.stdout);
  expect(r.duringBusy).toBe(6); // three workers, two regions each
  expect(r.afterTerminate).toBe(0);
  expect(r.leaveOpenExit).toBe(0);
  expect(r.afterLeaveOpen).toBe(0);
  expect(r.roundtrip).toMatchObject({ wrote: true, read: true });
  expect(r.mainWorks).toBe(true);
});

test('a script that connected engines and never closed them still exits', async () => {
  const run = await runNode(
    [
      '--input-type=module',
      '-e',
      `import { TransferEngine } from './dist/lib/index.js';
       const a = await TransferEngine.open();
       const b = await TransferEngine.open();
       b.allocate(4096);
       await a.connect(b.address);
       console.log(JSON.stringify({ done: true }));`,
    ],
    { timeoutMs: 20_000 },
  );
  expect(run.signal, run.stderr).toBeNull();
  expect(run.code, run.stderr).toBe(0);
  expect(lastJson(run.stdout)).toEqual({ done: true });
});
