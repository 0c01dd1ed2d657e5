// The control-port handshake against raw sockets and fake servers: version
// mismatches both ways, garbage, refused and silent ports, and segment
// descriptors a peer should never be able to get away with.
import { readFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { TransferEngine } from '../../lib/index.js';
import { encodeFrame, FrameDecoder, MessageType, WIRE_VERSION, type Frame, type SegmentDescriptor } from '../../lib/meta/wire.js';
import { closeEngines, expectCode, openEngine, patterned, sha256 } from '../helpers.js';

let engine: TransferEngine;
const servers: net.Server[] = [];

beforeAll(async () => {
  engine = await openEngine();
});

afterAll(async () => {
  for (const s of servers) s.close();
  await closeEngines();
});

function portOf(address: string): number {
  return Number(address.slice(address.lastIndexOf(':') + 1));
}

/**
 * Sends `chunks` to a control port and resolves with the frames received, once
 * `count` arrived or the server closed the connection.
 */
function exchange(address: string, chunks: Buffer[], count = 1): Promise<Frame[]> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: '127.0.0.1', port: portOf(address) });
    const decoder = new FrameDecoder();
    const frames: Frame[] = [];
    socket.on('connect', async () => {
      for (const c of chunks) {
        if (socket.destroyed) return;
        socket.write(c);
        await new Promise((r) => setImmediate(r));
      }
    });
    socket.on('data', (d) => {
      frames.push(...decoder.push(d));
      if (frames.length >= count) socket.destroy();
    });
    socket.on('error', reject);
    socket.on('close', () => resolve(frames));
  });
}

