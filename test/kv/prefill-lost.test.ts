// Decode learns at once that a prefill pushing to it died: the receiver fails exactly
// the requests that prefill had begun, with ERR_PEER_LOST, long before their deadline;
// other prefills' requests — including a restarted process under the same name — go on.
import { afterEach, expect, it } from 'vitest';
import { LayerwiseReceiver } from '../../lib/kv/receiver.js';
import { digestBlocks } from '../fixtures/kv-digest.mjs';
import { closeEngines, openEngine } from '../helpers.js';
import { cache, fixtureGeometry, range, SMALL, startKvProcess, stopKvProcesses, track, type KvProcess } from './kv-helpers.js';

const closers: Array<() => unknown> = [];
afterEach(async () => {
  for (const c of closers.splice(0)) await c();
  await stopKvProcesses();
  await closeEngines();
});

/** Far beyond the test's own timeout: a failure that arrives at all arrived early. */
const DEADLINE_MS = 30_000;
const TEST_TIMEOUT_MS = 15_000;

async function decode() {
  const engine = await openEngine();
  const side = cache(engine, SMALL, SMALL.decodeBlockSize, SMALL.decodeBlocks);
  // Default quiesce period (30 s): settled() must not need it after a lost sender.
  const receiver = new LayerwiseReceiver(engine, side.layout);
  closers.push(() => receiver.close());
  return { engine, side, receiver };
}

function prefill(name: string, seed: number, transport: 'auto' | 'tcp' = 'auto'): Promise<KvProcess> {
  return startKvProcess('kv-prefill.mjs', { geometry: fixtureGeometry(SMALL, 'prefill'), seed, engine: { name, transport } });
}

/** Starts a request on a prefill process and pushes its first `layers` layers, acknowledged by decode. */
async function pushPart(p: KvProcess, address: string, requestId: string, localBlocks: number[], remoteBlocks: number[], layers: number) {
  await p.call('add', { requestId, peer: address, localBlocks, remoteBlocks, tokens: remoteBlocks.length * SMALL.decodeBlockSize });
  await p.call('ready', { upTo: layers });
  await p.call('acked', { count: layers });
}

it(
  'prefill SIGKILLed mid-push: its request fails ERR_PEER_LOST well before the deadline; another prefill’s request completes byte for byte',
  async () => {
    const { engine, side, receiver } = await decode();
    // The victim pushes over tcp (its grant is revoked when it dies), the survivor over shm.
    const [victim, survivor] = await Promise.all([prefill('prefill-victim', 11, 'tcp'), prefill('prefill-survivor', 12)]);
    const lostBlocks = [7, 8, 9, 10];
    const keptBlocks = [20, 21, 22];
    const lost = track(receiver.expect('victim-req', { blocks: lostBlocks, deadlineMs: DEADLINE_MS }));
    const kept = track(receiver.expect('survivor-req', { blocks: keptBlocks, deadlineMs: DEADLINE_MS }));
    // Expected, but no prefill has begun it: nothing says whose it is, so it waits on.
    const unclaimed = track(receiver.expect('unclaimed', { blocks: [30], deadlineMs: DEADLINE_MS }));
    await pushPart(victim, engine.address!, 'victim-req', range(0, 4), lostBlocks, 2);
    await pushPart(survivor, engine.address!, 'survivor-req', [10, 11, 12], keptBlocks, 2);

    await victim.kill();
    const err = await lost.promise.catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_PEER_LOST', requestId: 'victim-req', invalidBlockIds: lostBlocks });
    expect((err as Error).message).toContain("'prefill-victim'");
    await receiver.settled('victim-req'); // the dead sender writes nothing more
    expect(kept.settled).toBe(false);
    expect(unclaimed.settled).toBe(false);

    await survivor.call('ready', { upTo: SMALL.layers });
    expect(await kept.promise).toMatchObject({ requestId: 'survivor-req', senders: ['prefill-survivor'] });
    expect(digestBlocks(side.layout, keptBlocks)).toBe(await survivor.call('digest', { ids: [10, 11, 12] }));
    receiver.cancel('unclaimed');
    await expect(unclaimed.promise).rejects.toMatchObject({ code: 'ERR_ABORTED' });
    expect(receiver.stats).toMatchObject({ requestsPending: 0, requestsDone: 1, requestsFailed: 2 });
  },
  TEST_TIMEOUT_MS,
);

it(
  'a prefill restarted under the same name is not confused with the dead one: only the dead process’s request fails',
  async () => {
    const { engine, side, receiver } = await decode();
    const old = await prefill('prefill-a', 11);
    const oldBlocks = [1, 2, 3];
    const newBlocks = [40, 41, 42, 43];
    const oldReq = track(receiver.expect('from-old', { blocks: oldBlocks, deadlineMs: DEADLINE_MS }));
    const newReq = track(receiver.expect('from-new', { blocks: newBlocks, deadlineMs: DEADLINE_MS }));
    await pushPart(old, engine.address!, 'from-old', [5, 6, 7], oldBlocks, 2);
    // The replacement says hello under the same sender name while the old connection is still up.
    const fresh = await prefill('prefill-a', 13);
    await pushPart(fresh, engine.address!, 'from-new', range(20, 4), newBlocks, 1);

    await old.kill();
    await expect(oldReq.promise).rejects.toMatchObject({ code: 'ERR_PEER_LOST', requestId: 'from-old', invalidBlockIds: oldBlocks });
    expect(newReq.settled).toBe(false);

    await fresh.call('ready', { upTo: SMALL.layers });
    expect(await newReq.promise).toMatchObject({ requestId: 'from-new', senders: ['prefill-a'] });
    expect(digestBlocks(side.layout, newBlocks)).toBe(await fresh.call('digest', { ids: range(20, 4) }));
  },
  TEST_TIMEOUT_MS,
);
