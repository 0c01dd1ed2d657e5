// Region.free() while batches use the region: by default it waits for them; with
// inFlight 'fail' it stops them with ERR_REGION_FREED; later batches naming the
// region fail before moving a byte.
import { afterAll, beforeAll, expect, test } from 'vitest';
import type { Peer, Region, TransferEngine } from '../../lib/index.js';
import { closeEngines, counters, expectCode, openEngine, patterned, repeatedBatch, sha256 } from '../helpers.js';

const MiB = 1 << 20;
const SIZE = 16 * MiB;

let engine: TransferEngine;
let target: TransferEngine;
let peer: Peer;
let dst: Region;

beforeAll(async () => {
  engine = await openEngine();
  target = await openEngine();
  dst = patterned(target, SIZE, 2);
  peer = await engine.connect(target.address!);
});

afterAll(closeEngines);

test('free() waits for the write in flight over the region to finish', async () => {
  const src = patterned(engine, SIZE, 1);
  // Many copies into the first half, then a distinctive range into the second half
  // (descriptors of one batch run in parallel, so their targets must not overlap).
  const half = SIZE / 2;
  const batch = [...repeatedBatch(src, dst.id, half, 63), { localRegion: src, localOffset: 1, remoteRegion: dst.id, remoteOffset: half, length: half }];
  const expected = sha256(src.buffer!, 1, half);
  const write = engine.write(peer, batch);
  await src.free();
  // When free() resolves the batch has finished: every byte landed, nothing is in flight.
  expect(engine.counters.batchesInFlight).toBe(0);
  expect(sha256(dst.buffer!, half, half)).toBe(expected);
  expect((await write).bytes).toBe(64 * half);
});

test("free({ inFlight: 'fail' }) stops the write with ERR_REGION_FREED", async () => {
  const src = patterned(engine, SIZE, 3);
  const before = counters(engine);
  const write = engine.write(peer, repeatedBatch(src, dst.id, SIZE, 256));
  await src.free({ inFlight: 'fail' });
  const err = await expectCode(() => write, 'ERR_REGION_FREED');
  expect(err.bytesMoved).toBeLessThan(256 * SIZE);
  expect(engine.counters.batchesFailed - before.batchesFailed).toBe(1);
  expect(engine.counters.batchesInFlight).toBe(0);
});

test("free({ inFlight: 'fail' }) stops a read into the region", async () => {
  const local = engine.allocate(SIZE);
  const read = engine.read(peer, repeatedBatch(local, dst.id, SIZE, 256));
  await local.free({ inFlight: 'fail' });
  await expectCode(() => read, 'ERR_REGION_FREED');
});

test("free({ inFlight: 'fail' }) leaves batches over other regions alone", async () => {
  const doomed = patterned(engine, SIZE, 4);
  const kept = patterned(engine, 4 * MiB, 5);
  const a = engine.write(peer, repeatedBatch(doomed, dst.id, SIZE, 256));
  const b = engine.write(peer, [{ localRegion: kept, localOffset: 0, remoteRegion: dst.id, remoteOffset: 8 * MiB, length: 4 * MiB }]);
  await doomed.free({ inFlight: 'fail' });
  await expectCode(() => a, 'ERR_REGION_FREED');
  expect((await b).bytes).toBe(4 * MiB);
});

test('a batch naming a region whose free() is pending fails ERR_REGION_FREED and moves nothing', async () => {
  const src = patterned(engine, SIZE, 6);
  const other = patterned(engine, MiB, 7);
  const running = engine.write(peer, repeatedBatch(src, dst.id, SIZE, 32));
  const freed = src.free();
  const before = counters(engine);
  await expectCode(
    () =>
      engine.write(peer, [
        { localRegion: other, localOffset: 0, remoteRegion: dst.id, remoteOffset: 10 * MiB, length: MiB },
        { localRegion: src, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: 1 },
      ]),
    'ERR_REGION_FREED',
  );
  expect(engine.counters.batchesSubmitted).toBe(before.batchesSubmitted);
  await running;
  await freed;
  // That range holds what the running batch wrote, none of `other`'s bytes.
  expect(sha256(dst.buffer!, 10 * MiB, MiB)).toBe(sha256(src.buffer!, 10 * MiB, MiB));
});

test('a batch naming a freed region fails ERR_UNKNOWN_REGION', async () => {
  const src = patterned(engine, MiB, 8);
  await src.free();
  await expectCode(() => engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: 1 }]), 'ERR_UNKNOWN_REGION');
  await expectCode(() => engine.read(peer, [{ localRegion: src.id, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: 1 }]), 'ERR_UNKNOWN_REGION');
});

test('a freed region disappears from what peers see', async () => {
  const r = engine.allocate(MiB);
  const view = await target.connect(engine.address!);
  expect(view.regions.map((x) => x.id)).toContain(r.id);
  await r.free();
  await view.refresh();
  expect(view.regions.map((x) => x.id)).not.toContain(r.id);
});

test('a peer freeing its region mid-write does not fault the writer; after refresh the region is unknown', async () => {
  const remoteRegion = patterned(target, SIZE, 9);
  const src = patterned(engine, SIZE, 10);
  await peer.refresh();
  const write = engine.write(peer, repeatedBatch(src, remoteRegion.id, SIZE, 64));
  await remoteRegion.free({ inFlight: 'fail' });
  // The writer keeps its own mapping: the batch completes into memory nobody reads.
  expect((await write).bytes).toBe(64 * SIZE);
  await peer.refresh();
  await expectCode(() => engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: remoteRegion.id, remoteOffset: 0, length: 1 }]), 'ERR_UNKNOWN_REGION');
});

test('free of a registered buffer while it is the target of a read waits, then releases it', async () => {
  const bytes = Buffer.alloc(SIZE);
  const region = engine.register(bytes);
  const read = engine.read(peer, [{ localRegion: region, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: SIZE }]);
  await region.free();
  await read;
  expect(sha256(bytes)).toBe(sha256(dst.buffer!));
  await expectCode(() => engine.read(peer, [{ localRegion: region, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: 1 }]), 'ERR_UNKNOWN_REGION');
});
