// Bad input to every public function of the engine: a TransferError with the
// right code, thrown before any byte moves, counters untouched.
import { afterAll, beforeAll, beforeEach, describe, expect, test } from 'vitest';
import { DescriptorBatch, TransferEngine, type Region, type Descriptor, type ErrorCode, type Peer } from '../../lib/index.js';
import { closeEngines, counters, expectCode, openEngine, patterned, sha256, shmObjectsOf } from '../helpers.js';

const SIZE = 64 * 1024;

let engine: TransferEngine;
let target: TransferEngine;
let peer: Peer;
let src: Region;
let local: Region;
let remote: Region;
let stranger: TransferEngine;
let foreignPeer: Peer;

beforeAll(async () => {
  engine = await openEngine();
  target = await openEngine();
  stranger = await openEngine();
  src = patterned(engine, SIZE, 1);
  local = patterned(engine, SIZE, 2);
  remote = patterned(target, SIZE, 3);
  peer = await engine.connect(target.address!);
  foreignPeer = await stranger.connect(target.address!);
});

afterAll(closeEngines);

let remoteHash: string;
let localHash: string;
let before: Record<string, number>;

beforeEach(() => {
  remoteHash = sha256(remote.buffer!);
  localHash = sha256(local.buffer!);
  before = counters(engine);
});

/** Nothing moved and nothing was counted. */
function expectUntouched(): void {
  expect(sha256(remote.buffer!)).toBe(remoteHash);
  expect(sha256(local.buffer!)).toBe(localHash);
  expect(counters(engine)).toEqual(before);
  expect(engine.inFlight).toBe(0);
}

function d(over: Partial<Record<keyof Descriptor, unknown>>): Descriptor {
  return { localRegion: src, localOffset: 0, remoteRegion: remote.id, remoteOffset: 0, length: 16, ...over } as Descriptor;
}

describe('TransferEngine.open', () => {
  const cases: Array<[string, unknown, ErrorCode]> = [
    ['options not an object', 5, 'ERR_BAD_ARGUMENT'],
    ['options null', null, 'ERR_BAD_ARGUMENT'],
    ['options an array', [], 'ERR_BAD_ARGUMENT'],
    ['threads 0', { threads: 0 }, 'ERR_BAD_ARGUMENT'],
    ['threads 65', { threads: 65 }, 'ERR_BAD_ARGUMENT'],
    ['threads fractional', { threads: 1.5 }, 'ERR_BAD_ARGUMENT'],
    ['threads a string', { threads: '2' }, 'ERR_BAD_ARGUMENT'],
    ['chunkBytes below 4096', { chunkBytes: 100 }, 'ERR_BAD_ARGUMENT'],
    ['chunkBytes NaN', { chunkBytes: NaN }, 'ERR_BAD_ARGUMENT'],
    ['timeoutMs 0', { timeoutMs: 0 }, 'ERR_BAD_ARGUMENT'],
    ['timeoutMs negative', { timeoutMs: -1 }, 'ERR_BAD_ARGUMENT'],
    ['timeoutMs Infinity', { timeoutMs: Infinity }, 'ERR_BAD_ARGUMENT'],
    ['connectTimeoutMs a string', { connectTimeoutMs: '5' }, 'ERR_BAD_ARGUMENT'],
    ['empty name', { name: '' }, 'ERR_BAD_ARGUMENT'],
    ['name not a string', { name: 42 }, 'ERR_BAD_ARGUMENT'],
    ['host not a string', { host: 127 }, 'ERR_BAD_ARGUMENT'],
    ['port negative', { port: -1 }, 'ERR_BAD_ARGUMENT'],
    ['port above 65535', { port: 70_000 }, 'ERR_BAD_ARGUMENT'],
    ['port fractional', { port: 80.5 }, 'ERR_BAD_ARGUMENT'],
    ['unknown device', { device: 'tpu' }, 'ERR_BAD_ARGUMENT'],
    ['acl device not built', { device: 'acl' }, 'ERR_BACKEND_UNAVAILABLE'],
    ['cuda device not built', { device: 'cuda' }, 'ERR_BACKEND_UNAVAILABLE'],
    ['unknown transport', { transport: 'udp' }, 'ERR_BAD_ARGUMENT'],
    ['connections 0', { connections: 0 }, 'ERR_BAD_ARGUMENT'],
    ['connections 17', { connections: 17 }, 'ERR_BAD_ARGUMENT'],
    ['empty secret', { secret: '' }, 'ERR_BAD_ARGUMENT'],
    ['secret a number', { secret: 42 }, 'ERR_BAD_ARGUMENT'],
    ['dataPort negative', { dataPort: -1 }, 'ERR_BAD_ARGUMENT'],
    ['dataHost not a string', { dataHost: 1 }, 'ERR_BAD_ARGUMENT'],
    ['link not an object', { link: 'fast' }, 'ERR_BAD_ARGUMENT'],
    ['link with a nonsense bandwidth', { link: { bandwidth: 'lots' } }, 'ERR_BAD_ARGUMENT'],
  ];
  test.each(cases)('%s', async (_, options, code) => {
    await expectCode(() => TransferEngine.open(options as never), code);
  });

  test('a port already in use fails with ERR_SYSTEM', async () => {
    const port = Number(target.address!.split(':')[1]);
    await expectCode(() => TransferEngine.open({ port }), 'ERR_SYSTEM');
  });
});

