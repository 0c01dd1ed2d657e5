// Bad input to the device API: wrong types fail ERR_BAD_ARGUMENT, pointers
// outside device memory fail ERR_OUT_OF_RANGE, and nothing is written.
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import type { Device, DeviceAllocation, DeviceEvent, DeviceStream, ErrorCode, TransferEngine } from '../../lib/index.js';
import { closeEngines, expectCode, openEngine, pattern, sha256 } from '../helpers.js';

const SIZE = 64 * 1024;

let engine: TransferEngine;
let device: Device;
let mem: DeviceAllocation;
let other: DeviceAllocation;
let stream: DeviceStream;
let event: DeviceEvent;

beforeAll(async () => {
  engine = await openEngine({ listen: false });
  device = engine.device;
  mem = device.alloc(SIZE);
  other = device.alloc(SIZE);
  device.write(mem.ptr, pattern(1, SIZE));
  device.write(other.ptr, pattern(2, SIZE));
  stream = device.createStream();
  event = device.createEvent();
});

afterAll(closeEngines);

function hashOf(m: DeviceAllocation): string {
  const out = Buffer.alloc(m.length);
  device.read(out, m.ptr);
  return sha256(out);
}

const end = () => mem.ptr + BigInt(SIZE);

describe('Device', () => {
  const cases: Array<[string, () => unknown, ErrorCode]> = [
    ['alloc 0 bytes', () => device.alloc(0), 'ERR_BAD_ARGUMENT'],
    ['alloc negative bytes', () => device.alloc(-1), 'ERR_BAD_ARGUMENT'],
    ['alloc fractional bytes', () => device.alloc(1.5), 'ERR_BAD_ARGUMENT'],
    ['alloc bytes as a string', () => device.alloc('64' as never), 'ERR_BAD_ARGUMENT'],
    ['free a number', () => device.free(4096 as never), 'ERR_BAD_ARGUMENT'],
    ['free pointer 0', () => device.free(0n), 'ERR_BAD_ARGUMENT'],
    ['free a pointer never allocated', () => device.free(0x1000n), 'ERR_BAD_ARGUMENT'],
    ['free an interior pointer', () => device.free(mem.ptr + 8n), 'ERR_BAD_ARGUMENT'],
    ['write a string', () => device.write(mem.ptr, 'bytes' as never), 'ERR_BAD_ARGUMENT'],
    ['write to a pointer outside device memory', () => device.write(0x1000n, Buffer.alloc(4)), 'ERR_OUT_OF_RANGE'],
    ['write past the end of an allocation', () => device.write(end() - 2n, Buffer.alloc(4)), 'ERR_OUT_OF_RANGE'],
    ['write at the end of an allocation', () => device.write(end(), Buffer.alloc(1)), 'ERR_OUT_OF_RANGE'],
    ['write more than the allocation', () => device.write(mem.ptr, Buffer.alloc(SIZE + 1)), 'ERR_OUT_OF_RANGE'],
    ['read into a number', () => device.read(5 as never, mem.ptr), 'ERR_BAD_ARGUMENT'],
    ['read from a pointer outside device memory', () => device.read(Buffer.alloc(4), 0x1000n), 'ERR_OUT_OF_RANGE'],
    ['read past the end of an allocation', () => device.read(Buffer.alloc(16), end() - 8n), 'ERR_OUT_OF_RANGE'],
    ['ipcExport a range past the end', () => device.ipcExport(mem.ptr, SIZE + 1), 'ERR_OUT_OF_RANGE'],
    ['ipcExport length 0', () => device.ipcExport(mem.ptr, 0), 'ERR_BAD_ARGUMENT'],
    ['ipcExport host memory', () => device.ipcExport(0x1000n, 16), 'ERR_OUT_OF_RANGE'],
    ['ipcImport an empty key', () => device.ipcImport(''), 'ERR_BAD_ARGUMENT'],
    ['ipcImport a number', () => device.ipcImport(7 as never), 'ERR_BAD_ARGUMENT'],
    ['ipcImport a malformed key', () => device.ipcImport('nonsense'), 'ERR_BAD_ARGUMENT'],
    ['ipcImport a key of another library', () => device.ipcImport('/etc-passwd:0:16'), 'ERR_BAD_ARGUMENT'],
    ['ipcImport a key with zero length', () => device.ipcImport('/epdx-1-1-1-00000000:0:0'), 'ERR_BAD_ARGUMENT'],
    ['ipcImport a key of memory that no longer exists', () => device.ipcImport('/epdx-1-1-1-00000000:0:16'), 'ERR_SYSTEM'],
    ['ipcClose memory that was not imported', () => device.ipcClose(mem.ptr), 'ERR_BAD_ARGUMENT'],
    ['ipcClose a wild pointer', () => device.ipcClose(0x1000n), 'ERR_BAD_ARGUMENT'],
  ];
  test.each(cases)('%s', async (_, fn, code) => {
    const before = [hashOf(mem), hashOf(other)];
    await expectCode(fn, code);
    expect([hashOf(mem), hashOf(other)]).toEqual(before);
  });

  test('an IPC key whose range exceeds its memory fails ERR_OUT_OF_RANGE', async () => {
    const key = device.ipcExport(mem.ptr, SIZE);
    const [name] = key.split(':');
    await expectCode(() => device.ipcImport(`${name}:0:${SIZE * 2}`), 'ERR_OUT_OF_RANGE');
  });

  test('register rejects pointers that are not inside device memory', async () => {
    const cases: Array<[bigint, number]> = [
      [0x1000n, 16],
      [end(), 1],
      [end() - 4n, 8],
      [mem.ptr, SIZE + 1],
      [mem.ptr + 1n, SIZE],
    ];
    for (const [devicePtr, length] of cases) {
      await expectCode(() => engine.register({ devicePtr, length }), 'ERR_OUT_OF_RANGE');
    }
  });

  test("memory of another engine's device is mapped here but refused as this device's", async () => {
    const stranger = await openEngine({ listen: false });
    const theirs = stranger.device.alloc(SIZE);
    await expectCode(() => engine.register({ devicePtr: theirs.ptr, length: 16 }), 'ERR_OUT_OF_RANGE');
    await expectCode(() => device.write(theirs.ptr, Buffer.alloc(4)), 'ERR_OUT_OF_RANGE');
    await expectCode(() => stream.copy(mem.ptr, theirs.ptr, 16), 'ERR_OUT_OF_RANGE');
  });
});

