/**
 * Metadata: how engines find each other and learn that one left.
 *
 * A {@link MetadataStore} holds one {@link SegmentRecord} per listening engine. Two
 * implementations pass the same conformance suite (test/meta/conformance.test.ts):
 *
 * - {@link EmbeddedMetadataStore} (the default): nothing to install. An engine's
 *   control port *is* its record: `resolve("host:port")` asks that port (the
 *   handshake), and a watch is a control connection whose close means "gone". Names
 *   that are not addresses resolve only among engines of this process.
 * - {@link EtcdMetadataStore} (`metadata: 'etcd://host:port[,host:port]'`): records
 *   live in etcd under `<prefix>segments/<name>`, attached to the engine's lease, so
 *   an engine that dies (or whose host vanishes) disappears within the lease TTL,
 *   and a watch sees it without any connection to the engine. Names resolve across
 *   the cluster. See docs/METADATA.md.
 */
import { readFileSync } from 'node:fs';
import os from 'node:os';
import { TransferError, isTransferError } from '../errors.js';
import { expectString } from '../validate.js';
import { EtcdSession, keyOf, type EtcdOptions, type EtcdSessionState, type EtcdSessionStatus, type EtcdWatch } from './etcd.js';
import { ControlClient } from './handshake.js';
import type { SegmentDescriptor } from './wire.js';

/** What a listening engine publishes about itself. Never carries secrets, grants or shared-memory names. */
export interface SegmentRecord {
  /** The engine's name (unique among live engines of one metadata service). */
  name: string;
  /** Control address, "host:port": where the handshake (and everything else) starts. */
  address: string;
  /** Random per engine opening: tells a restarted engine of the same name from its predecessor ('' when unknown). */
  instance: string;
  hostname: string;
  /** Kernel boot id: equal for processes of one host. */
  bootId: string;
  pid: number;
  transports: string[];
  /** tcp data listener addresses, when the engine has one. */
  tcp?: string[];
  /** The shareable regions (ids and sizes; how to reach them comes from the handshake). */
  regions: Array<{ id: number; length: number; kind: string }>;
  /** Control-plane wire version the engine speaks. */
  wireVersion: number;
}

/** A watch on one segment (see {@link MetadataStore.watch}). */
export interface SegmentWatch {
  /** Resolves once the watch is in place (bound your wait: it may never, while the service is unreachable). */
  readonly ready: Promise<void>;
  /** Stops watching; `onGone` is not called afterwards. Idempotent. */
  cancel(): void;
}

/** State of a store: `live`; `lease-lost` (etcd only: records are being published again); `closed`. */
export type MetadataState = EtcdSessionState;
export type MetadataStatus = EtcdSessionStatus;

/** Options of one lookup. */
export interface ResolveOptions {
  /** Deadline (ms). Default: the store's. */
  timeoutMs?: number;
}

/** Where engines publish, resolve and watch each other. */
export interface MetadataStore {
  /** `embedded` or `etcd`. */
  readonly kind: 'embedded' | 'etcd';
  /** True when `resolve()` finds engines of other processes by name (not only by address). */
  readonly resolvesNames: boolean;
  /** See {@link MetadataState}. */
  readonly state: MetadataState;
  /** Publishes (or updates) a record; it stays until unpublished, the store closes, or the process dies. ERR_NAME_IN_USE when another live engine has the name. */
  publish(record: SegmentRecord): Promise<void>;
  /** Removes a record this store published. */
  unpublish(name: string): Promise<void>;
  /** The record of an engine by name, or by control address ("host:port"); null when there is none. */
  resolve(target: string, options?: ResolveOptions): Promise<SegmentRecord | null>;
  /** Every record this store can see (embedded: only those of this process). */
  list(options?: ResolveOptions): Promise<SegmentRecord[]>;
  /**
   * Calls `onGone` once, when the engine of `record` leaves: it unpublished, died,
   * or (etcd) its lease expired, or another engine took its name. A record that is
   * not published when the watch starts counts as gone only if it came from this
   * store (`record.instance` set).
   */
  watch(record: SegmentRecord, onGone: (reason: TransferError) => void): SegmentWatch;
  /** Calls `listener` on every state change; returns a function that removes it. */
  onStatus(listener: (status: MetadataStatus) => void): () => void;
  /** Unpublishes everything and releases connections. Idempotent. */
  close(): Promise<void>;
}

/** Options shared by both stores, plus etcd's own. */
export interface MetadataStoreOptions extends EtcdOptions {
  /** Name this process gives in handshakes it makes to resolve or watch. */
  clientName?: string;
  /** The control plane's shared secret (handshakes made by the store prove it). */
  secret?: Buffer;
}

const ADDRESS = /^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/;

/** True when `target` looks like "host:port" / "[v6]:port" rather than an engine name. */
export function isAddress(target: string): boolean {
  return ADDRESS.test(target);
}

let bootIdCache: string | undefined;
/** This host's kernel boot id (hostname where /proc has none). */
export function bootId(): string {
  if (bootIdCache === undefined) {
    try {
      bootIdCache = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
    } catch {
      bootIdCache = os.hostname();
    }
  }
  return bootIdCache;
}