/** A fake engine that answers every frame it receives with `reply(frame)`. */
async function fakeServer(reply: (f: Frame, socket: net.Socket) => Buffer | null): Promise<string> {
  const server = net.createServer((socket) => {
    const decoder = new FrameDecoder();
    socket.on('data', (d) => {
      for (const f of decoder.push(d)) {
        const out = reply(f, socket);
        if (out) socket.write(out);
      }
    });
    socket.on('error', () => {});
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return `127.0.0.1:${(server.address() as net.AddressInfo).port}`;
}

const bootId = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();

function segment(over: Partial<SegmentDescriptor> = {}): SegmentDescriptor {
  return { name: 'fake', pid: process.pid, bootId, hostname: os.hostname(), transports: ['shm'], regions: [], ...over };
}

/** The engine's real segment, shm names included, fetched with a raw HELLO. */
async function realSegment(e: TransferEngine): Promise<SegmentDescriptor> {
  const frames = await exchange(e.address!, [encodeFrame(MessageType.Hello, { version: WIRE_VERSION })]);
  return frames[0].body as SegmentDescriptor;
}

describe('server side', () => {
  test('a HELLO in wire version 99 gets an ERR_PROTOCOL_VERSION error frame and a closed connection', async () => {
    const frames = await exchange(engine.address!, [encodeFrame(MessageType.Hello, { version: 99 }, 99)], 2);
    expect(frames).toHaveLength(1);
    expect(frames[0].type).toBe(MessageType.Error);
    expect((frames[0].body as { code: string }).code).toBe('ERR_PROTOCOL_VERSION');
  });

  test('garbage bytes get an ERR_PROTOCOL error frame, and the engine keeps serving others', async () => {
    const target = await openEngine();
    const region = target.allocate(4096);
    const src = patterned(engine, 4096, 1);
    const before = await engine.connect(target.address!);

    const frames = await exchange(target.address!, [Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n')], 2);
    expect(frames.map((f) => [f.type, (f.body as { code: string }).code])).toEqual([[MessageType.Error, 'ERR_PROTOCOL']]);

    // The connection made before still works, and so does a new one.
    await engine.write(before, [{ localRegion: src, localOffset: 0, remoteRegion: region.id, remoteOffset: 0, length: 4096 }]);
    expect(sha256(region.buffer!)).toBe(sha256(src.buffer!));
    const other = await openEngine();
    expect((await other.connect(target.address!)).regions.map((r) => r.id)).toEqual([region.id]);
  });

  test('a frame announcing a body over the limit gets ERR_PROTOCOL', async () => {
    const header = Buffer.alloc(12);
    header.writeUInt32BE(0x45504458, 0);
    header.writeUInt16BE(WIRE_VERSION, 4);
    header.writeUInt16BE(MessageType.Hello, 6);
    header.writeUInt32BE(64 << 20, 8);
    const frames = await exchange(engine.address!, [header], 2);
    expect((frames[0].body as { code: string }).code).toBe('ERR_PROTOCOL');
  });

  test('a body that is not JSON gets ERR_PROTOCOL', async () => {
    const frame = encodeFrame(MessageType.Hello, 'xxxxx');
    frame.write('{{{{{{{', 12);
    const frames = await exchange(engine.address!, [frame], 2);
    expect((frames[0].body as { code: string }).code).toBe('ERR_PROTOCOL');
  });

  test('GET_SEGMENT before HELLO gets ERR_PROTOCOL', async () => {
    const frames = await exchange(engine.address!, [encodeFrame(MessageType.GetSegment, {})], 2);
    expect((frames[0].body as { code: string }).code).toBe('ERR_PROTOCOL');
  });

  test('an unknown message type gets ERR_PROTOCOL', async () => {
    const frames = await exchange(engine.address!, [encodeFrame(MessageType.Hello, { version: WIRE_VERSION }), encodeFrame(77 as MessageType, {})], 3);
    expect(frames.map((f) => f.type)).toEqual([MessageType.Segment, MessageType.Error]);
    expect((frames[1].body as { code: string }).code).toBe('ERR_PROTOCOL');
  });

  test('a HELLO delivered one byte at a time is answered with the segment', async () => {
    const hello = encodeFrame(MessageType.Hello, { version: WIRE_VERSION, name: 'slow' });
    const bytes = [...hello].map((b) => Buffer.from([b]));
    const frames = await exchange(engine.address!, bytes);
    expect(frames[0].type).toBe(MessageType.Segment);
    expect((frames[0].body as SegmentDescriptor).name).toBe(engine.name);
  });
});

describe('client side', () => {
  test('a server answering in wire version 99 makes connect reject ERR_PROTOCOL_VERSION', async () => {
    const address = await fakeServer(() => encodeFrame(MessageType.Segment, segment(), 99));
    await expectCode(() => engine.connect(address), 'ERR_PROTOCOL_VERSION');
  });

  test("a server's ERR_PROTOCOL_VERSION error frame (any version) makes connect reject ERR_PROTOCOL_VERSION", async () => {
    const address = await fakeServer(() => encodeFrame(MessageType.Error, { code: 'ERR_PROTOCOL_VERSION', message: 'I speak 99' }, 99));
    await expectCode(() => engine.connect(address), 'ERR_PROTOCOL_VERSION');
  });

  test('a server answering garbage makes connect reject ERR_PROTOCOL', async () => {
    const address = await fakeServer(() => Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n'));
    await expectCode(() => engine.connect(address), 'ERR_PROTOCOL');
  });

  test('a server answering the wrong message type makes connect reject ERR_PROTOCOL', async () => {
    const address = await fakeServer(() => encodeFrame(MessageType.Hello, {}));
    await expectCode(() => engine.connect(address), 'ERR_PROTOCOL');
  });

  test('connect to a closed port rejects ERR_CONNECT', async () => {
    const server = net.createServer();
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const port = (server.address() as net.AddressInfo).port;
    await new Promise((r) => server.close(r));
    await expectCode(() => engine.connect(`127.0.0.1:${port}`), 'ERR_CONNECT');
  });

  test('a server that never answers makes connect reject ERR_TIMEOUT (per call and engine default)', async () => {
    const address = await fakeServer(() => null);
    await expectCode(() => engine.connect(address, { timeoutMs: 100 }), 'ERR_TIMEOUT');
    const quick = await openEngine({ connectTimeoutMs: 100 });
    await expectCode(() => quick.connect(address), 'ERR_TIMEOUT');
  });

  test('a server that hangs up during the handshake makes connect reject ERR_CONNECT', async () => {
    const address = await fakeServer((_, socket) => {
      socket.destroy();
      return null;
    });
    await expectCode(() => engine.connect(address), 'ERR_CONNECT');
  });

  test('a peer on another host (other boot id) is refused for the shm transport', async () => {
    const address = await fakeServer(() => encodeFrame(MessageType.Segment, segment({ bootId: 'another-host' })));
    await expectCode(() => engine.connect(address), 'ERR_BACKEND_UNAVAILABLE');
  });
});

describe('segments a peer should not get away with', () => {
  const cases: Array<[string, () => Promise<Partial<SegmentDescriptor>>, string]> = [
    ['regions not an array', async () => ({ regions: 'all' as never }), 'ERR_BAD_ARGUMENT'],
    ['a region with a negative length', async () => ({ regions: [{ id: 1, length: -1, kind: 'host', shm: '/epdx-1-1-1-0' }] }), 'ERR_BAD_ARGUMENT'],
    ['a region with no location', async () => ({ regions: [{ id: 1, length: 16, kind: 'host' }] }), 'ERR_NOT_SHAREABLE'],
    ['a shm name outside the epdx namespace', async () => ({ regions: [{ id: 1, length: 16, kind: 'host', shm: '/some-other-object' }] }), 'ERR_BAD_ARGUMENT'],
    ['a shm name with a path', async () => ({ regions: [{ id: 1, length: 16, kind: 'host', shm: '/epdx-../../etc/passwd' }] }), 'ERR_BAD_ARGUMENT'],
    ['a shm object that does not exist', async () => ({ regions: [{ id: 1, length: 16, kind: 'host', shm: '/epdx-1-1-1-deadbeef' }] }), 'ERR_SYSTEM'],
    [
      'a region longer than its shm object',
      async () => {
        const real = (await realSegment(engine)).regions[0];
        return { regions: [{ ...real, length: real.length + 1 }] };
      },
      'ERR_OUT_OF_RANGE',
    ],
    [
      'a region offset past its shm object',
      async () => {
        const real = (await realSegment(engine)).regions[0];
        return { regions: [{ ...real, offset: real.length, length: 1 }] };
      },
      'ERR_OUT_OF_RANGE',
    ],
    ['a malformed device IPC key', async () => ({ regions: [{ id: 1, length: 16, kind: 'device', ipcKey: 'garbage' }] }), 'ERR_BAD_ARGUMENT'],
    ['a name that is not a string', async () => ({ name: 5 as never }), 'ERR_BAD_ARGUMENT'],
  ];
  beforeAll(() => {
    engine.allocate(4096); // a real region whose shm name the cases above can borrow
  });
  test.each(cases)('%s is refused', async (_, make, code) => {
    const over = await make();
    const address = await fakeServer(() => encodeFrame(MessageType.Segment, segment(over)));
    await expectCode(() => engine.connect(address), code as never);
  });
});

test("the segment names each host region's shm object, owned by this process", async () => {
  const seg = await realSegment(engine);
  expect(seg.regions.every((r) => typeof r.shm === 'string' && r.shm.includes(`epdx-${process.pid}-`))).toBe(true);
});
