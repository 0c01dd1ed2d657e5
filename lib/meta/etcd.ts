/**
 * One process's connection to etcd: a client, and one lease (TTL + keep-alive)
 * that every key the process publishes is attached to. A process that dies stops
 * renewing the lease and etcd deletes its keys within the TTL; one that closes
 * revokes it and they go at once. See docs/METADATA.md.
 *
 * Every call has a deadline (`timeoutMs`) and fails with ERR_METADATA_UNAVAILABLE
 * when etcd does not answer in time. Keys are "owned": the session remembers what it
 * published, and when the lease is lost (etcd unreachable for longer than the TTL,
 * or revoked) it grants a new one and publishes everything again, with backoff,
 * until it succeeds or the session closes.
 */
import { randomBytes } from 'node:crypto';
import type { Etcd3, IKeyValue, Lease, Namespace, Watcher } from 'etcd3';
import { TransferError, isTransferError } from '../errors.js';
import { badArgument, expectInteger, expectOptionalObject, expectString, expectTimeout } from '../validate.js';

/** Options of {@link EtcdSession.connect}. */
export interface EtcdOptions {
  /**
   * Key prefix every key lives under. Default: the URL's path (`etcd://h:p/cluster-a`
   * → `cluster-a/`), else `epd-transfer/`.
   */
  prefix?: string;
  /** Lease TTL in seconds: how long a dead process's keys outlive it. 2..3600, default 10. */
  ttlSeconds?: number;
  /** Deadline of connecting and of every etcd call (ms). Default 5000. */
  timeoutMs?: number;
}

/** Where a session stands with etcd. */
export type EtcdSessionState = 'live' | 'lease-lost' | 'closed';

/** A change of {@link EtcdSession.state}, with the error that caused a loss. */
export interface EtcdSessionStatus {
  state: EtcdSessionState;
  /** ERR_LEASE_LOST (with the cause) when the lease went. */
  error?: TransferError;
}

/** A key and its JSON value as read from etcd. */
export interface EtcdEntry<T = unknown> {
  /** The key below the session's prefix. */
  key: string;
  value: T;
  /** etcd's modification revision of the key. */
  modRevision: number;
  /** The lease the key is attached to ('0' for none). */
  lease: string;
}

/** Callbacks of {@link EtcdSession.watchPrefix}. Keys are below the session's prefix. */
export interface WatchHandlers<T> {
  put(entry: EtcdEntry<T>): void;
  delete(key: string): void;
  /** The watch (re)connected; `reconnected` is true after a drop (events missed meanwhile are replayed by etcd). */
  connected?(reconnected: boolean): void;
}

/** A running watch. */
export interface EtcdWatch {
  /** Resolves when etcd first confirmed the watch (it may never, while etcd is unreachable: bound your wait). */
  readonly ready: Promise<void>;
  /** Stops the watch (idempotent). */
  cancel(): Promise<void>;
}

const DEFAULT_PREFIX = 'epd-transfer/';
const DEFAULT_TTL_S = 10;
const DEFAULT_TIMEOUT_MS = 5_000;
/** etcd refuses transactions above 128 operations by default (--max-txn-ops). */
const TXN_OPS = 128;

/** Parses `etcd://host:port[,host:port…][/prefix]` (a bare `host:port[,…]` is accepted too, as Mooncake does). */
export function parseEtcdUrl(url: string): { hosts: string[]; prefix?: string } {
  expectString(url, 'metadata');
  const m = /^(?:etcd:\/\/)?([^/]+)(?:\/(.*))?$/.exec(url.trim());
  const hosts = m ? m[1].split(',').map((h) => h.trim()) : [];
  const valid = hosts.length > 0 && hosts.every((h) => /^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/.test(h) && Number(h.slice(h.lastIndexOf(':') + 1)) < 65536);
  if (!m || !valid) badArgument('metadata', 'an etcd URL like etcd://127.0.0.1:2379[,host:port][/prefix]', url);
  const path = m[2]?.replace(/^\/+|\/+$/g, '');
  return { hosts: hosts.map((h) => `http://${h}`), prefix: path ? `${path}/` : undefined };
}

