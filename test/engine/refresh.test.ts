// A peer's region list changes after we connected: a write naming a new region
// refreshes the list once and succeeds; peer.refresh() shows additions and removals.
import { afterAll, beforeAll, expect, test } from 'vitest';
import type { Peer, Region, TransferEngine } from '../../lib/index.js';
import { closeEngines, counters, expectCode, openEngine, patterned, sha256, startPeer, stopPeers, type PeerProcess } from '../helpers.js';

const MiB = 1 << 20;

let engine: TransferEngine;
let child: PeerProcess;
let peer: Peer;
let src: Region;

beforeAll(async () => {
  child = await startPeer({ regions: [MiB] });
  engine = await openEngine();
  src = patterned(engine, 4 * MiB, 1);
  peer = await engine.connect(child.address);
});

afterAll(async () => {
  await closeEngines();
  await stopPeers();
});

test('a region the peer allocated after connect is found by the first write naming it', async () => {
  const { id } = await child.call<{ id: number }>('allocate', { bytes: 2 * MiB });
  expect(peer.regions.map((r) => r.id)).not.toContain(id);
  const result = await engine.write(peer, [{ localRegion: src, localOffset: 3, remoteRegion: id, remoteOffset: 5, length: 2 * MiB - 5 }]);
  expect(result.bytes).toBe(2 * MiB - 5);
  expect(await child.call('hash', { region: id, offset: 5, length: 2 * MiB - 5 })).toBe(sha256(src.buffer!, 3, 2 * MiB - 5));
  expect(peer.regions).toContainEqual({ id, length: 2 * MiB, kind: 'host' });
});

test('a read from a region allocated after connect refreshes too', async () => {
  const { id } = await child.call<{ id: number }>('allocate', { bytes: MiB, seed: 31 });
  const dst = engine.allocate(MiB);
  await engine.read(peer, [{ localRegion: dst, localOffset: 0, remoteRegion: id, remoteOffset: 0, length: MiB }]);
  expect(sha256(dst.buffer!)).toBe(await child.call('hash', { region: id }));
});

test('peer.refresh() lists regions added and drops regions freed since connect', async () => {
  const { id: added } = await child.call<{ id: number }>('allocate', { bytes: 8192 });
  const dropped = child.regions[0];
  await child.call('free', { region: dropped });
  expect(peer.regions.map((r) => r.id)).toContain(dropped);
  await peer.refresh();
  const ids = peer.regions.map((r) => r.id);
  expect(ids).toContain(added);
  expect(ids).not.toContain(dropped);
});

test('a region still unknown after the one refresh fails ERR_UNKNOWN_REGION without moving bytes', async () => {
  const before = counters(engine);
  await expectCode(() => engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: 777, remoteOffset: 0, length: 1 }]), 'ERR_UNKNOWN_REGION');
  expect(engine.counters.batchesSubmitted).toBe(before.batchesSubmitted);
});

test('a region the peer freed is unknown once we refreshed', async () => {
  const { id } = await child.call<{ id: number }>('allocate', { bytes: 4096 });
  await peer.refresh();
  await child.call('free', { region: id });
  await peer.refresh();
  await expectCode(() => engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: id, remoteOffset: 0, length: 1 }]), 'ERR_UNKNOWN_REGION');
});

test('refresh of a lost peer rejects ERR_PEER_LOST', async () => {
  const other = await startPeer();
  const p = await engine.connect(other.address);
  other.child.kill('SIGKILL');
  await other.exited;
  await expectCode(async () => {
    // The loss arrives as the control connection closing.
    for (let i = 0; i < 500 && !p.lost; i++) await new Promise((r) => setTimeout(r, 10));
    await p.refresh();
  }, 'ERR_PEER_LOST');
});

test('concurrent writes naming a region allocated after connect all refresh and succeed', async () => {
  const { id } = await child.call<{ id: number }>('allocate', { bytes: MiB });
  const writes = Array.from({ length: 8 }, (_, i) =>
    engine.write(peer, [{ localRegion: src, localOffset: i * 1000, remoteRegion: id, remoteOffset: i * 4096, length: 4096 }]),
  );
  await Promise.all(writes);
  for (let i = 0; i < 8; i++) {
    expect(await child.call('hash', { region: id, offset: i * 4096, length: 4096 })).toBe(sha256(src.buffer!, i * 1000, 4096));
  }
});

test('concurrent peer.refresh() calls all resolve with the current list', async () => {
  const { id } = await child.call<{ id: number }>('allocate', { bytes: 4096 });
  await Promise.all([peer.refresh(), peer.refresh(), peer.refresh()]);
  expect(peer.regions.map((r) => r.id)).toContain(id);
});
