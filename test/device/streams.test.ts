// Host-device streams and events have real semantics: a stream runs its work in
// order, an event completes when the work recorded before it has run, and
// waitEvent orders one stream after another.
import { afterAll, beforeAll, expect, test } from 'vitest';
import type { Device, DeviceAllocation, TransferEngine } from '../../lib/index.js';
import { closeEngines, expectCode, openEngine, pattern, sha256 } from '../helpers.js';

const MiB = 1 << 20;
const SIZE = 4 * MiB;

let engine: TransferEngine;
let device: Device;

beforeAll(async () => {
  engine = await openEngine({ listen: false });
  device = engine.device;
});

afterAll(closeEngines);

function alloc(seed?: number): DeviceAllocation {
  const mem = device.alloc(SIZE);
  device.write(mem.ptr, seed === undefined ? Buffer.alloc(SIZE) : pattern(seed, SIZE));
  return mem;
}

function contents(mem: DeviceAllocation): string {
  const out = Buffer.alloc(mem.length);
  device.read(out, mem.ptr);
  return sha256(out);
}

test('device.write and device.read round-trip bytes', () => {
  const mem = alloc(1);
  expect(contents(mem)).toBe(sha256(pattern(1, SIZE)));
  const part = Buffer.alloc(100);
  device.read(part, mem.ptr + 4096n);
  expect(part.equals(pattern(1, SIZE).subarray(4096, 4196))).toBe(true);
});

test('a stream runs its work in order: copy A→B then B→C leaves C equal to A', async () => {
  const a = alloc(2);
  const b = alloc();
  const c = alloc();
  const stream = device.createStream();
  // Delay the first copy: had the second run before or beside it, C would hold zeros.
  stream.sleep(30_000);
  stream.copy(b.ptr, a.ptr, SIZE);
  stream.copy(c.ptr, b.ptr, SIZE);
  await stream.synchronize();
  expect(contents(c)).toBe(sha256(pattern(2, SIZE)));
  stream.destroy();
});

test('a chain of 16 dependent copies on one stream arrives intact', async () => {
  const chain = [alloc(3), ...Array.from({ length: 16 }, () => alloc())];
  const stream = device.createStream();
  for (let i = 1; i < chain.length; i++) stream.copy(chain[i].ptr, chain[i - 1].ptr, SIZE);
  await stream.synchronize();
  expect(contents(chain[16])).toBe(sha256(pattern(3, SIZE)));
  stream.destroy();
});

test('an event is incomplete while the stream sleeps before it, complete after', async () => {
  const stream = device.createStream();
  const event = device.createEvent();
  expect(event.query()).toBe(true); // nothing recorded yet
  stream.sleep(300_000);
  event.record(stream);
  expect(event.query()).toBe(false);
  await event.synchronize();
  expect(event.query()).toBe(true);
  stream.destroy();
  event.destroy();
});

test('event.synchronize and stream.synchronize time out with ERR_TIMEOUT, then still work', async () => {
  const stream = device.createStream();
  const event = device.createEvent();
  stream.sleep(400_000);
  event.record(stream);
  await expectCode(() => event.synchronize(10), 'ERR_TIMEOUT');
  await expectCode(() => stream.synchronize(10), 'ERR_TIMEOUT');
  await event.synchronize();
  await stream.synchronize();
  expect(event.query()).toBe(true);
  stream.destroy();
});

test('stream.waitEvent makes stream 2 wait for the work stream 1 recorded', async () => {
  const a = alloc(4);
  const b = alloc();
  const c = alloc();
  const s1 = device.createStream();
  const s2 = device.createStream();
  const ready = device.createEvent();
  s1.sleep(50_000);
  s1.copy(b.ptr, a.ptr, SIZE);
  ready.record(s1);
  s2.waitEvent(ready);
  s2.copy(c.ptr, b.ptr, SIZE); // without the wait this would copy B's zeros
  await s2.synchronize();
  expect(contents(c)).toBe(sha256(pattern(4, SIZE)));
  expect(ready.query()).toBe(true);
  s1.destroy();
  s2.destroy();
});

test('waitEvent on an event recorded nowhere does not block', async () => {
  const s = device.createStream();
  s.waitEvent(device.createEvent());
  await s.synchronize(10_000);
  s.destroy();
});

test('an event recorded again tracks the latest record', async () => {
  const s = device.createStream();
  const e = device.createEvent();
  e.record(s);
  await e.synchronize();
  s.sleep(300_000);
  e.record(s);
  expect(e.query()).toBe(false);
  await e.synchronize();
  expect(e.query()).toBe(true);
  s.destroy();
});

test('a destroyed stream or event refuses further use with ERR_CLOSED', async () => {
  const s = device.createStream();
  const e = device.createEvent();
  const mem = alloc();
  s.destroy();
  e.destroy();
  await expectCode(() => s.copy(mem.ptr, mem.ptr + 8n, 8), 'ERR_CLOSED');
  await expectCode(() => s.sleep(1), 'ERR_CLOSED');
  await expectCode(() => s.synchronize(), 'ERR_CLOSED');
  await expectCode(() => e.query(), 'ERR_CLOSED');
  await expectCode(() => e.synchronize(), 'ERR_CLOSED');
  await expectCode(() => device.createEvent().record(s), 'ERR_CLOSED');
  await expectCode(() => device.createStream().waitEvent(e), 'ERR_CLOSED');
});

test('work queued before destroy() still runs', async () => {
  const a = alloc(5);
  const b = alloc();
  const s = device.createStream();
  s.sleep(20_000);
  s.copy(b.ptr, a.ptr, SIZE);
  s.destroy();
  expect(contents(b)).toBe(sha256(pattern(5, SIZE)));
});

test('device memory freed while a queued copy uses it stays valid until the copy ran', async () => {
  const a = alloc(6);
  const b = alloc();
  const s = device.createStream();
  s.sleep(20_000);
  s.copy(b.ptr, a.ptr, SIZE);
  device.free(a.ptr);
  await s.synchronize();
  expect(contents(b)).toBe(sha256(pattern(6, SIZE)));
  await expectCode(() => device.write(a.ptr, Buffer.alloc(1)), 'ERR_OUT_OF_RANGE');
  s.destroy();
});
