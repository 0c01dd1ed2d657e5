/**
 * ECConnector: vLLM's encoder-cache connector contract, so a serving engine can
 * drive the encoder cache step by step. One instance per role:
 *
 * Scheduler role, once per scheduling step:
 *   1. `hasCacheItem(mmHash)` for each media item about to be scheduled that is not
 *      in the engine's own encoder cache (only those: checking every item every step
 *      costs decode latency, vLLM #32585);
 *   2. `updateStateAfterAlloc(request, index)` after the engine allocated encoder-cache
 *      space for item `index` — items found by step 1 become loads;
 *   3. `buildConnectorMeta()` returns this step's loads and resets the connector.
 *
 * Worker role, per step:
 *   - `saveCaches(mmHash, source)` right after the encoder produced an item (producer);
 *   - `startLoadCaches(meta, destinations)` before the embeddings are gathered
 *     (consumer);
 *   - `getFinished()` at the end of the step: what was saved, loaded, missed or failed
 *     since the last call.
 *
 * A miss is an ordinary outcome (`hasCacheItem` false, or `missed` from a load that
 * raced an eviction): the caller encodes the item locally.
 */
import { TransferError } from '../errors.js';
import { badArgument, expectInteger, expectObject, expectString } from '../validate.js';
import type { EncoderCacheHost, EncoderCacheRemote } from './remote.js';
import { EncoderCacheStore, type EntryMeta, type LoadTarget, type SaveResult } from './store.js';

/** Which of the two vLLM roles an instance plays. */
export type ECConnectorRole = 'scheduler' | 'worker';

/** What the instance does with embeddings (vLLM `ec_role`): produce, consume, or both. */
export type ECTransferRole = 'producer' | 'consumer' | 'both';

/** A multimodal item of a request, as the scheduler sees it. */
export interface ECFeature {
  /** The item's cache key (vLLM `mm_features[i].identifier`). */
  mmHash: string;
  /** Encoder tokens (embeddings) of the item. */
  numTokens: number;
}

/** The parts of a request the connector reads. */
export interface ECRequest {
  requestId: string;
  mmFeatures: readonly ECFeature[];
}

/** One embedding the worker must load this step. */
export interface ECLoadItem {
  mmHash: string;
  numTokens: number;
  /** Requests of this step that use it. */
  requestIds: string[];
  /** Another host's engine to pull from; absent when this host's store has it. */
  holder?: string;
}

/** The scheduler-to-worker payload of one step. */
export interface ECConnectorMetadata {
  readonly items: readonly ECLoadItem[];
}

/** What happened since the previous {@link ECConnector.getFinished}. */
export interface ECFinished {
  /** Keys saved by this worker (or found already saved by another process). */
  saved: string[];
  /** Keys whose save failed, with the error. */
  failedSaves: Array<{ mmHash: string; error: TransferError }>;
  /** Keys loaded into their destinations. */
  loaded: string[];
  /** Keys that were gone when loaded (evicted meanwhile): encode them locally. */
  missed: string[];
  /** Keys whose load failed, with the error. */
  failedLoads: Array<{ mmHash: string; error: TransferError }>;
}

/** Options of {@link ECConnector}. */
export interface ECConnectorOptions {
  role: ECConnectorRole;
  /** This host's shared store. */
  store: EncoderCacheStore;
  /** `producer`, `consumer` or `both` (default). Producers save; consumers check and load. */
  transferRole?: ECTransferRole;
  /** Other hosts: where to look up and pull keys this host lacks. */
  remote?: EncoderCacheRemote;
  /** This host's server: saves are announced at once, so another host finds them when the save resolves. */
  host?: EncoderCacheHost;
  /** Also keep embeddings pulled from other hosts in this host's store. Default true. */
  cacheRemote?: boolean;
}

function expectRequest(value: unknown): ECRequest {
  const r = expectObject(value, 'request');
  expectString(r.requestId, 'request.requestId');
  if (!Array.isArray(r.mmFeatures)) badArgument('request.mmFeatures', 'an array of { mmHash, numTokens }', r.mmFeatures);
  return r as unknown as ECRequest;
}

function toTransferError(err: unknown): TransferError {
  return err instanceof TransferError ? err : new TransferError(String((err as Error)?.message ?? err), 'ERR_SYSTEM', { cause: err });
}

/** vLLM's ECConnector contract over the shared encoder-cache store. */
export class ECConnector {
  /** `scheduler` or `worker`. */
  readonly role: ECConnectorRole;
  /** `producer`, `consumer` or `both`. */
  readonly transferRole: ECTransferRole;

