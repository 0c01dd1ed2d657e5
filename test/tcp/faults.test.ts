// tcp faults: a peer that is killed, stalls, resets its connections or answers
// garbage; a malicious client that sends malformed or out-of-bounds frames; wrong
// secrets and wire versions. Each ends with the expected error, leaves other peers
// alone, and leaks no socket or thread on either side.
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { TransferEngine, TransferError, type Peer, type Region } from '../../lib/index.js';
import { encodeFrame, MessageType, WIRE_VERSION } from '../../lib/meta/wire.js';
import { fillPattern, sha256 } from '../fixtures/pattern.mjs';
import {
  ByteReader,
  dataFrame,
  dataKey,
  FrameReader,
  helloHeader,
  openFds,
  rawDataConnect,
  rawHandshake,
  readReply,
  SERVER_DATA_LABEL,
  CLIENT_DATA_LABEL,
  startTcpPeer,
  stopTcpPeers,
  tcpStats,
  threadCount,
  type TcpPeer,
} from './util.js';
import { createHmac } from 'node:crypto';

const MiB = 1 << 20;
let engine: TransferEngine;
let src: Region;

beforeAll(async () => {
  engine = await TransferEngine.open({ connections: 2 });
  src = engine.allocate(64 * MiB);
  fillPattern(src.buffer!, 5);
  // Start what lives as long as the engine (the libuv pool that dials, the link
  // timer thread) so resource baselines only see per-peer state.
  const warm = await startTcpPeer({ regions: [MiB] });
  await engine.connect(warm.address, { transport: 'tcp', link: { bandwidth: '10GB/s' } });
});

afterEach(stopTcpPeers);
afterAll(() => engine.close());

async function failure(p: Promise<unknown>): Promise<TransferError> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf(TransferError);
    return err as TransferError;
  }
  throw new Error('expected a failure');
}

async function waitFor(predicate: () => boolean | Promise<boolean>, what: string, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await predicate())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Resources of this process now; `settled()` waits until they are back. */
function baseline(): { settled(what: string): Promise<void> } {
  const fds = openFds();
  const threads = threadCount();
  const clients = tcpStats(engine).clientConnections;
  return {
    settled: (what) =>
      waitFor(() => openFds() <= fds && threadCount() <= threads && tcpStats(engine).clientConnections <= clients, `fds/threads back to baseline after ${what} (fds ${openFds()}/${fds}, threads ${threadCount()}/${threads})`),
  };
}

function write(peer: Peer, region: number, length: number, options?: { timeoutMs?: number }) {
  return engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: region, remoteOffset: 0, length }], options);
}

describe('peer faults', () => {
  it('peer killed mid-write: ERR_PEER_LOST, a bystander is unaffected, nothing leaks, reconnect works', async () => {
    const victim = await startTcpPeer({ regions: [64 * MiB] });
    const bystander = await startTcpPeer({ regions: [64 * MiB] });
    const base = baseline();
    // A slow emulated link keeps the write in flight long enough to kill the peer under it.
    const peer = await engine.connect(victim.address, { transport: 'tcp', link: { bandwidth: '100MB/s' } });
    const other = await engine.connect(bystander.address, { transport: 'tcp' });
    const inFlight = write(peer, victim.regions[0], 64 * MiB);
    const parallel = write(other, bystander.regions[0], 64 * MiB);
    await new Promise((r) => setTimeout(r, 150));
    victim.child.kill('SIGKILL');
    const err = await failure(inFlight);
    expect(err.code).toBe('ERR_PEER_LOST');
    expect(err.bytesMoved).toBeLessThan(64 * MiB);
    expect((await parallel).bytes).toBe(64 * MiB);
    expect(await bystander.call('hash', { region: bystander.regions[0] })).toBe(sha256(src.buffer!));
    await waitFor(() => peer.lost !== null, 'the peer to be marked lost');
    expect((await failure(write(peer, victim.regions[0], 4096))).code).toBe('ERR_PEER_LOST');
    other.disconnect();
    await base.settled('a killed peer');
  });

  it('peer stalled (SIGSTOP): the batch fails ERR_TIMEOUT at its deadline, the peer is dropped, a new connect works after it resumes', async () => {
    const victim = await startTcpPeer({ regions: [64 * MiB] });
    const peer = await engine.connect(victim.address, { transport: 'tcp' });
    await write(peer, victim.regions[0], MiB);
    const base = baseline();
    victim.child.kill('SIGSTOP');
    try {
      // 64 MiB cannot fit in the socket buffers of a process that does not read.
      const err = await failure(write(peer, victim.regions[0], 64 * MiB, { timeoutMs: 500 }));
      expect(err.code).toBe('ERR_TIMEOUT');
      expect((await failure(write(peer, victim.regions[0], 4096))).code).toBe('ERR_PEER_LOST');
    } finally {
      victim.child.kill('SIGCONT');
    }
    const again = await engine.connect(victim.address, { transport: 'tcp' });
    expect(again).not.toBe(peer);
    expect((await write(again, victim.regions[0], 8 * MiB)).bytes).toBe(8 * MiB);
    expect(await victim.call('hash', { region: victim.regions[0], length: 8 * MiB })).toBe(sha256(src.buffer!, 0, 8 * MiB));
    again.disconnect();
    await base.settled('a stalled peer');
    // The target let go of the dropped connections too.
    await waitFor(async () => (await victim.call<{ tcp: { serverConnections: number } }>('resources')).tcp.serverConnections === 0, 'the target to close its side');
  });
});

