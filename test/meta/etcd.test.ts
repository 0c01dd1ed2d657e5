// What only the etcd backend can do, and how it fails: lease expiry removes a
// killed engine (timed and reported), a frozen peer is dropped by the watch long
// before the batch deadline, lease loss is repaired, an unreachable etcd fails
// with ERR_METADATA_UNAVAILABLE within the deadline while established peers keep
// moving bytes.
import { afterEach, describe, expect, it } from 'vitest';
import { TransferEngine } from '../../lib/index.js';
import { EtcdSession, keyOf } from '../../lib/meta/etcd.js';
import { EtcdMetadataStore, type SegmentRecord } from '../../lib/meta/store.js';
import { startEtcdServer } from '../../lib/meta/etcd-server.js';
import { closeEngines, expectCode, killPeer, openEngine, startPeer, stopPeers, waitFor } from '../helpers.js';
import { noEtcd, uniquePrefix, useEtcd } from './etcd-helpers.js';

const etcd = useEtcd();
const sessions: EtcdSession[] = [];
let seq = 0;

afterEach(async () => {
  await stopPeers();
  await closeEngines();
  await Promise.all(sessions.splice(0).map((s) => s.close()));
});

function options(prefix: string, ttlSeconds = 2) {
  return { metadata: etcd.url, metadataOptions: { prefix, ttlSeconds, timeoutMs: 2_000 } };
}

async function session(prefix: string): Promise<EtcdSession> {
  const s = await EtcdSession.connect(etcd.url, { prefix, timeoutMs: 2_000 });
  sessions.push(s);
  return s;
}