/** True while a process with this pid exists on this host. */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** The record of a segment described by a handshake at `address`. */
export function recordFromSegment(segment: SegmentDescriptor, address: string, instance = ''): SegmentRecord {
  return {
    name: segment.name,
    address,
    instance,
    hostname: segment.hostname,
    bootId: segment.bootId,
    pid: segment.pid,
    transports: segment.transports,
    ...(segment.tcp ? { tcp: segment.tcp.addresses } : {}),
    regions: segment.regions.map((r) => ({ id: r.id, length: r.length, kind: r.kind })),
    wireVersion: 2,
  };
}

/** Same engine process (and, when both know it, the same opening). */
function sameEngine(a: SegmentRecord, b: SegmentRecord): boolean {
  return a.name === b.name && a.pid === b.pid && a.bootId === b.bootId && (!a.instance || !b.instance || a.instance === b.instance);
}

/** Asks the control port at `address` for its segment: null when nothing listens there. */
async function handshakeRecord(address: string, timeoutMs: number, options: MetadataStoreOptions): Promise<SegmentRecord | null> {
  let client: ControlClient;
  let segment: SegmentDescriptor;
  try {
    ({ client, segment } = await ControlClient.connect(address, timeoutMs, { name: options.clientName ?? `${os.hostname()}-${process.pid}-metadata` }, options.secret));
  } catch (err) {
    const cause = (err as { cause?: { code?: string } }).cause;
    if (isTransferError(err, 'ERR_CONNECT') && (cause?.code === 'ECONNREFUSED' || cause?.code === 'ECONNRESET')) return null;
    throw err;
  }
  client.close();
  return recordFromSegment(segment, address);
}

/** Records published by embedded stores of this process, by name (names resolve within a process). */
const localRecords = new Map<string, SegmentRecord>();

/** The default store: the handshake on each engine's control port. See the module comment. */
export class EmbeddedMetadataStore implements MetadataStore {
  readonly kind = 'embedded' as const;
  readonly resolvesNames = false;
  private readonly published = new Map<string, SegmentRecord>();
  private readonly watches = new Set<ControlClient>();
  private closed = false;
  private readonly timeoutMs: number;

  constructor(private readonly options: MetadataStoreOptions = {}) {
    this.timeoutMs = options.timeoutMs ?? 5_000;
  }

  get state(): MetadataState {
    return this.closed ? 'closed' : 'live';
  }

  async publish(record: SegmentRecord): Promise<void> {
    this.assertOpen();
    const other = localRecords.get(record.name);
    if (other && !this.published.has(record.name)) throw new TransferError(`an engine named '${record.name}' is already open in this process`, 'ERR_NAME_IN_USE');
    this.published.set(record.name, record);
    localRecords.set(record.name, record);
  }

  async unpublish(name: string): Promise<void> {
    if (this.published.delete(name)) localRecords.delete(name);
  }

  async resolve(target: string, options: ResolveOptions = {}): Promise<SegmentRecord | null> {
    this.assertOpen();
    expectString(target, 'target');
    if (!isAddress(target)) return localRecords.get(target) ?? null;
    return handshakeRecord(target, options.timeoutMs ?? this.timeoutMs, this.options);
  }

  async list(): Promise<SegmentRecord[]> {
    this.assertOpen();
    return [...this.published.values()];
  }

  /** A control connection to the engine; its close is the departure. */
  watch(record: SegmentRecord, onGone: (reason: TransferError) => void): SegmentWatch {
    this.assertOpen();
    let cancelled = false;
    let client: ControlClient | undefined;
    const gone = (reason: TransferError) => {
      if (cancelled) return;
      cancelled = true;
      onGone(reason);
    };
    const ready = ControlClient.connect(record.address, this.timeoutMs, { name: this.options.clientName ?? `${os.hostname()}-${process.pid}-watch` }, this.options.secret).then(
      ({ client: c, segment }) => {
        client = c;
        this.watches.add(c);
        if (cancelled) return void c.close();
        if (!sameEngine(recordFromSegment(segment, record.address), record)) {
          c.close();
          return gone(new TransferError(`another engine ('${segment.name}', pid ${segment.pid}) now listens at ${record.address}`, 'ERR_PEER_LOST'));
        }
        c.onClose(() => {
          this.watches.delete(c);
          gone(new TransferError(`engine '${record.name}' at ${record.address} closed its control connection`, 'ERR_PEER_LOST'));
        });
      },
      (err: TransferError) => gone(new TransferError(`engine '${record.name}' at ${record.address} cannot be reached: ${err.message}`, 'ERR_PEER_LOST', { cause: err })),
    );
    return {
      ready,
      cancel: () => {
        cancelled = true;
        client?.close();
      },
    };
  }

  onStatus(): () => void {
    return () => {};
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const name of this.published.keys()) localRecords.delete(name);
    this.published.clear();
    for (const c of this.watches) c.close();
    this.watches.clear();
  }

  private assertOpen(): void {
    if (this.closed) throw new TransferError('the metadata store is closed', 'ERR_CLOSED');
  }
}