describe('DeviceStream and DeviceEvent', () => {
  const cases: Array<[string, () => unknown, ErrorCode]> = [
    ['copy to a pointer outside device memory', () => stream.copy(0x1000n, mem.ptr, 16), 'ERR_OUT_OF_RANGE'],
    ['copy from a pointer outside device memory', () => stream.copy(other.ptr, 0x1000n, 16), 'ERR_OUT_OF_RANGE'],
    ['copy past the end of the source', () => stream.copy(other.ptr, end() - 8n, 16), 'ERR_OUT_OF_RANGE'],
    ['copy more than the destination holds', () => stream.copy(other.ptr + 8n, mem.ptr, SIZE), 'ERR_OUT_OF_RANGE'],
    ['copy 0 bytes', () => stream.copy(other.ptr, mem.ptr, 0), 'ERR_BAD_ARGUMENT'],
    ['copy with number pointers', () => stream.copy(1 as never, 2 as never, 16), 'ERR_BAD_ARGUMENT'],
    ['copy to pointer 0', () => stream.copy(0n, mem.ptr, 16), 'ERR_BAD_ARGUMENT'],
    ['sleep negative', () => stream.sleep(-1), 'ERR_BAD_ARGUMENT'],
    ['sleep fractional', () => stream.sleep(0.5), 'ERR_BAD_ARGUMENT'],
    ['synchronize timeout 0', () => stream.synchronize(0), 'ERR_BAD_ARGUMENT'],
    ['synchronize timeout NaN', () => stream.synchronize(NaN), 'ERR_BAD_ARGUMENT'],
    ['waitEvent on a plain object', () => stream.waitEvent({} as never), 'ERR_BAD_ARGUMENT'],
    ['waitEvent on a stream', () => stream.waitEvent(stream as never), 'ERR_BAD_ARGUMENT'],
    ['record on a plain object', () => event.record({} as never), 'ERR_BAD_ARGUMENT'],
    ['record on an event', () => event.record(event as never), 'ERR_BAD_ARGUMENT'],
    ['event synchronize timeout negative', () => event.synchronize(-5), 'ERR_BAD_ARGUMENT'],
  ];
  test.each(cases)('%s', async (_, fn, code) => {
    const before = hashOf(other);
    await expectCode(fn, code);
    await stream.synchronize();
    expect(hashOf(other)).toBe(before);
  });

  test('native stream and event methods check their arguments too', async () => {
    // Reach past the TypeScript checks: the addon must still refuse.
    await expectCode(() => stream.native.copy(5n as never, 'x' as never, 1), 'ERR_BAD_ARGUMENT');
    await expectCode(() => stream.native.waitEvent({} as never), 'ERR_BAD_ARGUMENT');
    await expectCode(() => event.native.record(event.native as never), 'ERR_BAD_ARGUMENT');
    await expectCode(() => stream.native.synchronize(-1), 'ERR_BAD_ARGUMENT');
  });
});
