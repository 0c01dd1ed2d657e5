// Device memory across processes: IPC export/import both ways, and device
// regions registered with register({ devicePtr, length }) as both ends of a transfer.
import { afterAll, beforeAll, expect, test } from 'vitest';
import type { Peer, TransferEngine } from '../../lib/index.js';
import { closeEngines, counters, expectCode, lastJson, openEngine, pattern, runNode, sha256, startPeer, stopPeers, type PeerProcess } from '../helpers.js';

const MiB = 1 << 20;
const SIZE = 4 * MiB;

let engine: TransferEngine;
let child: PeerProcess;

beforeAll(async () => {
  engine = await openEngine();
  child = await startPeer();
});

afterAll(async () => {
  await closeEngines();
  await stopPeers();
});

function deviceHash(ptr: bigint, length: number): string {
  const out = Buffer.alloc(length);
  engine.device.read(out, ptr);
  return sha256(out);
}

test('device memory exported here is read and written by another process', async () => {
  const mem = engine.device.alloc(SIZE);
  engine.device.write(mem.ptr, pattern(1, SIZE));
  const key = engine.device.ipcExport(mem.ptr, SIZE);
  expect(await child.call('ipcImportHash', { key })).toEqual({ hash: sha256(pattern(1, SIZE)), length: SIZE });
  await child.call('ipcImportFill', { key, seed: 2 });
  expect(deviceHash(mem.ptr, SIZE)).toBe(sha256(pattern(2, SIZE)));
});

test('an exported sub-range is exactly that range in the importer', async () => {
  const mem = engine.device.alloc(SIZE);
  engine.device.write(mem.ptr, pattern(3, SIZE));
  const key = engine.device.ipcExport(mem.ptr + 4096n, 8192);
  expect(await child.call('ipcImportHash', { key })).toEqual({ hash: sha256(pattern(3, SIZE), 4096, 8192), length: 8192 });
});

test('device memory of another process is imported here, read, and closed', async () => {
  const ptr = await child.call<bigint>('deviceAlloc', { bytes: SIZE, seed: 4 });
  const key = await child.call<string>('deviceExport', { ptr, length: SIZE });
  const imported = engine.device.ipcImport(key);
  expect(imported.length).toBe(SIZE);
  expect(deviceHash(imported.ptr, SIZE)).toBe(sha256(pattern(4, SIZE)));
  engine.device.write(imported.ptr + 10n, Buffer.from('written here'));
  const theirs = await child.call<string>('deviceHash', { ptr, length: SIZE });
  const expected = pattern(4, SIZE);
  Buffer.from('written here').copy(expected, 10);
  expect(theirs).toBe(sha256(expected));
  engine.device.ipcClose(imported.ptr);
  await expectCode(() => engine.device.read(Buffer.alloc(4), imported.ptr), 'ERR_OUT_OF_RANGE');
  await expectCode(() => engine.device.ipcClose(imported.ptr), 'ERR_BAD_ARGUMENT');
});

test('imported memory cannot be freed as if it were an allocation', async () => {
  const ptr = await child.call<bigint>('deviceAlloc', { bytes: 4096 });
  const imported = engine.device.ipcImport(await child.call<string>('deviceExport', { ptr, length: 4096 }));
  await expectCode(() => engine.device.free(imported.ptr), 'ERR_BAD_ARGUMENT');
  engine.device.ipcClose(imported.ptr);
});

test("a device region is written into a peer's device region and read back", async () => {
  // Peer side: device memory registered as a region, advertised with its IPC key.
  const theirPtr = await child.call<bigint>('deviceAlloc', { bytes: SIZE, seed: 5 });
  const theirRegion = await child.call<number>('deviceRegister', { ptr: theirPtr, length: SIZE });
  // Local side: our device memory as a region.
  const mine = engine.device.alloc(SIZE);
  engine.device.write(mine.ptr, pattern(6, SIZE));
  const local = engine.register({ devicePtr: mine.ptr, length: SIZE });
  expect(local.kind).toBe('device');
  expect(local.devicePtr).toBe(mine.ptr);

  const peer: Peer = await engine.connect(child.address);
  expect(peer.regions).toContainEqual({ id: theirRegion, length: SIZE, kind: 'device' });
  const before = counters(engine);
  await engine.write(peer, [{ localRegion: local, localOffset: 7, remoteRegion: theirRegion, remoteOffset: 1000, length: SIZE - 1000 }]);
  expect(engine.counters.bytesWritten - before.bytesWritten).toBe(SIZE - 1000);
  const expected = pattern(5, SIZE);
  pattern(6, SIZE).copy(expected, 1000, 7, 7 + SIZE - 1000);
  expect(await child.call('deviceHash', { ptr: theirPtr, length: SIZE })).toBe(sha256(expected));

  const back = engine.device.alloc(SIZE);
  const backRegion = engine.register({ devicePtr: back.ptr, length: SIZE });
  await engine.read(peer, [{ localRegion: backRegion, localOffset: 0, remoteRegion: theirRegion, remoteOffset: 0, length: SIZE }]);
  expect(deviceHash(back.ptr, SIZE)).toBe(sha256(expected));
});

test('a device region over part of an allocation is bounded by its own length', async () => {
  const mem = engine.device.alloc(SIZE);
  const region = engine.register({ devicePtr: mem.ptr + 4096n, length: 8192 });
  const target = engine.allocate(SIZE);
  const self = await engine.connect(engine.address!);
  await expectCode(
    () => engine.write(self, [{ localRegion: region, localOffset: 4096, remoteRegion: target.id, remoteOffset: 0, length: 4097 }]),
    'ERR_OUT_OF_RANGE',
  );
  engine.device.write(mem.ptr + 4096n, pattern(8, 8192));
  await engine.write(self, [{ localRegion: region, localOffset: 0, remoteRegion: target.id, remoteOffset: 0, length: 8192 }]);
  expect(sha256(target.buffer!, 0, 8192)).toBe(sha256(pattern(8, 8192)));
});

test('device.free() of memory under a registered region does not fault transfers over it', async () => {
  // In a process of its own: before the fix this was a segmentation fault.
  const run = await runNode([
    '--input-type=module',
    '-e',
    `import { TransferEngine } from './dist/lib/index.js';
     const e = await TransferEngine.open();
     const mem = e.device.alloc(1 << 20);
     e.device.write(mem.ptr, Buffer.alloc(1 << 20, 7));
     const region = e.register({ devicePtr: mem.ptr, length: 1 << 20 });
     const target = e.allocate(1 << 20);
     const self = await e.connect(e.address);
     const inFlight = e.write(self, Array.from({ length: 64 }, () => ({ localRegion: region, localOffset: 0, remoteRegion: target.id, remoteOffset: 0, length: 1 << 20 })));
     e.device.free(mem.ptr);
     await inFlight;
     await e.write(self, [{ localRegion: region, localOffset: 0, remoteRegion: target.id, remoteOffset: 0, length: 1 << 20 }]);
     console.log(JSON.stringify({ landed: target.buffer.every((b) => b === 7) }));
     await e.close();`,
  ]);
  expect(run.signal).toBeNull();
  expect(run.code, run.stderr).toBe(0);
  expect(lastJson(run.stdout)).toEqual({ landed: true });
});
