// Two real processes: this one writes into and reads from a peer engine in a
// child process; every byte is checked against hashes the child computes.
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { DescriptorBatch, type Peer, type Region, type TransferEngine } from '../../lib/index.js';
import { closeEngines, counters, openEngine, pattern, patterned, sha256, startPeer, stopPeers, type PeerProcess } from '../helpers.js';

const MiB = 1 << 20;
const REGION = 64 * MiB;
const PEER_SEED = 100;

let engine: TransferEngine;
let child: PeerProcess;
let peer: Peer;
let remote: number;
let src: Region;
let dst: Region;
/** What the child's region must hold: its initial pattern plus every write so far. */
let mirror: Buffer;

beforeAll(async () => {
  child = await startPeer({ regions: [REGION], seed: PEER_SEED });
  remote = child.regions[0];
  engine = await openEngine();
  src = patterned(engine, REGION, 1);
  dst = patterned(engine, REGION, 2);
  peer = await engine.connect(child.address);
  mirror = pattern(PEER_SEED, REGION);
});

afterAll(async () => {
  await closeEngines();
  await stopPeers();
});

/** The child's hash of [offset, offset + length) equals the mirror's. */
async function expectPeerHolds(offset: number, length: number): Promise<void> {
  const theirs = await child.call<string>('hash', { region: remote, offset, length });
  expect(theirs).toBe(sha256(mirror, offset, length));
}

function record(localOffset: number, remoteOffset: number, length: number): void {
  src.buffer!.copy(mirror, remoteOffset, localOffset, localOffset + length);
}

const sizes = [1, 3, 4095, 4096, 4097, 65_537, MiB, MiB + 13, REGION];

describe('write', () => {
  test.each(sizes)('%i bytes land byte for byte, neighbours untouched', async (size) => {
    const localOffset = size === REGION ? 0 : 7;
    const remoteOffset = size === REGION ? 0 : 4096 * 3 + 11;
    const before = counters(engine);
    const result = await engine.write(peer, [{ localRegion: src, localOffset, remoteRegion: remote, remoteOffset, length: size }]);
    expect(result).toEqual({ bytes: size, descriptors: 1 });
    record(localOffset, remoteOffset, size);
    // One byte either side proves nothing spilled over.
    const lo = Math.max(0, remoteOffset - 1);
    await expectPeerHolds(lo, Math.min(REGION, remoteOffset + size + 1) - lo);
    expect(engine.counters.bytesWritten - before.bytesWritten).toBe(size);
    expect(engine.counters.batchesCompleted - before.batchesCompleted).toBe(1);
    expect(engine.counters.descriptors - before.descriptors).toBe(1);
  });
});

describe('read', () => {
  test.each(sizes)('%i bytes arrive byte for byte, neighbours untouched', async (size) => {
    const seed = 1000 + size;
    const remoteOffset = size === REGION ? 0 : 5;
    const localOffset = size === REGION ? 0 : 4096 + 9;
    await child.call('fill', { region: remote, seed, offset: remoteOffset, length: size });
    pattern(seed, size).copy(mirror, remoteOffset);
    const edges = [localOffset - 1, localOffset + size].filter((i) => i >= 0 && i < REGION).map((i) => [i, dst.buffer![i]]);
    const before = counters(engine);
    const result = await engine.read(peer, [{ localRegion: dst, localOffset, remoteRegion: remote, remoteOffset, length: size }]);
    expect(result.bytes).toBe(size);
    const theirs = await child.call<string>('hash', { region: remote, offset: remoteOffset, length: size });
    expect(sha256(dst.buffer!, localOffset, size)).toBe(theirs);
    for (const [i, v] of edges) expect(dst.buffer![i]).toBe(v);
    expect(engine.counters.bytesRead - before.bytesRead).toBe(size);
  });
});

/** Deterministic small PRNG so failures reproduce. */
function rng(seed: number): (n: number) => number {
  let s = seed >>> 0 || 1;
  return (n) => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) % n;
  };
}