describe('allocate', () => {
  const cases: Array<[string, unknown, unknown, ErrorCode]> = [
    ['zero bytes', 0, undefined, 'ERR_BAD_ARGUMENT'],
    ['negative bytes', -4096, undefined, 'ERR_BAD_ARGUMENT'],
    ['fractional bytes', 10.5, undefined, 'ERR_BAD_ARGUMENT'],
    ['bytes as a string', '4096', undefined, 'ERR_BAD_ARGUMENT'],
    ['bytes NaN', NaN, undefined, 'ERR_BAD_ARGUMENT'],
    ['bytes beyond 2^53', 2 ** 53, undefined, 'ERR_BAD_ARGUMENT'],
    ['options not an object', 4096, 'yes', 'ERR_BAD_ARGUMENT'],
  ];
  test.each(cases)('%s', async (_, bytes, options, code) => {
    await expectCode(() => engine.allocate(bytes as number, options as never), code);
    expectUntouched();
  });

  test('more memory than the host can map fails with ERR_SYSTEM and leaves nothing behind', async () => {
    const shmBefore = shmObjectsOf(process.pid).length;
    const err = await expectCode(() => engine.allocate(2 ** 50, { prefault: false }), 'ERR_SYSTEM');
    expect(err.errno).toBeGreaterThan(0);
    expect(shmObjectsOf(process.pid).length).toBe(shmBefore);
    const view = await (await openEngine()).connect(engine.address!);
    expect(view.regions.map((r) => r.id).sort()).toEqual([src.id, local.id].sort());
    expectUntouched();
  });
});

describe('register', () => {
  const cases: Array<[string, unknown, ErrorCode]> = [
    ['an empty Buffer', Buffer.alloc(0), 'ERR_BAD_ARGUMENT'],
    ['an empty ArrayBuffer', new ArrayBuffer(0), 'ERR_BAD_ARGUMENT'],
    ['a string', 'bytes', 'ERR_BAD_ARGUMENT'],
    ['a number', 4096, 'ERR_BAD_ARGUMENT'],
    ['null', null, 'ERR_BAD_ARGUMENT'],
    ['a plain object', {}, 'ERR_BAD_ARGUMENT'],
    ['devicePtr as a number', { devicePtr: 4096, length: 16 }, 'ERR_BAD_ARGUMENT'],
    ['device length 0', { devicePtr: 4096n, length: 0 }, 'ERR_BAD_ARGUMENT'],
    ['device length fractional', { devicePtr: 4096n, length: 1.5 }, 'ERR_BAD_ARGUMENT'],
    ['a pointer that is not device memory', { devicePtr: 0x1000n, length: 16 }, 'ERR_OUT_OF_RANGE'],
  ];
  test.each(cases)('%s', async (_, memory, code) => {
    await expectCode(() => engine.register(memory as never), code);
    expectUntouched();
  });
});

describe('connect', () => {
  const cases: Array<[string, unknown, unknown, ErrorCode]> = [
    ['address not a string', 1234, undefined, 'ERR_BAD_ARGUMENT'],
    ['empty address', '', undefined, 'ERR_BAD_ARGUMENT'],
    // Without a port a target is an engine name: embedded metadata knows only this process's engines.
    ['a name no engine has', 'localhost', undefined, 'ERR_UNKNOWN_PEER'],
    ['port 0', '127.0.0.1:0', undefined, 'ERR_BAD_ARGUMENT'],
    ['port out of range', '127.0.0.1:99999', undefined, 'ERR_BAD_ARGUMENT'],
    ['options not an object', '127.0.0.1:1', 'x', 'ERR_BAD_ARGUMENT'],
    ['timeoutMs 0', '127.0.0.1:1', { timeoutMs: 0 }, 'ERR_BAD_ARGUMENT'],
    ['unknown transport', '127.0.0.1:1', { transport: 'rdma' }, 'ERR_BAD_ARGUMENT'],
    ['connections fractional', '127.0.0.1:1', { connections: 1.5 }, 'ERR_BAD_ARGUMENT'],
    ['link not an object', '127.0.0.1:1', { link: 5 }, 'ERR_BAD_ARGUMENT'],
  ];
  test.each(cases)('%s', async (_, address, options, code) => {
    await expectCode(() => engine.connect(address as string, options as never), code);
  });
});

