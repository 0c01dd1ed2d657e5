// close(): drains in-flight work by default, fails what is left after its
// timeout with ERR_CLOSED, is idempotent, and every method fails ERR_CLOSED after it.
import { afterAll, beforeAll, expect, test } from 'vitest';
import { DescriptorBatch, TransferEngine, type Peer, type Region } from '../../lib/index.js';
import { closeEngines, expectCode, openEngine, patterned, repeatedBatch, sha256 } from '../helpers.js';

const MiB = 1 << 20;
const SIZE = 16 * MiB;

let target: TransferEngine;
let dst: Region;

beforeAll(async () => {
  target = await openEngine();
  dst = patterned(target, SIZE, 2);
});

afterAll(closeEngines);

async function writer(): Promise<{ engine: TransferEngine; peer: Peer; src: Region }> {
  const engine = await TransferEngine.open();
  const src = patterned(engine, SIZE, 1);
  const peer = await engine.connect(target.address!);
  return { engine, peer, src };
}

test('close while a write is in flight waits for it to finish (default)', async () => {
  const { engine, peer, src } = await writer();
  const events: string[] = [];
  // Half a GiB into the first half of dst, and a distinctive range into the second
  // half (descriptors of one batch run in parallel, so their targets must not overlap).
  const half = SIZE / 2;
  const batch = [...repeatedBatch(src, dst.id, half, 63), { localRegion: src, localOffset: 3, remoteRegion: dst.id, remoteOffset: half, length: half }];
  const pending = engine.write(peer, batch).then((r) => {
    events.push('write');
    return r;
  });
  await engine.close().then(() => events.push('close'));
  expect((await pending).bytes).toBe(64 * half);
  expect(events).toEqual(['write', 'close']);
  expect(sha256(dst.buffer!, half, half)).toBe(sha256(src.buffer!, 3, half));
});

test('close with a short timeout fails the batches still in flight with ERR_CLOSED', async () => {
  const { engine, peer, src } = await writer();
  const pending = [0, 1, 2].map(() => engine.write(peer, repeatedBatch(src, dst.id, SIZE, 256)));
  await engine.close({ timeoutMs: 1 });
  for (const p of pending) await expectCode(() => p, 'ERR_CLOSED');
  expect(engine.inFlight).toBe(0);
});

test('close while a read is in flight with a short timeout fails it with ERR_CLOSED', async () => {
  const { engine, peer, src } = await writer();
  const pending = engine.read(peer, repeatedBatch(src, dst.id, SIZE, 256));
  await engine.close({ timeoutMs: 1 });
  await expectCode(() => pending, 'ERR_CLOSED');
});

test('close is idempotent: every call returns the same settled promise', async () => {
  const engine = await TransferEngine.open();
  const first = engine.close();
  const second = engine.close();
  expect(second).toBe(first);
  await first;
  await engine.close();
  await engine.close({ timeoutMs: 5 });
});

test('after close every method fails with ERR_CLOSED', async () => {
  const { engine, peer, src } = await writer();
  const device = engine.device;
  const mem = device.alloc(4096);
  const stream = device.createStream();
  const event = device.createEvent();
  await engine.close();

  const d = { localRegion: src, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: 1 };
  const calls: Array<[string, () => unknown]> = [
    ['allocate', () => engine.allocate(4096)],
    ['register a buffer', () => engine.register(Buffer.alloc(16))],
    ['register device memory', () => engine.register({ devicePtr: mem.ptr, length: 16 })],
    ['connect', () => engine.connect(target.address!)],
    ['write', () => engine.write(peer, [d])],
    ['read', () => engine.read(peer, [d])],
    ['write a DescriptorBatch', () => engine.write(peer, new DescriptorBatch().add(src, 0, dst.id, 0, 1))],
    ['free', () => src.free()],
    ['peer.refresh', () => peer.refresh()],
    ['handle', () => engine.handle('topic', () => 1)],
    ['device.alloc', () => device.alloc(4096)],
    ['device.free', () => device.free(mem.ptr)],
    ['device.write', () => device.write(mem.ptr, Buffer.alloc(4))],
    ['device.read', () => device.read(Buffer.alloc(4), mem.ptr)],
    ['device.ipcExport', () => device.ipcExport(mem.ptr, 16)],
    ['device.createStream', () => device.createStream()],
    ['device.createEvent', () => device.createEvent()],
    ['stream.copy', () => stream.copy(mem.ptr, mem.ptr + 8n, 8)],
    ['stream.sleep', () => stream.sleep(1)],
    ['stream.synchronize', () => stream.synchronize()],
    ['event.record', () => event.record(stream)],
    ['event.query', () => event.query()],
    ['event.synchronize', () => event.synchronize()],
    ['stream.waitEvent', () => stream.waitEvent(event)],
  ];
  const failures: string[] = [];
  for (const [name, call] of calls) {
    try {
      await call();
      failures.push(`${name} succeeded`);
    } catch (err) {
      if ((err as { code?: string }).code !== 'ERR_CLOSED') failures.push(`${name}: ${(err as Error).message}`);
    }
  }
  expect(failures).toEqual([]);
  expect(engine.inFlight).toBe(0);
  expect(() => engine.address).not.toThrow();
});

test('the closed engine stops listening: a new connect to it fails', async () => {
  const engine = await TransferEngine.open();
  const address = engine.address!;
  await engine.close();
  await expectCode(() => target.connect(address, { timeoutMs: 2_000 }), 'ERR_CONNECT');
});

test('a peer sees a closed engine as lost: its batches fail with ERR_PEER_LOST', async () => {
  const other = await TransferEngine.open();
  const otherRegion = other.allocate(4096);
  const src = target.allocate(4096);
  const p = await target.connect(other.address!);
  await other.close();
  await expectCode(
    async () => {
      // The loss is learnt from the control connection; give it the time it needs.
      for (let i = 0; i < 500; i++) {
        await target.write(p, [{ localRegion: src, localOffset: 0, remoteRegion: otherRegion.id, remoteOffset: 0, length: 1 }]);
        await new Promise((r) => setTimeout(r, 10));
      }
    },
    'ERR_PEER_LOST',
  );
  expect(p.lost?.code).toBe('ERR_PEER_LOST');
});