/** A fake engine: a control port that describes a data port the test controls. */
async function fakeEngine(
  onData: (socket: net.Socket, reader: ByteReader) => void,
  replyVersion = WIRE_VERSION,
  options: { dataAddress?: string; silent?: boolean } = {},
): Promise<{ address: string; close(): Promise<void> }> {
  const grant = randomBytes(16);
  const key = dataKey(undefined, grant);
  const sockets = new Set<net.Socket>();
  const data = net.createServer((socket) => {
    sockets.add(socket);
    if (options.silent) return; // accepts, then never says a word
    const reader = new ByteReader(socket);
    const nonce = randomBytes(32);
    socket.write(Buffer.concat([helloHeader(1, 32), nonce]));
    void (async () => {
      const h = await reader.read(12);
      const body = h && (await reader.read(80));
      if (!body) return;
      const clientNonce = body.subarray(16, 48);
      const proof = createHmac('sha256', key).update(SERVER_DATA_LABEL).update(clientNonce).update(nonce).update(grant).digest();
      expect(body.subarray(48).equals(createHmac('sha256', key).update(CLIENT_DATA_LABEL).update(nonce).update(clientNonce).update(grant).digest())).toBe(true);
      socket.write(Buffer.concat([helloHeader(3, 32), proof]));
      onData(socket, reader);
    })();
  });
  const control = net.createServer((socket) => {
    sockets.add(socket);
    const reader = new FrameReader(socket);
    void reader.next().then(() => {
      const port = (data.address() as net.AddressInfo).port;
      socket.write(
        encodeFrame(
          MessageType.Segment,
          { name: 'fake', pid: 0, bootId: 'another-host', hostname: 'fake', transports: ['tcp'], regions: [{ id: 1, length: 64 * MiB, kind: 'host' }], tcp: { addresses: [options.dataAddress ?? `127.0.0.1:${port}`], grant: grant.toString('hex') } },
          replyVersion,
        ),
      );
    });
  });
  await Promise.all([data, control].map((s) => new Promise<void>((r) => s.listen(0, '127.0.0.1', r))));
  return {
    address: `127.0.0.1:${(control.address() as net.AddressInfo).port}`,
    close: async () => {
      for (const s of sockets) s.destroy();
      await Promise.all([data, control].map((s) => new Promise((r) => s.close(r))));
    },
  };
}

