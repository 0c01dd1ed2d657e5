/**
 * TransferEngine: registered memory regions, peers found through the embedded
 * handshake, and one-sided batch writes/reads into peers' regions.
 *
 * ```ts
 * const engine = await TransferEngine.open();
 * const src = engine.allocate(64 << 20);
 * const peer = await engine.connect('127.0.0.1:7400');
 * await engine.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: peer.regions[0], remoteOffset: 0, length: 1 << 20 }]);
 * await engine.close();
 * ```
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import os from 'node:os';
import { Device } from './device.js';
import { TransferError, isTransferError, withCallerStack } from './errors.js';
import { ControlClient, ControlServer, dataKey, parseAddress, type ControlSession, type RequestHandler } from './meta/handshake.js';
import { WIRE_VERSION, type SegmentDescriptor } from './meta/wire.js';
import type { EtcdOptions } from './meta/etcd.js';
import { isAddress, openMetadataStore, recordFromSegment, type MetadataStore, type SegmentRecord } from './meta/store.js';
import { resolveLink, type LinkOptions, type NativeLinkSpec } from './link.js';
import { addonPath, COUNTER_NAMES, native, type NativeEngine } from './native.js';
import { vendorBackends } from './probe.js';
import { HCCL_CLOSE, HcclResponder, hcclAgree, hcclConnect, hcclLanded } from './vendor/hccl.js';
import { badArgument, expectInteger, expectOptionalObject, expectString, expectTimeout } from './validate.js';

/** Options of {@link TransferEngine.open}. */
export interface EngineOptions {
  /** Name peers see. Default `<hostname>-<pid>-<n>`. */
  name?: string;
  /** Control-port host to listen on. Default `127.0.0.1`. */
  host?: string;
  /** Control port. Default 0 (any free port; read it from `engine.address`). */
  port?: number;
  /** Listen for peers at all. Default true. An engine that only writes may say false. */
  listen?: boolean;
  /** Worker threads that move bytes. Default min(4, max(2, CPUs)). */
  threads?: number;
  /** Descriptors larger than this are split across threads. Default 1 MiB. */
  chunkBytes?: number;
  /**
   * Device backend: `host` (default, the CPU), `acl` (Ascend NPU through
   * libascendcl.so) or `cuda` (NVIDIA GPU through libcuda.so.1). Vendor runtimes are
   * loaded at run time; one that cannot run here fails open() with
   * ERR_BACKEND_UNAVAILABLE and the reason (see `probe()`).
   */
  device?: 'host' | 'acl' | 'cuda';
  /** Which NPU/GPU (ordinal as the runtime numbers them). Default 0. */
  deviceId?: number;
  /** Default deadline of a batch. Default 30 000 ms. */
  timeoutMs?: number;
  /** Deadline of `connect`. Default 5 000 ms. */
  connectTimeoutMs?: number;
  /** Remove shared-memory objects left by crashed engines on this host. Default true. */
  reclaimStale?: boolean;
  /**
   * How to reach peers: `'auto'` (default) uses shm for a peer on this host (same
   * boot id) and tcp otherwise; `'shm'` or `'tcp'` forces one. `connect()` may override.
   */
  transport?: TransportChoice;
  /** Data connections per tcp peer; large descriptors are split across them. Default 2. */
  connections?: number;
  /**
   * Shared secret (string or bytes). When set, the handshake and every tcp data
   * connection prove it with HMAC-SHA256 challenge-response (never sent on the
   * wire), both ways; a peer without it gets ERR_AUTH and no region information.
   * Default: the `EPD_TRANSFER_SECRET` environment variable, else none.
   */
  secret?: string | Uint8Array;
  /** Accept tcp data connections (when listening). Default true. */
  tcp?: boolean;
  /** Host of the tcp data listener. Default: `host`. A wildcard (0.0.0.0, ::) is advertised as "the host you reached me at". */
  dataHost?: string;
  /** Port of the tcp data listener. Default 0 (any free port). */
  dataPort?: number;
  /**
   * Start a Mooncake transfer engine (libtransfer_engine.so, loaded at run time) so
   * peers can be reached with `transport: 'mooncake'` (RDMA, HCCS on Ascend, TCP).
   * `true` takes the defaults. Every region of this engine is registered with it.
   * Fails open() with ERR_BACKEND_UNAVAILABLE where Mooncake cannot run.
   */
  mooncake?: boolean | MooncakeOptions;
  /**
   * Accept and open `transport: 'hccl'` links: HCCL point-to-point between NPUs
   * (libhccl.so, loaded at run time). Needs `device: 'acl'`; moves device regions only.
   */
  hccl?: boolean;
  /**
   * Emulate a link to every peer of this engine (each peer gets its own link):
   * real transfers are paced to `{ bandwidth, latency, jitter, seed }`, with optional
   * fault injection. See {@link LinkOptions} and docs/TCP.md. Default: none.
   */
  link?: LinkOptions;
  /**
   * Where engines find each other. `'embedded'` (default, or the
   * `EPD_TRANSFER_METADATA` environment variable): each engine's control port
   * describes it, peers are named by "host:port". `'etcd://host:port[,host:port][/prefix]'`:
   * the engine publishes its segment record in etcd under a lease (TTL + keep-alive,
   * see `metadataOptions`), `connect(name)` resolves engine names there, and a peer
   * whose record leaves (it closed, crashed, or its host vanished and the lease
   * expired) is dropped at once: work in flight to it fails with ERR_PEER_LOST
   * instead of at its deadline. A {@link MetadataStore} may be passed instead (the
   * engine does not close it). See docs/METADATA.md.
   */
  metadata?: string | MetadataStore;
  /** etcd only: `prefix` (default `epd-transfer/`), `ttlSeconds` (lease TTL, default 10), `timeoutMs` (per etcd call, default 5000). */
  metadataOptions?: EtcdOptions;
}

/** Which transport reaches a peer. `mooncake` and `hccl` need the engine opened with them. */
export type TransportChoice = 'auto' | 'shm' | 'tcp' | 'mooncake' | 'hccl';

