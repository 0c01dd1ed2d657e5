// Other hosts: a consumer finds the holder of a key in the directory and pulls it
// through the engines' control connection and transport. The holder runs in its own
// process with its own store, so nothing can come through a shared index.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  ECConnector,
  EmbeddedDirectory,
  EncoderCacheRemote,
  EncoderCacheStore,
  FETCH_TOPIC,
  DIRECTORY_TOPIC,
  MemoryDirectory,
  TransferEngine,
  serveDirectory,
} from '../../lib/index.js';
import { ecPattern, expectCode, startWorker, stopWorkers, storeName, type EcWorker } from './helpers.js';

const MiB = 1 << 20;
const SIZE = 3 * MiB + 123; // not a multiple of anything

let directoryEngine: TransferEngine;
let directory: MemoryDirectory;
let engine: TransferEngine;
let store: EncoderCacheStore;
let remote: EncoderCacheRemote;
let holder: EcWorker;
let holderAddress: string;

async function until(what: string, predicate: () => Promise<boolean>): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

beforeEach(async () => {
  directoryEngine = await TransferEngine.open();
  directory = new MemoryDirectory();
  serveDirectory(directoryEngine, directory);
  engine = await TransferEngine.open();
  store = await EncoderCacheStore.open({ name: storeName('consumer'), capacity: 16 * MiB });
  remote = new EncoderCacheRemote(engine, await EmbeddedDirectory.connect(engine, directoryEngine.address!), { timeoutMs: 10_000 });

  holder = await startWorker();
  await holder.call('open', { name: storeName('holder'), capacity: 16 * MiB });
  await holder.call('save', { key: 'img', seed: 1, size: SIZE, meta: { tokens: 1000 } });
  holderAddress = (await holder.call<{ address: string }>('serve', { directoryAddress: directoryEngine.address })).address;
});

afterEach(async () => {
  await stopWorkers();
  await store.close();
  await engine.close();
  await directoryEngine.close();
});

