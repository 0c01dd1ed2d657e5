/**
 * Several proxies, one view (cluster mode: `--metadata etcd://…`). Each proxy:
 *
 * - registers itself (`<prefix>proxies/<id>` → its URL) under its etcd lease;
 * - discovers E/P/D/PD instances from the shared registry (`instances/`, see
 *   lib/meta/registry.ts) and follows additions and removals without a restart;
 * - shares its load: for every instance it writes its own in-flight tokens and
 *   requests to `load/<role>/<url>/<proxy id>` (throttled to one etcd transaction per
 *   `loadSyncMs`), and adds up what the other proxies wrote into each instance's
 *   `sharedTokens`/`sharedRequests`, which the least-loaded queues count. The view of
 *   other proxies' load is approximate: it is as old as the sync interval plus one
 *   etcd round trip and watch delivery (measured: docs/BENCHMARKS.md); a dead
 *   proxy's share disappears with its lease;
 * - forwards a `/v1/metaserver` call for a request it does not hold to the proxy that
 *   does: the metaserver URL handed to D names the owner (`?owner=<id>`), and without
 *   that hint the call is offered to every live proxy (only the owner accepts it).
 */
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import { Histogram } from 'prom-client';
import { request } from 'undici';
import { TransferError } from '../errors.js';
import { EtcdSession, keyOf, keyParts, type EtcdOptions, type EtcdWatch } from '../meta/etcd.js';
import { watchInstances, type InstanceRecord } from '../meta/registry.js';
import { bootId, processAlive } from '../meta/store.js';
import { signBody, SIGNATURE_HEADER } from './auth.js';
import { normalizeInstanceUrl, type Instance, type InstancePool, type Role } from './instances.js';
import type { ProxyMetrics } from './metrics.js';

/** Cluster options of a proxy ({@link ProxyOptions.cluster}). */
export interface ClusterOptions extends EtcdOptions {
  /** etcd URL: `etcd://host:port[,host:port][/prefix]`. */
  metadata: string;
  /** This proxy's id among the cluster's proxies. Default `<hostname>-<pid>-<random>`. */
  id?: string;
  /** Use only registered instances of this model (and those registered without one). Default: all. */
  model?: string;
  /** Longest wait before this proxy's load changes are written to etcd (ms). Default 50. */
  loadSyncMs?: number;
}

/** What this proxy publishes about itself. */
export interface ProxyRecord {
  id: string;
  /** Base URL other proxies forward metaserver calls to. */
  url: string;
  /** Host (kernel boot id) and pid: a restarted proxy takes over the id of its dead predecessor at once. */
  bootId: string;
  pid: number;
}

/** One proxy's load on one instance, as shared. */
interface LoadShare {
  tokens: number;
  requests: number;
  /** When the oldest change this value carries happened (sender's clock, ms). */
  at: number;
}

/** What the cluster needs from its proxy. */
export interface ClusterHost {
  pools: Map<Role, InstancePool>;
  /** This proxy's base URL as other proxies reach it. */
  url: string;
  secret?: string;
  metrics: ProxyMetrics;
  /** Deadline of a forwarded metaserver call (the owner answers after the prefill). */
  forwardTimeoutMs: number;
  addInstance(role: Role, url: string): Promise<unknown>;
  removeInstance(url: string, role: Role): unknown;
  log(message: string, fields?: Record<string, unknown>): void;
}

/** Header a forwarded metaserver call carries (the receiver never forwards it again). */
export const FORWARDED_HEADER = 'x-epd-forwarded-by';

/** Shared-load staleness figures (ms) over the last samples. */
export interface StalenessStats {
  samples: number;
  p50: number;
  p99: number;
  max: number;
}

const STALENESS_WINDOW = 4096;

function percentile(sorted: number[], p: number): number {
  return sorted.length === 0 ? 0 : sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
}

/** A proxy's membership in the cluster. Created by {@link EpdProxy.start} with `cluster` options. */
export class ProxyCluster {
  private readonly proxies = new Map<string, string>();
  /** role|url → proxy id → share. */
  private readonly shares = new Map<string, Map<string, LoadShare>>();
  /** Instances this cluster added (static ones are never removed by it). */
  private readonly discovered = new Set<string>();
  private readonly dirty = new Map<Instance, number>();
  private readonly watches: EtcdWatch[] = [];
  private flushTimer: NodeJS.Timeout | undefined;
  private flushing: Promise<void> | null = null;
  private lastFlush = 0;
  private sharingFailed = false;
  private closed = false;
  private readonly staleness: number[] = [];
  private readonly stalenessHistogram: Histogram;
  private readonly loadSyncMs: number;

  private constructor(
    /** This proxy's id. */
    readonly id: string,
    /** The etcd session (its lease carries this proxy's record and load shares). */
    readonly session: EtcdSession,
    private readonly host: ClusterHost,
    private readonly options: ClusterOptions,
  ) {
    this.loadSyncMs = options.loadSyncMs ?? 50;
    this.stalenessHistogram = new Histogram({
      name: 'epd_proxy_shared_load_staleness_seconds',
      help: "Age of another proxy's load share when it arrived here",
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
      registers: [host.metrics.registry],
    });
  }