/** Options of the Mooncake engine a TransferEngine starts (docs/VENDOR.md). */
export interface MooncakeOptions {
  /** Metadata connection string: `P2PHANDSHAKE` (default), `etcd://h:p`, `redis://h:p`, `http://h:p/metadata`. */
  metadata?: string;
  /** Host name or IP peers reach this engine at. Default: the control `host`, or the hostname when that is a wildcard. */
  hostname?: string;
  /** RPC port outside P2PHANDSHAKE mode (that mode binds a free one). Default 12001. */
  rpcPort?: number;
  /**
   * Protocol to install: `rdma`, `tcp`, `ascend`, ... Default: none, and Mooncake
   * discovers the topology and installs what the host has.
   */
  protocol?: string;
  /** NIC priority matrix (JSON) for `rdma`. */
  nicPriorityMatrix?: string;
}

function resolveMooncake(value: unknown, host: string): { metadata: string; hostname: string; rpcPort: number; protocol: string; nicPriorityMatrix: string } {
  const o = value === true ? {} : (expectOptionalObject(value, 'options.mooncake') as MooncakeOptions);
  const str = (v: unknown, name: string, def: string): string => (v === undefined ? def : expectString(v, name));
  const wildcard = host === '0.0.0.0' || host === '::' || host === '';
  return {
    metadata: str(o.metadata, 'options.mooncake.metadata', 'P2PHANDSHAKE'),
    hostname: str(o.hostname, 'options.mooncake.hostname', wildcard ? os.hostname() : host),
    rpcPort: o.rpcPort === undefined ? 12001 : expectInteger(o.rpcPort, 'options.mooncake.rpcPort', 1, 65535),
    protocol: str(o.protocol, 'options.mooncake.protocol', ''),
    nicPriorityMatrix: str(o.nicPriorityMatrix, 'options.mooncake.nicPriorityMatrix', ''),
  };
}

/** Options of {@link TransferEngine.connect}. */
export interface ConnectOptions {
  /** Deadline of the handshake (and of opening tcp data connections). Default: the engine's `connectTimeoutMs`. */
  timeoutMs?: number;
  /** Transport for this peer; replaces the engine's `transport` option. */
  transport?: TransportChoice;
  /** tcp data connections for this peer (1..16); replaces the engine's `connections`. */
  connections?: number;
  /** Emulated link to this peer; replaces the engine's `link` option. */
  link?: LinkOptions;
}

/** Options of a single {@link TransferEngine.write} / {@link TransferEngine.read}. */
export interface TransferOptions {
  /** Aborts the batch: it rejects with ERR_ABORTED once its workers have let go. */
  signal?: AbortSignal;
  /** Deadline in ms; the batch rejects with ERR_TIMEOUT. Default: the engine's `timeoutMs`. */
  timeoutMs?: number;
}

export interface TransferResult {
  /** Bytes moved. */
  bytes: number;
  descriptors: number;
}

/**
 * A peer that had connected to this engine (its control connection came in here) is
 * gone: the connection closed or broke. See {@link TransferEngine.onPeerLost}.
 */
export interface PeerLostEvent {
  /** The peer engine's name, as its HELLO gave it. */
  name: string;
  /**
   * The connection's id on this engine, the same as `context.session.id` in the
   * {@link TransferEngine.handle} handlers that served it. Unique per connection: a
   * peer that reconnects, or a restarted process under the same name, has another.
   */
  session: string;
  /** "host:port" the connection came from. */
  address: string;
  /** ERR_PEER_LOST; the message says whether the connection was closed or broke, and how. */
  error: TransferError;
}

/** A region of a connected peer. */
export interface RemoteRegion {
  id: number;
  length: number;
  kind: string;
}

/** One transfer: `length` bytes between a local region and a peer's region. */
export interface Descriptor {
  localRegion: Region | number;
  localOffset: number;
  remoteRegion: RemoteRegion | number;
  remoteOffset: number;
  length: number;
}

/** Live engine counters; reading one costs no native call. */
export type EngineCounters = Readonly<Record<(typeof COUNTER_NAMES)[number], number>>;

const STRIDE = 5;
/** tcp data connections per peer unless configured (see docs/BENCHMARKS.md, tcp section). */
const DEFAULT_CONNECTIONS = 2;

function expectTransport(value: unknown, name: string): TransportChoice {
  if (value !== 'auto' && value !== 'shm' && value !== 'tcp' && value !== 'mooncake' && value !== 'hccl') {
    badArgument(name, '"auto", "shm", "tcp", "mooncake" or "hccl"', value);
  }
  return value;
}

function resolveSecret(value: unknown): Buffer | undefined {
  if (value === undefined) {
    const env = process.env.EPD_TRANSFER_SECRET;
    return env ? Buffer.from(env, 'utf8') : undefined;
  }
  if (typeof value === 'string' && value.length > 0) return Buffer.from(value, 'utf8');
  if (value instanceof Uint8Array && value.length > 0) return Buffer.from(value);
  return badArgument('options.secret', 'a non-empty string or byte array', typeof value === 'string' ? '(empty string)' : value);
}

/** A data address with a wildcard host means "the host you reached my control port at". */
function reachable(address: string, controlHost: string): string {
  const { host, port } = parseAddress(address);
  if (host === '0.0.0.0' || host === '::' || host === '*') return controlHost.includes(':') ? `[${controlHost}]:${port}` : `${controlHost}:${port}`;
  return address;
}
let engineSeq = 0;

/**
 * Engines not closed yet, closed on process exit: process.exit() skips the addon's
 * environment cleanup, which would leave their shared-memory names in /dev/shm.
 */
const openOnExit = new Set<WeakRef<NativeEngine>>();
let exitHook = false;

function closeOnExit(engine: NativeEngine): WeakRef<NativeEngine> {
  if (!exitHook) {
    exitHook = true;
    process.on('exit', () => {
      for (const ref of openOnExit) ref.deref()?.close();
    });
  }
  const ref = new WeakRef(engine);
  openOnExit.add(ref);
  return ref;
}