  private readonly store: EncoderCacheStore;
  private readonly remote: EncoderCacheRemote | undefined;
  private readonly host: EncoderCacheHost | undefined;
  private readonly cacheRemote: boolean;
  // Scheduler state of the current step.
  private found = new Map<string, string | null>(); // mmHash -> holder (null: this host)
  private loads = new Map<string, ECLoadItem>();
  // Worker results since the last getFinished().
  private finished: ECFinished = ECConnector.emptyFinished();

  constructor(options: ECConnectorOptions) {
    const o = expectObject(options, 'options') as unknown as ECConnectorOptions;
    if (o.role !== 'scheduler' && o.role !== 'worker') badArgument('options.role', '"scheduler" or "worker"', o.role);
    if (!(o.store instanceof EncoderCacheStore)) badArgument('options.store', 'an EncoderCacheStore', o.store);
    const t = o.transferRole ?? 'both';
    if (t !== 'producer' && t !== 'consumer' && t !== 'both') badArgument('options.transferRole', '"producer", "consumer" or "both"', t);
    this.role = o.role;
    this.transferRole = t;
    this.store = o.store;
    this.remote = o.remote;
    this.host = o.host;
    this.cacheRemote = o.cacheRemote !== false;
  }

  /** True when this instance loads embeddings (vLLM `is_consumer`). */
  get isConsumer(): boolean {
    return this.transferRole !== 'producer';
  }

  /** True when this instance saves embeddings (vLLM `is_producer`). */
  get isProducer(): boolean {
    return this.transferRole !== 'consumer';
  }

  // ----- scheduler role -----

  /**
   * Whether an embedding for `mmHash` exists: in this host's store (answered from
   * shared memory) or, with a remote, on another host (one directory lookup; a
   * directory that fails to answer counts as a miss). True reserves nothing: the
   * item becomes a load only through {@link updateStateAfterAlloc}.
   */
  async hasCacheItem(mmHash: string): Promise<boolean> {
    this.expectRole('scheduler', 'hasCacheItem');
    expectString(mmHash, 'mmHash');
    if (this.store.has(mmHash)) {
      this.found.set(mmHash, null);
      return true;
    }
    if (!this.remote) return false;
    // A directory that cannot answer reads as a miss: the item is encoded here.
    const [holder] = await this.remote.locate(mmHash).catch(() => [] as string[]);
    if (holder === undefined) return false;
    this.found.set(mmHash, holder);
    return true;
  }

  /**
   * Called after encoder-cache space was allocated for `request.mmFeatures[index]`.
   * An item found this step (or present in the store now) is added to the step's
   * loads; any other item is being encoded locally and needs nothing.
   */
  updateStateAfterAlloc(request: ECRequest, index: number): void {
    this.expectRole('scheduler', 'updateStateAfterAlloc');
    const req = expectRequest(request);
    const i = expectInteger(index, 'index', 0, Math.max(0, req.mmFeatures.length - 1));
    if (i >= req.mmFeatures.length) badArgument('index', `an index below ${req.mmFeatures.length}`, index);
    const feature = expectObject(req.mmFeatures[i], `request.mmFeatures[${i}]`) as unknown as ECFeature;
    const mmHash = expectString(feature.mmHash, `request.mmFeatures[${i}].mmHash`);
    const numTokens = expectInteger(feature.numTokens, `request.mmFeatures[${i}].numTokens`, 1);
    if (!this.isConsumer) return; // an encode-only instance never loads
    let holder = this.found.get(mmHash);
    if (holder === undefined) {
      if (!this.store.has(mmHash)) return; // encoded locally: nothing to load
      holder = null;
    }
    const pending = this.loads.get(mmHash);
    if (pending) {
      if (!pending.requestIds.includes(req.requestId)) pending.requestIds.push(req.requestId);
      return;
    }
    this.loads.set(mmHash, holder === null ? { mmHash, numTokens, requestIds: [req.requestId] } : { mmHash, numTokens, requestIds: [req.requestId], holder });
  }

  /** This step's loads, then a reset: the next step starts empty. */
  buildConnectorMeta(): ECConnectorMetadata {
    this.expectRole('scheduler', 'buildConnectorMeta');
    const meta: ECConnectorMetadata = Object.freeze({ items: Object.freeze([...this.loads.values()].map((it) => Object.freeze({ ...it, requestIds: [...it.requestIds] }))) });
    this.loads = new Map();
    this.found = new Map();
    return meta;
  }

  // ----- worker role -----

