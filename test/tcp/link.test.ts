// Link emulation: the model is deterministic for a seed, real transfers are paced to
// the emulated bandwidth, and the injected faults (drop after N bytes, delayed
// descriptor) surface as the errors a real link would cause.
import { afterEach, describe, expect, it } from 'vitest';
import { linkSchedule, TransferEngine, TransferError, type Peer, type Region } from '../../lib/index.js';
import { sha256 } from '../fixtures/pattern.mjs';
import { startTcpPeer, stopTcpPeers } from './util.js';

const MiB = 1 << 20;
// Under the AddressSanitizer build (scripts/asan.mjs) every copy is several times slower, so
// the achieved rate says nothing about the emulator's pacing; there these tests check only
// that the paced transfer completes byte-exact and never runs faster than the link allows.
const sanitized = /build-asan/.test(process.env.EPD_TRANSFER_ADDON ?? '');
let engines: TransferEngine[] = [];

async function open(options?: Parameters<typeof TransferEngine.open>[0]): Promise<TransferEngine> {
  const e = await TransferEngine.open(options);
  engines.push(e);
  return e;
}

afterEach(async () => {
  await Promise.all(engines.map((e) => e.close()));
  engines = [];
  await stopTcpPeers();
});

function fill(region: Region, seed: number): void {
  const b = region.buffer!;
  for (let i = 0; i < b.length; i += 4096) b.fill((seed + i / 4096) & 0xff, i, Math.min(b.length, i + 4096));
}

async function errorOf(p: Promise<unknown>): Promise<TransferError> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf(TransferError);
    return err as TransferError;
  }
  throw new Error('expected the call to fail');
}

describe('link options', () => {
  it('refuses malformed link options before anything opens', async () => {
    for (const link of [{ bandwidth: 'fast' }, { bandwidth: -1 }, { latency: '5 parsecs' }, { jitter: -2 }, { seed: 1.5 }, { faults: { delayDescriptor: { index: -1, delayMs: 1 } } }]) {
      const err = await errorOf(TransferEngine.open({ listen: false, link: link as never }));
      expect(err.code).toBe('ERR_BAD_ARGUMENT');
    }
  });

  it('gives the same schedule for the same seed and another for another seed', () => {
    const link = { bandwidth: '1GB/s', latency: '10us', jitter: '5us', seed: 42 };
    const sizes = Array.from({ length: 32 }, () => 64 * 1024);
    const a = linkSchedule(link, sizes);
    expect(linkSchedule(link, sizes)).toEqual(a);
    expect(linkSchedule({ ...link, seed: 43 }, sizes)).not.toEqual(a);
    // Serialisation: the last message cannot arrive before all bytes crossed the link.
    expect(a[31]).toBeGreaterThanOrEqual((32 * 64 * 1024) / 1e3 + 5 - 1e-6);
    // No reordering.
    for (let i = 1; i < a.length; i++) expect(a[i]).toBeGreaterThanOrEqual(a[i - 1]);
  });

  it('models bandwidth and latency exactly without jitter', () => {
    expect(linkSchedule({ bandwidth: '2GB/s', latency: '5us' }, [1e6, 1e6])).toEqual([505, 1005]);
    expect(linkSchedule({ bandwidth: '8Gbit/s' }, [1e6])).toEqual([1000]);
    expect(linkSchedule({ bandwidth: '1GiB/s' }, [2 ** 30])[0]).toBeCloseTo(1e6, 3);
  });
});

