/**
 * Instances of each role and their load. Every role has its own pool: a
 * least-loaded priority queue on active tokens (ties go to the instance picked
 * longest ago, so idle instances take turns). A {@link Lease} holds an instance's
 * load for one hop and gives it back exactly once, whatever path the request takes.
 */
import { TransferError } from '../errors.js';
import { IndexedHeap, type HeapSlot } from './heap.js';

/** The roles of a disaggregated deployment. `pd` is a combined prefill+decode instance. */
export const ROLES = ['encode', 'prefill', 'decode', 'pd'] as const;
/** One of {@link ROLES}. */
export type Role = (typeof ROLES)[number];

/**
 * - `probing`: added, not yet checked; not routable.
 * - `healthy`: routable.
 * - `unhealthy`: failing health checks; not routable, still probed, comes back when healthy.
 * - `draining`: removed by an operator; not routable; forgotten when its last request ends.
 */
export type InstanceState = 'probing' | 'healthy' | 'unhealthy' | 'draining';

/** A snapshot of one instance, as GET /instances shows it. */
export interface InstanceInfo {
  url: string;
  role: Role;
  state: InstanceState;
  activeTokens: number;
  activeRequests: number;
  /** Tokens other proxies have in flight on it, as last shared through etcd (cluster mode only). */
  sharedTokens?: number;
  /** Requests other proxies have in flight on it (cluster mode only). */
  sharedRequests?: number;
  lastError?: string;
}

/** Parses "http://host:port[/base]" or "host:port" into a canonical base URL without a trailing slash. */
export function normalizeInstanceUrl(value: string): string {
  const raw = value.trim();
  const withScheme = /^[a-z][a-z0-9+.-]*:\/\//i.test(raw) ? raw : `http://${raw}`;
  let url: URL;
  try {
    url = new URL(withScheme);
  } catch {
    throw new TransferError(`Expected an instance URL like http://127.0.0.1:8100 but received ${JSON.stringify(value)}`, 'ERR_BAD_ARGUMENT');
  }
  if ((url.protocol !== 'http:' && url.protocol !== 'https:') || !url.hostname || url.search || url.hash || url.username) {
    throw new TransferError(`Expected an http(s) instance URL without query, fragment or credentials but received ${JSON.stringify(value)}`, 'ERR_BAD_ARGUMENT');
  }
  return `${url.origin}${url.pathname.replace(/\/+$/, '')}`;
}

/** One upstream instance. */
export class Instance implements HeapSlot {
  heapIndex = -1;
  state: InstanceState = 'probing';
  activeTokens = 0;
  activeRequests = 0;
  /** Load other proxies reported through the metadata service (cluster mode); approximate, see docs/PROXY.md. */
  sharedTokens = 0;
  sharedRequests = 0;
  /** Pick order: among equal loads the instance picked longest ago goes first. */
  lastPicked = 0;
  consecutiveFailures = 0;
  consecutiveSuccesses = 0;
  lastError?: string;
  /** `http://host:port`, what undici dispatches to. */
  readonly origin: string;
  /** Path prefix in front of every API path ('' for most deployments). */
  readonly basePath: string;

  constructor(
    readonly role: Role,
    /** Canonical base URL; the instance's identity. */
    readonly url: string,
  ) {
    const u = new URL(url);
    this.origin = u.origin;
    this.basePath = u.pathname === '/' ? '' : u.pathname;
  }

  get routable(): boolean {
    return this.state === 'healthy';
  }

  info(): InstanceInfo {
    return {
      url: this.url,
      role: this.role,
      state: this.state,
      activeTokens: this.activeTokens,
      activeRequests: this.activeRequests,
      ...(this.sharedTokens !== 0 || this.sharedRequests !== 0 ? { sharedTokens: this.sharedTokens, sharedRequests: this.sharedRequests } : {}),
      ...(this.lastError === undefined ? {} : { lastError: this.lastError }),
    };
  }
}

/** Load held on an instance for one hop. `release()` is idempotent. */
export class Lease {
  private released = false;

  constructor(
    private readonly pool: InstancePool,
    readonly instance: Instance,
    readonly tokens: number,
  ) {}

  release(): void {
    if (this.released) return;
    this.released = true;
    this.pool.unload(this);
  }
}

/** Ordering of the least-loaded queue: this proxy's load plus what other proxies shared. */
function lessLoaded(a: Instance, b: Instance): boolean {
  const at = a.activeTokens + a.sharedTokens;
  const bt = b.activeTokens + b.sharedTokens;
  if (at !== bt) return at < bt;
  const ar = a.activeRequests + a.sharedRequests;
  const br = b.activeRequests + b.sharedRequests;
  if (ar !== br) return ar < br;
  return a.lastPicked < b.lastPicked;
}