describe('a broken or hostile target', () => {
  it('connection reset by the peer: ERR_PEER_LOST, no leak', async () => {
    const base = baseline();
    const fake = await fakeEngine((socket, reader) => void reader.read(32).then(() => socket.resetAndDestroy()));
    try {
      const peer = await engine.connect(fake.address);
      expect(peer.transport).toBe('tcp');
      const err = await failure(write(peer, 1, 4 * MiB));
      expect(err.code).toBe('ERR_PEER_LOST');
      await waitFor(() => peer.lost !== null, 'the peer to be dropped');
    } finally {
      await fake.close();
    }
    await base.settled('a reset');
  });

  it('a malformed reply: ERR_PROTOCOL, the connection is dropped, no crash and no leak', async () => {
    const base = baseline();
    const fake = await fakeEngine((socket, reader) => void reader.read(32).then(() => socket.write(Buffer.alloc(32, 0xab))));
    try {
      const peer = await engine.connect(fake.address);
      expect((await failure(engine.read(peer, [{ localRegion: src, localOffset: 0, remoteRegion: 1, remoteOffset: 0, length: MiB }]))).code).toBe('ERR_PROTOCOL');
      // Src was not overwritten by the garbage.
      expect(sha256(src.buffer!)).toBe(sha256((() => { const b = Buffer.alloc(64 * MiB); fillPattern(b, 5); return b; })()));
    } finally {
      await fake.close();
    }
    await base.settled('a malformed reply');
  });

  it('a read reply longer than asked for is malformed, not an overflow', async () => {
    const fake = await fakeEngine((socket, reader) =>
      void reader.read(32).then(async (h) => {
        if (!h || !(await reader.read(16))) return;
        const r = Buffer.alloc(32);
        r.write('EPDR', 0, 'latin1');
        r.writeUInt8(2, 4);
        r.writeBigUInt64LE(h.readBigUInt64LE(8), 8);
        r.writeBigUInt64LE(BigInt(2 * MiB), 16);
        socket.write(r);
      }),
    );
    try {
      const peer = await engine.connect(fake.address);
      expect((await failure(engine.read(peer, [{ localRegion: src, localOffset: 0, remoteRegion: 1, remoteOffset: 0, length: 4096 }]))).code).toBe('ERR_PROTOCOL');
    } finally {
      await fake.close();
    }
  });

  it('a data port nobody listens on fails connect() with ERR_CONNECT; one that never answers, with ERR_TIMEOUT', async () => {
    const base = baseline();
    const closed = await new Promise<number>((resolve) => {
      const probe = net.createServer().listen(0, '127.0.0.1', () => {
        const port = (probe.address() as net.AddressInfo).port;
        probe.close(() => resolve(port));
      });
    });
    const refused = await fakeEngine(() => {}, WIRE_VERSION, { dataAddress: `127.0.0.1:${closed}` });
    const silent = await fakeEngine(() => {}, WIRE_VERSION, { silent: true });
    try {
      expect((await failure(engine.connect(refused.address))).code).toBe('ERR_CONNECT');
      expect((await failure(engine.connect(silent.address, { timeoutMs: 300 }))).code).toBe('ERR_TIMEOUT');
    } finally {
      await Promise.all([refused.close(), silent.close()]);
    }
    await base.settled('failed dials');
  });

  it('a control port that speaks another wire version: ERR_PROTOCOL_VERSION', async () => {
    const fake = await fakeEngine(() => {}, WIRE_VERSION + 1);
    try {
      expect((await failure(engine.connect(fake.address))).code).toBe('ERR_PROTOCOL_VERSION');
    } finally {
      await fake.close();
    }
  });
});