describe('write and read', () => {
  const batches: Array<[string, () => unknown, ErrorCode]> = [
    ['batch not an array', () => 5, 'ERR_BAD_ARGUMENT'],
    ['batch null', () => null, 'ERR_BAD_ARGUMENT'],
    ['batch a plain object', () => ({ length: 1 }), 'ERR_BAD_ARGUMENT'],
    ['empty batch', () => [], 'ERR_BAD_ARGUMENT'],
    ['empty DescriptorBatch', () => new DescriptorBatch(), 'ERR_BAD_ARGUMENT'],
    ['descriptor null', () => [null], 'ERR_BAD_ARGUMENT'],
    ['descriptor a number', () => [7], 'ERR_BAD_ARGUMENT'],
    ['missing length', () => [d({ length: undefined })], 'ERR_BAD_ARGUMENT'],
    ['zero length', () => [d({ length: 0 })], 'ERR_BAD_ARGUMENT'],
    ['negative length', () => [d({ length: -16 })], 'ERR_BAD_ARGUMENT'],
    ['length as a string', () => [d({ length: '16' })], 'ERR_BAD_ARGUMENT'],
    ['negative localOffset', () => [d({ localOffset: -1 })], 'ERR_BAD_ARGUMENT'],
    ['fractional localOffset', () => [d({ localOffset: 0.5 })], 'ERR_BAD_ARGUMENT'],
    ['NaN remoteOffset', () => [d({ remoteOffset: NaN })], 'ERR_BAD_ARGUMENT'],
    ['remoteOffset beyond 2^53', () => [d({ remoteOffset: 2 ** 53 })], 'ERR_BAD_ARGUMENT'],
    ['bigint offset', () => [d({ localOffset: 0n })], 'ERR_BAD_ARGUMENT'],
    ['localRegion a string', () => [d({ localRegion: '1' })], 'ERR_BAD_ARGUMENT'],
    ['localRegion negative', () => [d({ localRegion: -1 })], 'ERR_BAD_ARGUMENT'],
    ['remoteRegion with a fractional id', () => [d({ remoteRegion: { id: 1.5 } })], 'ERR_BAD_ARGUMENT'],
    ['local range past the region end', () => [d({ localOffset: SIZE - 8, length: 16 })], 'ERR_OUT_OF_RANGE'],
    ['local offset at the region end', () => [d({ localOffset: SIZE, length: 1 })], 'ERR_OUT_OF_RANGE'],
    ['local offset far past the region', () => [d({ localOffset: 2 ** 40 })], 'ERR_OUT_OF_RANGE'],
    ['local length larger than the region', () => [d({ length: SIZE + 1 })], 'ERR_OUT_OF_RANGE'],
    ['offset + length overflowing 2^53', () => [d({ localOffset: 2 ** 53 - 1, length: 2 ** 53 - 1 })], 'ERR_OUT_OF_RANGE'],
    ['remote range past the region end', () => [d({ remoteOffset: SIZE - 1, length: 2 })], 'ERR_OUT_OF_RANGE'],
    ['remote offset at the region end', () => [d({ remoteOffset: SIZE })], 'ERR_OUT_OF_RANGE'],
    ['unknown local region', () => [d({ localRegion: 9999 })], 'ERR_UNKNOWN_REGION'],
    ['local region id beyond 32 bits', () => [d({ localRegion: 2 ** 32 + src.id })], 'ERR_UNKNOWN_REGION'],
    ['unknown remote region', () => [d({ remoteRegion: 9999 })], 'ERR_UNKNOWN_REGION'],
    ['remote region id beyond 32 bits', () => [d({ remoteRegion: 2 ** 32 + remote.id })], 'ERR_UNKNOWN_REGION'],
    ['a valid descriptor followed by a bad one', () => [d({}), d({ remoteOffset: SIZE })], 'ERR_OUT_OF_RANGE'],
    ['a valid descriptor followed by an unknown region', () => [d({}), d({ localRegion: 4242 })], 'ERR_UNKNOWN_REGION'],
    ['DescriptorBatch with a negative offset', () => new DescriptorBatch().add(src, -1, remote.id, 0, 4), 'ERR_BAD_ARGUMENT'],
    ['DescriptorBatch with a NaN length', () => new DescriptorBatch().add(src, 0, remote.id, 0, NaN), 'ERR_BAD_ARGUMENT'],
    ['DescriptorBatch with a zero length', () => new DescriptorBatch().add(src, 0, remote.id, 0, 0), 'ERR_BAD_ARGUMENT'],
    ['DescriptorBatch with a fractional offset', () => new DescriptorBatch().add(src, 0, remote.id, 0.25, 4), 'ERR_BAD_ARGUMENT'],
    ['DescriptorBatch past the remote region', () => new DescriptorBatch().add(src, 0, remote.id, 0, 4).add(src, 0, remote.id, SIZE - 3, 4), 'ERR_OUT_OF_RANGE'],
  ];

  describe.each([
    ['write', (p: Peer, b: unknown, o?: unknown) => engine.write(p, b as never, o as never)],
    ['read', (p: Peer, b: unknown, o?: unknown) => engine.read(p, b as never, o as never)],
  ] as const)('%s', (_, op) => {
    test.each(batches)('%s', async (_, batch, code) => {
      // For reads the local side is the destination.
      const b = batch();
      await expectCode(() => op(peer, b), code);
      expectUntouched();
    });

    test('the destination is local for reads too: a read into a region past its end moves nothing', async () => {
      await expectCode(() => op(peer, [d({ localRegion: local, localOffset: SIZE - 1, length: 2 })]), 'ERR_OUT_OF_RANGE');
      expectUntouched();
    });

    test.each([
      ['peer undefined', () => undefined],
      ['peer a plain object', () => ({ nativeId: 1 })],
      ['a Peer of another engine', () => foreignPeer],
    ])('%s', async (_, p) => {
      await expectCode(() => op(p() as Peer, [d({})]), 'ERR_BAD_ARGUMENT');
      expectUntouched();
    });

    test.each([
      ['options not an object', 5],
      ['timeoutMs 0', { timeoutMs: 0 }],
      ['timeoutMs NaN', { timeoutMs: NaN }],
      ['signal not an AbortSignal', { signal: { aborted: false } }],
    ])('%s', async (_, options) => {
      await expectCode(() => op(peer, [d({})], options), 'ERR_BAD_ARGUMENT');
      expectUntouched();
    });
  });

  test('a Region of another engine is refused, not mistaken for a local id', async () => {
    const theirs = patterned(stranger, SIZE, 9);
    await expectCode(() => engine.write(peer, [d({ localRegion: theirs })]), 'ERR_BAD_ARGUMENT');
    expectUntouched();
  });

  test('after the bad batches a good one still moves exactly its bytes', async () => {
    await engine.write(peer, [d({ localOffset: 100, remoteOffset: 200, length: 300 })]);
    expect(sha256(remote.buffer!, 200, 300)).toBe(sha256(src.buffer!, 100, 300));
    expect(engine.counters.bytesWritten - before.bytesWritten).toBe(300);
  });
});

