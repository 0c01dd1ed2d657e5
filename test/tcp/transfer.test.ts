// The tcp transport between processes: byte-exact writes and reads (large
// descriptors split across connections, small ones coalesced), transport choice,
// argument checks, and the HMAC the data connections use.
import { createHmac } from 'node:crypto';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { native } from '../../lib/native.js';
import { DescriptorBatch, TransferEngine, TransferError, type Region } from '../../lib/index.js';
import { fillPattern, sha256 } from '../fixtures/pattern.mjs';
import { startTcpPeer, stopTcpPeers, tcpStats, type TcpPeer } from './util.js';

const MiB = 1 << 20;
let engine: TransferEngine;
let src: Region;
let dst: Region;
let target: TcpPeer;

beforeAll(async () => {
  engine = await TransferEngine.open();
  src = engine.allocate(32 * MiB);
  dst = engine.allocate(32 * MiB);
  fillPattern(src.buffer!, 11);
  target = await startTcpPeer({ regions: [32 * MiB, 4 * MiB], seed: 100 });
});

afterEach(() => dst.buffer!.fill(0));

afterAll(async () => {
  await engine.close();
  await stopTcpPeers();
});

async function codeOf(p: Promise<unknown> | (() => unknown)): Promise<string> {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (err) {
    expect(err).toBeInstanceOf(TransferError);
    return (err as TransferError).code;
  }
  throw new Error('expected a TransferError');
}

describe('HMAC-SHA256 of the data connections', () => {
  it('matches node:crypto for short, block-sized and long keys and messages', () => {
    for (const [k, m] of [[0, 0], [3, 5], [32, 64], [64, 55], [65, 56], [200, 1000], [17, 4096]]) {
      const key = Buffer.alloc(k, 7).map((_, i) => (i * 31 + 5) & 0xff);
      const msg = Buffer.alloc(m).map((_, i) => (i * 17 + 3) & 0xff);
      expect(native.hmacSha256(key, msg).toString('hex')).toBe(createHmac('sha256', key).update(msg).digest('hex'));
    }
  });
});

