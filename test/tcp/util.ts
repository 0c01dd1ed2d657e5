/**
 * Helpers of the tcp tests: engines in child processes (optionally inside a network
 * namespace), resource probes, and a raw implementation of the control and data
 * wire formats (docs/WIRE.md) to play a malicious or broken peer.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { controlProof, dataKey } from '../../lib/meta/handshake.js';
import { encodeFrame, FrameDecoder, MessageType, WIRE_VERSION, type Frame, type SegmentDescriptor } from '../../lib/meta/wire.js';
import type { EngineOptions, TransferEngine } from '../../lib/index.js';
import type { NativeEngine } from '../../lib/native.js';

const here = path.dirname(fileURLToPath(import.meta.url));

export interface TcpPeer {
  child: ChildProcess;
  pid: number;
  address: string;
  tcpAddress: string;
  regions: number[];
  call<T = unknown>(op: string, args?: Record<string, unknown>): Promise<T>;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const live = new Set<TcpPeer>();

/** Starts test/tcp/fixtures/tcp-peer.mjs, inside network namespace `netns` when given. */
export async function startTcpPeer(options: { engine?: EngineOptions; regions?: number[]; seed?: number } = {}, netns?: string): Promise<TcpPeer> {
  const args = [path.join(here, 'fixtures', 'tcp-peer.mjs'), JSON.stringify(options)];
  const child = netns
    ? spawn('ip', ['netns', 'exec', netns, process.execPath, ...args], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], serialization: 'advanced' })
    : spawn(process.execPath, args, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], serialization: 'advanced' });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  const pending = new Map<number, { resolve(v: unknown): void; reject(e: Error): void }>();
  let next = 1;
  const ready = new Promise<{ address: string; tcpAddress: string; pid: number; regions: number[] }>((resolve, reject) => {
    child.on('message', (m: { type?: string; id?: number; result?: unknown; error?: { code?: string; message: string } }) => {
      if (m.type === 'ready') return resolve(m as never);
      const p = m.id === undefined ? undefined : pending.get(m.id);
      if (!p) return;
      pending.delete(m.id!);
      if (m.error) p.reject(Object.assign(new Error(m.error.message), { code: m.error.code }));
      else p.resolve(m.result);
    });
    void exited.then(({ code, signal }) => {
      const err = new Error(`tcp peer exited (code ${code}, signal ${signal})`);
      reject(err);
      for (const p of pending.values()) p.reject(err);
    });
  });
  const info = await ready;
  const peer: TcpPeer = {
    child,
    ...info,
    exited,
    call<T>(op: string, a?: Record<string, unknown>) {
      return new Promise<T>((resolve, reject) => {
        const id = next++;
        pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
        child.send({ id, op, args: a });
      });
    },
  };
  live.add(peer);
  void exited.then(() => live.delete(peer));
  return peer;
}

/** Kills every fixture still running. */
export async function stopTcpPeers(): Promise<void> {
  await Promise.all(
    [...live].map(async (p) => {
      p.child.kill('SIGCONT');
      p.child.kill('SIGKILL');
      await p.exited;
    }),
  );
}

export function openFds(): number {
  return readdirSync('/proc/self/fd').length;
}

export function threadCount(): number {
  return Number(/Threads:\s+(\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))![1]);
}

/** The engine's tcp connection counts (an internal probe, for leak checks). */
export function tcpStats(engine: TransferEngine): { listening: boolean; serverConnections: number; clientConnections: number } {
  return (engine as unknown as { native: NativeEngine }).native.tcpStats();
}

// --- raw control plane -----------------------------------------------------------

/** Reads frames from a socket one at a time. */
export class FrameReader {
  private readonly decoder = new FrameDecoder();
  private readonly frames: Frame[] = [];
  private waiters: Array<(f: Frame | null) => void> = [];
  private ended = false;

  constructor(socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      for (const f of this.decoder.push(chunk)) this.frames.push(f);
      this.flush();
    });
    socket.on('close', () => {
      this.ended = true;
      this.flush();
    });
    socket.on('error', () => {});
  }

  next(): Promise<Frame | null> {
    return new Promise((resolve) => {
      this.waiters.push(resolve);
      this.flush();
    });
  }

  private flush(): void {
    while (this.waiters.length > 0 && (this.frames.length > 0 || this.ended)) this.waiters.shift()!(this.frames.shift() ?? null);
  }
}

export async function connectSocket(address: string): Promise<net.Socket> {
  const i = address.lastIndexOf(':');
  const socket = net.connect({ host: address.slice(0, i).replace(/^\[|\]$/g, ''), port: Number(address.slice(i + 1)) });
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  });
  return socket;
}

