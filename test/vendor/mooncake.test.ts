// The mooncake transport against the Mooncake fake (test/fakes/fake_mooncake.c): two
// engines in two processes move real bytes through the transfer-engine C API. The
// fake checks registration, batch accounting and status polling; it is not RDMA.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { TransferEngine, type Region } from '../../lib/index.js';
import { pattern, sha256 } from '../fixtures/pattern.mjs';
import { closeEngines, expectCode, openEngine, startPeer, stopPeers, waitFor, type PeerProcess } from '../helpers.js';
import { buildFakes, FakeControl, reclaimFakeShm, type FakeLibraries } from './fakes.js';

const SIZE = 3 << 20;
const MOONCAKE = { mooncake: { protocol: 'tcp' } } as const;

let fakes: FakeLibraries;
const control = new FakeControl();

beforeAll(() => {
  fakes = buildFakes();
  Object.assign(process.env, control.env(), { EPD_TRANSFER_MOONCAKE_LIB: fakes.mooncake, EPD_TRANSFER_ACL_LIB: fakes.acl });
});

afterEach(async () => {
  control.clear();
  await closeEngines();
  await stopPeers();
});

afterAll(() => {
  control.dispose();
  reclaimFakeShm();
});

function mine(fn: string) {
  return control.trace().filter((t) => t.pid === process.pid && t.fn === fn);
}

