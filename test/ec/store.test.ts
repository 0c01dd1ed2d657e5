// EncoderCacheStore within one process: saving and loading, visibility, single
// flight, LRU eviction, pins, capacity errors, misses, bad input, lifecycle.
import { closeSync, openSync, readdirSync, readSync, writeSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import { afterEach, describe, expect, it } from 'vitest';
import { EncoderCacheStore, TransferEngine, type EncoderCacheStoreOptions } from '../../lib/index.js';
import { ecPattern, expectCode, storeName, storeObjects } from './helpers.js';

const KiB = 1024;
const stores: EncoderCacheStore[] = [];

async function open(options: Partial<EncoderCacheStoreOptions> & { capacity?: number | string } = {}): Promise<EncoderCacheStore> {
  const s = await EncoderCacheStore.open({ name: storeName('store'), capacity: 1 << 20, ...options });
  stores.push(s);
  return s;
}

afterEach(async () => {
  await Promise.all(stores.splice(0).map((s) => s.close()));
});

describe('EncoderCacheStore: save and load', () => {
  it('saves an embedding and loads it back byte-exact, with its meta', async () => {
    const store = await open({ capacity: '4MiB' });
    const bytes = ecPattern(1, 700 * KiB);
    expect(await store.save('img-1', bytes, { meta: { tokens: 256, dtype: 'bf16' } })).toEqual({ stored: true, bytes: bytes.length });

    const target = Buffer.alloc(bytes.length);
    expect(await store.load('img-1', target)).toEqual({ bytes: bytes.length, meta: { tokens: 256, dtype: 'bf16' } });
    expect(target.equals(bytes)).toBe(true);
    expect(store.stat('img-1')).toEqual({ bytes: bytes.length, meta: { tokens: 256, dtype: 'bf16' } });

    const entry = store.acquire('img-1')!;
    expect(entry.bytes.equals(bytes)).toBe(true);
    expect(entry.meta).toEqual({ tokens: 256, dtype: 'bf16' });
    entry.release();
    entry.release(); // idempotent
    expect(store.stats().pinned).toBe(0);
  });

  it('loads into an engine region at an offset', async () => {
    const store = await open();
    const engine = await TransferEngine.open({ listen: false });
    try {
      const bytes = ecPattern(2, 300 * KiB);
      await store.save('img-2', bytes);
      const region = engine.allocate(512 * KiB);
      expect(await store.load('img-2', { region, offset: 4096 })).toMatchObject({ bytes: bytes.length });
      expect(region.buffer!.subarray(4096, 4096 + bytes.length).equals(bytes)).toBe(true);
      expect(await store.load('img-2', region)).toMatchObject({ bytes: bytes.length });
      expect(region.buffer!.subarray(0, bytes.length).equals(bytes)).toBe(true);
    } finally {
      await engine.close();
    }
  });

  it('saves from a region and from an ArrayBuffer', async () => {
    const store = await open();
    const engine = await TransferEngine.open({ listen: false });
    try {
      const region = engine.allocate(64 * KiB);
      region.buffer!.set(ecPattern(3, 64 * KiB));
      await store.save('from-region', region);
      const ab = new Uint8Array(ecPattern(4, 10 * KiB)).buffer;
      await store.save('from-ab', ab);
      const out = Buffer.alloc(64 * KiB);
      await store.load('from-region', out);
      expect(out.equals(region.buffer!)).toBe(true);
      await store.load('from-ab', out);
      expect(out.subarray(0, 10 * KiB).equals(ecPattern(4, 10 * KiB))).toBe(true);
    } finally {
      await engine.close();
    }
  });

  it('keeps a reservation invisible until commit, and frees it on abort', async () => {
    const store = await open();
    const writer = (await store.reserve('late', 8 * KiB))!;
    writer.bytes.set(ecPattern(5, 8 * KiB));
    expect(store.has('late')).toBe(false);
    expect(store.stat('late')).toBeNull();
    expect(await store.load('late', Buffer.alloc(8 * KiB))).toBeNull();
    expect(store.acquire('late')).toBeNull();
    expect(store.keys()).toEqual([]);
    expect(store.stats().writing).toBe(1);
    writer.commit();
    expect(writer.status).toBe('committed');
    expect(store.has('late')).toBe(true);

    const dropped = (await store.reserve('dropped', 8 * KiB))!;
    const used = store.stats().usedBytes;
    dropped.abort();
    expect(dropped.status).toBe('aborted');
    expect(store.stats().usedBytes).toBe(used - 8 * KiB);
    expect(store.has('dropped')).toBe(false);
    await expectCode(() => dropped.commit(), 'ERR_ABORTED');
    expect(await store.save('dropped', ecPattern(6, KiB))).toMatchObject({ stored: true });
  });

  it('writes a reservation with write() at offsets', async () => {
    const store = await open();
    const bytes = ecPattern(7, 600 * KiB);
    const writer = (await store.reserve('parts', bytes.length))!;
    await writer.write(bytes.subarray(0, 300 * KiB));
    await writer.write(bytes.subarray(300 * KiB), 300 * KiB);
    await expectCode(() => writer.write(Buffer.alloc(2), bytes.length - 1), 'ERR_OUT_OF_RANGE');
    writer.commit();
    expect(store.acquire('parts')!.bytes.equals(bytes)).toBe(true);
  });
});

describe('EncoderCacheStore: single flight', () => {
  it('concurrent saves of one key write once; the others report exists', async () => {
    const store = await open();
    const bytes = ecPattern(8, 512 * KiB);
    const results = await Promise.all(Array.from({ length: 5 }, () => store.save('same', bytes)));
    expect(results.filter((r) => r.stored)).toHaveLength(1);
    expect(results.filter((r) => !r.stored)).toEqual(Array(4).fill({ stored: false, reason: 'exists' }));
    expect(store.stats().saves).toBe(1);
  });

  it('a save waits for an open reservation and then reports exists', async () => {
    const store = await open();
    const writer = (await store.reserve('slow', 4 * KiB))!;
    let settled = false;
    const waiting = store.save('slow', ecPattern(9, 4 * KiB)).then((r) => {
      settled = true;
      return r;
    });
    await new Promise((r) => setTimeout(r, 30));
    expect(settled).toBe(false);
    writer.bytes.set(ecPattern(10, 4 * KiB));
    writer.commit();
    expect(await waiting).toEqual({ stored: false, reason: 'exists' });
    expect(store.acquire('slow')!.bytes.equals(ecPattern(10, 4 * KiB))).toBe(true);
  });

  it('a waiting save takes over when the reservation is aborted', async () => {
    const store = await open();
    const writer = (await store.reserve('retry', 4 * KiB))!;
    const waiting = store.save('retry', ecPattern(11, 4 * KiB));
    setTimeout(() => writer.abort(), 20);
    expect(await waiting).toEqual({ stored: true, bytes: 4 * KiB });
    expect(store.acquire('retry')!.bytes.equals(ecPattern(11, 4 * KiB))).toBe(true);
  });

  it('a waiting save fails with ERR_TIMEOUT or ERR_ABORTED, and stores nothing', async () => {
    const store = await open();
    const writer = (await store.reserve('held', 4 * KiB))!;
    await expectCode(() => store.save('held', ecPattern(12, 4 * KiB), { timeoutMs: 30 }), 'ERR_TIMEOUT');
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 20);
    await expectCode(() => store.save('held', ecPattern(12, 4 * KiB), { signal: ac.signal }), 'ERR_ABORTED');
    expect(store.stats()).toMatchObject({ writing: 1, entries: 0 });
    writer.abort();
  });
});