function isMetadataStore(value: unknown): value is MetadataStore {
  const v = value as MetadataStore;
  return typeof v === 'object' && v !== null && typeof v.publish === 'function' && typeof v.resolve === 'function' && typeof v.watch === 'function';
}

function readBootId(): string {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return os.hostname();
  }
}

/**
 * Descriptors packed in one Float64Array (localRegion, localOffset, remoteRegion,
 * remoteOffset, length). Build once, reuse: the engine copies it at submit time,
 * so it may be cleared and refilled as soon as write()/read() returned.
 */
export class DescriptorBatch {
  private buf: Float64Array;
  private n = 0;

  constructor(capacity = 64) {
    this.buf = new Float64Array(Math.max(1, expectInteger(capacity, 'capacity', 1)) * STRIDE);
  }

  /** Appends a descriptor. */
  add(localRegion: Region | number, localOffset: number, remoteRegion: RemoteRegion | number, remoteOffset: number, length: number): this {
    if (this.n * STRIDE === this.buf.length) {
      const next = new Float64Array(this.buf.length * 2);
      next.set(this.buf);
      this.buf = next;
    }
    const o = this.n * STRIDE;
    this.buf[o] = typeof localRegion === 'number' ? localRegion : localRegion.id;
    this.buf[o + 1] = localOffset;
    this.buf[o + 2] = typeof remoteRegion === 'number' ? remoteRegion : remoteRegion.id;
    this.buf[o + 3] = remoteOffset;
    this.buf[o + 4] = length;
    this.n++;
    return this;
  }

  get length(): number {
    return this.n;
  }

  /** Total bytes described. */
  get bytes(): number {
    let sum = 0;
    for (let i = 0; i < this.n; i++) sum += this.buf[i * STRIDE + 4];
    return sum;
  }

  clear(): this {
    this.n = 0;
    return this;
  }

  /** @internal */
  get data(): Float64Array {
    return this.buf;
  }
}

function regionId(value: unknown, name: string, owner?: TransferEngine): number {
  if (value instanceof Region) {
    // Region ids are per engine: another engine's Region would name one of ours.
    if (owner !== undefined && value.engine !== owner) badArgument(name, 'a Region of this engine', value);
    return value.id;
  }
  if (typeof value === 'object' && value !== null && typeof (value as RemoteRegion).id === 'number') {
    return expectInteger((value as RemoteRegion).id, `${name}.id`);
  }
  return expectInteger(value, name);
}

function pack(batch: unknown, engine: TransferEngine): { data: Float64Array; count: number } {
  if (batch instanceof DescriptorBatch) {
    if (batch.length === 0) badArgument('batch', 'a non-empty batch', batch);
    return { data: batch.data, count: batch.length };
  }
  if (!Array.isArray(batch) || batch.length === 0) badArgument('batch', 'a non-empty array of descriptors or a DescriptorBatch', batch);
  const data = new Float64Array(batch.length * STRIDE);
  batch.forEach((d: unknown, i) => {
    if (typeof d !== 'object' || d === null) badArgument(`batch[${i}]`, 'a descriptor object', d);
    const x = d as Record<string, unknown>;
    const o = i * STRIDE;
    data[o] = regionId(x.localRegion, `batch[${i}].localRegion`, engine);
    data[o + 1] = expectInteger(x.localOffset, `batch[${i}].localOffset`);
    data[o + 2] = regionId(x.remoteRegion, `batch[${i}].remoteRegion`);
    data[o + 3] = expectInteger(x.remoteOffset, `batch[${i}].remoteOffset`);
    data[o + 4] = expectInteger(x.length, `batch[${i}].length`, 1);
  });
  return { data, count: batch.length };
}

/** A registered local region. */
export class Region {
  /** @internal */
  constructor(
    /** @internal */ readonly engine: TransferEngine,
    /** Id used in descriptors and advertised to peers. */
    readonly id: number,
    readonly length: number,
    /** `host`: engine-allocated shared memory; `external`: caller's buffer; `device`: caller's device memory. */
    readonly kind: 'host' | 'external' | 'device',
    /** The bytes, when the CPU can address them (host and external regions). */
    readonly buffer: Buffer | undefined,
    /** Device regions: the device address. */
    readonly devicePtr?: bigint,
  ) {}

  /**
   * Unregisters the region. With `inFlight: 'wait'` (default) it resolves once
   * batches touching it have completed; with `'fail'` those batches stop with
   * ERR_REGION_FREED. New batches naming it fail at once. Its shared-memory name is
   * removed immediately; the memory goes when the last user lets go.
   */
  free(options?: { inFlight?: 'wait' | 'fail' }): Promise<void> {
    const opts = expectOptionalObject(options, 'options');
    if (opts.inFlight !== undefined && opts.inFlight !== 'wait' && opts.inFlight !== 'fail') {
      badArgument('options.inFlight', '"wait" or "fail"', opts.inFlight);
    }
    return this.engine._free(this, opts.inFlight === 'fail');
  }
}

/** A connected peer engine. */
export class Peer {
  private lostError: TransferError | null = null;

  /** @internal */
  constructor(
    /** @internal */ readonly engine: TransferEngine,
    /** @internal */ readonly nativeId: number,
    readonly address: string,
    private segment: SegmentDescriptor,
    private readonly client: ControlClient,
    /** The transport that moves this peer's bytes. */
    readonly transport: 'shm' | 'tcp' | 'mooncake' | 'hccl' = 'shm',
    /** @internal hccl: the session the peer knows this link by. */
    readonly hcclSession?: string,
  ) {}

  get name(): string {
    return this.segment.name;
  }

  get pid(): number {
    return this.segment.pid;
  }

  /** The peer's shareable regions as of the last handshake or refresh. */
  get regions(): RemoteRegion[] {
    return this.segment.regions.map((r) => ({ id: r.id, length: r.length, kind: r.kind }));
  }

  /** Set once the peer is gone; batches to it fail with this error's code. */
  get lost(): TransferError | null {
    return this.lostError;
  }