/** Constraints of one pick from a pool. */
export interface PickOptions {
  /** Instances already tried by this request (a retry goes elsewhere). */
  exclude?: ReadonlySet<Instance>;
  /** Preferred instances (e.g. encoders that already hold an embedding); used when one is routable. */
  prefer?: ReadonlySet<string>;
}

/** The instances of one role. */
export class InstancePool {
  private readonly byUrl = new Map<string, Instance>();
  private readonly routable = new IndexedHeap<Instance>(lessLoaded);
  private pickSeq = 0;

  constructor(
    readonly role: Role,
    /** Called when an instance leaves the pool for good (drained). */
    private readonly onGone: (instance: Instance) => void = () => {},
    /** Called after this proxy's load on an instance changed (a lease taken or released). */
    private readonly onLoad: (instance: Instance) => void = () => {},
  ) {}

  /** Adds an instance in state `probing`, or revives a draining one. Returns it and whether it is new. */
  add(url: string): { instance: Instance; added: boolean } {
    const canonical = normalizeInstanceUrl(url);
    const existing = this.byUrl.get(canonical);
    if (existing) {
      if (existing.state === 'draining') existing.state = 'probing';
      return { instance: existing, added: false };
    }
    const instance = new Instance(this.role, canonical);
    this.byUrl.set(canonical, instance);
    return { instance, added: true };
  }

  /**
   * Stops routing to an instance; it is forgotten once its in-flight requests end
   * (immediately when it has none). Returns it, or undefined when unknown.
   */
  remove(url: string): Instance | undefined {
    const instance = this.byUrl.get(normalizeInstanceUrl(url));
    if (!instance) return undefined;
    instance.state = 'draining';
    this.routable.remove(instance);
    this.forgetIfDrained(instance);
    return instance;
  }

  get(url: string): Instance | undefined {
    return this.byUrl.get(url);
  }

  /** Moves an instance between healthy and unhealthy. Draining instances stay draining. Returns true on a change. */
  setHealthy(instance: Instance, healthy: boolean): boolean {
    if (instance.state === 'draining' || this.byUrl.get(instance.url) !== instance) return false;
    const next: InstanceState = healthy ? 'healthy' : 'unhealthy';
    if (instance.state === next) return false;
    instance.state = next;
    if (healthy) this.routable.push(instance);
    else this.routable.remove(instance);
    return true;
  }

  /**
   * Picks the least-loaded routable instance and charges it `tokens`. Returns
   * undefined when none is routable (after `exclude`).
   */
  lease(tokens: number, options: PickOptions = {}): Lease | undefined {
    const instance = this.pick(options);
    if (!instance) return undefined;
    instance.lastPicked = ++this.pickSeq;
    instance.activeTokens += tokens;
    instance.activeRequests += 1;
    this.routable.update(instance);
    this.onLoad(instance);
    return new Lease(this, instance, tokens);
  }

  /** @internal Called by Lease.release(). */
  unload(lease: Lease): void {
    const instance = lease.instance;
    instance.activeTokens -= lease.tokens;
    instance.activeRequests -= 1;
    this.routable.update(instance);
    this.onLoad(instance);
    this.forgetIfDrained(instance);
  }

  /** Sets the load other proxies hold on `instance` (cluster mode) and restores the queue order. */
  setShared(instance: Instance, tokens: number, requests: number): void {
    instance.sharedTokens = tokens;
    instance.sharedRequests = requests;
    this.routable.update(instance);
  }

  /** Every instance, draining ones included. */
  list(): Instance[] {
    return [...this.byUrl.values()];
  }

  get routableCount(): number {
    return this.routable.size;
  }

  get size(): number {
    return this.byUrl.size;
  }

  private pick({ exclude, prefer }: PickOptions): Instance | undefined {
    const top = this.routable.peek();
    if (!top) return undefined;
    if (prefer && prefer.size > 0) {
      const preferred = this.scan((i) => prefer.has(i.url) && !exclude?.has(i));
      if (preferred) return preferred;
    }
    if (!exclude || !exclude.has(top)) return top;
    return this.scan((i) => !exclude.has(i));
  }

  /** Least-loaded routable instance that passes `ok`; a linear scan, used only off the common path. */
  private scan(ok: (i: Instance) => boolean): Instance | undefined {
    let best: Instance | undefined;
    for (const i of this.routable.values()) if (ok(i) && (!best || lessLoaded(i, best))) best = i;
    return best;
  }

  private forgetIfDrained(instance: Instance): void {
    if (instance.state !== 'draining' || instance.activeRequests > 0 || this.byUrl.get(instance.url) !== instance) return;
    this.byUrl.delete(instance.url);
    this.onGone(instance);
  }
}
