// The encoder-cache index in etcd: holders by mmHash, most recent first; entries
// leave on withdraw (eviction), on close, and when the holder's lease is lost.
import { afterEach, describe, expect, it } from 'vitest';
import { EncoderCacheHost, EncoderCacheRemote, EncoderCacheStore } from '../../lib/index.js';
import { EtcdEncoderCacheIndex } from '../../lib/meta/ec-index.js';
import { closeEngines, expectCode, openEngine, stopPeers, waitFor } from '../helpers.js';
import { noEtcd, uniquePrefix, useEtcd } from './etcd-helpers.js';

const etcd = useEtcd();
const open: EtcdEncoderCacheIndex[] = [];

afterEach(async () => {
  await stopPeers();
  await closeEngines();
  await Promise.all(open.splice(0).map((i) => i.close()));
});

async function index(prefix: string, ttlSeconds = 2): Promise<EtcdEncoderCacheIndex> {
  const i = await EtcdEncoderCacheIndex.connect(etcd.url, { prefix, ttlSeconds });
  open.push(i);
  return i;
}

const h = (n: number) => n.toString(16).padStart(64, '0');

describe.skipIf(noEtcd)('encoder-cache index in etcd', () => {
  it('locate answers the holders of a key, most recent announcement first', async () => {
    const prefix = uniquePrefix();
    const a = await index(prefix);
    const b = await index(prefix);
    await a.announce('10.0.0.1:7400', [h(1), h(2)]);
    await b.announce('10.0.0.2:7400', [h(2)]);
    expect(await b.locate(h(1))).toEqual(['10.0.0.1:7400']);
    expect(await a.locate(h(2))).toEqual(['10.0.0.2:7400', '10.0.0.1:7400']);
    expect(await a.locate(h(3))).toEqual([]);
    // A key that is a prefix of another key's path never matches it.
    await a.announce('lora:x', ['lora:x']);
    expect(await a.locate('lora')).toEqual([]);
  });

  it('withdraw (what an eviction triggers) removes just that holder of that key', async () => {
    const prefix = uniquePrefix();
    const a = await index(prefix);
    await a.announce('e1', [h(1), h(2)]);
    await a.announce('e2', [h(1)]);
    await a.withdraw('e1', [h(1)]);
    expect(await a.locate(h(1))).toEqual(['e2']);
    expect(await a.locate(h(2))).toEqual(['e1']);
    await a.forget('e1');
    expect(await a.locate(h(2))).toEqual([]);
    expect(await a.locate(h(1))).toEqual(['e2']);
  });

  // (A crash ends the lease by expiry instead: the same mechanism test/meta/etcd.test.ts times for segment records.)
  it("entries go with the holder's lease: when the holder or its engine closes, at once", async () => {
    const prefix = uniquePrefix();
    const reader = await index(prefix);
    const closing = await EtcdEncoderCacheIndex.connect(etcd.url, { prefix, ttlSeconds: 2 });
    await closing.announce('closing', [h(5)]);
    await closing.close();
    expect(await reader.locate(h(5))).toEqual([]);

    // An index sharing an engine's session: its announcements live and die with the engine's record.
    const engine = await openEngine({ metadata: etcd.url, metadataOptions: { prefix, ttlSeconds: 2 }, name: `holder-local-${process.pid}` });
    const local = EtcdEncoderCacheIndex.forEngine(engine);
    await local.announce(engine.address!, [h(6)]);
    expect(await reader.locate(h(6))).toEqual([engine.address]);
    await engine.close();
    expect(await reader.locate(h(6))).toEqual([]);
  });

  it('a lost lease takes the entries away and re-announces them when the lease is back', async () => {
    const prefix = uniquePrefix();
    const engine = await openEngine({ metadata: etcd.url, metadataOptions: { prefix, ttlSeconds: 2 }, name: `relapse-ec-${process.pid}` });
    const idx = EtcdEncoderCacheIndex.forEngine(engine);
    const reader = await index(prefix);
    await idx.announce(engine.address!, [h(7)]);
    const session = (engine.metadata as unknown as { session: { dropLease(): Promise<void> } }).session;
    await session.dropLease();
    await waitFor(async () => (await reader.locate(h(7))).length === 1 && engine.metadata.state === 'live', 're-announced after the new lease');
  });

  it('with lib/ec: a host announces through etcd, a consumer elsewhere pulls by mmHash, eviction withdraws the entry', async () => {
    const prefix = uniquePrefix();
    const o = { metadata: etcd.url, metadataOptions: { prefix, ttlSeconds: 2 } };
    const KiB = 1024;
    const holderEngine = await openEngine({ ...o, name: `ec-holder-${process.pid}` });
    const holderStore = await EncoderCacheStore.open({ name: `t-etcd-holder-${process.pid}`, capacity: 1024 * KiB, maxEntries: 256 });
    const host = await EncoderCacheHost.serve(holderEngine, holderStore, { directory: EtcdEncoderCacheIndex.forEngine(holderEngine), syncIntervalMs: 50 });
    const consumer = await openEngine({ ...o, name: `ec-consumer-${process.pid}` });
    const reader = await index(prefix);
    try {
      const first = Buffer.alloc(400 * KiB, 0x11);
      await holderStore.save(h(1), first);
      await waitFor(async () => (await reader.locate(h(1))).length === 1, 'the holder to announce the key');
      const remote = new EncoderCacheRemote(consumer, EtcdEncoderCacheIndex.forEngine(consumer));
      const target = Buffer.alloc(first.length);
      expect(await remote.fetch(h(1), target)).toMatchObject({ bytes: first.length, holder: host.address });
      expect(target.equals(first)).toBe(true);
      // Two more entries do not fit beside the first: the store evicts it, the host's sync withdraws it.
      await holderStore.save(h(2), Buffer.alloc(400 * KiB, 0x22));
      await holderStore.save(h(3), Buffer.alloc(400 * KiB, 0x33));
      expect(holderStore.has(h(1))).toBe(false);
      await waitFor(async () => (await reader.locate(h(1))).length === 0 && (await reader.locate(h(3))).length === 1, 'the evicted key to be withdrawn');
      expect(await remote.fetch(h(1), target)).toBeNull();
    } finally {
      await host.close();
      await holderStore.close();
    }
  });

  it('bad arguments are ERR_BAD_ARGUMENT', async () => {
    const a = await index(uniquePrefix());
    await expectCode(() => a.announce('e', ['']), 'ERR_BAD_ARGUMENT');
    await expectCode(() => a.announce('e', 'x' as never), 'ERR_BAD_ARGUMENT');
    await expectCode(() => a.locate(5 as never), 'ERR_BAD_ARGUMENT');
    const embedded = await openEngine();
    await expectCode(() => EtcdEncoderCacheIndex.forEngine(embedded), 'ERR_BAD_ARGUMENT');
  });
});
