// Peers that die, stop or hang up: the batches that go to them fail with
// ERR_PEER_LOST within their deadline, and everything else keeps working.
import { afterAll, afterEach, beforeAll, expect, test } from 'vitest';
import type { Peer, Region, TransferEngine } from '../../lib/index.js';
import { closeEngines, expectCode, openEngine, patterned, repeatedBatch, sha256, startPeer, stopPeers, waitFor, type PeerProcess } from '../helpers.js';

const MiB = 1 << 20;
const SIZE = 16 * MiB;

let engine: TransferEngine;
let src: Region;

beforeAll(async () => {
  engine = await openEngine();
  src = patterned(engine, SIZE, 1);
});

afterEach(stopPeers);
afterAll(closeEngines);

/** Writes `length` bytes from src to the child's first region and checks them there. */
async function writeAndVerify(peer: Peer, child: PeerProcess, length = 3 * MiB + 7): Promise<void> {
  const result = await engine.write(peer, [{ localRegion: src, localOffset: 11, remoteRegion: child.regions[0], remoteOffset: 13, length }]);
  expect(result.bytes).toBe(length);
  expect(await child.call('hash', { region: child.regions[0], offset: 13, length })).toBe(sha256(src.buffer!, 11, length));
}

test('peer killed mid-batch: a write fails ERR_PEER_LOST within its deadline, then the engine still works', async () => {
  const victim = await startPeer({ regions: [SIZE] });
  const bystander = await startPeer({ regions: [SIZE] });
  const peer = await engine.connect(victim.address);
  const other = await engine.connect(bystander.address);
  // Something in flight to the bystander all along must be unaffected.
  const parallel = engine.write(other, repeatedBatch(src, bystander.regions[0], SIZE, 32));

  await engine.write(peer, repeatedBatch(src, victim.regions[0], SIZE, 8));
  const big = () => engine.write(peer, repeatedBatch(src, victim.regions[0], SIZE, 64), { timeoutMs: 20_000 });
  const inFlight = big();
  victim.child.kill('SIGKILL');
  let failure: unknown;
  for (let i = 0, next = inFlight; i < 100; i++, next = big()) {
    try {
      await next;
    } catch (err) {
      failure = err;
      break;
    }
  }
  expect((failure as { code?: string })?.code).toBe('ERR_PEER_LOST');
  await victim.exited;
  await waitFor(() => peer.lost !== null, 'the peer to be marked lost');
  expect(peer.lost!.code).toBe('ERR_PEER_LOST');
  await expectCode(() => big(), 'ERR_PEER_LOST');

  expect((await parallel).bytes).toBe(32 * SIZE);
  await writeAndVerify(other, bystander);
  const fresh = await startPeer({ regions: [SIZE] });
  await writeAndVerify(await engine.connect(fresh.address), fresh);
  expect(engine.counters.batchesInFlight).toBe(0);
});

test('a read from a killed peer fails ERR_PEER_LOST', async () => {
  const victim = await startPeer({ regions: [SIZE] });
  const peer = await engine.connect(victim.address);
  const dst = engine.allocate(SIZE);
  const pending = engine.read(peer, repeatedBatch(dst, victim.regions[0], SIZE, 256));
  victim.child.kill('SIGKILL');
  await expectCode(() => pending, 'ERR_PEER_LOST');
  await victim.exited;
  await dst.free();
});

test('connecting again to a killed peer fails ERR_CONNECT', async () => {
  const victim = await startPeer({ regions: [MiB] });
  const peer = await engine.connect(victim.address);
  victim.child.kill('SIGKILL');
  await victim.exited;
  await waitFor(() => peer.lost !== null, 'the peer to be marked lost');
  await expectCode(() => engine.connect(victim.address, { timeoutMs: 2_000 }), 'ERR_CONNECT');
});

test('a stopped peer (SIGSTOP) does not fail shm writes: they are one-sided', async () => {
  const sleeper = await startPeer({ regions: [SIZE] });
  const peer = await engine.connect(sleeper.address);
  sleeper.child.kill('SIGSTOP');
  try {
    for (let i = 0; i < 5; i++) {
      const r = await engine.write(peer, [{ localRegion: src, localOffset: i, remoteRegion: sleeper.regions[0], remoteOffset: 100 + i, length: 4 * MiB }]);
      expect(r.bytes).toBe(4 * MiB);
    }
    expect(peer.lost).toBeNull();
  } finally {
    sleeper.child.kill('SIGCONT');
  }
  expect(await sleeper.call('hash', { region: sleeper.regions[0], offset: 104, length: 4 * MiB })).toBe(sha256(src.buffer!, 4, 4 * MiB));
  await writeAndVerify(peer, sleeper);
});

test('a stopped peer cannot answer a refresh: ERR_TIMEOUT, and the peer is then treated as lost', async () => {
  const sleeper = await startPeer({ regions: [MiB] });
  const peer = await engine.connect(sleeper.address);
  sleeper.child.kill('SIGSTOP');
  try {
    await expectCode(() => peer.refresh(200), 'ERR_TIMEOUT');
    await expectCode(() => engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: sleeper.regions[0], remoteOffset: 0, length: 1 }]), 'ERR_PEER_LOST');
  } finally {
    sleeper.child.kill('SIGCONT');
  }
  // A fresh connection to the woken peer works.
  await writeAndVerify(await engine.connect(sleeper.address), sleeper, 1000);
});

test('disconnect() fails the batch in flight and later batches with ERR_PEER_LOST', async () => {
  const child = await startPeer({ regions: [SIZE] });
  const peer = await engine.connect(child.address);
  const pending = engine.write(peer, repeatedBatch(src, child.regions[0], SIZE, 256));
  peer.disconnect();
  await expectCode(() => pending, 'ERR_PEER_LOST');
  await expectCode(() => engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: child.regions[0], remoteOffset: 0, length: 1 }]), 'ERR_PEER_LOST');
  // connect() gives a new, working peer for the same address.
  const again = await engine.connect(child.address);
  expect(again).not.toBe(peer);
  await writeAndVerify(again, child);
});

test('a write issued right after disconnect() fails ERR_PEER_LOST and moves nothing', async () => {
  const child = await startPeer({ regions: [MiB], seed: 5 });
  const peer = await engine.connect(child.address);
  const before = await child.call('hash', { region: child.regions[0] });
  peer.disconnect();
  await expectCode(() => engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: child.regions[0], remoteOffset: 0, length: MiB }]), 'ERR_PEER_LOST');
  expect(await child.call('hash', { region: child.regions[0] })).toBe(before);
});

test('a peer whose engine closed (process still alive) is lost: writes fail ERR_PEER_LOST', async () => {
  const child = await startPeer({ regions: [MiB] });
  const peer = await engine.connect(child.address);
  await child.call('closeEngine');
  await waitFor(() => peer.lost !== null, 'the peer to be marked lost');
  await expectCode(() => engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: child.regions[0], remoteOffset: 0, length: 1 }]), 'ERR_PEER_LOST');
  expect(child.child.exitCode).toBeNull();
});
