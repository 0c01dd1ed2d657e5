// A short soak: thousands of small batches (some failing on purpose) must not
// grow the process's resident memory or open file descriptors without bound.
import { afterAll, expect, test } from 'vitest';
import { DescriptorBatch } from '../../lib/index.js';
import { closeEngines, openEngine, openFds, patterned, rssBytes, sha256, startPeer, stopPeers } from '../helpers.js';

const KiB = 1024;
const MiB = 1 << 20;

afterAll(async () => {
  await closeEngines();
  await stopPeers();
});

test('2000 small batches, with failures and refreshes among them, leak neither memory nor fds', async () => {
  const child = await startPeer({ regions: [4 * MiB] });
  const remote = child.regions[0];
  const engine = await openEngine();
  const src = patterned(engine, 4 * MiB, 1);
  const dst = engine.allocate(4 * MiB);
  const peer = await engine.connect(child.address);
  let failures = 0;

  const lane = async (lane: number, rounds: number) => {
    const batch = new DescriptorBatch(4);
    for (let i = 0; i < rounds; i++) {
      const base = ((lane * 131 + i * 17) % 1000) * 4 * KiB;
      batch.clear();
      for (let k = 0; k < 4; k++) batch.add(src, base + k * KiB, remote, base + k * KiB, KiB - k);
      if (i % 2 === 0) await engine.write(peer, batch);
      else await engine.read(peer, batch.clear().add(dst, base, remote, base, 4 * KiB));
      if (i % 10 === 9) {
        await engine.write(peer, [{ localRegion: src, localOffset: 4 * MiB - 1, remoteRegion: remote, remoteOffset: 0, length: 2 }]).catch(() => failures++);
      }
      if (i % 50 === 49) await peer.refresh();
    }
  };
  const run = (rounds: number) => Promise.all(Array.from({ length: 8 }, (_, l) => lane(l, rounds)));

  await run(25); // warm up: 200 batches
  globalThis.gc?.();
  const rss0 = rssBytes();
  const fds0 = openFds();
  const counted0 = engine.counters.batchesCompleted;
  await run(225); // 1800 more
  globalThis.gc?.();
  const rss1 = rssBytes();
  const fds1 = openFds();

  expect(engine.counters.batchesCompleted - counted0).toBe(8 * 225);
  expect(failures).toBe(8 * (2 + 22)); // every tenth round of each lane
  expect(engine.counters.batchesInFlight).toBe(0);
  expect(fds1 - fds0).toBeLessThanOrEqual(4);
  expect(rss1 - rss0).toBeLessThan(64 * MiB);

  // And the bytes are right at the end.
  await engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: remote, remoteOffset: 0, length: 4 * MiB }]);
  expect(await child.call('hash', { region: remote })).toBe(sha256(src.buffer!));
});

test('connecting and disconnecting 200 times leaks no fds', async () => {
  const child = await startPeer({ regions: [MiB] });
  const engine = await openEngine();
  const src = patterned(engine, MiB, 2);
  const cycle = async () => {
    const peer = await engine.connect(child.address);
    await engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: child.regions[0], remoteOffset: 0, length: 4 * KiB }]);
    peer.disconnect();
  };
  for (let i = 0; i < 20; i++) await cycle();
  await new Promise((r) => setTimeout(r, 50));
  const fds0 = openFds();
  for (let i = 0; i < 200; i++) await cycle();
  await new Promise((r) => setTimeout(r, 50));
  expect(openFds() - fds0).toBeLessThanOrEqual(4);
});