  /** Fetches the peer's region list again (e.g. after it allocated more). */
  async refresh(timeoutMs = 5_000): Promise<void> {
    this.engine.assertOpen();
    if (this.lostError) throw this.lostError;
    this.segment = await this.client.refresh(expectTimeout(timeoutMs, 'timeoutMs'));
    this.engine._updatePeer(this, this.segment);
  }

  /**
   * Sends a control request to the peer's handler for `topic` (see
   * {@link TransferEngine.handle}) over the control connection and resolves with
   * its answer. Rejects with the handler's error code, ERR_NO_HANDLER,
   * ERR_TIMEOUT (default 5 s) or ERR_PEER_LOST.
   */
  request(topic: string, body: unknown, options?: { timeoutMs?: number }): Promise<unknown> {
    this.engine.assertOpen();
    expectString(topic, 'topic');
    const opts = expectOptionalObject(options, 'options');
    const timeoutMs = opts.timeoutMs === undefined ? 5_000 : expectTimeout(opts.timeoutMs, 'options.timeoutMs');
    if (this.lostError) return Promise.reject(this.lostError);
    return this.client.call(topic, body, timeoutMs);
  }

  /** Closes the control connection; in-flight batches to this peer fail with ERR_PEER_LOST. */
  disconnect(): void {
    this.client.close();
  }

  /** @internal */
  _markLost(err: TransferError): void {
    if (!this.lostError) this.lostError = err;
  }
}

/** Moves bytes between registered regions of engines in different processes. */
export class TransferEngine {
  /** Engine name peers see. */
  readonly name: string;
  /** The engine's device (memory, streams, events, IPC). */
  readonly device: Device;
  /** Live counters. */
  readonly counters: EngineCounters;

  private readonly native: NativeEngine;
  private readonly inflight = new Set<Promise<unknown>>();
  private readonly peers = new Map<string, Peer>();
  private readonly handlers = new Map<string, RequestHandler>();
  private readonly peerLostListeners = new Set<(event: PeerLostEvent) => void>();
  private readonly bootId = readBootId();
  private readonly registry = new FinalizationRegistry<number>((id) => {
    // Wait for batches in flight: a DescriptorBatch names the region by id only.
    if (!this.closed) this.native.free(id, false).catch(() => {});
  });
  private readonly exitRef: WeakRef<NativeEngine>;
  private closing: Promise<void> | null = null;
  private closed = false;
  private dataAddress: string | undefined;
  private store!: MetadataStore;
  private ownsStore = false;
  private published = false;
  private republishing: Promise<void> | null = null;
  private republishAgain = false;
  /** Tells this opening from a later engine of the same name (in its metadata record). */
  private readonly instanceId = randomBytes(8).toString('hex');
  private mooncakeSegment: string | undefined;
  private hccl: HcclResponder | undefined;

  private constructor(
    private readonly options: Required<Pick<EngineOptions, 'threads' | 'chunkBytes' | 'timeoutMs' | 'connectTimeoutMs' | 'device' | 'deviceId'>> & {
      link?: NativeLinkSpec;
      transport: TransportChoice;
      connections: number;
      secret?: Buffer;
    },
    name: string,
    private server: ControlServer | null,
  ) {
    this.name = name;
    this.native = new native.NativeEngine({
      threads: options.threads,
      chunkBytes: options.chunkBytes,
      device: options.device,
      deviceId: options.deviceId,
    });
    this.exitRef = closeOnExit(this.native);
    this.device = new Device(this.native, options.device);
    const view = this.native.counters();
    const counters = {} as Record<string, number>;
    COUNTER_NAMES.forEach((key, i) => Object.defineProperty(counters, key, { get: () => Number(view[i]), enumerable: true }));
    this.counters = Object.freeze(counters) as EngineCounters;
  }

  /** Opens an engine and (unless `listen: false`) its control port. */
  static async open(options?: EngineOptions): Promise<TransferEngine> {
    const o = expectOptionalObject(options, 'options') as EngineOptions;
    const device = o.device ?? 'host';
    if (device !== 'host' && device !== 'acl' && device !== 'cuda') badArgument('options.device', '"host", "acl" or "cuda"', device);
    const deviceId = o.deviceId === undefined ? 0 : expectInteger(o.deviceId, 'options.deviceId', 0, 1024);
    const cpus = os.availableParallelism?.() ?? os.cpus().length;
    const resolved = {
      threads: o.threads === undefined ? Math.min(4, Math.max(2, cpus)) : expectInteger(o.threads, 'options.threads', 1, 64),
      chunkBytes: o.chunkBytes === undefined ? 1 << 20 : expectInteger(o.chunkBytes, 'options.chunkBytes', 4096),
      timeoutMs: o.timeoutMs === undefined ? 30_000 : expectTimeout(o.timeoutMs, 'options.timeoutMs'),
      connectTimeoutMs: o.connectTimeoutMs === undefined ? 5_000 : expectTimeout(o.connectTimeoutMs, 'options.connectTimeoutMs'),
      device,
      deviceId,
      link: resolveLink(o.link, 'options.link'),
      transport: o.transport === undefined ? 'auto' : expectTransport(o.transport, 'options.transport'),
      connections: o.connections === undefined ? DEFAULT_CONNECTIONS : expectInteger(o.connections, 'options.connections', 1, 16),
      secret: resolveSecret(o.secret),
    };
    const name = o.name === undefined ? `${os.hostname()}-${process.pid}-${engineSeq++}` : expectString(o.name, 'options.name');
    const host = o.host === undefined ? '127.0.0.1' : expectString(o.host, 'options.host');
    const port = o.port === undefined ? 0 : expectInteger(o.port, 'options.port', 0, 65535);
    const dataHost = o.dataHost === undefined ? host : expectString(o.dataHost, 'options.dataHost');
    const dataPort = o.dataPort === undefined ? 0 : expectInteger(o.dataPort, 'options.dataPort', 0, 65535);
    const spec = o.metadata ?? process.env.EPD_TRANSFER_METADATA ?? 'embedded';
    if (typeof spec !== 'string' && !isMetadataStore(spec)) badArgument('options.metadata', '"embedded", an etcd:// URL or a MetadataStore', spec);
    const store = typeof spec === 'string' ? await openMetadataStore(spec, { ...expectOptionalObject(o.metadataOptions, 'options.metadataOptions'), clientName: name, secret: resolved.secret }) : spec;
    if (o.reclaimStale !== false) native.reclaimStaleShm();
    const engine = new TransferEngine(resolved, name, null);
    engine.store = store;
    engine.ownsStore = typeof spec === 'string';
    try {
      if (o.mooncake !== undefined && o.mooncake !== false) {
        engine.mooncakeSegment = engine.native.mooncakeStart(resolveMooncake(o.mooncake, host));
      }
      if (o.hccl === true) {
        engine.native.hcclEnable();
        engine.hccl = new HcclResponder(engine.native);
        for (const [topic, handler] of engine.hccl.handlers()) engine.handlers.set(topic, handler);
      }
    } catch (err) {
      engine.native.close();
      openOnExit.delete(engine.exitRef);
      if (engine.ownsStore) await store.close().catch(() => {});
      throw err;
    }
    if (o.listen !== false) {
      try {
        if (o.tcp !== false) engine.dataAddress = engine.native.tcpListen(dataHost, dataPort);
        engine.server = await ControlServer.listen({
          host,
          port,
          describe: (session) => engine.describe(session),
          handlers: engine.handlers,
          secret: resolved.secret,
          onSessionEnd: (session, cause) => engine.endSession(session, cause),
        });
        await store.publish(engine.segmentRecord());
        engine.published = true;
      } catch (err) {
        await engine.server?.close();
        engine.native.close();
        openOnExit.delete(engine.exitRef);
        if (engine.ownsStore) await store.close().catch(() => {});
        throw err;
      }
    }
    return engine;
  }