/** Segment records in etcd. See the module comment and docs/METADATA.md. */
export class EtcdMetadataStore implements MetadataStore {
  readonly kind = 'etcd' as const;
  readonly resolvesNames = true;
  private readonly watches = new Set<EtcdWatch>();
  private readonly published = new Set<string>();

  /** Use {@link EtcdMetadataStore.connect}, or wrap a session you own. */
  constructor(
    /** The etcd session; its lease carries every record this store publishes. */
    readonly session: EtcdSession,
    private readonly options: MetadataStoreOptions = {},
    private readonly ownsSession = false,
  ) {}

  /** Connects to etcd (ERR_METADATA_UNAVAILABLE when it does not answer within `timeoutMs`). */
  static async connect(url: string, options: MetadataStoreOptions = {}): Promise<EtcdMetadataStore> {
    return new EtcdMetadataStore(await EtcdSession.connect(url, options), options, true);
  }

  get state(): MetadataState {
    return this.session.state;
  }

  async publish(record: SegmentRecord): Promise<void> {
    const key = keyOf('segments', record.name);
    // A record left by a crashed predecessor on this host (same boot, dead pid) is taken over at once
    // instead of waiting out its TTL; anything else alive keeps its name.
    await this.session.claim<SegmentRecord>(key, record, (current) => {
      const c = current.value;
      return c.instance === record.instance || (c.bootId === bootId() && c.pid !== process.pid && !processAlive(c.pid));
    });
    this.published.add(record.name);
  }

  async unpublish(name: string): Promise<void> {
    this.published.delete(name);
    await this.session.delete(keyOf('segments', name));
  }

  async resolve(target: string, options: ResolveOptions = {}): Promise<SegmentRecord | null> {
    expectString(target, 'target');
    if (isAddress(target)) return handshakeRecord(target, options.timeoutMs ?? this.session.timeoutMs, this.options);
    return (await this.session.get<SegmentRecord>(keyOf('segments', target)))?.value ?? null;
  }

  async list(): Promise<SegmentRecord[]> {
    return (await this.session.list<SegmentRecord>('segments/')).entries.map((e) => e.value);
  }

  /** An etcd watch on the record's key: deleted (lease expired, unpublished) or replaced by another engine → gone. */
  watch(record: SegmentRecord, onGone: (reason: TransferError) => void): SegmentWatch {
    const key = keyOf('segments', record.name);
    let done = false;
    let seen = false;
    let watch: EtcdWatch | undefined;
    const gone = (reason: TransferError) => {
      if (done) return;
      done = true;
      if (watch) {
        this.watches.delete(watch);
        void watch.cancel();
      }
      onGone(reason);
    };
    const check = (current: SegmentRecord | undefined) => {
      if (current && sameEngine(current, record)) {
        seen = true;
        return;
      }
      if (current) gone(new TransferError(`engine '${record.name}' was replaced by another engine of that name (pid ${current.pid} on ${current.hostname})`, 'ERR_PEER_LOST'));
      else if (seen || record.instance) gone(new TransferError(`engine '${record.name}' left the metadata service (its lease expired or it closed)`, 'ERR_PEER_LOST'));
    };
    watch = this.session.watchKey<SegmentRecord>(key, {
      put: (e) => check(e.value),
      delete: () => check(undefined),
      // On every (re)connection, compare with what etcd holds now: a departure while the watch was down is not missed.
      connected: () => {
        this.session.get<SegmentRecord>(key).then(
          (e) => check(e?.value),
          () => {},
        );
      },
    });
    this.watches.add(watch);
    const w = watch;
    return {
      ready: w.ready,
      cancel: () => {
        done = true;
        if (this.watches.delete(w)) void w.cancel();
      },
    };
  }

  onStatus(listener: (status: MetadataStatus) => void): () => void {
    return this.session.onStatus(listener);
  }

  async close(): Promise<void> {
    await Promise.allSettled([...this.watches].map((w) => w.cancel()));
    this.watches.clear();
    if (this.ownsSession) {
      await this.session.close(); // revokes the lease: every record goes at once
      return;
    }
    const names = [...this.published];
    this.published.clear();
    if (names.length > 0 && this.session.state !== 'closed') await this.session.putMany(names.map((n) => [keyOf('segments', n), null] as const)).catch(() => {});
  }
}

/**
 * Opens the store a `metadata` option names: `'embedded'` (default) or
 * `'etcd://host:port[,host:port][/prefix]'`.
 */
export async function openMetadataStore(spec: string, options: MetadataStoreOptions = {}): Promise<MetadataStore> {
  expectString(spec, 'metadata');
  if (spec === 'embedded' || spec === 'p2p') return new EmbeddedMetadataStore(options);
  if (spec.startsWith('etcd://')) return EtcdMetadataStore.connect(spec, options);
  throw new TransferError(`Expected "embedded" or an etcd URL like etcd://127.0.0.1:2379 for metadata but received ${JSON.stringify(spec)}`, 'ERR_BAD_ARGUMENT');
}