/** Joins key parts below the prefix; each part is URI-encoded, so names may contain '/'. */
export function keyOf(...parts: string[]): string {
  return parts.map((p) => encodeURIComponent(p)).join('/');
}

/** Splits a key made by {@link keyOf}. */
export function keyParts(key: string): string[] {
  return key.split('/').map((p) => decodeURIComponent(p));
}

function unavailable(what: string, cause: unknown): TransferError {
  if (isTransferError(cause)) return cause;
  const reason = (cause as Error)?.message ?? String(cause);
  return new TransferError(`etcd ${what} failed: ${reason}`, 'ERR_METADATA_UNAVAILABLE', { cause });
}

function parse<T>(kv: IKeyValue, key: string): EtcdEntry<T> | null {
  try {
    return { key, value: JSON.parse(kv.value.toString('utf8')) as T, modRevision: Number(kv.mod_revision), lease: String(kv.lease ?? '0') };
  } catch {
    return null; // not ours (or corrupted): never fatal to a reader
  }
}

/** A client and a lease; see the module comment. */
export class EtcdSession {
  private lease: Lease | null = null;
  private leaseId: string | null = null;
  private granting: Promise<string> | null = null;
  private readonly owned = new Map<string, string>();
  private readonly watchers = new Set<Watcher>();
  private readonly listeners = new Set<(s: EtcdSessionStatus) => void>();
  private currentState: EtcdSessionState = 'live';
  private regrantTimer: NodeJS.Timeout | undefined;
  private closing: Promise<void> | undefined;
  /** Identifies this session in what it publishes (a restarted process gets a new one). */
  readonly id = randomBytes(8).toString('hex');

  private constructor(
    private readonly client: Etcd3,
    private readonly ns: Namespace,
    /** The endpoints, as `host:port,host:port`. */
    readonly endpoints: string,
    /** Key prefix (ends with '/'). */
    readonly prefix: string,
    readonly ttlSeconds: number,
    readonly timeoutMs: number,
  ) {}

  /**
   * Connects to etcd and checks that it answers (within `timeoutMs`). Fails with
   * ERR_METADATA_UNAVAILABLE when it does not, ERR_BAD_ARGUMENT on a malformed URL.
   */
  static async connect(url: string, options?: EtcdOptions): Promise<EtcdSession> {
    const { hosts, prefix: urlPrefix } = parseEtcdUrl(url);
    const o = expectOptionalObject(options, 'options') as EtcdOptions;
    const ttlSeconds = o.ttlSeconds === undefined ? DEFAULT_TTL_S : expectInteger(o.ttlSeconds, 'options.ttlSeconds', 2, 3600);
    const timeoutMs = o.timeoutMs === undefined ? DEFAULT_TIMEOUT_MS : expectTimeout(o.timeoutMs, 'options.timeoutMs');
    let prefix = o.prefix === undefined ? (urlPrefix ?? DEFAULT_PREFIX) : expectString(o.prefix, 'options.prefix');
    if (!prefix.endsWith('/')) prefix += '/';
    // Loaded on first use: engines on the embedded handshake never pay for gRPC.
    const mod = (await import('etcd3')) as typeof import('etcd3') & { default?: typeof import('etcd3') };
    const { Etcd3 } = mod.default ?? mod;
    const client = new Etcd3({
      hosts,
      dialTimeout: timeoutMs,
      // Every unary call gets the session's deadline; streams (watch, keep-alive) none.
      defaultCallOptions: (ctx) => (ctx.isStream ? {} : { deadline: Date.now() + timeoutMs }),
    });
    const session = new EtcdSession(client, client.namespace(prefix), hosts.map((h) => h.slice('http://'.length)).join(','), prefix, ttlSeconds, timeoutMs);
    try {
      await session.bounded('status check', () => client.maintenance.status());
    } catch (err) {
      client.close();
      throw new TransferError(`etcd at ${session.endpoints} did not answer within ${timeoutMs} ms (${(err as Error).message})`, 'ERR_METADATA_UNAVAILABLE', { cause: err });
    }
    return session;
  }