  /** Where this engine publishes itself and resolves peers (see `EngineOptions.metadata`). */
  get metadata(): MetadataStore {
    return this.store;
  }

  /** "host:port" of the tcp data listener (undefined without one). */
  get tcpAddress(): string | undefined {
    return this.dataAddress;
  }

  /** "host:port" of the control port peers connect to (undefined with `listen: false`). */
  get address(): string | undefined {
    return this.server?.address;
  }

  /**
   * What this engine can do: its device, the transports it can reach peers with, and
   * what each vendor backend found on this host (`backends`: available or why not).
   */
  capabilities(): {
    device: string;
    deviceId: number;
    transports: string[];
    backends: ReturnType<typeof vendorBackends>;
    threads: number;
    chunkBytes: number;
    wireVersion: number;
    napiVersion: number;
    addon: string;
  } {
    return {
      device: this.device.kind,
      deviceId: this.options.deviceId,
      transports: ['shm', 'tcp', ...(this.mooncakeSegment ? ['mooncake'] : []), ...(this.hccl ? ['hccl'] : [])],
      backends: vendorBackends(),
      threads: this.options.threads,
      chunkBytes: this.options.chunkBytes,
      wireVersion: WIRE_VERSION,
      napiVersion: native.napiVersion,
      addon: addonPath,
    };
  }

  /** Number of batches in flight. */
  get inFlight(): number {
    return this.inflight.size;
  }

  /**
   * Allocates a host region in POSIX shared memory, so peers on this host can
   * write and read it directly. `prefault` (default true) touches the pages now.
   */
  allocate(bytes: number, options?: { prefault?: boolean }): Region {
    this.assertOpen();
    const length = expectInteger(bytes, 'bytes', 1);
    const opts = expectOptionalObject(options, 'options');
    const r = this.native.allocate(length, opts.prefault !== false);
    this.republish();
    return this.track(new Region(this, r.id, length, 'host', r.buffer));
  }

  /**
   * Registers memory the caller owns: a Buffer / TypedArray / ArrayBuffer (pinned
   * until the region is freed), or device memory `{ devicePtr, length }`.
   * External buffers can be the local side of a transfer; peers cannot map them.
   */
  register(memory: ArrayBufferView | ArrayBuffer | { devicePtr: bigint; length: number }): Region {
    this.assertOpen();
    if (ArrayBuffer.isView(memory) || memory instanceof ArrayBuffer) {
      const view = ArrayBuffer.isView(memory)
        ? Buffer.from(memory.buffer, memory.byteOffset, memory.byteLength)
        : Buffer.from(memory);
      if (view.length === 0) badArgument('memory', 'a non-empty buffer', memory);
      const id = this.native.register(memory);
      return this.track(new Region(this, id, view.length, 'external', view));
    }
    if (typeof memory === 'object' && memory !== null && 'devicePtr' in memory) {
      if (typeof memory.devicePtr !== 'bigint') badArgument('memory.devicePtr', 'a bigint', memory.devicePtr);
      const length = expectInteger(memory.length, 'memory.length', 1);
      const id = this.native.registerDevice(memory.devicePtr, length);
      this.republish();
      return this.track(new Region(this, id, length, 'device', undefined, memory.devicePtr));
    }
    return badArgument('memory', 'a Buffer, TypedArray, ArrayBuffer or { devicePtr, length }', memory);
  }