/** Handshakes by hand (as a peer engine would) and returns the segment, or the ERROR frame. */
export async function rawHandshake(
  address: string,
  secret?: string,
  version = WIRE_VERSION,
): Promise<{ socket: net.Socket; segment?: SegmentDescriptor; error?: { code: string; message: string }; challenged?: boolean }> {
  const socket = await connectSocket(address);
  const reader = new FrameReader(socket);
  const nonce = randomBytes(32);
  socket.write(encodeFrame(MessageType.Hello, { version, name: 'raw-test', nonce: nonce.toString('base64') }, version));
  let f = await reader.next();
  if (f?.type === MessageType.Challenge && secret) {
    const body = f.body as { nonce: string };
    const serverNonce = Buffer.from(body.nonce, 'base64');
    socket.write(encodeFrame(MessageType.Auth, { proof: controlProof(Buffer.from(secret), 'client', serverNonce, nonce).toString('base64') }));
    f = await reader.next();
  }
  if (f?.type === MessageType.Challenge) {
    // Without a secret there is nothing to answer: hand the socket back as it is.
    socket.removeAllListeners('data');
    return { socket, challenged: true };
  }
  if (f?.type === MessageType.Segment) return { socket, segment: f.body as SegmentDescriptor };
  if (f?.type === MessageType.Error) return { socket, error: f.body as { code: string; message: string } };
  return { socket, error: { code: f ? `type ${f.type}` : 'closed', message: 'no segment' } };
}

// --- raw data plane --------------------------------------------------------------

/** Reads exactly n bytes (or null at end of stream). */
export class ByteReader {
  private buf = Buffer.alloc(0);
  private ended = false;
  private wake: (() => void) | null = null;

  constructor(readonly socket: net.Socket) {
    socket.on('data', (c: Buffer) => {
      this.buf = Buffer.concat([this.buf, c]);
      this.wake?.();
    });
    socket.on('close', () => {
      this.ended = true;
      this.wake?.();
    });
    socket.on('error', () => {});
  }

  async read(n: number): Promise<Buffer | null> {
    while (this.buf.length < n) {
      if (this.ended) return null;
      await new Promise<void>((r) => (this.wake = r));
      this.wake = null;
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** Resolves when the peer closed the connection. */
  async closed(): Promise<void> {
    while (!this.ended) {
      await new Promise<void>((r) => (this.wake = r));
      this.wake = null;
      this.buf = Buffer.alloc(0);
    }
  }
}

function helloHeader(type: number, body: number, version = WIRE_VERSION): Buffer {
  const h = Buffer.alloc(12);
  h.write('EPDD', 0, 'latin1');
  h.writeUInt16LE(version, 4);
  h.writeUInt16LE(type, 6);
  h.writeUInt32LE(body, 8);
  return h;
}

export const CLIENT_DATA_LABEL = 'epd-transfer data client v2';
export const SERVER_DATA_LABEL = 'epd-transfer data server v2';

/**
 * Opens a data connection by hand and authenticates with `key` (derive it with
 * {@link dataKey}). Returns the reader, or the REJECT text.
 */
export async function rawDataConnect(address: string, grant: Buffer, key: Buffer, version = WIRE_VERSION): Promise<{ reader: ByteReader; rejected?: string }> {
  const socket = await connectSocket(address);
  const reader = new ByteReader(socket);
  const h = (await reader.read(12))!;
  const serverNonce = (await reader.read(h.readUInt32LE(8)))!;
  const clientNonce = randomBytes(32);
  const proof = createHmac('sha256', key).update(CLIENT_DATA_LABEL).update(serverNonce).update(clientNonce).update(grant).digest();
  socket.write(Buffer.concat([helloHeader(2, 80, version), grant, clientNonce, proof]));
  const reply = await reader.read(12);
  if (!reply) return { reader, rejected: 'closed' };
  const body = (await reader.read(reply.readUInt32LE(8)))!;
  if (reply.readUInt16LE(6) === 4) return { reader, rejected: body.toString('utf8') };
  return { reader };
}

/** A request frame: op 1 = write, 2 = read; segments [region, offset, length]. */
export function dataFrame(op: number, seq: number, segments: Array<[number, number, number]>, payload?: Buffer, overrides: { payloadBytes?: number; magic?: string } = {}): Buffer {
  const h = Buffer.alloc(32);
  h.write(overrides.magic ?? 'EPDF', 0, 'latin1');
  h.writeUInt8(op, 4);
  h.writeUInt16LE(segments.length, 6);
  h.writeBigUInt64LE(BigInt(seq), 8);
  const total = segments.reduce((s, [, , len]) => s + len, 0);
  h.writeBigUInt64LE(BigInt(overrides.payloadBytes ?? total), 16);
  const table = Buffer.alloc(segments.length * 16);
  segments.forEach(([region, offset, length], i) => {
    table.writeUInt32LE(region, i * 16);
    table.writeUInt32LE(length, i * 16 + 4);
    table.writeBigUInt64LE(BigInt(offset), i * 16 + 8);
  });
  return Buffer.concat([h, table, payload ?? Buffer.alloc(0)]);
}

/** Reads one reply: kind 1 ACK, 2 DATA, 3 ERROR (with its text). */
export async function readReply(reader: ByteReader): Promise<{ kind: number; seq: number; payload: Buffer } | null> {
  const h = await reader.read(32);
  if (!h) return null;
  const n = Number(h.readBigUInt64LE(16));
  const payload = n > 0 ? await reader.read(n) : Buffer.alloc(0);
  return { kind: h.readUInt8(4), seq: Number(h.readBigUInt64LE(8)), payload: payload ?? Buffer.alloc(0) };
}

export { dataKey, helloHeader };
