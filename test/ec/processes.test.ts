// The store shared by real processes: byte-exact save/load across processes,
// single flight across processes, and what a killed writer, reader or lock holder
// leaves behind (nothing visible, nothing stuck).
import { spawn } from 'node:child_process';
import { closeSync, fstatSync, openSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { EncoderCacheStore } from '../../lib/index.js';
import { ecPattern, ecSha256, expectCode, startWorker, stopWorkers, storeName, storeObjects } from './helpers.js';

const MiB = 1 << 20;
const stores: EncoderCacheStore[] = [];

async function open(name: string, capacity?: number): Promise<EncoderCacheStore> {
  const s = await EncoderCacheStore.open({ name, capacity });
  stores.push(s);
  return s;
}

afterEach(async () => {
  await stopWorkers();
  await Promise.all(stores.splice(0).map((s) => s.close()));
});

describe('encoder cache across processes', () => {
  it('an embedding saved in one process loads byte-exact in others', async () => {
    const name = storeName('xproc');
    const writer = await startWorker();
    const reader = await startWorker();
    await writer.call('open', { name, capacity: 32 * MiB });
    expect(await writer.call('save', { key: 'img', seed: 1, size: 18 * MiB, meta: { tokens: 2691 } })).toEqual({ stored: true, bytes: 18 * MiB });

    // Another child: one copy into its own memory.
    await reader.call('open', { name });
    expect(await reader.call('loadHash', { key: 'img', size: 18 * MiB })).toEqual({
      hash: ecSha256(ecPattern(1, 18 * MiB)),
      bytes: 18 * MiB,
      meta: { tokens: 2691 },
    });
    // This process: zero-copy.
    const store = await open(name);
    const entry = store.acquire('img')!;
    expect(entry.bytes.equals(ecPattern(1, 18 * MiB))).toBe(true);
    entry.release();
    expect(store.stats().processes).toBe(3);

    // And the other way round.
    await store.save('back', ecPattern(2, 3 * MiB));
    expect(await writer.call('loadHash', { key: 'back', size: 3 * MiB })).toMatchObject({ hash: ecSha256(ecPattern(2, 3 * MiB)) });
  });

  it('concurrent saves of one key from several processes write once', async () => {
    const name = storeName('flight');
    const store = await open(name, 64 * MiB);
    const workers = await Promise.all([startWorker(), startWorker(), startWorker()]);
    await Promise.all(workers.map((w) => w.call('open', { name })));
    const at = Date.now() + 200;
    const results = await Promise.all(
      workers.map((w, i) => w.call<{ stored: boolean }>('saveAt', { key: 'same', seed: 10 + i, size: 8 * MiB, at })),
    );
    expect(results.filter((r) => r.stored)).toHaveLength(1);
    expect(results.filter((r) => !r.stored)).toHaveLength(2);
    expect(store.stats()).toMatchObject({ saves: 1, entries: 1, usedBytes: 8 * MiB });
    // The bytes are exactly one writer's.
    const winner = results.findIndex((r) => r.stored);
    expect(store.acquire('same')!.bytes.equals(ecPattern(10 + winner, 8 * MiB))).toBe(true);
  });

  it('a writer killed mid-save leaves no entry visible and the store usable', async () => {
    const name = storeName('killw');
    const store = await open(name, 8 * MiB);
    await store.save('other', ecPattern(3, MiB));
    const writer = await startWorker();
    await writer.call('open', { name });
    await writer.call('saveHalf', { key: 'half', seed: 4, size: 4 * MiB });
    expect(store.has('half')).toBe(false);
    expect(await store.load('half', Buffer.alloc(4 * MiB))).toBeNull();
    expect(store.stats()).toMatchObject({ writing: 1, entries: 1 });

    await writer.kill();
    expect(store.has('half')).toBe(false);
    expect(store.acquire('half')).toBeNull();
    // A new save of the key takes over from the dead writer: no wait, full bytes.
    expect(await store.save('half', ecPattern(5, 4 * MiB), { timeoutMs: 2_000 })).toEqual({ stored: true, bytes: 4 * MiB });
    expect(store.acquire('half')!.bytes.equals(ecPattern(5, 4 * MiB))).toBe(true);
    expect(store.stats()).toMatchObject({ writing: 0, entries: 2, processes: 1, reapedProcesses: 1 });
    // Its space came back: the whole capacity is usable.
    expect(await store.save('fill', ecPattern(6, 3 * MiB))).toMatchObject({ stored: true });
    expect(store.keys().sort()).toEqual(['fill', 'half', 'other']);
  });

  it('a killed writer that is still a zombie counts as dead', async () => {
    // The writer's parent is a shell that execs `sleep` and never reaps it.
    const name = storeName('zombie');
    const store = await open(name, MiB);
    const fixture = fileURLToPath(new URL('../fixtures/ec-reserve.mjs', import.meta.url));
    const parent = spawn('bash', ['-c', 'node "$0" "$1" half & exec sleep 60', fixture, name], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      const pid = await new Promise<number>((resolve, reject) => {
        let out = '';
        parent.stdout!.on('data', (d) => {
          out += d;
          const m = /READY (\d+)/.exec(out);
          if (m) resolve(Number(m[1]));
        });
        parent.once('exit', () => reject(new Error('the writer did not start')));
      });
      process.kill(pid, 'SIGKILL');
      const state = () => /\) (\S)/.exec(readFileSync(`/proc/${pid}/stat`, 'utf8'))?.[1];
      while (state() !== 'Z') await new Promise((r) => setTimeout(r, 5));
      expect(await store.save('half', ecPattern(18, 4096), { timeoutMs: 2_000 })).toEqual({ stored: true, bytes: 4096 });
      expect(store.stats()).toMatchObject({ processes: 1, writing: 0 });
    } finally {
      parent.kill('SIGKILL');
    }
  });

  it('space held by a killed writer is reclaimed under pressure', async () => {
    const name = storeName('killspace');
    const store = await open(name, 4 * MiB);
    const writer = await startWorker();
    await writer.call('open', { name });
    await writer.call('saveHalf', { key: 'w', seed: 7, size: 4 * MiB });
    await expectCode(() => store.save('x', ecPattern(8, MiB)), 'ERR_CAPACITY'); // a live writer holds it all
    await writer.kill();
    expect(await store.save('x', ecPattern(8, MiB))).toMatchObject({ stored: true });
  });

  it("a killed reader's pins are released", async () => {
    const name = storeName('killr');
    const store = await open(name, 2 * MiB);
    await store.save('a', ecPattern(9, MiB));
    const reader = await startWorker();
    await reader.call('open', { name });
    expect(await reader.call('pin', { key: 'a' })).toBe(ecSha256(ecPattern(9, MiB)));
    await store.save('b', ecPattern(10, MiB));
    await store.save('c', ecPattern(11, MiB)); // must evict b: a is pinned by the reader
    expect(store.keys()).toEqual(['a', 'c']);
    await expectCode(() => store.save('big', ecPattern(12, 2 * MiB)), 'ERR_CAPACITY');

    await reader.kill();
    expect(await store.save('big', ecPattern(12, 2 * MiB))).toMatchObject({ stored: true });
    expect(store.keys()).toEqual(['big']);
  });

  it('a process killed while holding the index lock: the next one rebuilds the index and goes on', async () => {
    const name = storeName('killlock');
    const store = await open(name, 8 * MiB);
    await store.save('a', ecPattern(13, MiB));
    await store.save('b', ecPattern(14, 2 * MiB));
    const holder = await startWorker({ EPD_TRANSFER_EC_TEST_HOOKS: '1' });
    await holder.call('open', { name, lockTimeoutMs: 20_000 });
    void holder.call('holdLock').catch(() => {});
    await holder.stdoutIncludes('LOCKED'); // it scrambled the derived index and holds the lock
    await holder.kill();

    expect(store.has('a')).toBe(true); // EOWNERDEAD: rebuilt from the authoritative entries
    expect(store.stats()).toMatchObject({ recoveries: 1, entries: 2, usedBytes: 3 * MiB, processes: 1 });
    const out = Buffer.alloc(2 * MiB);
    await store.load('b', out);
    expect(out.equals(ecPattern(14, 2 * MiB))).toBe(true);
    expect(await store.save('c', ecPattern(15, 5 * MiB))).toMatchObject({ stored: true });
    expect(store.keys().sort()).toEqual(['a', 'b', 'c']);
  });

  it('a lock held by a stopped process fails waiters with ERR_TIMEOUT, not a hang', async () => {
    const name = storeName('stoplock');
    const store = await EncoderCacheStore.open({ name, capacity: MiB, lockTimeoutMs: 100 });
    stores.push(store);
    const holder = await startWorker({ EPD_TRANSFER_EC_TEST_HOOKS: '1' });
    await holder.call('open', { name });
    void holder.call('holdLock').catch(() => {});
    await holder.stdoutIncludes('LOCKED');
    await expectCode(() => store.has('a'), 'ERR_TIMEOUT');
    await holder.kill();
    expect(store.has('a')).toBe(false);
  });

  it('a store whose processes all died is reclaimed', async () => {
    const name = storeName('orphan');
    const w = await startWorker();
    await w.call('open', { name, capacity: MiB });
    await w.call('save', { key: 'k', seed: 16, size: 1000 });
    expect(storeObjects(name)).toHaveLength(1);
    await w.kill();
    // Still there, unless a parallel test file opening a store has just reclaimed it (the same sweep).
    const orphaned = storeObjects(name).length;
    const removed = EncoderCacheStore.reclaimStale();
    if (orphaned === 1) expect(removed).toBeGreaterThanOrEqual(1);
    expect(storeObjects(name)).toHaveLength(0);
  });

  it('reopening a store whose processes all died keeps its entries', async () => {
    // Between the kill and the reopen the store is an orphan, and any other process that opens a
    // store meanwhile (a parallel test file) may rightly reclaim it. A descriptor held on the shm
    // object tells that case apart (the object we filled was unlinked: try again) from entries lost
    // by the reopen itself (same object, entry missing: the failure this test exists for).
    for (let attempt = 1; ; attempt++) {
      const name = storeName(`reopen${attempt}`);
      const w = await startWorker();
      await w.call('open', { name, capacity: MiB });
      await w.call('save', { key: 'k', seed: 17, size: 1000 });
      const [object] = storeObjects(name);
      const fd = openSync(`/dev/shm/${object}`, 'r');
      try {
        await w.kill();
        const store = await EncoderCacheStore.open({ name, capacity: MiB, reclaimStale: false });
        stores.push(store);
        if (fstatSync(fd).nlink === 0 && attempt < 5) continue; // reclaimed by someone else in between
        expect(fstatSync(fd).nlink, 'the store was reclaimed by another process on every attempt').toBe(1);
        expect(store.acquire('k')!.bytes.equals(ecPattern(17, 1000))).toBe(true);
        expect(store.stats().processes).toBe(1);
        return;
      } finally {
        closeSync(fd);
      }
    }
  });
});
