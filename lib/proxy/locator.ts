/**
 * Where an embedding already is. Before sending a media item to an encoder the
 * proxy asks an {@link EmbeddingLocator}: an item whose embedding consumers can
 * already load skips the encoder entirely; an item only some encoder holds goes to
 * that encoder (a cache hit there costs no encoder compute).
 *
 * The proxy feeds the locator with what encoders report, and forgets an encoder
 * that leaves the pool. The encoder-cache layer (lib/ec) implements this interface
 * over its shared store and directory; {@link MemoryEmbeddingLocator} is the
 * stand-alone version, fed only by encoder responses.
 *
 * A locator answer is a hint, never the truth: the proxy always forwards the media
 * itself to P/PD, so a stale "loadable" answer costs a local encode there, not a
 * failed request.
 */

/** What the locator knows about one item. */
export interface EmbeddingLocation {
  /** P/PD instances can load the embedding without any encoder pass (e.g. a shared store). */
  loadable: boolean;
  /** Encoder instances (base URLs as the proxy knows them) that hold the embedding. */
  encoders: readonly string[];
}

/** What an encoder reported after encoding one item. */
export interface EncodedReport {
  /** The key the proxy sent as the item's `uuid`. */
  itemKey: string;
  /** The `mm_hash`es the encoder says it saved (usually `[itemKey]`). */
  mmHashes: readonly string[];
  /** Base URL of the encoder instance. */
  encoder: string;
  /** The encoder's `ec_transfer_params`, for locators that need more than the hashes. */
  params: Record<string, unknown>;
}

/** The seam between the proxy and an encoder-cache index. */
export interface EmbeddingLocator {
  /** Looks up an item by the key the proxy computed for it (sent as the item's `uuid`). */
  locate(itemKey: string): EmbeddingLocation | undefined | Promise<EmbeddingLocation | undefined>;
  /** Called after an encoder answered 2xx for an item. */
  recordEncoded(report: EncodedReport): void;
  /** Called when an encoder leaves the pool for good (removed and drained). */
  forgetInstance(encoderUrl: string): void;
}

/** Options of {@link MemoryEmbeddingLocator}. */
export interface MemoryEmbeddingLocatorOptions {
  /** Most items remembered; the least recently used are dropped first. Default 100,000. */
  capacity?: number;
  /** Forget an item this long after it was last reported (ms); a proxy cannot see evictions. Default 10 min. */
  ttlMs?: number;
  /**
   * Whether an encoder's 2xx means every P/PD can load the embedding (true with a
   * shared encoder cache, as lib/ec provides on one host). When false, hits only
   * steer the item back to the encoder that holds it. Default true.
   */
  sharedStore?: boolean;
  /** Clock, for tests. */
  now?: () => number;
}

interface MemoryEntry {
  encoders: Set<string>;
  expires: number;
}

/** An in-process locator fed by encoder responses. */
export class MemoryEmbeddingLocator implements EmbeddingLocator {
  // A Map iterates in insertion order: re-inserting on use makes the first key the least recently used.
  private readonly entries = new Map<string, MemoryEntry>();
  private readonly capacity: number;
  private readonly ttlMs: number;
  private readonly sharedStore: boolean;
  private readonly now: () => number;

  constructor(options: MemoryEmbeddingLocatorOptions = {}) {
    this.capacity = options.capacity ?? 100_000;
    this.ttlMs = options.ttlMs ?? 10 * 60_000;
    this.sharedStore = options.sharedStore ?? true;
    this.now = options.now ?? Date.now;
  }

  locate(itemKey: string): EmbeddingLocation | undefined {
    const entry = this.entries.get(itemKey);
    if (!entry) return undefined;
    if (entry.expires <= this.now()) {
      this.entries.delete(itemKey);
      return undefined;
    }
    this.entries.delete(itemKey);
    this.entries.set(itemKey, entry);
    return { loadable: this.sharedStore, encoders: [...entry.encoders] };
  }

  recordEncoded(report: EncodedReport): void {
    // The proxy looks items up by its own key; an encoder that keyed the item differently
    // is still recorded under that key, so the next request with the same media hits.
    for (const key of new Set([report.itemKey, ...report.mmHashes])) this.put(key, report.encoder);
  }

  forgetInstance(encoderUrl: string): void {
    for (const [key, entry] of this.entries) {
      // Conservative even with a shared store: whether the bytes outlive their writer is the store's business.
      if (entry.encoders.delete(encoderUrl) && entry.encoders.size === 0) this.entries.delete(key);
    }
  }

  /** Number of items remembered. */
  get size(): number {
    return this.entries.size;
  }

  private put(key: string, encoder: string): void {
    const entry = this.entries.get(key) ?? { encoders: new Set<string>(), expires: 0 };
    entry.encoders.add(encoder);
    entry.expires = this.now() + this.ttlMs;
    this.entries.delete(key);
    this.entries.set(key, entry);
    while (this.entries.size > this.capacity) this.entries.delete(this.entries.keys().next().value as string);
  }
}