describe('EncoderCacheStore: eviction and pins', () => {
  const E = 64 * KiB; // four entries fill a 256 KiB store exactly

  async function full(): Promise<EncoderCacheStore> {
    const store = await open({ capacity: 4 * E });
    for (const [i, k] of ['a', 'b', 'c', 'd'].entries()) await store.save(k, ecPattern(20 + i, E));
    return store;
  }

  it('evicts the least recently used entry first; loads and pins count as uses, has() does not', async () => {
    const store = await full();
    await store.load('a', Buffer.alloc(E)); // a becomes the most recent
    expect(store.has('b')).toBe(true); // a peek, not a use
    store.acquire('c')!.release(); // a use
    expect(store.keys()).toEqual(['b', 'd', 'a', 'c']);

    await store.save('e', ecPattern(30, E));
    expect(store.keys()).toEqual(['d', 'a', 'c', 'e']);
    expect(store.has('b')).toBe(false);
    await store.save('f', ecPattern(31, E));
    expect(store.keys()).toEqual(['a', 'c', 'e', 'f']);
    expect(store.stats()).toMatchObject({ evictions: 2, evictedBytes: 2 * E, entries: 4 });
    // What survived is intact.
    const out = Buffer.alloc(E);
    await store.load('a', out);
    expect(out.equals(ecPattern(20, E))).toBe(true);
  });

  it('never evicts a pinned entry; it can go once released', async () => {
    const store = await full();
    const pinned = store.acquire('a')!; // the oldest
    for (let i = 0; i < 6; i++) await store.save(`x${i}`, ecPattern(40 + i, E));
    expect(store.has('a')).toBe(true);
    expect(pinned.bytes.equals(ecPattern(20, E))).toBe(true);
    pinned.release();
    // 'a' was used when pinned, so the three x's saved after it are newer; more pressure takes it.
    for (let i = 6; i < 10; i++) await store.save(`x${i}`, ecPattern(40 + i, E));
    expect(store.has('a')).toBe(false);
  });

  it('a save larger than the capacity fails with ERR_CAPACITY and loses nothing', async () => {
    const store = await full();
    const before = store.keys();
    const err = await expectCode(() => store.save('huge', ecPattern(50, 4 * E + 1)), 'ERR_CAPACITY');
    expect(err.message).toMatch(/larger than the store's capacity/);
    await expectCode(() => store.reserve('huge', 5 * E), 'ERR_CAPACITY');
    expect(store.keys()).toEqual(before);
    expect(store.stats()).toMatchObject({ evictions: 0, capacityErrors: 2 });
    for (const [i, k] of before.entries()) {
      const out = Buffer.alloc(E);
      await store.load(k, out);
      expect(out.equals(ecPattern(20 + i, E))).toBe(true);
    }
  });

  it('with everything pinned a save fails with ERR_CAPACITY and loses nothing', async () => {
    const store = await full();
    const pins = ['a', 'b', 'c', 'd'].map((k) => store.acquire(k)!);
    await expectCode(() => store.save('e', ecPattern(51, E)), 'ERR_CAPACITY');
    expect(store.keys()).toEqual(['a', 'b', 'c', 'd']);
    pins.forEach((p, i) => expect(p.bytes.equals(ecPattern(20 + i, E))).toBe(true));
    pins[2].release(); // c may go now, and only c
    expect(await store.save('e', ecPattern(51, E))).toMatchObject({ stored: true });
    expect(store.keys().sort()).toEqual(['a', 'b', 'd', 'e']);
    pins.forEach((p) => p.release());
  });

  it('an open reservation is never evicted', async () => {
    const store = await open({ capacity: 2 * E });
    const writer = (await store.reserve('w', E))!;
    await store.save('a', ecPattern(52, E));
    await expectCode(() => store.save('b', ecPattern(53, 2 * E)), 'ERR_CAPACITY');
    expect(await store.save('b', ecPattern(53, E))).toMatchObject({ stored: true }); // evicts a, not w
    expect(store.has('a')).toBe(false);
    writer.commit();
    expect(store.keys()).toEqual(['b', 'w']);
  });

  it('with mixed sizes evicts only the entries inside the range it needs', async () => {
    const store = await open({ capacity: 4 * E });
    await store.save('s1', ecPattern(60, E)); // [0, E)
    await store.save('big', ecPattern(61, 2 * E)); // [E, 3E)
    await store.save('s2', ecPattern(62, E)); // [3E, 4E)
    await store.load('s1', Buffer.alloc(E)); // LRU now: big, s2, s1
    // Two adjacent units are needed: big alone opens them; s1 and s2 stay.
    await store.save('new', ecPattern(63, 2 * E));
    expect(store.keys().sort()).toEqual(['new', 's1', 's2']);
  });

  it('respects maxEntries: the oldest entry gives up its slot', async () => {
    const store = await open({ capacity: '1MiB', maxEntries: 2 });
    await store.save('a', ecPattern(70, KiB));
    await store.save('b', ecPattern(71, KiB));
    await store.save('c', ecPattern(72, KiB));
    expect(store.keys()).toEqual(['b', 'c']);
    const pins = ['b', 'c'].map((k) => store.acquire(k)!);
    const err = await expectCode(() => store.save('d', ecPattern(73, KiB)), 'ERR_CAPACITY');
    expect(err.message).toMatch(/entry slot/);
    expect(store.keys()).toEqual(['b', 'c']);
    pins.forEach((p) => p.release());
  });

  it('delete hides an entry at once and frees it when the last reader releases it', async () => {
    const store = await open();
    await store.save('gone', ecPattern(80, 16 * KiB));
    const entry = store.acquire('gone')!;
    expect(store.delete('gone')).toBe(true);
    expect(store.has('gone')).toBe(false);
    expect(store.delete('gone')).toBe(false);
    expect(entry.bytes.equals(ecPattern(80, 16 * KiB))).toBe(true); // still readable while pinned
    expect(await store.save('gone', ecPattern(81, 16 * KiB))).toMatchObject({ stored: true });
    expect(store.stats().usedBytes).toBe(32 * KiB);
    entry.release();
    expect(store.stats().usedBytes).toBe(16 * KiB);
    expect(store.acquire('gone')!.bytes.equals(ecPattern(81, 16 * KiB))).toBe(true);
  });
});

describe('EncoderCacheStore: misses', () => {
  it('unknown keys are ordinary misses everywhere', async () => {
    const store = await open();
    await store.save('known', ecPattern(90, KiB));
    expect(store.has('unknown')).toBe(false);
    expect(store.stat('unknown')).toBeNull();
    expect(await store.load('unknown', Buffer.alloc(KiB))).toBeNull();
    expect(store.acquire('unknown')).toBeNull();
    expect(store.delete('unknown')).toBe(false);
    expect(store.has('Known')).toBe(false); // keys are exact
    expect(store.stats()).toMatchObject({ misses: 4, pinned: 0 }); // has ×2, load, acquire
  });

  it('a target too small fails with ERR_OUT_OF_RANGE and leaves the entry unpinned', async () => {
    const store = await open();
    await store.save('k', ecPattern(91, 8 * KiB));
    const target = Buffer.alloc(8 * KiB);
    await expectCode(() => store.load('k', Buffer.alloc(8 * KiB - 1)), 'ERR_OUT_OF_RANGE');
    await expectCode(() => store.load('k', { region: undefined as never, offset: 1 }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => store.load('k', new Uint8Array(target.buffer, target.byteOffset, 100)), 'ERR_OUT_OF_RANGE');
    expect(store.stats().pinned).toBe(0);
  });
});

describe('EncoderCacheStore: lifecycle', () => {
  it('handles in one process share the store; the last close removes its shared memory', async () => {
    const name = storeName('life');
    const a = await EncoderCacheStore.open({ name, capacity: '1MiB' });
    const b = await EncoderCacheStore.open({ name });
    expect(b.capacity).toBe(1 << 20);
    await a.save('k', ecPattern(100, KiB));
    expect(b.has('k')).toBe(true);
    expect(a.stats().processes).toBe(2);
    await a.close();
    expect(storeObjects(name)).toHaveLength(1);
    expect(b.has('k')).toBe(true);
    await b.close();
    expect(storeObjects(name)).toHaveLength(0);
  });

  it('every call after close fails with ERR_CLOSED; close is idempotent', async () => {
    const store = await open();
    await store.save('k', ecPattern(101, KiB));
    const entry = store.acquire('k')!;
    const writer = (await store.reserve('w', KiB))!;
    await store.close();
    await store.close();
    expect(() => store.has('k')).toThrow(expect.objectContaining({ code: 'ERR_CLOSED' }));
    await expectCode(() => store.save('k2', ecPattern(1, KiB)), 'ERR_CLOSED');
    await expectCode(() => store.load('k', Buffer.alloc(KiB)), 'ERR_CLOSED');
    await expectCode(() => store.acquire('k'), 'ERR_CLOSED');
    await expectCode(() => writer.commit(), 'ERR_CLOSED');
    entry.release(); // harmless after close
    writer.abort();
  });

  it('close waits for a load in flight', async () => {
    const store = await open({ capacity: '8MiB' });
    const bytes = ecPattern(102, 4 << 20);
    await store.save('big', bytes);
    const target = Buffer.alloc(bytes.length);
    const loading = store.load('big', target);
    await store.close();
    expect(await loading).toMatchObject({ bytes: bytes.length });
    expect(target.equals(bytes)).toBe(true);
  });

  it('opening a store that does not exist without a capacity fails with ERR_NOT_FOUND', async () => {
    await expectCode(() => EncoderCacheStore.open({ name: storeName('missing') }), 'ERR_NOT_FOUND');
  });

  it('opening an existing store with another layout fails with ERR_BAD_ARGUMENT and changes nothing', async () => {
    const store = await open({ capacity: '1MiB' });
    await store.save('k', ecPattern(103, KiB));
    await expectCode(() => EncoderCacheStore.open({ name: store.name, capacity: '2MiB' }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => EncoderCacheStore.open({ name: store.name, capacity: '1MiB', maxEntries: 7 }), 'ERR_BAD_ARGUMENT');
    expect(store.has('k')).toBe(true);
    expect(store.stats().processes).toBe(1);
  });

  it('refuses a store made by an incompatible build, and never re-creates or reclaims it', async () => {
    const store = await open();
    await store.save('k', ecPattern(105, KiB));
    const file = `/dev/shm/epdec-${store.name}`;
    const fd = openSync(file, 'r+');
    const version = Buffer.alloc(4);
    readSync(fd, version, 0, 4, 8); // the layout version follows the 8-byte magic
    try {
      writeSync(fd, Buffer.from([0xe7, 0x03, 0, 0]), 0, 4, 8); // version 999
      await expectCode(() => EncoderCacheStore.open({ name: store.name }), 'ERR_PROTOCOL_VERSION');
      await expectCode(() => EncoderCacheStore.open({ name: store.name, capacity: '1MiB' }), 'ERR_PROTOCOL_VERSION');
      EncoderCacheStore.reclaimStale();
      expect(storeObjects(store.name)).toHaveLength(1);
    } finally {
      writeSync(fd, version, 0, 4, 8);
      closeSync(fd);
    }
    expect(store.acquire('k')!.bytes.equals(ecPattern(105, KiB))).toBe(true);
  });

  it('limits the number of attached handles (maxProcesses)', async () => {
    const store = await open({ maxProcesses: 2 });
    stores.push(await EncoderCacheStore.open({ name: store.name }));
    await expectCode(() => EncoderCacheStore.open({ name: store.name }), 'ERR_CAPACITY');
  });

  it('limits the entries one handle pins (maxPinsPerProcess)', async () => {
    const store = await open({ maxPinsPerProcess: 2 });
    for (const k of ['a', 'b', 'c']) await store.save(k, ecPattern(104, KiB));
    const a = store.acquire('a')!;
    const a2 = store.acquire('a')!; // the same entry again takes no new slot
    const b = store.acquire('b')!;
    await expectCode(() => store.acquire('c'), 'ERR_CAPACITY');
    a.release();
    a2.release();
    expect(store.acquire('c')).not.toBeNull();
    b.release();
  });
});

describe('EncoderCacheStore: bad input', () => {
  it('open rejects bad options before touching shared memory', async () => {
    const bad: Array<[unknown, string]> = [
      [undefined, 'options'],
      [{}, 'options.name'],
      [{ name: 'has/slash', capacity: 4096 }, 'options.name'],
      [{ name: '', capacity: 4096 }, 'options.name'],
      [{ name: 'x'.repeat(65), capacity: 4096 }, 'options.name'],
      [{ name: 'ok', capacity: -1 }, 'options.capacity'],
      [{ name: 'ok', capacity: '12 parsecs' }, 'options.capacity'],
      [{ name: 'ok', capacity: 4096, maxEntries: 0 }, 'options.maxEntries'],
      [{ name: 'ok', capacity: 4096, alignment: 3000 }, 'options.alignment'],
      [{ name: 'ok', capacity: 4096, alignment: 32 }, 'options.alignment'],
      [{ name: 'ok', capacity: 4096, maxProcesses: 1.5 }, 'options.maxProcesses'],
      [{ name: 'ok', capacity: 4096, lockTimeoutMs: 0 }, 'options.lockTimeoutMs'],
    ];
    for (const [options, field] of bad) {
      const err = await expectCode(() => EncoderCacheStore.open(options as EncoderCacheStoreOptions), 'ERR_BAD_ARGUMENT');
      expect(err.message).toContain(field);
    }
    expect(storeObjects('ok')).toEqual([]);
  });

  it('every method rejects bad arguments before anything happens', async () => {
    const store = await open();
    await store.save('k', ecPattern(110, KiB));
    const before = store.stats();
    const longKey = 'é'.repeat(200); // 400 UTF-8 bytes
    const calls: Array<() => unknown> = [
      () => store.has(1 as never),
      () => store.has(''),
      () => store.has(longKey),
      () => store.stat(null as never),
      () => store.save('', Buffer.alloc(1)),
      () => store.save('k2', 'text' as never),
      () => store.save('k2', Buffer.alloc(0)),
      () => store.save('k2', Buffer.alloc(1), { meta: { blob: 'x'.repeat(300) } }),
      () => store.save('k2', Buffer.alloc(1), { meta: (() => 1) as never }),
      () => store.save('k2', Buffer.alloc(1), { timeoutMs: -5 }),
      () => store.save('k2', Buffer.alloc(1), { signal: 'stop' as never }),
      () => store.save('k2', Buffer.alloc(1), 7 as never),
      () => store.reserve('k2', 0),
      () => store.reserve('k2', 1.5),
      () => store.load('k', 'buffer' as never),
      () => store.load('k', { region: 5 } as never),
      () => store.load('k', { region: Buffer.alloc(KiB), offset: -1 } as never),
      () => store.load(longKey, Buffer.alloc(1)),
      () => store.acquire(undefined as never),
      () => store.delete(42 as never),
      () => store.close({ timeoutMs: 'soon' } as never),
    ];
    for (const call of calls) await expectCode(call, 'ERR_BAD_ARGUMENT');
    const after = store.stats();
    expect({ ...after, misses: 0, hits: 0 }).toEqual({ ...before, misses: 0, hits: 0 });
    expect(store.keys()).toEqual(['k']);
  });
});

describe('EncoderCacheStore: large arenas', () => {
  it('gives zero-copy views of entries far beyond 4 GiB into the arena', async () => {
    // Reservations that are never written take no memory: the object is sparse.
    const GiB = 2 ** 30;
    const store = await open({ capacity: '8GiB' });
    const spacers = [(await store.reserve('spacer-1', 3.25 * GiB))!, (await store.reserve('spacer-2', 2.25 * GiB))!];
    const bytes = ecPattern(130, 64 * KiB);
    await store.save('deep', bytes); // lands at 5.5 GiB
    const entry = store.acquire('deep')!;
    expect(entry.bytes.equals(bytes)).toBe(true);
    entry.release();
    const writer = (await store.reserve('deep-2', 4 * KiB))!;
    writer.bytes.set(ecPattern(131, 4 * KiB));
    writer.commit();
    expect(store.acquire('deep-2')!.bytes.equals(ecPattern(131, 4 * KiB))).toBe(true);

    // An entry above 3 GiB has no zero-copy view; acquire says so and keeps nothing pinned.
    spacers[0].commit();
    await expectCode(() => store.acquire('spacer-1'), 'ERR_OUT_OF_RANGE');
    expect(store.stats().pinned).toBe(1); // deep-2, still held above
    spacers[1].abort();
  });
});

describe('EncoderCacheStore: resources', () => {
  it('opening, using and closing handles repeatedly leaves no descriptors or shared memory behind', async () => {
    const name = storeName('leak');
    const fds = () => readdirSync('/proc/self/fd').length;
    const keeper = await EncoderCacheStore.open({ name, capacity: '1MiB' });
    const before = fds();
    for (let i = 0; i < 100; i++) {
      const s = await EncoderCacheStore.open({ name, reclaimStale: false });
      await s.save(`k${i % 5}`, ecPattern(i, 8 * KiB));
      s.acquire(`k${i % 5}`)!.release();
      await s.reserve(`open-${i}`, KiB); // left open: close drops it
      await s.close();
    }
    expect(fds()).toBe(before);
    expect(keeper.stats()).toMatchObject({ processes: 1, pinned: 0, writing: 0 });
    await keeper.close();
    expect(storeObjects(name)).toEqual([]);
  });

  it('a worker thread that ends without close() gives back its pins and reservations', async () => {
    const store = await open();
    await store.save('k', ecPattern(120, KiB));
    const dist = pathToFileURL(path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../dist/lib/index.js')).href;
    const worker = new Worker(
      `import { parentPort, workerData } from 'node:worker_threads';
       const { EncoderCacheStore } = await import(workerData.dist);
       const s = await EncoderCacheStore.open({ name: workerData.name });
       globalThis.held = [s.acquire('k'), await s.reserve('w', 1024)];
       parentPort.postMessage('ready');
       setInterval(() => {}, 1000);`,
      { eval: true, workerData: { dist, name: store.name } },
    );
    await new Promise((resolve, reject) => {
      worker.once('message', resolve);
      worker.once('error', reject);
    });
    expect(store.stats()).toMatchObject({ processes: 2, pinned: 1, writing: 1 });
    await worker.terminate();
    expect(store.stats()).toMatchObject({ processes: 1, pinned: 0, writing: 0 });
    expect(await store.save('w', ecPattern(121, KiB))).toMatchObject({ stored: true });
  });
});
