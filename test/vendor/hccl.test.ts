// The hccl transport against the HCCL and ACL fakes: two acl engines in two
// processes join a two-rank communicator from a root-info blob exchanged over our
// control plane, then push and pull device regions with send/recv on ACL streams. The
// fakes move bytes over a local socket; they check the pairing and call order, not
// HCCS or RoCE.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { TransferEngine, type Region } from '../../lib/index.js';
import { pattern, sha256 } from '../fixtures/pattern.mjs';
import { closeEngines, expectCode, openEngine, startPeer, stopPeers, type PeerProcess } from '../helpers.js';
import { buildFakes, FakeControl, reclaimFakeShm, type FakeLibraries } from './fakes.js';

const SIZE = 1 << 20;
const HCCL = { device: 'acl', hccl: true } as const;

let fakes: FakeLibraries;
const control = new FakeControl();

beforeAll(() => {
  fakes = buildFakes();
  Object.assign(process.env, control.env(), { EPD_TRANSFER_ACL_LIB: fakes.acl, EPD_TRANSFER_HCCL_LIB: fakes.hccl });
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

describe('hccl transport', () => {
  let peer: PeerProcess;
  let engine: TransferEngine;
  let remoteRegion: number;
  let remotePtr: bigint;
  let local: Region;
  let localPtr: bigint;

  async function setup() {
    peer = await startPeer({ regions: [4096], engine: HCCL as never });
    remotePtr = await peer.call<bigint>('deviceAlloc', { bytes: SIZE, seed: 60 });
    remoteRegion = await peer.call<number>('deviceRegister', { ptr: remotePtr, length: SIZE });
    engine = await openEngine({ ...HCCL, listen: false });
    localPtr = engine.device.alloc(SIZE).ptr;
    engine.device.write(localPtr, pattern(61, SIZE));
    local = engine.register({ devicePtr: localPtr, length: SIZE });
  }

  function localHash(): string {
    const out = Buffer.alloc(SIZE);
    engine.device.read(out, localPtr);
    return sha256(out);
  }

  it('joins a two-rank communicator and pushes and pulls device memory', async () => {
    await setup();
    control.resetTrace();
    const p = await engine.connect(peer.address, { transport: 'hccl' });
    expect(p.transport).toBe('hccl');
    const joins = control.trace().filter((t) => t.fn === 'HcclCommInitRootInfo');
    expect(joins.map((t) => `${t.pid === process.pid ? 'us' : 'peer'}:${t.details}`).sort()).toEqual(['peer:rank=1', 'us:rank=0']);

    await engine.write(p, [{ localRegion: local, localOffset: 0, remoteRegion, remoteOffset: 0, length: SIZE }]);
    expect(await peer.call('deviceHash', { ptr: remotePtr, length: SIZE })).toBe(sha256(pattern(61, SIZE)));

    // Pull two halves back, swapped: a batch of two descriptors (one HcclBatchSendRecv each side).
    control.resetTrace();
    const half = SIZE / 2;
    await engine.read(p, [
      { localRegion: local, localOffset: 0, remoteRegion, remoteOffset: half, length: half },
      { localRegion: local, localOffset: half, remoteRegion, remoteOffset: 0, length: half },
    ]);
    const expected = Buffer.concat([pattern(61, SIZE).subarray(half), pattern(61, SIZE).subarray(0, half)]);
    expect(localHash()).toBe(sha256(expected));
    const posts = control.trace().filter((t) => t.fn === 'HcclBatchSendRecv');
    expect(posts.map((t) => `${t.pid === process.pid ? 'us' : 'peer'}:${t.details}`).sort()).toEqual(['peer:items=2 rank=1', 'us:items=2 rank=0']);
  });

  it('drops a batch the peer refuses before either side posts anything', async () => {
    await setup();
    const p = await engine.connect(peer.address, { transport: 'hccl' });
    control.resetTrace();
    // The peer's region 1 is host memory: HCCL moves device memory only.
    const err = await expectCode(() => engine.write(p, [{ localRegion: local, localOffset: 0, remoteRegion: peer.regions[0], remoteOffset: 0, length: 4096 }]), 'ERR_BAD_ARGUMENT');
    expect(err.message).toMatch(/device memory only/);
    expect(control.trace().filter((t) => /^Hccl(Send|Recv|BatchSendRecv)$/.test(t.fn))).toEqual([]);
    // The link is intact.
    await engine.write(p, [{ localRegion: local, localOffset: 0, remoteRegion, remoteOffset: 0, length: SIZE }]);
    expect(await peer.call('deviceHash', { ptr: remotePtr, length: SIZE })).toBe(sha256(pattern(61, SIZE)));
  });

  it('refuses host memory and out-of-range descriptors locally', async () => {
    await setup();
    const p = await engine.connect(peer.address, { transport: 'hccl' });
    const host = engine.allocate(4096);
    await expectCode(() => engine.write(p, [{ localRegion: host, localOffset: 0, remoteRegion, remoteOffset: 0, length: 4096 }]), 'ERR_BAD_ARGUMENT');
    await expectCode(() => engine.write(p, [{ localRegion: local, localOffset: 0, remoteRegion, remoteOffset: SIZE - 1, length: 2 }]), 'ERR_OUT_OF_RANGE');
  });

  it('fails a posted batch at its deadline and closes the link; a new connect works', async () => {
    await setup();
    const p = await engine.connect(peer.address, { transport: 'hccl' });
    control.set({ 'hccl.hang': 1 });
    await expectCode(
      () => engine.write(p, [{ localRegion: local, localOffset: 0, remoteRegion, remoteOffset: 0, length: SIZE }], { timeoutMs: 300 }),
      'ERR_TIMEOUT',
    );
    // HCCL cannot cancel what was posted: the link is gone.
    const lost = await expectCode(() => engine.write(p, [{ localRegion: local, localOffset: 0, remoteRegion, remoteOffset: 0, length: 16 }]), 'ERR_PEER_LOST');
    expect(lost.message).toMatch(/connect again|closed|cannot cancel/);
    control.clear();
    const again = await engine.connect(peer.address, { transport: 'hccl' });
    expect(again).not.toBe(p);
    await engine.write(again, [{ localRegion: local, localOffset: 0, remoteRegion, remoteOffset: 0, length: SIZE }]);
    expect(await peer.call('deviceHash', { ptr: remotePtr, length: SIZE })).toBe(sha256(pattern(61, SIZE)));
  });

  it('says why when hccl cannot be used', async () => {
    await expectCode(() => TransferEngine.open({ hccl: true, listen: false }), 'ERR_BACKEND_UNAVAILABLE');
    const plain = await startPeer({ regions: [4096], engine: { device: 'acl' } as never });
    const e = await openEngine({ ...HCCL, listen: false });
    const err = await expectCode(() => e.connect(plain.address, { transport: 'hccl' }), 'ERR_BACKEND_UNAVAILABLE');
    expect(err.message).toMatch(/did not open with hccl/);
    const noHccl = await openEngine({ device: 'acl', listen: false });
    await expectCode(() => noHccl.connect(plain.address, { transport: 'hccl' }), 'ERR_BACKEND_UNAVAILABLE');
    process.env.EPD_TRANSFER_HCCL_LIB = fakes.hcclNoSymbol;
    try {
      const m = await expectCode(() => TransferEngine.open({ ...HCCL, listen: false }), 'ERR_BACKEND_UNAVAILABLE');
      expect(m.message).toMatch(/HcclRecv/);
    } finally {
      process.env.EPD_TRANSFER_HCCL_LIB = fakes.hccl;
    }
  });

  it('fails a batch in flight with ERR_CLOSED when the engine closes', async () => {
    await setup();
    const p = await engine.connect(peer.address, { transport: 'hccl' });
    control.set({ 'hccl.hang': 1 });
    const pending = engine.write(p, [{ localRegion: local, localOffset: 0, remoteRegion, remoteOffset: 0, length: SIZE }]);
    await new Promise((r) => setTimeout(r, 100));
    await engine.close({ timeoutMs: 100 });
    await expectCode(() => pending, 'ERR_CLOSED');
    control.clear();
  });
});