  /** Connects to etcd, registers the proxy (ERR_NAME_IN_USE when a live proxy has the id), and starts following instances and load. */
  static async join(host: ClusterHost, options: ClusterOptions): Promise<ProxyCluster> {
    const id = options.id ?? `${os.hostname()}-${process.pid}-${randomBytes(3).toString('hex')}`;
    const session = await EtcdSession.connect(options.metadata, options);
    const cluster = new ProxyCluster(id, session, host, options);
    try {
      // The id of a crashed predecessor on this host is taken over at once, not after its lease TTL.
      const record: ProxyRecord = { id, url: host.url, bootId: bootId(), pid: process.pid };
      await session.claim<ProxyRecord>(keyOf('proxies', id), record, (c) => c.value.bootId === record.bootId && c.value.pid !== process.pid && !processAlive(c.value.pid));
      await cluster.follow();
    } catch (err) {
      await cluster.close();
      throw err;
    }
    session.onStatus((s) => host.log(`metadata session ${s.state}`, s.error ? { error: s.error.message } : undefined));
    return cluster;
  }

  /** The other live proxies: id → base URL. */
  peers(): Map<string, string> {
    return new Map([...this.proxies].filter(([id]) => id !== this.id));
  }

  /** How old other proxies' load shares were when they arrived (ms). */
  stalenessStats(): StalenessStats {
    const sorted = [...this.staleness].sort((a, b) => a - b);
    return { samples: sorted.length, p50: percentile(sorted, 0.5), p99: percentile(sorted, 0.99), max: sorted[sorted.length - 1] ?? 0 };
  }

  /** This proxy's load on `instance` changed: share it within `loadSyncMs`. */
  loadChanged(instance: Instance): void {
    if (this.closed) return;
    if (!this.dirty.has(instance)) this.dirty.set(instance, Date.now());
    if (this.flushTimer || this.flushing) return;
    const wait = Math.max(0, this.lastFlush + this.loadSyncMs - Date.now());
    this.flushTimer = setTimeout(() => {
      this.flushTimer = undefined;
      void this.flush();
    }, wait);
    this.flushTimer.unref();
  }

