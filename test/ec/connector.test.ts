// ECConnector against vLLM's contract: the scheduler's per-step sequence
// (hasCacheItem → updateStateAfterAlloc → buildConnectorMeta, then reset) and the
// worker's saveCaches / startLoadCaches / getFinished.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ECConnector, EncoderCacheStore, TransferEngine, type ECRequest } from '../../lib/index.js';
import { ecPattern, expectCode, storeName } from './helpers.js';

const KiB = 1024;
let store: EncoderCacheStore;

beforeEach(async () => {
  store = await EncoderCacheStore.open({ name: storeName('conn'), capacity: '4MiB' });
});
afterEach(async () => {
  await store.close();
});

function request(requestId: string, ...items: Array<[string, number]>): ECRequest {
  return { requestId, mmFeatures: items.map(([mmHash, numTokens]) => ({ mmHash, numTokens })) };
}

describe('ECConnector: scheduler role', () => {
  it('one step: check, allocate, build the metadata, then start empty', async () => {
    await store.save('cached', ecPattern(1, 4 * KiB));
    await store.save('cached-2', ecPattern(2, 4 * KiB));
    const scheduler = new ECConnector({ role: 'scheduler', store });

    // Step 1: request A has a cached and an uncached item; request B reuses the cached one.
    expect(await scheduler.hasCacheItem('cached')).toBe(true);
    expect(await scheduler.hasCacheItem('fresh')).toBe(false); // a miss is an answer, not an error
    scheduler.updateStateAfterAlloc(request('A', ['cached', 256], ['fresh', 64]), 0);
    scheduler.updateStateAfterAlloc(request('A', ['cached', 256], ['fresh', 64]), 1); // encoded locally: no load
    scheduler.updateStateAfterAlloc(request('B', ['cached', 256]), 0);
    const step1 = scheduler.buildConnectorMeta();
    expect(step1.items).toEqual([{ mmHash: 'cached', numTokens: 256, requestIds: ['A', 'B'] }]);
    expect(Object.isFrozen(step1.items)).toBe(true);

    // Reset: nothing carries over into step 2.
    expect(scheduler.buildConnectorMeta().items).toEqual([]);

    // Step 2: an item checked but never allocated (no space this step) is not loaded.
    expect(await scheduler.hasCacheItem('cached-2')).toBe(true);
    expect(scheduler.buildConnectorMeta().items).toEqual([]);
  });

  it('an item that left the store after the check of an earlier step is not loaded', async () => {
    await store.save('short-lived', ecPattern(3, 4 * KiB));
    const scheduler = new ECConnector({ role: 'scheduler', store });
    expect(await scheduler.hasCacheItem('short-lived')).toBe(true);
    scheduler.buildConnectorMeta(); // step ends without an allocation
    store.delete('short-lived');
    scheduler.updateStateAfterAlloc(request('A', ['short-lived', 16]), 0);
    expect(scheduler.buildConnectorMeta().items).toEqual([]);
  });

  it('an encode-only (producer) scheduler checks but never loads', async () => {
    await store.save('cached', ecPattern(4, 4 * KiB));
    const scheduler = new ECConnector({ role: 'scheduler', store, transferRole: 'producer' });
    expect(scheduler.isProducer && !scheduler.isConsumer).toBe(true);
    expect(await scheduler.hasCacheItem('cached')).toBe(true); // lets the encoder skip it
    scheduler.updateStateAfterAlloc(request('A', ['cached', 32]), 0);
    expect(scheduler.buildConnectorMeta().items).toEqual([]);
  });

  it('rejects worker calls and bad input', async () => {
    const scheduler = new ECConnector({ role: 'scheduler', store });
    await expectCode(() => scheduler.saveCaches('k', Buffer.alloc(1)), 'ERR_BAD_ARGUMENT');
    await expectCode(() => scheduler.startLoadCaches({ items: [] }, {}), 'ERR_BAD_ARGUMENT');
    await expectCode(() => scheduler.getFinished(), 'ERR_BAD_ARGUMENT');
    await expectCode(() => scheduler.hasCacheItem(7 as never), 'ERR_BAD_ARGUMENT');
    await expectCode(() => scheduler.updateStateAfterAlloc(request('A', ['k', 8]), 1), 'ERR_BAD_ARGUMENT');
    await expectCode(() => scheduler.updateStateAfterAlloc(request('A'), 0), 'ERR_BAD_ARGUMENT');
    await expectCode(() => scheduler.updateStateAfterAlloc(request('A', ['k', 0]), 0), 'ERR_BAD_ARGUMENT');
    await expectCode(() => scheduler.updateStateAfterAlloc({ requestId: 'A' } as never, 0), 'ERR_BAD_ARGUMENT');
    await expectCode(() => scheduler.updateStateAfterAlloc(null as never, 0), 'ERR_BAD_ARGUMENT');
    await expectCode(() => new ECConnector({ role: 'driver' as never, store }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => new ECConnector({ role: 'worker', store: {} as never }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => new ECConnector({ role: 'worker', store, transferRole: 'reader' as never }), 'ERR_BAD_ARGUMENT');
  });
});

describe('ECConnector: worker role', () => {
  it('saves, then loads what the scheduler planned, and reports it once', async () => {
    const producer = new ECConnector({ role: 'worker', store, transferRole: 'producer' });
    const scheduler = new ECConnector({ role: 'scheduler', store, transferRole: 'consumer' });
    const consumer = new ECConnector({ role: 'worker', store, transferRole: 'consumer' });

    expect(await producer.saveCaches('img-a', ecPattern(10, 64 * KiB), { meta: { tokens: 64 } })).toMatchObject({ stored: true });
    expect(await producer.saveCaches('img-a', ecPattern(10, 64 * KiB))).toEqual({ stored: false, reason: 'exists' });
    expect(await producer.saveCaches('img-b', ecPattern(11, 32 * KiB))).toMatchObject({ stored: true });
    expect(producer.getFinished().saved).toEqual(['img-a', 'img-a', 'img-b']);
    expect(producer.getFinished().saved).toEqual([]);

    for (const k of ['img-a', 'img-b']) expect(await scheduler.hasCacheItem(k)).toBe(true);
    scheduler.updateStateAfterAlloc(request('R1', ['img-a', 64], ['img-b', 32]), 0);
    scheduler.updateStateAfterAlloc(request('R1', ['img-a', 64], ['img-b', 32]), 1);
    const meta = scheduler.buildConnectorMeta();

    const engine = await TransferEngine.open({ listen: false });
    try {
      const a = Buffer.alloc(64 * KiB);
      const b = engine.allocate(32 * KiB);
      await consumer.startLoadCaches(meta, new Map<string, Buffer | typeof b>([['img-a', a], ['img-b', b]]));
      expect(a.equals(ecPattern(10, 64 * KiB))).toBe(true);
      expect(b.buffer!.equals(ecPattern(11, 32 * KiB))).toBe(true);
      expect(consumer.getFinished()).toEqual({ saved: [], failedSaves: [], loaded: ['img-a', 'img-b'], missed: [], failedLoads: [] });
      expect(consumer.getFinished().loaded).toEqual([]);
    } finally {
      await engine.close();
    }
  });

  it('an item evicted between the check and the load is reported missed', async () => {
    await store.save('evicted', ecPattern(12, 4 * KiB));
    const scheduler = new ECConnector({ role: 'scheduler', store });
    const worker = new ECConnector({ role: 'worker', store });
    await scheduler.hasCacheItem('evicted');
    scheduler.updateStateAfterAlloc(request('R', ['evicted', 4]), 0);
    const meta = scheduler.buildConnectorMeta();
    store.delete('evicted');
    await worker.startLoadCaches(meta, { evicted: Buffer.alloc(4 * KiB) });
    expect(worker.getFinished()).toMatchObject({ loaded: [], missed: ['evicted'], failedLoads: [] });
  });

  it('a destination too small fails that item only', async () => {
    await store.save('ok', ecPattern(13, 4 * KiB));
    await store.save('too-big', ecPattern(14, 8 * KiB));
    const worker = new ECConnector({ role: 'worker', store });
    const ok = Buffer.alloc(4 * KiB);
    await worker.startLoadCaches(
      { items: [{ mmHash: 'ok', numTokens: 1, requestIds: ['R'] }, { mmHash: 'too-big', numTokens: 2, requestIds: ['R'] }] },
      { ok, 'too-big': Buffer.alloc(4 * KiB) },
    );
    const finished = worker.getFinished();
    expect(finished.loaded).toEqual(['ok']);
    expect(finished.failedLoads.map((f) => [f.mmHash, f.error.code])).toEqual([['too-big', 'ERR_OUT_OF_RANGE']]);
    expect(ok.equals(ecPattern(13, 4 * KiB))).toBe(true);
  });

  it('checks every destination before any load starts', async () => {
    await store.save('a', ecPattern(15, 4 * KiB));
    const worker = new ECConnector({ role: 'worker', store });
    const a = Buffer.alloc(4 * KiB);
    const meta = { items: [{ mmHash: 'a', numTokens: 1, requestIds: ['R'] }, { mmHash: 'b', numTokens: 1, requestIds: ['R'] }] };
    const err = await expectCode(() => worker.startLoadCaches(meta, { a }), 'ERR_BAD_ARGUMENT');
    expect(err.message).toContain("destinations['b']");
    expect(a.every((x) => x === 0)).toBe(true);
    await expectCode(() => worker.startLoadCaches({ items: 'all' } as never, {}), 'ERR_BAD_ARGUMENT');
    await expectCode(() => worker.startLoadCaches(meta, null as never), 'ERR_BAD_ARGUMENT');
    await expectCode(() => worker.startLoadCaches({ items: [{ numTokens: 1 }] } as never, {}), 'ERR_BAD_ARGUMENT');
    expect(worker.getFinished()).toEqual({ saved: [], failedSaves: [], loaded: [], missed: [], failedLoads: [] });
  });

  it('a failed save is reported and thrown; roles are enforced', async () => {
    const worker = new ECConnector({ role: 'worker', store });
    const err = await expectCode(() => worker.saveCaches('huge', Buffer.alloc(5 << 20)), 'ERR_CAPACITY');
    expect(worker.getFinished().failedSaves).toEqual([{ mmHash: 'huge', error: err }]);
    const consumerOnly = new ECConnector({ role: 'worker', store, transferRole: 'consumer' });
    await expectCode(() => consumerOnly.saveCaches('k', Buffer.alloc(1)), 'ERR_BAD_ARGUMENT');
    const producerOnly = new ECConnector({ role: 'worker', store, transferRole: 'producer' });
    await expectCode(() => producerOnly.startLoadCaches({ items: [] }, {}), 'ERR_BAD_ARGUMENT');
    await expectCode(() => worker.hasCacheItem('k'), 'ERR_BAD_ARGUMENT');
    await expectCode(() => worker.buildConnectorMeta(), 'ERR_BAD_ARGUMENT');
    await expectCode(() => worker.updateStateAfterAlloc(request('A', ['k', 1]), 0), 'ERR_BAD_ARGUMENT');
  });
});