  /**
   * Saves the embedding the encoder just produced. Resolves once it is visible to
   * every process on this host (and announced, with a host). Concurrent saves of a
   * key write once; an existing key counts as saved.
   */
  async saveCaches(mmHash: string, source: ArrayBufferView | ArrayBuffer, options?: { meta?: EntryMeta }): Promise<SaveResult> {
    this.expectRole('worker', 'saveCaches');
    if (!this.isProducer) throw new TransferError('saveCaches needs transferRole "producer" or "both"', 'ERR_BAD_ARGUMENT');
    expectString(mmHash, 'mmHash');
    try {
      const r = await this.store.save(mmHash, source, options?.meta === undefined ? undefined : { meta: options.meta });
      await this.host?.announce([mmHash]).catch(() => {});
      this.finished.saved.push(mmHash);
      return r;
    } catch (err) {
      const error = toTransferError(err);
      this.finished.failedSaves.push({ mmHash, error });
      throw error;
    }
  }

  /**
   * Starts loading every item of `meta` into its destination (keyed by mmHash).
   * Checks every destination before anything starts. Resolves when all loads of
   * this call settled; per-item outcomes go to {@link getFinished} (a load never
   * rejects the whole step).
   */
  startLoadCaches(meta: ECConnectorMetadata, destinations: ReadonlyMap<string, LoadTarget> | Record<string, LoadTarget>): Promise<void> {
    this.expectRole('worker', 'startLoadCaches');
    if (!this.isConsumer) throw new TransferError('startLoadCaches needs transferRole "consumer" or "both"', 'ERR_BAD_ARGUMENT');
    const m = expectObject(meta, 'meta');
    if (!Array.isArray(m.items)) badArgument('meta.items', 'an array of load items', m.items);
    const dest = expectObject(destinations, 'destinations');
    const lookup = destinations instanceof Map ? (k: string) => destinations.get(k) : (k: string) => (Object.hasOwn(dest, k) ? dest[k] : undefined);
    const plan = (m.items as ECLoadItem[]).map((item, i) => {
      const it = expectObject(item, `meta.items[${i}]`) as unknown as ECLoadItem;
      const key = expectString(it.mmHash, `meta.items[${i}].mmHash`);
      const target = lookup(key) as LoadTarget | undefined;
      if (target === undefined || target === null) badArgument(`destinations['${key}']`, 'a load target', target);
      if (it.holder !== undefined) expectString(it.holder, `meta.items[${i}].holder`);
      return { key, holder: it.holder, target };
    });
    return Promise.all(plan.map((p) => this.loadOne(p.key, p.holder, p.target))).then(() => undefined);
  }

  /** Drains what finished since the last call. */
  getFinished(): ECFinished {
    this.expectRole('worker', 'getFinished');
    const out = this.finished;
    this.finished = ECConnector.emptyFinished();
    return out;
  }

  private async loadOne(mmHash: string, holder: string | undefined, target: LoadTarget): Promise<void> {
    try {
      let hit = holder === undefined ? await this.store.load(mmHash, target) : null;
      if (!hit && this.remote) {
        // A remote item, or a local one evicted since the check: ask the other hosts.
        const pulled = holder !== undefined ? await this.remote.pull(holder, mmHash, target).catch(() => null) : null;
        hit = pulled ?? (await this.remote.fetch(mmHash, target));
        if (hit && this.cacheRemote) await this.keepLocally(mmHash, target, hit.bytes, hit.meta);
      }
      if (hit) this.finished.loaded.push(mmHash);
      else this.finished.missed.push(mmHash);
    } catch (err) {
      this.finished.failedLoads.push({ mmHash, error: toTransferError(err) });
    }
  }

  // A pulled embedding also serves this host's other processes from now on.
  private async keepLocally(mmHash: string, target: LoadTarget, bytes: number, meta: EntryMeta | undefined): Promise<void> {
    const view = targetView(target);
    if (!view) return;
    await this.store.save(mmHash, view.subarray(0, bytes), meta === undefined ? undefined : { meta }).catch(() => {});
  }

  private expectRole(role: ECConnectorRole, method: string): void {
    if (this.role !== role) {
      throw new TransferError(`${method} belongs to the ${role} role; this connector is a ${this.role}`, 'ERR_BAD_ARGUMENT');
    }
  }

  private static emptyFinished(): ECFinished {
    return { saved: [], failedSaves: [], loaded: [], missed: [], failedLoads: [] };
  }
}

function targetView(target: LoadTarget): Uint8Array | null {
  if (ArrayBuffer.isView(target)) return new Uint8Array(target.buffer, target.byteOffset, target.byteLength);
  if (target instanceof ArrayBuffer) return new Uint8Array(target);
  const region = 'region' in target ? target.region : target;
  const offset = 'region' in target ? (target.offset ?? 0) : 0;
  return region.buffer ? region.buffer.subarray(offset) : null;
}