describe('a hostile client', () => {
  let target: TcpPeer;
  let grant: Buffer;
  let key: Buffer;
  let region: number;

  beforeAll(async () => {
    target = await startTcpPeer({ regions: [MiB, MiB], seed: 40 });
    region = target.regions[0];
  });

  async function authed(): Promise<{ reader: ByteReader; control: net.Socket }> {
    const { socket, segment } = await rawHandshake(target.address);
    grant = Buffer.from(segment!.tcp!.grant, 'hex');
    key = dataKey(undefined, grant);
    const { reader, rejected } = await rawDataConnect(segment!.tcp!.addresses[0], grant, key);
    expect(rejected).toBeUndefined();
    return { reader, control: socket };
  }

  async function targetIntact(): Promise<void> {
    const expected = Buffer.alloc(MiB);
    fillPattern(expected, 40);
    expect(await target.call('hash', { region })).toBe(sha256(expected));
    // It still serves an honest engine.
    const peer = await engine.connect(target.address, { transport: 'tcp', connections: 1 });
    expect((await engine.read(peer, [{ localRegion: src, localOffset: 0, remoteRegion: target.regions[1], remoteOffset: 0, length: MiB }])).bytes).toBe(MiB);
    peer.disconnect();
    await waitFor(async () => (await target.call<{ tcp: { serverConnections: number } }>('resources')).tcp.serverConnections === 0, 'the target to drop the connections');
  }

  afterEach(async () => {
    // Only the hostile-client tests use `target`: keep it alive across them.
  });

  it('an out-of-bounds write is refused with ERR_OUT_OF_RANGE before a byte lands, and the connection closes', async () => {
    // stopTcpPeers runs after each test: restart the target for this block's tests.
    target = await startTcpPeer({ regions: [MiB, MiB], seed: 40 });
    region = target.regions[0];
    const { reader, control } = await authed();
    reader.socket.write(dataFrame(1, 1, [[region, MiB - 100, 4096]], Buffer.alloc(4096, 0xee)));
    const reply = await readReply(reader);
    expect(reply?.kind).toBe(3);
    expect(reply?.payload.toString()).toMatch(/^ERR_OUT_OF_RANGE/);
    await reader.closed();
    // Offsets that overflow 64 bits are out of range too, not a wrap-around.
    const again = await authed();
    again.reader.socket.write(dataFrame(1, 1, [[region, 2 ** 53, 16]], Buffer.alloc(16)));
    expect((await readReply(again.reader))?.payload.toString()).toMatch(/^ERR_OUT_OF_RANGE/);
    control.destroy();
    again.control.destroy();
    await targetIntact();
  });

  it('a region that was never granted is refused with ERR_UNKNOWN_REGION; the connection stays usable', async () => {
    target = await startTcpPeer({ regions: [MiB, MiB], seed: 40 });
    region = target.regions[0];
    const { reader, control } = await authed();
    reader.socket.write(dataFrame(1, 1, [[999, 0, 64]], Buffer.alloc(64, 0xee)));
    const reply = await readReply(reader);
    expect(reply?.payload.toString()).toMatch(/^ERR_UNKNOWN_REGION/);
    reader.socket.write(dataFrame(2, 2, [[region, 0, 64]]));
    const data = await readReply(reader);
    expect(data?.kind).toBe(2);
    expect(data?.seq).toBe(2);
    control.destroy();
    await reader.closed(); // revoking the grant closes its data connections
    await targetIntact();
  });

  it.each([
    ['bad magic', dataFrame(1, 1, [[1, 0, 16]], Buffer.alloc(16), { magic: 'XXXX' })],
    ['bad op', (() => { const f = dataFrame(1, 1, [[1, 0, 16]], Buffer.alloc(16)); f.writeUInt8(9, 4); return f; })()],
    ['no segments', dataFrame(1, 1, [])],
    ['payload that does not match the segments', dataFrame(1, 1, [[1, 0, 16]], Buffer.alloc(16), { payloadBytes: 8 })],
    ['a zero-length segment', dataFrame(1, 1, [[1, 0, 0]])],
    ['an absurd payload', dataFrame(1, 1, [[1, 0, 16]], undefined, { payloadBytes: 2 ** 40 })],
  ])('a malformed frame (%s) gets ERR_PROTOCOL and a closed connection, never a crash', async (_what, frame) => {
    target = await startTcpPeer({ regions: [MiB, MiB], seed: 40 });
    region = target.regions[0];
    const { reader, control } = await authed();
    reader.socket.write(frame);
    const reply = await readReply(reader);
    expect(reply?.payload.toString()).toMatch(/^ERR_PROTOCOL/);
    await reader.closed();
    control.destroy();
    await targetIntact();
  });
});

