// Cancellation: an AbortSignal stops a batch before or during its run
// (ERR_ABORTED), a deadline stops it (ERR_TIMEOUT), and the engine keeps working.
import { afterAll, beforeAll, beforeEach, expect, test } from 'vitest';
import type { Peer, Region, TransferEngine } from '../../lib/index.js';
import { closeEngines, counters, expectCode, openEngine, patterned, repeatedBatch, sha256 } from '../helpers.js';

const MiB = 1 << 20;
const SIZE = 64 * MiB;
/** 4 GiB of copying: far longer than any deadline or abort below. */
const COPIES = 64;

let engine: TransferEngine;
let target: TransferEngine;
let peer: Peer;
let src: Region;
let dst: Region;

beforeAll(async () => {
  engine = await openEngine();
  target = await openEngine();
  src = patterned(engine, SIZE, 1);
  dst = patterned(target, SIZE, 2);
  peer = await engine.connect(target.address!);
});

afterAll(closeEngines);

beforeEach(async () => {
  // Each test starts from a known destination.
  dst.buffer!.fill(0);
});

/** The engine still moves bytes correctly and its in-flight counters are back to zero. */
async function expectEngineWorks(): Promise<void> {
  const result = await engine.write(peer, [{ localRegion: src, localOffset: 12345, remoteRegion: dst.id, remoteOffset: 777, length: MiB }]);
  expect(result.bytes).toBe(MiB);
  expect(sha256(dst.buffer!, 777, MiB)).toBe(sha256(src.buffer!, 12345, MiB));
  expect(engine.counters.batchesInFlight).toBe(0);
  expect(engine.counters.bytesInFlight).toBe(0);
  expect(engine.inFlight).toBe(0);
}

test('a signal aborted before the call rejects ERR_ABORTED and moves nothing', async () => {
  const before = counters(engine);
  const controller = new AbortController();
  controller.abort();
  await expectCode(
    () => engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: MiB }], { signal: controller.signal }),
    'ERR_ABORTED',
  );
  expect(dst.buffer!.equals(Buffer.alloc(SIZE))).toBe(true);
  expect(counters(engine)).toEqual(before);
  await expectEngineWorks();
});

test('aborting a write in flight rejects ERR_ABORTED with the bytes moved so far', async () => {
  const before = counters(engine);
  const controller = new AbortController();
  const batch = repeatedBatch(src, dst.id, SIZE, COPIES);
  const pending = engine.write(peer, batch, { signal: controller.signal });
  controller.abort();
  const err = await expectCode(() => pending, 'ERR_ABORTED');
  expect(err.bytesMoved).toBeLessThan(SIZE * COPIES);
  expect(engine.counters.batchesFailed - before.batchesFailed).toBe(1);
  expect(engine.counters.bytesWritten - before.bytesWritten).toBe(err.bytesMoved);
  await expectEngineWorks();
});

test('aborting a read in flight rejects ERR_ABORTED', async () => {
  const controller = new AbortController();
  const pending = engine.read(peer, repeatedBatch(src, dst.id, SIZE, COPIES), { signal: controller.signal });
  setImmediate(() => controller.abort());
  await expectCode(() => pending, 'ERR_ABORTED');
  await expectEngineWorks();
});

test('aborting after completion changes nothing', async () => {
  const controller = new AbortController();
  const result = await engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: 4096 }], {
    signal: controller.signal,
  });
  controller.abort();
  expect(result.bytes).toBe(4096);
  await expectEngineWorks();
});

test('one aborted batch does not disturb others in flight', async () => {
  const controller = new AbortController();
  const doomed = engine.write(peer, repeatedBatch(src, dst.id, SIZE, COPIES), { signal: controller.signal });
  const fine = engine.write(peer, [{ localRegion: src, localOffset: 5, remoteRegion: dst.id, remoteOffset: 9, length: 3 * MiB }]);
  controller.abort();
  await expectCode(() => doomed, 'ERR_ABORTED');
  expect((await fine).bytes).toBe(3 * MiB);
});

test('a tiny deadline on a huge batch rejects ERR_TIMEOUT', async () => {
  const before = counters(engine);
  const err = await expectCode(() => engine.write(peer, repeatedBatch(src, dst.id, SIZE, COPIES), { timeoutMs: 1 }), 'ERR_TIMEOUT');
  expect(err.bytesMoved).toBeLessThan(SIZE * COPIES);
  expect(engine.counters.batchesFailed - before.batchesFailed).toBe(1);
  await expectEngineWorks();
});

test("the engine's default deadline applies when a batch names none", async () => {
  const quick = await openEngine({ timeoutMs: 1 });
  const s = patterned(quick, SIZE, 3);
  const p = await quick.connect(target.address!);
  await expectCode(() => quick.write(p, repeatedBatch(s, dst.id, SIZE, COPIES)), 'ERR_TIMEOUT');
  // A generous per-batch deadline overrides it.
  expect((await quick.write(p, [{ localRegion: s, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: MiB }], { timeoutMs: 60_000 })).bytes).toBe(MiB);
});

test('a failed batch carries the stack of the call that submitted it', async () => {
  const err = await expectCode(() => engine.write(peer, repeatedBatch(src, dst.id, SIZE, COPIES), { timeoutMs: 1 }), 'ERR_TIMEOUT');
  expect(err.stack).toContain('submitted at');
  expect(err.stack).toContain('abort-timeout.test.ts');
});