/** `count` non-overlapping [offset, length) ranges in [0, span), in shuffled order. */
function scattered(count: number, span: number, random: (n: number) => number): Array<[number, number]> {
  const slot = Math.floor(span / count);
  const out: Array<[number, number]> = [];
  for (let i = 0; i < count; i++) {
    const pad = random(64);
    out.push([i * slot + pad, 1 + random(slot - pad)]);
  }
  for (let i = out.length - 1; i > 0; i--) {
    const j = random(i + 1);
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

describe('scattered batches', () => {
  test('one write batch of 512 descriptors at scattered offsets', async () => {
    const random = rng(42);
    const targets = scattered(512, 16 * MiB, random);
    const batch = targets.map(([remoteOffset, length]) => {
      const localOffset = random(REGION - length);
      record(localOffset, remoteOffset, length);
      return { localRegion: src, localOffset, remoteRegion: remote, remoteOffset, length };
    });
    const total = batch.reduce((n, d) => n + d.length, 0);
    expect(await engine.write(peer, batch)).toEqual({ bytes: total, descriptors: 512 });
    await expectPeerHolds(0, 16 * MiB + 4096);
  });

  test('a DescriptorBatch of 2000 small descriptors, reused after submit', async () => {
    const random = rng(7);
    const batch = new DescriptorBatch(4);
    for (const [remoteOffset, length] of scattered(2000, 8 * MiB, random)) {
      const localOffset = random(REGION - length);
      record(localOffset, 16 * MiB + remoteOffset, length);
      batch.add(src, localOffset, remote, 16 * MiB + remoteOffset, length);
    }
    const bytes = batch.bytes;
    const done = engine.write(peer, batch);
    // The engine copied the descriptors at submit: clobbering them now changes nothing.
    batch.clear().add(src, 0, remote, 0, 1);
    expect(await done).toEqual({ bytes, descriptors: 2000 });
    await expectPeerHolds(16 * MiB, 8 * MiB + 4096);
  });

  test('one read batch gathers scattered remote ranges into scattered local ranges', async () => {
    const random = rng(99);
    await child.call('fill', { region: remote, seed: 55, offset: 32 * MiB, length: 8 * MiB });
    pattern(55, 8 * MiB).copy(mirror, 32 * MiB);
    const remoteRanges = scattered(300, 8 * MiB, random).map(([o, l]) => [32 * MiB + o, l] as const);
    const localSlots = scattered(300, 32 * MiB, random);
    const expected = Buffer.from(dst.buffer!);
    const batch = remoteRanges.map(([remoteOffset, length], i) => {
      const localOffset = localSlots[i][0];
      const len = Math.min(length, localSlots[i][1]);
      mirror.copy(expected, localOffset, remoteOffset, remoteOffset + len);
      return { localRegion: dst, localOffset, remoteRegion: remote, remoteOffset, length: len };
    });
    await engine.read(peer, batch);
    expect(sha256(dst.buffer!, 0, 32 * MiB + 64)).toBe(sha256(expected, 0, 32 * MiB + 64));
  });
});

describe('concurrency', () => {
  test('32 write batches in flight at once all land', async () => {
    const before = counters(engine);
    const jobs = Array.from({ length: 32 }, (_, i) => {
      const localOffset = i * MiB + i;
      const remoteOffset = i * 2 * MiB + 3;
      const length = MiB - i * 17;
      record(localOffset, remoteOffset, length);
      return engine.write(peer, [
        { localRegion: src, localOffset, remoteRegion: remote, remoteOffset, length },
        { localRegion: src, localOffset: localOffset + length, remoteRegion: remote, remoteOffset: remoteOffset + MiB, length: 100 + i },
      ]);
    });
    jobs.forEach((_, i) => record(i * MiB + i + MiB - i * 17, i * 2 * MiB + 3 + MiB, 100 + i));
    expect(engine.inFlight).toBeGreaterThan(0);
    const results = await Promise.all(jobs);
    results.forEach((r, i) => expect(r.bytes).toBe(MiB - i * 17 + 100 + i));
    expect(engine.counters.batchesCompleted - before.batchesCompleted).toBe(32);
    expect(engine.counters.batchesInFlight).toBe(0);
    expect(engine.counters.bytesInFlight).toBe(0);
    expect(engine.inFlight).toBe(0);
    await expectPeerHolds(0, REGION);
  });

  test('concurrent reads and writes over disjoint ranges all complete correctly', async () => {
    await child.call('fill', { region: remote, seed: 77, offset: 40 * MiB, length: 16 * MiB });
    pattern(77, 16 * MiB).copy(mirror, 40 * MiB);
    const jobs: Array<Promise<unknown>> = [];
    for (let i = 0; i < 16; i++) {
      record(i * MiB, i * MiB, MiB);
      jobs.push(engine.write(peer, [{ localRegion: src, localOffset: i * MiB, remoteRegion: remote, remoteOffset: i * MiB, length: MiB }]));
      jobs.push(engine.read(peer, [{ localRegion: dst, localOffset: i * MiB, remoteRegion: remote, remoteOffset: 40 * MiB + i * MiB, length: MiB }]));
    }
    await Promise.all(jobs);
    await expectPeerHolds(0, 16 * MiB);
    expect(sha256(dst.buffer!, 0, 16 * MiB)).toBe(sha256(mirror, 40 * MiB, 16 * MiB));
  });
});

describe('external buffers', () => {
  test('a registered Buffer is the source of a write and the target of a read', async () => {
    const bytes = pattern(9, 3 * MiB + 5);
    const region = engine.register(bytes);
    expect(region.kind).toBe('external');
    await engine.write(peer, [{ localRegion: region, localOffset: 1, remoteRegion: remote, remoteOffset: 48 * MiB, length: 3 * MiB }]);
    bytes.copy(mirror, 48 * MiB, 1, 1 + 3 * MiB);
    await expectPeerHolds(48 * MiB, 3 * MiB + 1);
    const back = new Uint8Array(3 * MiB);
    await engine.read(peer, [{ localRegion: engine.register(back), localOffset: 0, remoteRegion: remote, remoteOffset: 48 * MiB, length: 3 * MiB }]);
    expect(sha256(back)).toBe(sha256(bytes, 1, 3 * MiB));
  });

  test('external regions are not advertised to peers', async () => {
    const other = await openEngine();
    const p = await other.connect(engine.address!);
    const kinds = p.regions.map((r) => r.kind);
    expect(kinds).not.toContain('external');
    expect(p.regions.map((r) => r.id).sort()).toEqual([src.id, dst.id].sort());
  });
});