  /**
   * Connects to an engine, named by its control address ("host:port") or, with etcd
   * metadata, by its name (resolved in etcd; ERR_UNKNOWN_PEER when no live engine has
   * it, ERR_METADATA_UNAVAILABLE when etcd does not answer), and fetches its segment
   * descriptor. A live connection to the same address with the same options is
   * reused; a lost one is replaced.
   */
  async connect(target: string, options?: ConnectOptions): Promise<Peer> {
    this.assertOpen();
    expectString(target, 'target');
    const opts = expectOptionalObject(options, 'options') as ConnectOptions;
    const timeoutMs = opts.timeoutMs === undefined ? this.options.connectTimeoutMs : expectTimeout(opts.timeoutMs, 'options.timeoutMs');
    const link = opts.link === undefined ? this.options.link : resolveLink(opts.link, 'options.link');
    const transport = opts.transport === undefined ? this.options.transport : expectTransport(opts.transport, 'options.transport');
    const connections = opts.connections === undefined ? this.options.connections : expectInteger(opts.connections, 'options.connections', 1, 16);
    const started = Date.now();
    const record = isAddress(target) ? null : await this.resolvePeer(target, timeoutMs);
    const address = record ? record.address : target;
    const key = `${address}|${transport}|${connections}|${JSON.stringify(link ?? null)}`;
    const existing = this.peers.get(key);
    if (existing && !existing.lost) return existing;
    if (existing) {
      // Its native state (connections, link) goes now, not with the engine.
      this.peers.delete(key);
      this.native.dropPeer(existing.nativeId, 'ERR_PEER_LOST', true);
    }
    const remaining = Math.max(1, timeoutMs - (Date.now() - started));
    const { client, segment } = await ControlClient.connect(address, remaining, { name: this.name }, this.options.secret);
    const fail = (err: unknown): never => {
      client.close();
      throw err;
    };
    if (this.closed || this.closing) fail(new TransferError('engine is closed', 'ERR_CLOSED'));
    if (record && (segment.name !== record.name || segment.pid !== record.pid || segment.bootId !== record.bootId)) {
      fail(new TransferError(`the metadata record of '${record.name}' is stale: ${address} is now '${segment.name}' (pid ${segment.pid})`, 'ERR_UNKNOWN_PEER'));
    }
    const sameHost = segment.bootId === this.bootId;
    const vendor = transport === 'mooncake' || transport === 'hccl';
    const useTcp = transport === 'tcp' || (transport === 'auto' && !sameHost);
    if (vendor) {
      if (transport === 'mooncake' && !this.mooncakeSegment) fail(new TransferError('this engine was not opened with mooncake', 'ERR_BACKEND_UNAVAILABLE'));
      if (transport === 'mooncake' && !segment.mooncake) fail(new TransferError(`peer '${segment.name}' at ${address} did not open with mooncake`, 'ERR_BACKEND_UNAVAILABLE'));
      if (transport === 'hccl' && !this.hccl) fail(new TransferError('this engine was not opened with hccl', 'ERR_BACKEND_UNAVAILABLE'));
      // HCCL batches are agreed with the peer whole; a link emulator would cut them.
      if (transport === 'hccl' && link) fail(new TransferError('link emulation is not available over hccl', 'ERR_BAD_ARGUMENT'));
    } else if (!useTcp && !sameHost) {
      fail(new TransferError(`peer '${segment.name}' at ${address} is on another host; the shm transport reaches only this host`, 'ERR_BACKEND_UNAVAILABLE'));
    }
    if (useTcp && !segment.tcp) {
      fail(new TransferError(`peer '${segment.name}' at ${address} has no tcp data listener`, 'ERR_BACKEND_UNAVAILABLE'));
    }
    let id = 0;
    let hcclSession: string | undefined;
    try {
      if (transport === 'mooncake') {
        id = this.native.addPeer(segment.name, sameHost ? segment.pid : 0, segment.regions, {
          transport: 'mooncake',
          link,
          mooncake: { segment: segment.mooncake!.segment },
        });
      } else if (transport === 'hccl') {
        const joined = await hcclConnect(
          this.native,
          (topic, body, ms) => client.call(topic, body, ms),
          segment,
          sameHost ? segment.pid : 0,
          Math.max(1, timeoutMs - (Date.now() - started)),
        );
        id = joined.peerId;
        hcclSession = joined.session;
        if (this.closed || this.closing) throw new TransferError('engine is closed', 'ERR_CLOSED');
      } else if (useTcp) {
        const grant = Buffer.from(segment.tcp!.grant, 'hex');
        const { host } = parseAddress(address);
        id = this.native.addPeer(segment.name, sameHost ? segment.pid : 0, segment.regions, {
          transport: 'tcp',
          link,
          tcp: {
            addresses: segment.tcp!.addresses.map((a) => reachable(a, host)),
            grant,
            key: dataKey(this.options.secret, grant),
            connections,
            connectTimeoutMs: Math.max(1, timeoutMs - (Date.now() - started)),
          },
        });
        await this.native.connectPeer(id);
        if (this.closed || this.closing) throw new TransferError('engine is closed', 'ERR_CLOSED');
      } else {
        id = this.native.addPeer(segment.name, segment.pid, segment.regions, { transport: 'shm', link });
      }
    } catch (err) {
      if (id !== 0 && !this.closed) this.native.dropPeer(id, 'ERR_PEER_LOST', true);
      fail(err);
    }
    const peer = new Peer(this, id, address, segment, client, vendor ? transport : useTcp ? 'tcp' : 'shm', hcclSession);
    this.peers.set(key, peer);
    client.onClose((err) => {
      peer._markLost(err);
      if (!this.closed) this.native.dropPeer(id, 'ERR_PEER_LOST', false);
    });
    if (this.store.kind !== 'embedded') {
      // The control connection only notices a peer whose host answers; the metadata
      // service also notices one that froze or vanished (its lease expires).
      const watch = this.store.watch(record ?? recordFromSegment(segment, address), (err) => {
        if (peer.lost) return;
        peer._markLost(err);
        peer.disconnect();
      });
      client.onClose(() => watch.cancel());
    }
    return peer;
  }

  /** A peer's record by name; ERR_UNKNOWN_PEER when there is none. */
  private async resolvePeer(name: string, timeoutMs: number): Promise<SegmentRecord> {
    const record = await this.store.resolve(name, { timeoutMs });
    if (record) return record;
    const hint = this.store.resolvesNames
      ? `no live engine named '${name}' is published in the metadata service`
      : `no engine named '${name}' in this process: with embedded metadata, connect to a "host:port" address (or open engines with metadata: "etcd://…" to use names)`;
    throw new TransferError(hint, 'ERR_UNKNOWN_PEER');
  }