describe('mooncake transport', () => {
  let peer: PeerProcess;
  let engine: TransferEngine;

  async function setup(engineOptions: object = MOONCAKE) {
    peer = await startPeer({ regions: [SIZE], seed: 40, engine: { ...MOONCAKE, ...engineOptions } as never });
    engine = await openEngine({ ...MOONCAKE, ...engineOptions, listen: false } as never);
  }

  it('writes and reads a peer\'s regions through Mooncake batches', async () => {
    control.resetTrace();
    await setup();
    const src = engine.allocate(SIZE);
    src.buffer!.set(pattern(41, SIZE));
    const back = engine.allocate(SIZE);
    const p = await engine.connect(peer.address, { transport: 'mooncake' });
    expect(p.transport).toBe('mooncake');
    expect(engine.capabilities().transports).toContain('mooncake');

    // Four descriptors: one Mooncake batch of four requests.
    const quarter = SIZE / 4;
    const batch = [0, 1, 2, 3].map((i) => ({ localRegion: src, localOffset: i * quarter, remoteRegion: peer.regions[0], remoteOffset: i * quarter, length: quarter }));
    expect(await engine.write(p, batch)).toEqual({ bytes: SIZE, descriptors: 4 });
    expect(await peer.call('hash', { region: peer.regions[0] })).toBe(sha256(pattern(41, SIZE)));

    await engine.read(p, [{ localRegion: back, localOffset: 0, remoteRegion: peer.regions[0], remoteOffset: 0, length: SIZE }]);
    expect(sha256(back.buffer!)).toBe(sha256(pattern(41, SIZE)));

    expect(mine('registerLocalMemory').length).toBe(2);
    expect(mine('openSegment')).toHaveLength(1);
    expect(mine('submitTransfer').map((t) => t.details)).toEqual([expect.stringMatching(/count=4$/), expect.stringMatching(/count=1$/)]);
    // Every Mooncake batch id is given back once its tasks ended.
    await waitFor(() => mine('freeBatchID').length === 2, 'batch ids to be freed');
  });

  it('fails a batch whose transfers fail, with Mooncake\'s status', async () => {
    await setup();
    const src = engine.allocate(4096);
    const p = await engine.connect(peer.address, { transport: 'mooncake' });
    control.set({ 'mooncake.task_fail': 1 });
    const err = await expectCode(() => engine.write(p, [{ localRegion: src, localOffset: 0, remoteRegion: peer.regions[0], remoteOffset: 0, length: 4096 }]), 'ERR_SYSTEM');
    expect(err.message).toMatch(/ended FAILED/);
    expect(err.bytesMoved).toBe(0);
    control.clear();
    await engine.write(p, [{ localRegion: src, localOffset: 0, remoteRegion: peer.regions[0], remoteOffset: 0, length: 4096 }]);
  });

  it('fails a transfer that never completes at its deadline, and reclaims it when Mooncake lets go', async () => {
    await setup();
    const src = engine.allocate(4096);
    src.buffer!.set(pattern(42, 4096));
    const p = await engine.connect(peer.address, { transport: 'mooncake' });
    control.resetTrace();
    control.set({ 'mooncake.hang': 1 });
    const err = await expectCode(
      () => engine.write(p, [{ localRegion: src, localOffset: 0, remoteRegion: peer.regions[0], remoteOffset: 0, length: 4096 }], { timeoutMs: 200 }),
      'ERR_TIMEOUT',
    );
    expect(err.message).toMatch(/deadline/);
    expect(engine.inFlight).toBe(0);
    // Mooncake still owns the batch: its id is not freed while a task is pending.
    expect(mine('freeBatchID')).toHaveLength(0);
    control.clear();
    await waitFor(() => mine('freeBatchID').length === 1, 'the timed-out batch to be freed');
    // The engine goes on.
    await engine.write(p, [{ localRegion: src, localOffset: 0, remoteRegion: peer.regions[0], remoteOffset: 0, length: 4096 }]);
    expect(await peer.call('hash', { region: peer.regions[0], length: 4096 })).toBe(sha256(pattern(42, 4096)));
  });

  it('aborts a hanging transfer on request', async () => {
    await setup();
    const src = engine.allocate(4096);
    const p = await engine.connect(peer.address, { transport: 'mooncake' });
    control.set({ 'mooncake.hang': 1 });
    const ac = new AbortController();
    const pending = engine.write(p, [{ localRegion: src, localOffset: 0, remoteRegion: peer.regions[0], remoteOffset: 0, length: 4096 }], { signal: ac.signal });
    ac.abort();
    await expectCode(() => pending, 'ERR_ABORTED');
    control.clear();
  });

  it('maps submit errors and refuses bad input before anything moves', async () => {
    await setup();
    const src = engine.allocate(4096);
    const p = await engine.connect(peer.address, { transport: 'mooncake' });
    control.set({ 'mooncake.fail': 'submitTransfer:-3' });
    const err = await expectCode(() => engine.write(p, [{ localRegion: src, localOffset: 0, remoteRegion: peer.regions[0], remoteOffset: 0, length: 4096 }]), 'ERR_BAD_ARGUMENT');
    expect(err.message).toMatch(/ERR_ADDRESS_NOT_REGISTERED/);
    control.clear();
    await expectCode(() => engine.write(p, [{ localRegion: src, localOffset: 0, remoteRegion: peer.regions[0], remoteOffset: SIZE, length: 1 }]), 'ERR_OUT_OF_RANGE');
    await expectCode(() => engine.write(p, [{ localRegion: src, localOffset: 4000, remoteRegion: peer.regions[0], remoteOffset: 0, length: 200 }]), 'ERR_OUT_OF_RANGE');
  });

  it('unregisters a region before its memory goes', async () => {
    await setup();
    control.resetTrace();
    const r: Region = engine.allocate(8192);
    const [registered] = mine('registerLocalMemory');
    const addr = /addr=(0x[0-9a-f]+)/.exec(registered.details)![1];
    await r.free();
    expect(mine('unregisterLocalMemory').map((t) => t.details)).toEqual([`addr=${addr}`]);
  });

  it('moves device memory between acl engines (NPU-to-NPU path, on the fakes)', async () => {
    await setup({ device: 'acl' });
    const remotePtr = await peer.call<bigint>('deviceAlloc', { bytes: SIZE });
    const remoteRegion = await peer.call<number>('deviceRegister', { ptr: remotePtr, length: SIZE });
    const local = engine.device.alloc(SIZE);
    engine.device.write(local.ptr, pattern(43, SIZE));
    control.resetTrace();
    const region = engine.register({ devicePtr: local.ptr, length: SIZE });
    const p = await engine.connect(peer.address, { transport: 'mooncake' });
    await engine.write(p, [{ localRegion: region, localOffset: 0, remoteRegion, remoteOffset: 0, length: SIZE }]);
    expect(await peer.call('deviceHash', { ptr: remotePtr, length: SIZE })).toBe(sha256(pattern(43, SIZE)));
    const regs = control.trace().filter((t) => t.fn === 'registerLocalMemory');
    expect(regs.some((t) => /location=npu:0/.test(t.details))).toBe(true);
  });

  it('says why when mooncake cannot be used', async () => {
    const plain = await openEngine({ listen: false });
    const withMc = await startPeer({ regions: [4096], engine: MOONCAKE as never });
    await expectCode(() => plain.connect(withMc.address, { transport: 'mooncake' }), 'ERR_BACKEND_UNAVAILABLE');
    const without = await startPeer({ regions: [4096] });
    const mc = await openEngine({ ...MOONCAKE, listen: false });
    const err = await expectCode(() => mc.connect(without.address, { transport: 'mooncake' }), 'ERR_BACKEND_UNAVAILABLE');
    expect(err.message).toMatch(/did not open with mooncake/);
    // Mooncake refusing to start (this fake knows only P2PHANDSHAKE metadata).
    await expectCode(() => TransferEngine.open({ mooncake: { metadata: 'etcd://127.0.0.1:1' }, listen: false }), 'ERR_BACKEND_UNAVAILABLE');
    await expectCode(() => TransferEngine.open({ mooncake: { protocol: 'carrier-pigeon' }, listen: false }), 'ERR_BACKEND_UNAVAILABLE');
    process.env.EPD_TRANSFER_MOONCAKE_LIB = '/nonexistent/libtransfer_engine.so';
    try {
      const e = await expectCode(() => TransferEngine.open({ mooncake: true, listen: false }), 'ERR_BACKEND_UNAVAILABLE');
      expect(e.message).toMatch(/EPD_TRANSFER_MOONCAKE_LIB/);
    } finally {
      process.env.EPD_TRANSFER_MOONCAKE_LIB = fakes.mooncake;
    }
  });

  it('fails in-flight batches with ERR_CLOSED on close and destroys the Mooncake engine', async () => {
    await setup();
    const src = engine.allocate(4096);
    const p = await engine.connect(peer.address, { transport: 'mooncake' });
    control.set({ 'mooncake.hang': 1 });
    const pending = engine.write(p, [{ localRegion: src, localOffset: 0, remoteRegion: peer.regions[0], remoteOffset: 0, length: 4096 }]);
    control.resetTrace();
    await engine.close({ timeoutMs: 100 });
    await expectCode(() => pending, 'ERR_CLOSED');
    expect(mine('destroyTransferEngine')).toHaveLength(1);
    control.clear();
  });
});