describe('tcp between processes', () => {
  it.each([1, 3])('writes and reads byte-exact with %i connection(s): one large descriptor split across them', async (connections) => {
    const peer = await engine.connect(target.address, { transport: 'tcp', connections });
    expect(peer.transport).toBe('tcp');
    const region = target.regions[0];
    const length = 9 * MiB + 12345; // odd size and offsets: split pieces do not align with frames
    const w = await engine.write(peer, [{ localRegion: src, localOffset: 7, remoteRegion: region, remoteOffset: 1001, length }]);
    expect(w).toEqual({ bytes: length, descriptors: 1 });
    expect(await target.call('hash', { region, offset: 1001, length })).toBe(sha256(src.buffer!, 7, length));
    const r = await engine.read(peer, [{ localRegion: dst, localOffset: 3, remoteRegion: region, remoteOffset: 1001, length }]);
    expect(r.bytes).toBe(length);
    expect(sha256(dst.buffer!, 3, length)).toBe(sha256(src.buffer!, 7, length));
    expect(tcpStats(engine).clientConnections).toBeGreaterThanOrEqual(connections);
  });

  it('coalesces many small descriptors into frames and keeps each in its place', async () => {
    const peer = await engine.connect(target.address, { transport: 'tcp', connections: 2 });
    const region = target.regions[0];
    const batch = new DescriptorBatch(2048);
    // 2048 descriptors of 1..4 KiB at scattered offsets: several frames of up to 1000 segments.
    let remote = 0;
    const placed: Array<[number, number, number]> = [];
    for (let i = 0; i < 2048; i++) {
      const len = 1024 + ((i * 97) % 3072);
      const local = (i * 7919 * 64) % (16 * MiB);
      batch.add(src, local, region, remote, len);
      placed.push([local, remote, len]);
      remote += len + 13;
    }
    await engine.write(peer, batch);
    // Read it all back in reverse order, into dst at the same local offsets.
    const back = new DescriptorBatch(2048);
    for (const [local, rem, len] of [...placed].reverse()) back.add(dst, local, region, rem, len);
    await engine.read(peer, back);
    for (const [local, , len] of placed) expect(dst.buffer!.subarray(local, local + len).equals(src.buffer!.subarray(local, local + len))).toBe(true);
  });

  it('runs writes and reads of several batches at once on one peer', async () => {
    const peer = await engine.connect(target.address, { transport: 'tcp', connections: 2 });
    const region = target.regions[0];
    await engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: region, remoteOffset: 0, length: 16 * MiB }]);
    const jobs: Promise<unknown>[] = [];
    for (let i = 0; i < 8; i++) {
      const off = i * 2 * MiB;
      jobs.push(engine.read(peer, [{ localRegion: dst, localOffset: off, remoteRegion: region, remoteOffset: off, length: 2 * MiB }]));
      jobs.push(engine.write(peer, [{ localRegion: src, localOffset: 16 * MiB + off, remoteRegion: region, remoteOffset: 16 * MiB + off, length: 2 * MiB }]));
    }
    await Promise.all(jobs);
    expect(sha256(dst.buffer!, 0, 16 * MiB)).toBe(sha256(src.buffer!, 0, 16 * MiB));
    expect(await target.call('hash', { region, offset: 16 * MiB, length: 16 * MiB })).toBe(sha256(src.buffer!, 16 * MiB, 16 * MiB));
  });

  it('picks shm for a peer on this host unless tcp is asked for, engine-wide or per connect', async () => {
    expect((await engine.connect(target.address)).transport).toBe('shm');
    const tcpEngine = await TransferEngine.open({ transport: 'tcp', listen: false, connections: 1 });
    try {
      const peer = await tcpEngine.connect(target.address);
      expect(peer.transport).toBe('tcp');
      expect((await tcpEngine.connect(target.address, { transport: 'shm' })).transport).toBe('shm');
      expect(tcpStats(tcpEngine).clientConnections).toBe(1);
    } finally {
      await tcpEngine.close();
    }
    expect(engine.capabilities().transports).toContain('tcp');
  });

  it('refuses bad transport options before connecting', async () => {
    expect(await codeOf(() => engine.connect(target.address, { transport: 'udp' as never }))).toBe('ERR_BAD_ARGUMENT');
    expect(await codeOf(() => engine.connect(target.address, { transport: 'tcp', connections: 0 }))).toBe('ERR_BAD_ARGUMENT');
    expect(await codeOf(() => engine.connect(target.address, { transport: 'tcp', connections: 17 }))).toBe('ERR_BAD_ARGUMENT');
    expect(await codeOf(() => TransferEngine.open({ connections: 1.5 }))).toBe('ERR_BAD_ARGUMENT');
    expect(await codeOf(() => TransferEngine.open({ secret: '' }))).toBe('ERR_BAD_ARGUMENT');
    expect(await codeOf(() => TransferEngine.open({ dataHost: '203.0.113.1' }))).toBe('ERR_SYSTEM');
  });

  it('tcp to a peer without a data listener fails with ERR_BACKEND_UNAVAILABLE', async () => {
    const noTcp = await TransferEngine.open({ tcp: false });
    try {
      expect(noTcp.tcpAddress).toBeUndefined();
      expect(await codeOf(engine.connect(noTcp.address!, { transport: 'tcp' }))).toBe('ERR_BACKEND_UNAVAILABLE');
    } finally {
      await noTcp.close();
    }
  });

  it('a region the peer freed after we connected is refused with ERR_UNKNOWN_REGION; the connection stays usable', async () => {
    const extra = await target.call<number>('allocate', { bytes: MiB });
    const peer = await engine.connect(target.address, { transport: 'tcp', connections: 1 });
    await peer.refresh();
    expect(peer.regions.map((r) => r.id)).toContain(extra);
    await target.call('free', { region: extra });
    const err = await codeOf(engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: extra, remoteOffset: 0, length: 4096 }]));
    expect(err).toBe('ERR_UNKNOWN_REGION');
    const ok = await engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: target.regions[1], remoteOffset: 0, length: MiB }]);
    expect(ok.bytes).toBe(MiB);
    expect(peer.lost).toBeNull();
  });
});