  /**
   * Answers control requests for `topic` from connected peers ({@link Peer.request}).
   * The handler's return value (JSON) is sent back; a thrown TransferError's code
   * reaches the caller. Returns a function that removes the handler.
   */
  handle(topic: string, handler: RequestHandler): () => void {
    this.assertOpen();
    expectString(topic, 'topic');
    if (typeof handler !== 'function') badArgument('handler', 'a function', handler);
    if (this.handlers.has(topic)) throw new TransferError(`a handler for '${topic}' is already registered`, 'ERR_BAD_ARGUMENT');
    this.handlers.set(topic, handler);
    return () => {
      if (this.handlers.get(topic) === handler) this.handlers.delete(topic);
    };
  }

  /**
   * Calls `listener` once for each peer that connected to this engine (the control
   * connection it opened here: the prefill pushing into this decode engine) when
   * that connection closes or breaks — the peer disconnected, its process died, or
   * keep-alive probes went unanswered. Its tcp data connections lose their grant at
   * the same moment. Only connections that completed the handshake count, and
   * nothing is reported once `close()` has released the engine. Peers this engine
   * connected to report their loss through {@link Peer.lost} instead. Returns a
   * function that removes the listener.
   */
  onPeerLost(listener: (event: PeerLostEvent) => void): () => void {
    this.assertOpen();
    if (typeof listener !== 'function') badArgument('listener', 'a function', listener);
    // Each registration is its own: the same function twice is called twice, removed one at a time.
    const entry = (event: PeerLostEvent) => listener(event);
    this.peerLostListeners.add(entry);
    return () => {
      this.peerLostListeners.delete(entry);
    };
  }

  /** Writes (pushes) local bytes into the peer's regions. Resolves once every byte landed. */
  write(peer: Peer, batch: Descriptor[] | DescriptorBatch, options?: TransferOptions): Promise<TransferResult> {
    return this.transfer(0, peer, batch, options, new Error());
  }

  /** Reads (pulls) bytes from the peer's regions into local regions. */
  read(peer: Peer, batch: Descriptor[] | DescriptorBatch, options?: TransferOptions): Promise<TransferResult> {
    return this.transfer(1, peer, batch, options, new Error());
  }

  /**
   * Stops accepting work, waits up to `timeoutMs` (default 10 s) for in-flight
   * batches, fails the rest with ERR_CLOSED, then releases every region (their
   * shared-memory objects are removed), peer and thread. Idempotent.
   */
  close(options?: { timeoutMs?: number }): Promise<void> {
    if (this.closing) return this.closing;
    const opts = expectOptionalObject(options, 'options');
    const timeoutMs = opts.timeoutMs === undefined ? 10_000 : expectTimeout(opts.timeoutMs, 'options.timeoutMs');
    this.closing = (async () => {
      if (this.inflight.size > 0) {
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([
          Promise.allSettled([...this.inflight]),
          new Promise((resolve) => {
            timer = setTimeout(resolve, timeoutMs);
          }),
        ]);
        clearTimeout(timer);
      }
      // Leave the metadata first, so peers stop sending here at once (an owned etcd
      // store revokes its lease: every record goes in one step).
      if (this.ownsStore) await this.store.close().catch(() => {});
      else if (this.published) await this.store.unpublish(this.name).catch(() => {});
      this.closed = true;
      this.peerLostListeners.clear();
      this.native.close();
      openOnExit.delete(this.exitRef);
      for (const peer of this.peers.values()) peer.disconnect();
      this.peers.clear();
      await this.server?.close();
    })();
    return this.closing;
  }

  /** @internal */
  _free(region: Region, failInFlight: boolean): Promise<void> {
    this.assertOpen();
    this.registry.unregister(region);
    const freed = this.native.free(region.id, failInFlight);
    this.republish();
    return freed;
  }

  /** @internal */
  _updatePeer(peer: Peer, segment: SegmentDescriptor): void {
    this.assertOpen();
    this.native.updatePeer(peer.nativeId, segment.regions);
  }

  /** What this engine publishes in the metadata service (no grants, no shared-memory names). */
  private segmentRecord(): SegmentRecord {
    return {
      name: this.name,
      address: this.server!.address,
      instance: this.instanceId,
      hostname: os.hostname(),
      bootId: this.bootId,
      pid: process.pid,
      transports: ['shm', ...(this.dataAddress ? ['tcp'] : []), ...(this.mooncakeSegment ? ['mooncake'] : []), ...(this.hccl ? ['hccl'] : [])],
      ...(this.dataAddress ? { tcp: [this.dataAddress] } : {}),
      regions: this.native.segment().map((r) => ({ id: r.id, length: r.length, kind: r.kind ?? 'host' })),
      wireVersion: WIRE_VERSION,
    };
  }

  /**
   * Publishes the region list again after it changed (etcd only: the embedded
   * store's record is the live handshake). Coalesced: one update in flight, then
   * one more with whatever changed meanwhile. A failure is retried by the store
   * when its lease is re-granted.
   */
  private republish(): void {
    if (!this.published || this.store.kind === 'embedded' || this.closing) return;
    if (this.republishing) {
      this.republishAgain = true;
      return;
    }
    this.republishing = (async () => {
      do {
        this.republishAgain = false;
        await new Promise<void>((resolve) => setImmediate(resolve));
        if (this.closing || this.closed) return;
        await this.store.publish(this.segmentRecord()).catch(() => {});
      } while (this.republishAgain);
    })().finally(() => {
      this.republishing = null;
    });
  }

  private track(region: Region): Region {
    this.registry.register(region, region.id, region);
    return region;
  }

  private describe(session: ControlSession): SegmentDescriptor {
    const regions = this.closed ? [] : this.native.segment().map((r) => ({ ...r, kind: r.kind ?? 'host' }));
    const segment: SegmentDescriptor = {
      name: this.name,
      pid: process.pid,
      bootId: this.bootId,
      hostname: os.hostname(),
      transports: [...(this.dataAddress ? ['shm', 'tcp'] : ['shm']), ...(this.mooncakeSegment ? ['mooncake'] : []), ...(this.hccl ? ['hccl'] : [])],
      regions,
    };
    if (this.mooncakeSegment) segment.mooncake = { segment: this.mooncakeSegment };
    if (this.dataAddress && !this.closed) {
      // Each control connection gets its own grant: its data connections may touch
      // exactly the regions described to it, and lose them when it closes.
      session.grant ??= randomBytes(16).toString('hex');
      const grant = Buffer.from(session.grant, 'hex');
      this.native.tcpGrant(grant, dataKey(this.options.secret, grant), regions.map((r) => r.id));
      segment.tcp = { addresses: [this.dataAddress], grant: session.grant };
    }
    return segment;
  }