  /** `live`, `lease-lost` (re-publishing in the background) or `closed`. */
  get state(): EtcdSessionState {
    return this.currentState;
  }

  /** Calls `listener` on every state change. Returns a function that removes it. */
  onStatus(listener: (status: EtcdSessionStatus) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Reads one key. Null when absent (or not JSON). */
  async get<T>(key: string): Promise<EtcdEntry<T> | null> {
    this.assertOpen();
    const res = await this.bounded(`get ${key}`, () => this.ns.get(key).exec());
    const kv = res.kvs[0];
    return kv ? parse<T>(kv, key) : null;
  }

  /** Reads every key under `prefix` (below the session prefix), and the revision of the read. */
  async list<T>(prefix: string): Promise<{ entries: EtcdEntry<T>[]; revision: number }> {
    this.assertOpen();
    const res = await this.bounded(`list ${prefix}`, () => this.ns.getAll().prefix(prefix).exec());
    const entries: EtcdEntry<T>[] = [];
    for (const kv of res.kvs) {
      const e = parse<T>(kv, this.relative(kv.key));
      if (e) entries.push(e);
    }
    return { entries, revision: Number(res.header.revision) };
  }

  /**
   * Publishes `value` at `key` under this session's lease. The key is remembered:
   * after a lease loss it is published again. Rejects with ERR_METADATA_UNAVAILABLE
   * at the deadline (the key stays remembered and is published when etcd is back).
   */
  async put(key: string, value: unknown): Promise<void> {
    await this.putMany([[key, value]]);
  }

  /** Publishes (value) or deletes (null) several owned keys, in transactions of up to 128 operations. */
  async putMany(changes: ReadonlyArray<readonly [string, unknown]>): Promise<void> {
    this.assertOpen();
    const ops: Array<[string, string | null]> = changes.map(([k, v]) => [k, v === null ? null : JSON.stringify(v)]);
    for (const [k, v] of ops) {
      if (v === null) this.owned.delete(k);
      else this.owned.set(k, v);
    }
    const lease = await this.ensureLease();
    for (let i = 0; i < ops.length; i += TXN_OPS) {
      const slice = ops.slice(i, i + TXN_OPS);
      await this.bounded('put', () =>
        this.ns
          .if(slice[0][0], 'Version', '>', -1)
          .then(...slice.map(([k, v]) => (v === null ? this.ns.delete().key(k) : this.ns.put(k).value(v).lease(lease))))
          .commit(),
      );
    }
  }

  /** Deletes an owned key. */
  async delete(key: string): Promise<void> {
    await this.putMany([[key, null]]);
  }

  /** Deletes any keys (owned or not) in one or more transactions. */
  async deleteKeys(keys: readonly string[]): Promise<void> {
    this.assertOpen();
    for (const k of keys) this.owned.delete(k);
    for (let i = 0; i < keys.length; i += TXN_OPS) {
      const slice = keys.slice(i, i + TXN_OPS);
      await this.bounded('delete', () =>
        this.ns
          .if(slice[0], 'Version', '>', -1)
          .then(...slice.map((k) => this.ns.delete().key(k)))
          .commit(),
      );
    }
  }

  /**
   * Publishes an owned key that must be unique: succeeds when the key is absent,
   * already ours, or `stale(current)` says its holder is gone (then it is replaced
   * only if unchanged since read). Otherwise ERR_NAME_IN_USE.
   */
  async claim<T>(key: string, value: unknown, stale: (current: EtcdEntry<T>) => boolean | Promise<boolean>): Promise<void> {
    this.assertOpen();
    const text = JSON.stringify(value);
    const lease = await this.ensureLease();
    for (let attempt = 0; attempt < 3; attempt++) {
      const res = await this.bounded(`claim ${key}`, () =>
        this.ns.if(key, 'Create', '==', 0).then(this.ns.put(key).value(text).lease(lease)).else(this.ns.get(key)).commit(),
      );
      if (res.succeeded) {
        this.owned.set(key, text);
        return;
      }
      const kv = res.responses[0]?.response_range?.kvs[0];
      if (!kv) continue; // deleted meanwhile: try again
      const current = parse<T>(kv, key);
      const ours = String(kv.lease) === lease;
      if (!ours && current && !(await stale(current))) {
        throw new TransferError(`'${key}' is held by another live process (etcd lease ${String(kv.lease)})`, 'ERR_NAME_IN_USE');
      }
      const swapped = await this.bounded(`claim ${key}`, () =>
        this.ns.if(key, 'Mod', '==', Number(kv.mod_revision)).then(this.ns.put(key).value(text).lease(lease)).commit(),
      );
      if (swapped.succeeded) {
        this.owned.set(key, text);
        return;
      }
    }
    throw new TransferError(`'${key}' kept changing while it was claimed`, 'ERR_NAME_IN_USE');
  }

  /**
   * Watches every key under `prefix`. With `startRevision` etcd first replays what
   * changed since (so a list at revision r followed by a watch from r+1 misses
   * nothing). Returns at once; the watch connects in the background and
   * reconnects on its own after etcd drops, replaying what it missed.
   */
  watchPrefix<T>(prefix: string, handlers: WatchHandlers<T>, options: { startRevision?: number } = {}): EtcdWatch {
    this.assertOpen();
    let builder = this.ns.watch().prefix(prefix);
    if (options.startRevision !== undefined) builder = builder.startRevision(String(options.startRevision));
    return this.startWatch(builder.watcher(), handlers);
  }

  /** Watches one key (see {@link watchPrefix}). */
  watchKey<T>(key: string, handlers: WatchHandlers<T>, options: { startRevision?: number } = {}): EtcdWatch {
    this.assertOpen();
    let builder = this.ns.watch().key(key);
    if (options.startRevision !== undefined) builder = builder.startRevision(String(options.startRevision));
    return this.startWatch(builder.watcher(), handlers);
  }

  /**
   * Revokes the lease (every key of this session goes at once; bounded by
   * `timeoutMs`, after which etcd expires it within the TTL anyway), stops the
   * watches and closes the client. Idempotent.
   */
  close(): Promise<void> {
    this.closing ??= (async () => {
      clearTimeout(this.regrantTimer);
      this.setState('closed');
      const lease = this.lease;
      this.lease = null;
      if (lease) {
        lease.removeAllListeners();
        try {
          await this.bounded('revoke', () => lease.revoke());
        } catch {
          lease.release(); // etcd unreachable: the TTL removes our keys
        }
      }
      await Promise.allSettled([...this.watchers].map((w) => w.cancel()));
      this.watchers.clear();
      this.client.close();
    })();
    return this.closing;
  }

  /** Revokes the lease now, as if etcd had expired it (tests and operators' drills). */
  async dropLease(): Promise<void> {
    const lease = this.lease;
    if (!lease) return;
    await this.bounded('revoke', () => lease.revoke());
    this.onLeaseLost(new TransferError('the lease was revoked', 'ERR_LEASE_LOST'));
  }

  // ------------------------------------------------------------------ internals

  private assertOpen(): void {
    if (this.currentState === 'closed') throw new TransferError('the etcd session is closed', 'ERR_CLOSED');
  }

  private relative(key: Buffer | string): string {
    const k = key.toString();
    return k.startsWith(this.prefix) ? k.slice(this.prefix.length) : k;
  }

  /** Runs one etcd call with the session deadline; any failure is ERR_METADATA_UNAVAILABLE. */
  private async bounded<T>(what: string, call: () => Promise<T>): Promise<T> {
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new TransferError(`etcd ${what} did not complete within ${this.timeoutMs} ms`, 'ERR_METADATA_UNAVAILABLE')), this.timeoutMs);
    });
    try {
      return await Promise.race([call(), late]);
    } catch (err) {
      throw unavailable(what, err);
    } finally {
      clearTimeout(timer);
    }
  }

  private ensureLease(): Promise<string> {
    if (this.leaseId) return Promise.resolve(this.leaseId);
    this.granting ??= this.grant().finally(() => {
      this.granting = null;
    });
    return this.granting;
  }

  private async grant(): Promise<string> {
    const lease = this.ns.lease(this.ttlSeconds);
    // Registered before grant() so that a failed grant never becomes an unhandled 'lost' error.
    lease.on('lost', (err) => {
      if (this.lease === lease) this.onLeaseLost(new TransferError(`etcd lease lost: ${err.message}`, 'ERR_LEASE_LOST', { cause: err }));
    });
    let id: string;
    try {
      id = await this.bounded('lease grant', () => lease.grant());
    } catch (err) {
      lease.removeAllListeners();
      lease.release();
      throw err;
    }
    if (this.currentState === 'closed') {
      lease.removeAllListeners();
      await lease.revoke().catch(() => lease.release());
      throw new TransferError('the etcd session is closed', 'ERR_CLOSED');
    }
    this.lease = lease;
    this.leaseId = id;
    return id;
  }

  private onLeaseLost(error: TransferError): void {
    if (this.currentState === 'closed') return;
    const old = this.lease;
    this.lease = null;
    this.leaseId = null;
    if (old) {
      old.removeAllListeners();
      old.release();
    }
    this.setState('lease-lost', error);
    this.scheduleRegrant(250);
  }

  /** Grants a new lease and publishes every owned key again; retried with backoff until it works or the session closes. */
  private scheduleRegrant(delayMs: number): void {
    clearTimeout(this.regrantTimer);
    this.regrantTimer = setTimeout(async () => {
      if (this.currentState === 'closed') return;
      try {
        const lease = await this.ensureLease();
        const all = [...this.owned];
        for (let i = 0; i < all.length; i += TXN_OPS) {
          const slice = all.slice(i, i + TXN_OPS);
          await this.bounded('republish', () =>
            this.ns
              .if(slice[0][0], 'Version', '>', -1)
              .then(...slice.map(([k, v]) => this.ns.put(k).value(v).lease(lease)))
              .commit(),
          );
        }
        if (this.leaseId === lease) this.setState('live');
      } catch {
        this.scheduleRegrant(Math.min(delayMs * 2, (this.ttlSeconds * 1000) / 2));
      }
    }, delayMs);
    this.regrantTimer.unref();
  }

  private setState(state: EtcdSessionState, error?: TransferError): void {
    if (this.currentState === state || this.currentState === 'closed') return;
    this.currentState = state;
    for (const l of this.listeners) {
      try {
        l(error ? { state, error } : { state });
      } catch {
        // a listener's failure is its own
      }
    }
  }

  private startWatch<T>(w: Watcher, handlers: WatchHandlers<T>): EtcdWatch {
    this.watchers.add(w);
    let dropped = false;
    let connected!: () => void;
    const ready = new Promise<void>((resolve) => (connected = resolve));
    w.on('put', (kv) => {
      const e = parse<T>(kv, this.relative(kv.key));
      if (e) handlers.put(e);
    });
    w.on('delete', (kv) => handlers.delete(this.relative(kv.key)));
    w.on('disconnected', () => {
      dropped = true;
    });
    w.on('connected', () => {
      connected();
      handlers.connected?.(dropped);
      dropped = false;
    });
    // A watch etcd cancels for good (e.g. its start revision was compacted) must not crash the process.
    w.on('error', () => {});
    return {
      ready,
      cancel: async () => {
        if (!this.watchers.delete(w)) return;
        await w.cancel().catch(() => {});
      },
    };
  }
}