describe('free', () => {
  test('free twice fails with ERR_UNKNOWN_REGION', async () => {
    const r = engine.allocate(4096);
    await r.free();
    await expectCode(() => r.free(), 'ERR_UNKNOWN_REGION');
  });

  test.each([
    ['options not an object', 'fail'],
    ['unknown inFlight policy', { inFlight: 'later' }],
  ])('%s', async (_, options) => {
    const r = engine.allocate(4096);
    await expectCode(() => r.free(options as never), 'ERR_BAD_ARGUMENT');
    // The region is still usable: a bad free must not half-free it.
    await engine.write(peer, [d({ localRegion: r, length: 8 })]);
    await r.free();
  });
});

describe('DescriptorBatch', () => {
  test.each([0, -1, 1.5, '8'])('capacity %s', async (capacity) => {
    await expectCode(() => new DescriptorBatch(capacity as number), 'ERR_BAD_ARGUMENT');
  });
});

describe('close and refresh options', () => {
  test.each([
    ['close options not an object', () => engine.close(3 as never)],
    ['close timeoutMs negative', () => engine.close({ timeoutMs: -5 })],
    ['refresh timeoutMs 0', () => peer.refresh(0)],
  ])('%s', async (_, fn) => {
    await expectCode(fn, 'ERR_BAD_ARGUMENT');
    // A rejected close() must not leave the engine half-closed.
    await engine.write(peer, [d({ length: 1 })]);
  });
});