describe('encoder cache across hosts', () => {
  it('pulls an entry from its holder over the transport, byte-exact', async () => {
    expect(await remote.locate('img')).toEqual([holderAddress]);
    expect(store.has('img')).toBe(false); // this "host" has its own store
    expect(await remote.stat(holderAddress, 'img')).toEqual({ bytes: SIZE, meta: { tokens: 1000 } });

    // Straight into a host region of this engine, at an offset.
    const region = engine.allocate(SIZE + 8192);
    expect(await remote.pull(holderAddress, 'img', { region, offset: 8192 })).toEqual({ bytes: SIZE, meta: { tokens: 1000 }, holder: holderAddress });
    expect(region.buffer!.subarray(8192, 8192 + SIZE).equals(ecPattern(1, SIZE))).toBe(true);
    const counters = await holder.call<{ bytesWritten: number }>('engineCounters');
    expect(counters.bytesWritten).toBe(SIZE); // the holder's engine moved the bytes

    // Into plain memory, through a staging region.
    const plain = Buffer.alloc(SIZE);
    expect(await remote.fetch('img', plain)).toMatchObject({ bytes: SIZE, holder: holderAddress });
    expect(plain.equals(ecPattern(1, SIZE))).toBe(true);
    expect(await holder.call('stats')).toMatchObject({ pinned: 0 });
  });

  it('pulls over the tcp transport, as between two hosts', async () => {
    const tcpHolder = await startWorker();
    await tcpHolder.call('open', { name: storeName('tcp-holder'), capacity: 16 * MiB });
    await tcpHolder.call('save', { key: 'over-tcp', seed: 3, size: SIZE });
    const { address } = await tcpHolder.call<{ address: string }>('serve', { directoryAddress: directoryEngine.address, transport: 'tcp' });
    await until('the key to be announced', async () => (await remote.locate('over-tcp')).length === 1);
    const region = engine.allocate(SIZE);
    expect(await remote.fetch('over-tcp', region)).toMatchObject({ bytes: SIZE, holder: address });
    expect(region.buffer!.equals(ecPattern(3, SIZE))).toBe(true);
    expect(await tcpHolder.call('engineCounters')).toMatchObject({ bytesWritten: SIZE });
  });

  it('misses are ordinary results', async () => {
    expect(await remote.locate('nobody-has-it')).toEqual([]);
    expect(await remote.stat(holderAddress, 'nobody-has-it')).toBeNull();
    expect(await remote.pull(holderAddress, 'nobody-has-it', engine.allocate(4096))).toBeNull();
    expect(await remote.fetch('nobody-has-it', Buffer.alloc(4096))).toBeNull();
  });

  it('the directory follows the holder: new keys are announced, removed ones withdrawn', async () => {
    await holder.call('save', { key: 'later', seed: 2, size: 4096 });
    await until('the new key to be announced', async () => (await remote.locate('later')).length === 1);
    await holder.call('delete', { key: 'later' });
    await until('the deleted key to be withdrawn', async () => (await remote.locate('later')).length === 0);
    expect(await remote.locate('img')).toEqual([holderAddress]);
  });

  it('the connector pulls what another host holds and keeps it on this host', async () => {
    const scheduler = new ECConnector({ role: 'scheduler', store, remote });
    const worker = new ECConnector({ role: 'worker', store, remote });
    expect(await scheduler.hasCacheItem('img')).toBe(true);
    expect(await scheduler.hasCacheItem('unknown')).toBe(false);
    scheduler.updateStateAfterAlloc({ requestId: 'R', mmFeatures: [{ mmHash: 'img', numTokens: 1000 }] }, 0);
    const meta = scheduler.buildConnectorMeta();
    expect(meta.items).toEqual([{ mmHash: 'img', numTokens: 1000, requestIds: ['R'], holder: holderAddress }]);

    const target = Buffer.alloc(SIZE);
    await worker.startLoadCaches(meta, { img: target });
    expect(worker.getFinished()).toMatchObject({ loaded: ['img'], missed: [], failedLoads: [] });
    expect(target.equals(ecPattern(1, SIZE))).toBe(true);
    // Now this host has it too: the next check is answered locally.
    expect(store.acquire('img')!.bytes.equals(ecPattern(1, SIZE))).toBe(true);
  });

  it('a directory that cannot answer reads as a miss to the scheduler', async () => {
    const scheduler = new ECConnector({ role: 'scheduler', store, remote });
    await directoryEngine.close();
    expect(await scheduler.hasCacheItem('img')).toBe(false);
  });

  it('a holder that died is forgotten and the fetch is a miss', async () => {
    await holder.kill();
    expect(await remote.fetch('img', Buffer.alloc(SIZE))).toBeNull();
    expect(await directory.locate('img')).toEqual([]);
  });

  it('a target too small fails with ERR_OUT_OF_RANGE and leaves the holder unpinned', async () => {
    await expectCode(() => remote.pull(holderAddress, 'img', engine.allocate(SIZE - 1)), 'ERR_OUT_OF_RANGE');
    expect(await holder.call('stats')).toMatchObject({ pinned: 0 });
  });

  it('a holder writes only into the engine that asked', async () => {
    const bystander = await TransferEngine.open();
    try {
      const victim = bystander.allocate(SIZE);
      const peer = await engine.connect(holderAddress);
      const err = await expectCode(
        () => peer.request(FETCH_TOPIC, { mmHash: 'img', address: bystander.address, region: victim.id, offset: 0, length: SIZE }),
        'ERR_BAD_ARGUMENT',
      );
      expect(err.message).toMatch(/not the requester/);
      expect(victim.buffer!.every((b) => b === 0)).toBe(true);
      expect(await holder.call('stats')).toMatchObject({ pinned: 0 });
    } finally {
      await bystander.close();
    }
  });

  it('bad requests are refused with ERR_BAD_ARGUMENT', async () => {
    const peer = await engine.connect(holderAddress);
    for (const body of [null, { mmHash: 5 }, { mmHash: 'img', address: engine.address, region: 0, offset: 0, length: 1 }, { mmHash: 'img', address: engine.address, region: 1, offset: -1, length: 1 }]) {
      await expectCode(() => peer.request(FETCH_TOPIC, body), 'ERR_BAD_ARGUMENT');
    }
    const dir = await engine.connect(directoryEngine.address!);
    for (const body of [{ op: 'drop' }, { op: 'announce', holder: 'h', mmHashes: 'img' }, { op: 'locate' }, { op: 'announce', holder: '', mmHashes: [] }]) {
      await expectCode(() => dir.request(DIRECTORY_TOPIC, body), 'ERR_BAD_ARGUMENT');
    }
    await expectCode(() => remote.pull(holderAddress, 'img', { region: engine.allocate(16), offset: 16 }), 'ERR_OUT_OF_RANGE');
    await expectCode(() => remote.pull(holderAddress, 'img', 'buffer' as never), 'ERR_BAD_ARGUMENT');
    await expectCode(() => remote.pull('', 'img', Buffer.alloc(1)), 'ERR_BAD_ARGUMENT');
    expect(() => new EncoderCacheRemote({} as never, directory)).toThrow(expect.objectContaining({ code: 'ERR_BAD_ARGUMENT' }));
    const silent = await TransferEngine.open({ listen: false });
    try {
      await expectCode(() => new EncoderCacheRemote(silent, directory).pull(holderAddress, 'img', Buffer.alloc(SIZE)), 'ERR_BAD_ARGUMENT');
    } finally {
      await silent.close();
    }
  });
});

describe('MemoryDirectory', () => {
  it('locates holders most recently announced first; withdraw and forget remove them', async () => {
    const d = new MemoryDirectory();
    await d.announce('h1:1', ['a', 'b']);
    await d.announce('h2:2', ['a']);
    expect(await d.locate('a')).toEqual(['h2:2', 'h1:1']);
    await d.announce('h1:1', ['a']);
    expect(await d.locate('a')).toEqual(['h1:1', 'h2:2']);
    await d.withdraw('h1:1', ['a']);
    expect(await d.locate('a')).toEqual(['h2:2']);
    await d.forget('h2:2');
    expect(await d.locate('a')).toEqual([]);
    expect(await d.locate('b')).toEqual(['h1:1']);
    expect(d.size).toBe(1);
    await expectCode(() => d.announce('h', [''] as never), 'ERR_BAD_ARGUMENT');
    await expectCode(() => d.locate(3 as never), 'ERR_BAD_ARGUMENT');
  });
});