describe('link emulation over shm', () => {
  async function selfPeer(link: Parameters<TransferEngine['connect']>[1]): Promise<{ engine: TransferEngine; peer: Peer; src: Region; dst: Region }> {
    const engine = await open();
    const src = engine.allocate(64 * MiB);
    const dst = engine.allocate(64 * MiB);
    fill(src, 3);
    const peer = await engine.connect(engine.address!, link);
    return { engine, peer, src, dst };
  }

  it('paces a long transfer to within 10% of the set bandwidth', async () => {
    // The emulator, not the machine, sets the pace: shm copies run at several GB/s here.
    const bandwidth = 400e6;
    const { engine, peer, src, dst } = await selfPeer({ link: { bandwidth, latency: '20us', jitter: '5us', seed: 3 } });
    const total = 128 * MiB;
    const start = performance.now();
    for (let done = 0; done < total; done += 16 * MiB) {
      const batch = Array.from({ length: 4 }, (_, i) => ({ localRegion: src, localOffset: ((done % (64 * MiB)) + i * 4 * MiB), remoteRegion: dst.id, remoteOffset: ((done % (64 * MiB)) + i * 4 * MiB), length: 4 * MiB }));
      await engine.write(peer, batch);
    }
    const rate = total / ((performance.now() - start) / 1000);
    if (!sanitized) expect(rate / bandwidth).toBeGreaterThan(0.9);
    expect(rate / bandwidth).toBeLessThan(1.1);
    expect(dst.buffer!.equals(src.buffer!)).toBe(true);
  });

  it('drops the peer after N bytes: the batch fails with ERR_PEER_LOST, exactly N bytes landed, reconnect works', async () => {
    const { engine, peer, src, dst } = await selfPeer({ link: { faults: { dropAfterBytes: '1MiB' } } });
    const err = await errorOf(engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: 4 * MiB }]));
    expect(err.code).toBe('ERR_PEER_LOST');
    expect(err.bytesMoved).toBe(MiB);
    expect(dst.buffer!.subarray(0, MiB).equals(src.buffer!.subarray(0, MiB))).toBe(true);
    expect(dst.buffer!.subarray(MiB, 2 * MiB).every((b) => b === 0)).toBe(true);
    expect(peer.lost?.code).toBe('ERR_PEER_LOST');
    const again = await errorOf(engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: 4096 }]));
    expect(again.code).toBe('ERR_PEER_LOST');
    // A new connect re-arms nothing it was not asked to: a plain link works.
    const fresh = await engine.connect(engine.address!);
    expect(fresh).not.toBe(peer);
    await engine.write(fresh, [{ localRegion: src, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: 4 * MiB }]);
    expect(dst.buffer!.subarray(0, 4 * MiB).equals(src.buffer!.subarray(0, 4 * MiB))).toBe(true);
  });

  it('holds a delayed descriptor back: a short deadline fails with ERR_TIMEOUT, a long one completes', async () => {
    const { engine, peer, src, dst } = await selfPeer({ link: { faults: { delayDescriptor: { index: 1, delayMs: 400 } } } });
    const batch = [0, 1, 2].map((i) => ({ localRegion: src, localOffset: i * MiB, remoteRegion: dst.id, remoteOffset: i * MiB, length: MiB }));
    const err = await errorOf(engine.write(peer, batch, { timeoutMs: 100 }));
    expect(err.code).toBe('ERR_TIMEOUT');
    // Descriptors 0 and 2 were not held back; 1 was, and the deadline stopped it.
    expect(dst.buffer!.subarray(2 * MiB, 3 * MiB).equals(src.buffer!.subarray(2 * MiB, 3 * MiB))).toBe(true);
    expect(dst.buffer!.subarray(MiB, 2 * MiB).every((b) => b === 0)).toBe(true);
    // The peer is still usable; the fault fired once (index 1 is in the past now).
    const ok = await engine.write(peer, batch, { timeoutMs: 5_000 });
    expect(ok.bytes).toBe(3 * MiB);
    expect(dst.buffer!.subarray(0, 3 * MiB).equals(src.buffer!.subarray(0, 3 * MiB))).toBe(true);
  });

  it('applies the engine-wide link to every peer and lets connect override it', async () => {
    const engine = await open({ link: { bandwidth: '1MB/s' } });
    const src = engine.allocate(8 * MiB);
    const dst = engine.allocate(8 * MiB);
    const slow = await engine.connect(engine.address!);
    const fast = await engine.connect(engine.address!, { link: { bandwidth: '100GB/s' } });
    expect(fast).not.toBe(slow);
    const d = [{ localRegion: src, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: 8 * MiB }];
    // 8 MiB at 1 MB/s takes 8 s: a 300 ms deadline expires on the engine-wide link only.
    expect((await errorOf(engine.write(slow, d, { timeoutMs: 300 }))).code).toBe('ERR_TIMEOUT');
    expect((await engine.write(fast, d, { timeoutMs: 5_000 })).bytes).toBe(8 * MiB);
  });

  it('closes with emulated batches in flight: they fail with ERR_CLOSED', async () => {
    const { engine, peer, src, dst } = await selfPeer({ link: { bandwidth: '10MB/s' } });
    const p = engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: 32 * MiB }]);
    const closed = engine.close({ timeoutMs: 50 });
    expect((await errorOf(p)).code).toBe('ERR_CLOSED');
    await closed;
  });
});

describe('link emulation over tcp', () => {
  it('paces tcp writes to within 10% of the set bandwidth, byte-exact', async () => {
    const target = await startTcpPeer({ regions: [64 * MiB] });
    const engine = await open({ listen: false });
    const src = engine.allocate(64 * MiB);
    fill(src, 9);
    const bandwidth = 250e6;
    const peer = await engine.connect(target.address, { transport: 'tcp', link: { bandwidth, latency: '50us', jitter: '10us', seed: 5 } });
    const start = performance.now();
    await engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: target.regions[0], remoteOffset: 0, length: 64 * MiB }]);
    const rate = (64 * MiB) / ((performance.now() - start) / 1000);
    if (!sanitized) expect(rate / bandwidth).toBeGreaterThan(0.9);
    expect(rate / bandwidth).toBeLessThan(1.1);
    expect(await target.call('hash', { region: target.regions[0] })).toBe(sha256(src.buffer!));
  });

  it('drops the real tcp connections after N bytes: the target sees them close', async () => {
    const target = await startTcpPeer({ regions: [16 * MiB] });
    const engine = await open({ listen: false });
    const src = engine.allocate(16 * MiB);
    fill(src, 4);
    const peer = await engine.connect(target.address, { transport: 'tcp', link: { faults: { dropAfterBytes: 3 * MiB } } });
    const err = await errorOf(engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: target.regions[0], remoteOffset: 0, length: 16 * MiB }]));
    expect(err.code).toBe('ERR_PEER_LOST');
    expect(err.bytesMoved).toBe(3 * MiB);
    expect(await target.call('hash', { region: target.regions[0], length: 3 * MiB })).toBe(sha256(src.buffer!, 0, 3 * MiB));
    const deadline = Date.now() + 10_000;
    while ((await target.call<{ tcp: { serverConnections: number } }>('resources')).tcp.serverConnections !== 0) {
      if (Date.now() > deadline) throw new Error('the target kept the dropped connections');
      await new Promise((r) => setTimeout(r, 20));
    }
  });
});