describe('authentication and versions', () => {
  it('a peer with another secret, or none, gets ERR_AUTH both ways; the right one connects', async () => {
    const guarded = await startTcpPeer({ regions: [MiB], seed: 3, engine: { secret: 'correct horse' } });
    const open = await startTcpPeer({ regions: [MiB] });
    const base = baseline();
    const wrong = await TransferEngine.open({ secret: 'battery staple', listen: false });
    const none = await TransferEngine.open({ listen: false });
    const right = await TransferEngine.open({ secret: 'correct horse', listen: false, transport: 'tcp' });
    try {
      expect((await failure(wrong.connect(guarded.address))).code).toBe('ERR_AUTH');
      expect((await failure(none.connect(guarded.address))).code).toBe('ERR_AUTH');
      // Mutual: an engine with a secret refuses a peer that cannot prove it.
      expect((await failure(right.connect(open.address))).code).toBe('ERR_AUTH');
      const peer = await right.connect(guarded.address);
      expect(peer.transport).toBe('tcp');
      const dst = right.allocate(MiB);
      await right.read(peer, [{ localRegion: dst, localOffset: 0, remoteRegion: guarded.regions[0], remoteOffset: 0, length: MiB }]);
      expect(sha256(dst.buffer!)).toBe(await guarded.call('hash', { region: guarded.regions[0] }));
    } finally {
      await Promise.all([wrong.close(), none.close(), right.close()]);
    }
    await base.settled('failed authentications');
  });

  it('without the secret a raw peer learns nothing: no segment, no data connection', async () => {
    const guarded = await startTcpPeer({ regions: [MiB], engine: { secret: 's3cret' } });
    // No secret: it is challenged and gets no segment; a made-up proof ends the connection with ERR_AUTH.
    const bare = await rawHandshake(guarded.address);
    expect(bare.segment).toBeUndefined();
    expect(bare.challenged).toBe(true);
    const reader = new FrameReader(bare.socket);
    bare.socket.write(encodeFrame(MessageType.Auth, { proof: randomBytes(32).toString('base64') }));
    const refusal = await reader.next();
    expect(refusal?.type).toBe(MessageType.Error);
    expect((refusal?.body as { code: string }).code).toBe('ERR_AUTH');
    expect(await reader.next()).toBeNull(); // closed
    const wrong = await rawHandshake(guarded.address, 'not it');
    expect(wrong.segment).toBeUndefined();
    expect(wrong.error?.code).toBe('ERR_AUTH');
    // With the secret it gets a grant; a data connection with a key not derived from the secret is rejected.
    const good = await rawHandshake(guarded.address, 's3cret');
    const grant = Buffer.from(good.segment!.tcp!.grant, 'hex');
    const forged = await rawDataConnect(good.segment!.tcp!.addresses[0], grant, dataKey(undefined, grant));
    expect(forged.rejected).toMatch(/^ERR_AUTH/);
    const real = await rawDataConnect(good.segment!.tcp!.addresses[0], grant, dataKey(Buffer.from('s3cret'), grant));
    expect(real.rejected).toBeUndefined();
    // A grant id that was never issued is rejected the same way.
    const made = await rawDataConnect(good.segment!.tcp!.addresses[0], randomBytes(16), dataKey(Buffer.from('s3cret'), randomBytes(16)));
    expect(made.rejected).toMatch(/^ERR_AUTH/);
    for (const s of [bare.socket, wrong.socket, good.socket, real.reader.socket]) s.destroy();
  });

  it('another wire version is refused with ERR_PROTOCOL_VERSION on the control and the data port', async () => {
    const target = await startTcpPeer({ regions: [MiB] });
    const control = await rawHandshake(target.address, undefined, WIRE_VERSION + 1);
    expect(control.error?.code).toBe('ERR_PROTOCOL_VERSION');
    const good = await rawHandshake(target.address);
    const grant = Buffer.from(good.segment!.tcp!.grant, 'hex');
    const data = await rawDataConnect(good.segment!.tcp!.addresses[0], grant, dataKey(undefined, grant), WIRE_VERSION + 1);
    expect(data.rejected).toMatch(/^ERR_PROTOCOL_VERSION/);
    good.socket.destroy();
  });
});

describe('repeated faults leak nothing', () => {
  function rss(): number {
    return Number(/VmRSS:\s+(\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))![1]) * 1024;
  }

  it('40 connect/write/disconnect cycles and 40 hostile connections: fds, threads and memory stay flat on both sides', async () => {
    const target = await startTcpPeer({ regions: [4 * MiB] });
    const cycle = async () => {
      const peer = await engine.connect(target.address, { transport: 'tcp', connections: 2 });
      await write(peer, target.regions[0], MiB);
      peer.disconnect();
      await waitFor(() => peer.lost !== null, 'the disconnect to be seen');
      const { socket, segment } = await rawHandshake(target.address);
      const grant = Buffer.from(segment!.tcp!.grant, 'hex');
      const { reader } = await rawDataConnect(segment!.tcp!.addresses[0], grant, dataKey(undefined, grant));
      reader.socket.write(dataFrame(1, 1, [[target.regions[0], 4 * MiB, 1]], Buffer.alloc(1)));
      await reader.closed();
      socket.destroy();
    };
    for (let i = 0; i < 5; i++) await cycle(); // warm up allocators and pools
    const base = baseline();
    const targetBase = await target.call<{ fds: number; threads: number }>('resources');
    const rss0 = rss();
    for (let i = 0; i < 40; i++) await cycle();
    await base.settled('40 cycles');
    await waitFor(async () => {
      const now = await target.call<{ fds: number; threads: number; tcp: { serverConnections: number } }>('resources');
      return now.fds <= targetBase.fds && now.threads <= targetBase.threads && now.tcp.serverConnections === 0;
    }, 'the target to be back to its baseline');
    // Generous: allocator noise is a few MiB; a per-cycle leak of buffers or threads would be far more.
    expect(rss() - rss0).toBeLessThan(32 * MiB);
  });
});
