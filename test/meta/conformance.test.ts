// One metadata conformance suite, run over both stores: the embedded handshake
// (the default) and etcd (a real etcd-server started for this file). Each backend
// says how a peer is named (its address, or its name) and which error a departed
// peer's target gives; everything else must behave the same.
import { afterEach, describe, expect, it } from 'vitest';
import { TransferEngine, type EngineOptions } from '../../lib/index.js';
import type { MetadataStore, SegmentRecord } from '../../lib/meta/store.js';
import type { ErrorCode } from '../../lib/errors.js';
import { closeEngines, expectCode, killPeer, openEngine, startPeer, stopPeers, waitFor } from '../helpers.js';
import { noEtcd, uniquePrefix, useEtcd } from './etcd-helpers.js';

const etcd = useEtcd();

interface Backend {
  kind: 'embedded' | 'etcd';
  skip: boolean;
  /** Engine options selecting the backend (a fresh key prefix per call for etcd). */
  options(): EngineOptions;
  /** How peers name an engine. */
  target(engine: { name: string; address: string }): string;
  /** The code connect(target) fails with once the engine is gone. */
  goneCode: ErrorCode;
}

const backends: Backend[] = [
  { kind: 'embedded', skip: false, options: () => ({ metadata: 'embedded' }), target: (e) => e.address, goneCode: 'ERR_CONNECT' },
  {
    kind: 'etcd',
    skip: noEtcd,
    options: () => ({ metadata: etcd.url, metadataOptions: { prefix: prefix ?? (prefix = uniquePrefix()), ttlSeconds: 2 } }),
    target: (e) => e.name,
    goneCode: 'ERR_UNKNOWN_PEER',
  },
];
let prefix: string | undefined;
let seq = 0;

afterEach(async () => {
  await stopPeers();
  await closeEngines();
  prefix = undefined;
});

function name(): string {
  return `conf-${process.pid}-${++seq}`;
}

/** Calls `onGone` through the store's watch and resolves once it fired. */
function watched(store: MetadataStore, record: SegmentRecord): { gone: Promise<Error>; cancel(): void } {
  let cancel = () => {};
  const gone = new Promise<Error>((resolve) => {
    cancel = store.watch(record, resolve).cancel;
  });
  return { gone, cancel };
}