describe.skipIf(noEtcd)('etcd metadata', () => {
  it('lease expiry removes a SIGKILLed engine within its TTL (measured)', async () => {
    const prefix = uniquePrefix();
    const ttlSeconds = 2;
    const peer = await startPeer({ engine: { ...options(prefix, ttlSeconds), name: `victim-${++seq}` } });
    const watcher = await session(prefix);
    let goneAt = 0;
    const w = watcher.watchPrefix('segments/', { put: () => {}, delete: () => (goneAt ||= Date.now()) });
    await w.ready;
    expect((await watcher.list('segments/')).entries).toHaveLength(1);
    // SIGKILL: no close, no revoke; only the lease TTL can remove the record.
    const killedAt = Date.now();
    await killPeer(peer);
    await waitFor(() => goneAt > 0, 'the record to expire', ttlSeconds * 1000 * 8);
    const detectMs = goneAt - killedAt;
    console.info(`[lease expiry] TTL ${ttlSeconds} s: record of the killed engine deleted after ${detectMs} ms`);
    expect((await watcher.list('segments/')).entries).toHaveLength(0);
  });

  it('a frozen peer (SIGSTOP) is dropped when its lease expires: work in flight fails with ERR_PEER_LOST, not at its deadline', async () => {
    const prefix = uniquePrefix();
    const name = `frozen-${++seq}`;
    const peer = await startPeer({ regions: [256 << 20], engine: { ...options(prefix), name } });
    const b = await openEngine({ ...options(prefix), listen: false });
    const p = await b.connect(name, { transport: 'tcp' });
    const src = b.allocate(256 << 20, { prefault: false });
    const batch = Array.from({ length: 256 }, (_, i) => ({ localRegion: src, localOffset: i << 20, remoteRegion: peer.regions[0], remoteOffset: i << 20, length: 1 << 20 }));
    // The peer's host "vanishes": its sockets stay open (no FIN, no RST), it answers nothing.
    peer.child.kill('SIGSTOP');
    const stoppedAt = Date.now();
    const deadlineMs = 60_000;
    const err = await expectCode(() => b.write(p, batch, { timeoutMs: deadlineMs }), 'ERR_PEER_LOST');
    const failedMs = Date.now() - stoppedAt;
    console.info(`[watch] frozen peer: in-flight write failed with ${err.code} after ${failedMs} ms (lease TTL 2 s, batch deadline ${deadlineMs} ms)`);
    expect(p.lost?.message).toMatch(/left the metadata service/);
    await killPeer(peer);
  });

  it('a restarted engine of the same name takes over its crashed predecessor\'s record; peers of the old one see it gone', async () => {
    const prefix = uniquePrefix();
    const name = `phoenix-${++seq}`;
    const first = await startPeer({ engine: { ...options(prefix, 30), name } });
    const b = await openEngine({ ...options(prefix), listen: false });
    const old = await b.connect(name);
    const oldRecord = (await b.metadata.resolve(name))!;
    const gone = new Promise<Error>((resolve) => b.metadata.watch(oldRecord, resolve));
    first.child.kill('SIGKILL');
    await first.exited;
    // Same host, dead pid: no need to wait out the 30 s TTL.
    const second = await startPeer({ engine: { ...options(prefix, 30), name } });
    expect((await gone).message).toMatch(/replaced|left/);
    const fresh = await b.connect(name);
    expect(fresh).not.toBe(old);
    expect(fresh.pid).toBe(second.pid);
  });

  it('lease loss: records vanish, peers drop the engine, and the engine publishes itself again', async () => {
    const prefix = uniquePrefix();
    const a = await openEngine({ ...options(prefix), name: `relapse-${++seq}` });
    const store = a.metadata as EtcdMetadataStore;
    const b = await openEngine({ ...options(prefix), listen: false });
    const p = await b.connect(a.name);
    const states: string[] = [];
    store.onStatus((s) => states.push(s.error ? `${s.state}:${s.error.code}` : s.state));
    await store.session.dropLease();
    await waitFor(() => p.lost !== null, 'the peer to be dropped');
    expect(p.lost!.code).toBe('ERR_PEER_LOST');
    await waitFor(() => store.state === 'live', 'the lease to be re-granted');
    await waitFor(async () => (await b.metadata.resolve(a.name))?.pid === process.pid, 'the record to be back');
    expect(states).toEqual(['lease-lost:ERR_LEASE_LOST', 'live']);
    const again = await b.connect(a.name);
    expect(again.lost).toBeNull();
  });

  it('open() fails with ERR_METADATA_UNAVAILABLE when etcd does not answer', async () => {
    const started = Date.now();
    await expectCode(() => TransferEngine.open({ metadata: 'etcd://127.0.0.1:1', metadataOptions: { timeoutMs: 500 } }), 'ERR_METADATA_UNAVAILABLE');
    console.info(`[etcd unreachable] open() failed after ${Date.now() - started} ms (timeoutMs 500)`);
  });

  it('etcd unreachable: connect(name) fails within its deadline, connect(address) and established peers keep working', async () => {
    const own = await startEtcdServer();
    try {
      const o = { metadata: own.url, metadataOptions: { ttlSeconds: 10, timeoutMs: 1_000 } };
      const a = await openEngine({ ...o, name: `steady-${++seq}` });
      const dst = a.allocate(1 << 20);
      const b = await openEngine({ ...o, listen: false });
      const src = b.allocate(1 << 20);
      src.buffer!.fill(7);
      const p = await b.connect(a.name);
      await own.pause();
      await expectCode(() => b.connect(`someone-else-${seq}`, { timeoutMs: 1_500 }), 'ERR_METADATA_UNAVAILABLE');
      await b.write(p, [{ localRegion: src, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: 1 << 20 }]);
      expect(dst.buffer!.equals(src.buffer!)).toBe(true);
      const direct = await b.connect(a.address!, { transport: 'tcp' });
      expect(direct.lost).toBeNull();
      own.resume();
      // Back within the TTL: nothing was lost, names resolve again.
      await waitFor(async () => (await b.metadata.resolve(a.name).catch(() => null))?.name === a.name, 'etcd to answer again');
      expect(p.lost).toBeNull();
    } finally {
      own.resume();
      await closeEngines();
      await own.stop();
    }
  });

  it('records carry no capability: a reader of etcd learns no grant, shm name or secret', async () => {
    const prefix = uniquePrefix();
    const a = await openEngine({ ...options(prefix), name: `quiet-${++seq}`, secret: 'a shared secret of some length' });
    a.allocate(4096);
    const s = await session(prefix);
    await waitFor(async () => ((await s.get<SegmentRecord>(keyOf('segments', a.name)))?.value.regions.length ?? 0) > 0, 'the region to be published');
    const raw = JSON.stringify((await s.get(keyOf('segments', a.name)))!.value);
    expect(raw).not.toMatch(/grant|ipcKey|secret|epd-/i);
  });
});