  /**
   * Offers a metaserver call this proxy does not hold to its owner (`owner`, the id
   * from the URL) or, without one, to every other live proxy. Resolves with the
   * first answer that is not 404, or undefined when no proxy holds the request.
   */
  async forwardMetaserver(raw: Buffer, owner: string | undefined, requestId: string, signal: AbortSignal): Promise<{ status: number; body: Buffer } | undefined> {
    const peers = this.peers();
    const targets = owner && peers.has(owner) ? [peers.get(owner)!] : owner === this.id ? [] : [...peers.values()];
    if (targets.length === 0) return undefined;
    const all = new AbortController();
    const onAbort = () => all.abort(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
    const headers: Record<string, string> = { 'content-type': 'application/json', [FORWARDED_HEADER]: this.id, 'x-request-id': requestId };
    if (this.host.secret) headers[SIGNATURE_HEADER] = signBody(this.host.secret, raw);
    try {
      const answers = targets.map(async (url) => {
        try {
          const res = await request(`${url}/v1/metaserver`, {
            method: 'POST',
            body: raw,
            headers,
            signal: all.signal,
            headersTimeout: this.host.forwardTimeoutMs,
            bodyTimeout: this.host.forwardTimeoutMs,
          });
          const body = Buffer.from(await res.body.arrayBuffer());
          if (res.statusCode === 404) return undefined;
          return { status: res.statusCode, body };
        } catch {
          return undefined; // a proxy that cannot be reached does not hold it (or cannot answer for it)
        }
      });
      // The owner is the only one that answers anything but 404: take the first such answer.
      const first = await new Promise<{ status: number; body: Buffer } | undefined>((resolve) => {
        let pending = answers.length;
        for (const a of answers) {
          void a.then((r) => {
            if (r) resolve(r);
            else if (--pending === 0) resolve(undefined);
          });
        }
      });
      return first;
    } finally {
      signal.removeEventListener('abort', onAbort);
      all.abort(new Error('forward settled'));
    }
  }

  /** Leaves the cluster: stops following, revokes the lease (this proxy's record and load shares go at once). Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.flushTimer);
    await Promise.allSettled(this.watches.map((w) => w.cancel()));
    this.host.metrics.registry.removeSingleMetric('epd_proxy_shared_load_staleness_seconds');
    await this.session.close();
  }

  // ------------------------------------------------------------------ internals

  private async follow(): Promise<void> {
    // Proxies.
    const proxies = await this.session.list<ProxyRecord>('proxies/');
    for (const e of proxies.entries) this.proxies.set(e.value.id, e.value.url);
    this.watches.push(
      this.session.watchPrefix<ProxyRecord>(
        'proxies/',
        {
          put: (e) => this.proxies.set(e.value.id, e.value.url),
          delete: (key) => this.proxies.delete(keyParts(key)[1]),
        },
        { startRevision: proxies.revision + 1 },
      ),
    );
    // Instances.
    this.watches.push(
      await watchInstances(this.session, {
        added: (r) => this.instanceAdded(r),
        removed: (role, url) => this.instanceRemoved(role, url),
      }),
    );
    // Load shares of the other proxies.
    const loads = await this.session.list<LoadShare>('load/');
    for (const e of loads.entries) this.shareArrived(e.key, e.value, false);
    this.watches.push(
      this.session.watchPrefix<LoadShare>('load/', { put: (e) => this.shareArrived(e.key, e.value, true), delete: (key) => this.shareGone(key) }, { startRevision: loads.revision + 1 }),
    );
  }

  private instanceAdded(r: InstanceRecord): void {
    if (this.options.model && r.model && r.model !== this.options.model) return;
    let url: string;
    try {
      url = normalizeInstanceUrl(r.url);
    } catch {
      return;
    }
    const role = r.role as Role;
    const known = this.host.pools.get(role)?.get(url);
    if (known && known.state !== 'draining') return;
    this.discovered.add(`${role}|${url}`);
    this.host.log(`${role} instance ${url} registered in etcd`, r.model ? { model: r.model } : undefined);
    this.host.addInstance(role, url).then(
      () => this.applyShares(role, url),
      (err: Error) => this.host.log(`${role} instance ${url}: cannot add (${err.message})`),
    );
  }

  private instanceRemoved(role: Role, rawUrl: string): void {
    let url: string;
    try {
      url = normalizeInstanceUrl(rawUrl);
    } catch {
      return;
    }
    if (!this.discovered.delete(`${role}|${url}`)) return;
    this.host.log(`${role} instance ${url} left etcd: draining`);
    this.host.removeInstance(url, role);
  }

  private parseLoadKey(key: string): { role: Role; url: string; proxy: string } | null {
    const [kind, role, url, proxy] = keyParts(key);
    if (kind !== 'load' || !role || !url || !proxy) return null;
    return { role: role as Role, url, proxy };
  }

  private shareArrived(key: string, share: LoadShare, live: boolean): void {
    const k = this.parseLoadKey(key);
    if (!k || k.proxy === this.id) return;
    if (!(Number.isFinite(share.tokens) && Number.isFinite(share.requests))) return;
    let byProxy = this.shares.get(`${k.role}|${k.url}`);
    if (!byProxy) this.shares.set(`${k.role}|${k.url}`, (byProxy = new Map()));
    byProxy.set(k.proxy, share);
    if (live && Number.isFinite(share.at)) {
      const age = Math.max(0, Date.now() - share.at);
      this.staleness.push(age);
      if (this.staleness.length > STALENESS_WINDOW) this.staleness.shift();
      this.stalenessHistogram.observe(age / 1000);
    }
    this.applyShares(k.role, k.url);
  }

  private shareGone(key: string): void {
    const k = this.parseLoadKey(key);
    if (!k || k.proxy === this.id) return;
    const byProxy = this.shares.get(`${k.role}|${k.url}`);
    if (!byProxy?.delete(k.proxy)) return;
    if (byProxy.size === 0) this.shares.delete(`${k.role}|${k.url}`);
    this.applyShares(k.role, k.url);
  }

  private applyShares(role: Role, url: string): void {
    const pool = this.host.pools.get(role);
    const instance = pool?.get(url);
    if (!pool || !instance) return;
    let tokens = 0;
    let requests = 0;
    for (const s of this.shares.get(`${role}|${url}`)?.values() ?? []) {
      tokens += s.tokens;
      requests += s.requests;
    }
    pool.setShared(instance, tokens, requests);
  }

  /** Writes every changed share in one transaction; changes made meanwhile go in the next one. */
  private flush(): Promise<void> {
    if (this.flushing || this.closed) return this.flushing ?? Promise.resolve();
    const batch = [...this.dirty];
    this.dirty.clear();
    if (batch.length === 0) return Promise.resolve();
    this.lastFlush = Date.now();
    const changes = batch.map(([i, at]) => {
      const key = keyOf('load', i.role, i.url, this.id);
      return [key, i.activeTokens === 0 && i.activeRequests === 0 ? null : ({ tokens: i.activeTokens, requests: i.activeRequests, at } satisfies LoadShare)] as const;
    });
    this.flushing = this.session
      .putMany(changes)
      .then(() => {
        if (this.sharingFailed) this.host.log('sharing load through etcd again');
        this.sharingFailed = false;
      })
      .catch((err: TransferError) => {
        // Keep the oldest change time, so the next write reports its true age.
        for (const [i, at] of batch) if (!this.dirty.has(i)) this.dirty.set(i, at);
        // Once per outage, not once per load change.
        if (!this.sharingFailed) this.host.log('cannot share load through etcd (other proxies see this one\'s last shares until its lease expires)', { error: err.message });
        this.sharingFailed = true;
      })
      .finally(() => {
        this.flushing = null;
        if (this.dirty.size > 0 && !this.closed) this.loadChanged([...this.dirty.keys()][0]);
      });
    return this.flushing;
  }
}