function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: nothing within ${ms} ms`)), ms))),
  ]);
}

describe.each(backends)('metadata conformance: $kind', (backend) => {
  const it_ = backend.skip ? it.skip : it;

  it_('a listening engine resolves by its target to a record describing it', async () => {
    const a = await openEngine({ ...backend.options(), name: name() });
    const region = a.allocate(1 << 16);
    const b = await openEngine({ ...backend.options(), listen: false });
    const target = backend.target({ name: a.name, address: a.address! });
    await waitFor(async () => ((await b.metadata.resolve(target))?.regions.length ?? 0) > 0, 'the record lists the region');
    const record = (await b.metadata.resolve(target))!;
    expect(record).toMatchObject({ name: a.name, address: a.address, pid: process.pid, wireVersion: 2 });
    expect(record.regions).toContainEqual({ id: region.id, length: 1 << 16, kind: 'host' });
    // Capabilities (tcp grants, shared-memory names, IPC keys) come only from an authenticated handshake.
    for (const r of record.regions) expect(Object.keys(r).sort()).toEqual(['id', 'kind', 'length']);
    expect(JSON.stringify(record)).not.toMatch(/grant|ipcKey|secret/);
  });

  it_('connect(target) reaches the engine and moves bytes', async () => {
    const a = await openEngine({ ...backend.options(), name: name() });
    const dst = a.allocate(1 << 16);
    const b = await openEngine({ ...backend.options(), listen: false });
    const src = b.allocate(1 << 16);
    src.buffer!.fill(0x5a);
    const peer = await b.connect(backend.target({ name: a.name, address: a.address! }));
    expect(peer.name).toBe(a.name);
    await b.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: 1 << 16 }]);
    expect(dst.buffer!.equals(src.buffer!)).toBe(true);
  });

  it_('a region allocated later appears in the record', async () => {
    const a = await openEngine({ ...backend.options(), name: name() });
    const b = await openEngine({ ...backend.options(), listen: false });
    const target = backend.target({ name: a.name, address: a.address! });
    const later = a.allocate(3 << 12);
    await waitFor(async () => (await b.metadata.resolve(target))?.regions.some((r) => r.id === later.id) ?? false, 'the new region is published');
  });

  it_('list() includes what the store published', async () => {
    const a = await openEngine({ ...backend.options(), name: name() });
    const names = (await a.metadata.list()).map((r) => r.name);
    expect(names).toContain(a.name);
  });

  it_('an unknown name is ERR_UNKNOWN_PEER', async () => {
    const b = await openEngine({ ...backend.options(), listen: false });
    await expectCode(() => b.connect(`nobody-${name()}`), 'ERR_UNKNOWN_PEER');
    expect(await b.metadata.resolve(`nobody-${name()}`)).toBeNull();
  });

  it_('a name held by a live engine is refused with ERR_NAME_IN_USE', async () => {
    const n = name();
    await openEngine({ ...backend.options(), name: n });
    await expectCode(() => TransferEngine.open({ ...backend.options(), name: n }), 'ERR_NAME_IN_USE');
  });

  it_('a closed engine is gone: the watch fires, resolve finds nothing, connect fails', async () => {
    const a = await TransferEngine.open({ ...backend.options(), name: name() });
    const b = await openEngine({ ...backend.options(), listen: false });
    const target = backend.target({ name: a.name, address: a.address! });
    const record = (await b.metadata.resolve(target))!;
    const w = watched(b.metadata, record);
    await a.close();
    const reason = await within(w.gone, 10_000, 'watch after close');
    expect(reason).toMatchObject({ code: 'ERR_PEER_LOST' });
    expect(await b.metadata.resolve(target)).toBeNull();
    await expectCode(() => b.connect(target, { timeoutMs: 2_000 }), backend.goneCode);
  });

  it_('a killed engine: work in flight to it fails with ERR_PEER_LOST and its record goes', async () => {
    const peer = await startPeer({ regions: [64 << 20], engine: { ...backend.options(), name: name() } });
    const b = await openEngine({ ...backend.options(), listen: false });
    const peerName = (await b.metadata.resolve(peer.address))!.name;
    const target = backend.target({ name: peerName, address: peer.address });
    const record = (await b.metadata.resolve(target))!;
    const w = watched(b.metadata, record);
    const p = await b.connect(target);
    const src = b.allocate(64 << 20);
    const batch = Array.from({ length: 64 }, (_, i) => ({ localRegion: src, localOffset: i << 20, remoteRegion: peer.regions[0], remoteOffset: i << 20, length: 1 << 20 }));
    const writes = Array.from({ length: 16 }, () => b.write(p, batch, { timeoutMs: 60_000 }).then(() => 'ok', (e: { code: string }) => e.code));
    const killedAt = Date.now();
    await killPeer(peer);
    const outcomes = await Promise.all(writes);
    // Writes that completed before the kill are fine; none may end any other way than ERR_PEER_LOST.
    expect(outcomes.every((o) => o === 'ok' || o === 'ERR_PEER_LOST')).toBe(true);
    await within(w.gone, 15_000, 'watch after SIGKILL');
    const goneMs = Date.now() - killedAt;
    await waitFor(async () => (await b.metadata.resolve(target)) === null, 'the record is gone');
    console.info(`[metadata ${backend.kind}] killed engine seen gone by the watch after ${goneMs} ms (lease TTL ${backend.kind === 'etcd' ? '2 s' : 'n/a'})`);
    expect(p.lost?.code).toBe('ERR_PEER_LOST');
  });
});