  private endSession(session: ControlSession, cause: Error | undefined): void {
    if (this.closed) return; // close() released everything, and listeners hear nothing after it
    this.hccl?.endSession(session);
    if (session.grant) this.native.tcpRevoke(Buffer.from(session.grant, 'hex'));
    const how = cause ? `broke (${(cause as NodeJS.ErrnoException).code ?? cause.message})` : 'closed';
    const event: PeerLostEvent = {
      name: session.peer,
      session: session.id,
      address: session.address,
      error: new TransferError(`control connection from peer '${session.peer}' (${session.address}) ${how}`, 'ERR_PEER_LOST', cause ? { cause } : undefined),
    };
    for (const listener of [...this.peerLostListeners]) {
      try {
        listener(event);
      } catch (err) {
        // Like an EventEmitter listener's throw, but the other listeners still hear of it.
        process.nextTick(() => {
          throw err;
        });
      }
    }
  }

  /** A batch found the peer gone (data connection lost or broken, injected drop): the whole peer goes, so connect() replaces it. */
  private noteLoss(peer: Peer, err: unknown): void {
    if (!(isTransferError(err, 'ERR_PEER_LOST') || isTransferError(err, 'ERR_PROTOCOL')) || peer.lost) return;
    peer._markLost(err);
    peer.disconnect();
  }

  /**
   * hccl: the batch is held (validated, pinned, nothing posted) until the peer has
   * posted the mirror half; then it is released. A refusal drops it unposted.
   */
  private async agreeHccl(
    peer: Peer,
    op: 0 | 1,
    batchId: number,
    data: Float64Array,
    count: number,
    timeoutMs: number,
    done: Promise<number>,
  ): Promise<{ landed?: Promise<void> }> {
    const request = (topic: string, body: unknown, ms: number) => peer.request(topic, body, { timeoutMs: ms });
    // `done` may settle while we wait for the peer (a link already closed); the
    // caller awaits it afterwards, or sees the peer's refusal instead.
    done.catch(() => {});
    let remoteId: number;
    try {
      remoteId = await hcclAgree(request, peer.hcclSession!, op, data, count, timeoutMs);
    } catch (err) {
      this.native.abort(batchId, isTransferError(err, 'ERR_TIMEOUT') ? 'ERR_TIMEOUT' : 'ERR_ABORTED');
      throw err;
    }
    try {
      this.native.hcclRelease(batchId);
    } catch {
      // Stopped (deadline, abort) while the peer posted its half, which now has no
      // partner: the link is unusable. `done` rejects with the stop reason.
      request(HCCL_CLOSE, { session: peer.hcclSession }, 1_000).catch(() => {});
      peer._markLost(new TransferError(`hccl link to peer '${peer.name}' closed: a batch stopped after the peer posted its half`, 'ERR_PEER_LOST'));
      if (!this.closed) this.native.dropPeer(peer.nativeId, 'ERR_PEER_LOST', false);
      return {};
    }
    if (op !== 0) return {}; // a read landed when our own receive completed
    const landed = hcclLanded(request, peer.hcclSession!, remoteId, timeoutMs);
    landed.catch(() => {}); // awaited after `done`
    return { landed };
  }

  /** @internal Throws ERR_CLOSED once close() has begun. */
  assertOpen(): void {
    if (this.closed || this.closing) throw new TransferError('engine is closed', 'ERR_CLOSED');
  }

  private async transfer(op: 0 | 1, peer: Peer, batch: unknown, options: TransferOptions | undefined, caller: Error): Promise<TransferResult> {
    this.assertOpen();
    if (!(peer instanceof Peer) || peer.engine !== this) badArgument('peer', "a Peer returned by this engine's connect()", peer);
    const { data, count } = pack(batch, this);
    const opts = expectOptionalObject(options, 'options');
    const timeoutMs = opts.timeoutMs === undefined ? this.options.timeoutMs : expectTimeout(opts.timeoutMs, 'options.timeoutMs');
    const signal = opts.signal;
    if (signal !== undefined && !(signal instanceof AbortSignal)) badArgument('options.signal', 'an AbortSignal', signal);
    if (signal?.aborted) throw new TransferError('batch was aborted before it started', 'ERR_ABORTED');

    let submitted: [number, Promise<number>];
    try {
      try {
        submitted = this.native.submit(op, peer.nativeId, data, count);
      } catch (err) {
        // The peer may have registered the region after we connected: refresh once.
        if (!isTransferError(err, 'ERR_UNKNOWN_REGION') || !/remoteRegion/.test(err.message) || peer.lost) throw err;
        await peer.refresh();
        this.assertOpen();
        submitted = this.native.submit(op, peer.nativeId, data, count);
      }
    } catch (err) {
      this.noteLoss(peer, err);
      throw err;
    }
    const [batchId, done] = submitted;
    const timer = setTimeout(() => this.native.abort(batchId, 'ERR_TIMEOUT'), timeoutMs);
    const onAbort = () => this.native.abort(batchId, 'ERR_ABORTED');
    signal?.addEventListener('abort', onAbort, { once: true });
    this.inflight.add(done);
    try {
      const hccl = peer.transport === 'hccl' ? await this.agreeHccl(peer, op, batchId, data, count, timeoutMs, done) : undefined;
      const bytes = await done;
      await hccl?.landed;
      return { bytes, descriptors: count };
    } catch (err) {
      this.noteLoss(peer, err);
      throw withCallerStack(err, caller);
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      this.inflight.delete(done);
    }
  }
}
