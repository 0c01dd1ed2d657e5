// Shared-memory objects do not outlive their owner: close() removes them, a
// Region dropped without free() is released after GC, and objects left by a
// SIGKILLed process are reclaimed by the next TransferEngine.open().
import { afterAll, expect, test } from 'vitest';
import { TransferEngine } from '../../lib/index.js';
import { closeEngines, fixture, killPeer, lastJson, openEngine, runNode, sha256, shmObjectsOf, startPeer, stopPeers } from '../helpers.js';

const MiB = 1 << 20;

afterAll(async () => {
  await closeEngines();
  await stopPeers();
});

/** Runs a scenario of gc-child.mjs in a fresh `node --expose-gc` process. */
async function scenario<T>(name: string): Promise<T> {
  const run = await runNode(['--expose-gc', fixture('gc-child.mjs'), name]);
  expect(run.code, run.stderr).toBe(0);
  return lastJson<T>(run.stdout);
}

test('close() removes every shm object of the engine, even with regions and views still referenced', async () => {
  const r = await scenario<{ during: number; after: number }>('close');
  expect(r.during).toBe(4); // three regions and one device allocation
  expect(r.after).toBe(0);
});

test('close() in this process leaves no name of its regions in /dev/shm', async () => {
  const before = new Set(shmObjectsOf(process.pid));
  const engine = await TransferEngine.open();
  const regions = [engine.allocate(MiB), engine.allocate(2 * MiB)];
  const mem = engine.device.alloc(MiB);
  const mine = shmObjectsOf(process.pid).filter((n) => !before.has(n));
  expect(mine).toHaveLength(3);
  await engine.close();
  const left = shmObjectsOf(process.pid).filter((n) => mine.includes(n));
  expect(left).toEqual([]);
  // The views stay readable after close (the mapping lives as long as they do).
  regions[0].buffer![0] = 1;
  expect(regions[0].buffer![0]).toBe(1);
  expect(mem.length).toBe(MiB);
});

test('a Region dropped without free() is released after GC; a kept one keeps working', async () => {
  const r = await scenario<{ before: number; released: boolean; after: number; keptWorks: boolean }>('gc');
  expect(r.before).toBe(5);
  expect(r.released).toBe(true);
  expect(r.keptWorks).toBe(true);
  expect(r.after).toBe(0);
});

test('a Region collected while a DescriptorBatch over it is in flight does not fail the batch', async () => {
  const r = await scenario<{ ok: boolean; code?: string; released: boolean; landed: boolean }>('inFlight');
  expect(r).toEqual({ ok: true, bytes: 64 * 16 * MiB, released: true, landed: true });
});

test('shm objects of a SIGKILLed process are reclaimed by the next open(); a live peer keeps its own', async () => {
  const live = await startPeer({ regions: [MiB], seed: 4 });
  const victim = await startPeer({ regions: [MiB, 2 * MiB] });
  await victim.call('deviceAlloc', { bytes: MiB });
  const names = shmObjectsOf(victim.pid);
  expect(names).toHaveLength(3);
  const liveNames = shmObjectsOf(live.pid);
  expect(liveNames).toHaveLength(1);

  await killPeer(victim);
  const engine = await openEngine();
  expect(shmObjectsOf(victim.pid)).toEqual([]);
  expect(shmObjectsOf(live.pid)).toEqual(liveNames);

  // The live peer's region is intact and reachable.
  const peer = await engine.connect(live.address);
  const dst = engine.allocate(MiB);
  await engine.read(peer, [{ localRegion: dst, localOffset: 0, remoteRegion: live.regions[0], remoteOffset: 0, length: MiB }]);
  expect(sha256(dst.buffer!)).toBe(await live.call('hash', { region: live.regions[0] }));
});

test('a peer that exits normally leaves nothing in /dev/shm', async () => {
  const child = await startPeer({ regions: [MiB, MiB] });
  await child.call('deviceAlloc', { bytes: 4096 });
  expect(shmObjectsOf(child.pid)).toHaveLength(3);
  await child.call('exit');
  await child.exited;
  expect(shmObjectsOf(child.pid)).toEqual([]);
});
