/**
 * EncoderCacheStore: embeddings keyed by `mmHash`, shared by every process on the
 * host that opens the same store name. Bytes and index live in one POSIX
 * shared-memory object (native/ec_store.cc); see docs/ENCODER_CACHE.md for the
 * layout and the concurrency protocol.
 *
 * ```ts
 * const store = await EncoderCacheStore.open({ name: 'qwen-vl', capacity: '8GiB' });
 * await store.save(key, embedding);                 // encoder process
 * const hit = await store.load(key, region);        // prefill process: one copy, or null on a miss
 * const entry = store.acquire(key);                 // ... or zero-copy, pinned until release()
 * ```
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { Region } from '../engine.js';
import { TransferError } from '../errors.js';
import { native, type NativeEcInfo, type NativeEcStats, type NativeEcStore } from '../native.js';
import { badArgument, expectInteger, expectObject, expectOptionalObject, expectTimeout, parseBytes } from '../validate.js';

/** Options of {@link EncoderCacheStore.open}. */
export interface EncoderCacheStoreOptions {
  /** The store's name on this host, `[A-Za-z0-9._-]{1,64}`: every process opening it shares it. */
  name: string;
  /**
   * Bytes of embeddings it holds (e.g. `"8GiB"`). Given, the store is created when it
   * does not exist yet; an existing store must have been created with the same
   * capacity. Omitted, the store must exist (else `ERR_NOT_FOUND`).
   */
  capacity?: number | string;
  /** Most entries at once. Default capacity / 256 KiB, clamped to [256, 65536]. Creation only. */
  maxEntries?: number;
  /** Entries start at multiples of this (a power of two, 64 B – 2 MiB). Default 4096. Creation only. */
  alignment?: number;
  /** Most processes (store handles) attached at once. Default 128. Creation only. */
  maxProcesses?: number;
  /** Most distinct entries one handle pins at once. Default 1024. Creation only. */
  maxPinsPerProcess?: number;
  /** Deadline of the index lock (and of opening while another process creates the store). Default 2000 ms. */
  lockTimeoutMs?: number;
  /** Touch the whole arena at creation so later saves pay no page faults (commits the memory). Default false. */
  prefault?: boolean;
  /** First remove stores on this host whose every process is dead. Default true. */
  reclaimStale?: boolean;
}

/** A JSON value stored with an entry (at most 256 bytes once serialised), e.g. its shape and dtype. */
export type EntryMeta = null | boolean | number | string | EntryMeta[] | { [key: string]: EntryMeta };

/** Options of {@link EncoderCacheStore.save} and {@link EncoderCacheStore.reserve}. */
export interface SaveOptions {
  /** Stored with the bytes and returned by loads. */
  meta?: EntryMeta;
  /** How long to wait for another process saving the same key. Default 30 000 ms, then ERR_TIMEOUT. */
  timeoutMs?: number;
  /** Stops the wait with ERR_ABORTED. */
  signal?: AbortSignal;
}

/** What a save did: `stored`, or nothing because the key already holds an embedding (single flight). */
export type SaveResult = { stored: true; bytes: number } | { stored: false; reason: 'exists' };

/** A completed load. */
export interface LoadResult {
  /** Bytes copied. */
  bytes: number;
  /** The entry's meta, or undefined. */
  meta: EntryMeta | undefined;
}

/** Where a load copies to: host memory, or a host/external region of an engine (at `offset`). */
export type LoadTarget = ArrayBufferView | ArrayBuffer | Region | { region: Region; offset?: number };

/** Counters of the shared store (all processes together). */
export type EncoderCacheStats = NativeEcStats & { capacity: number };

const encoder = new TextEncoder();

// Zero-copy views are slices of windows over the arena (native/ec_binding.cc):
// window k starts at k GiB and spans up to 4 GiB, so an entry of up to 3 GiB lies
// wholly in window floor(offset / 1 GiB).
const WINDOW_STRIDE = 2 ** 30;
const MAX_VIEW_BYTES = 3 * 2 ** 30;

function encodeMeta(meta: unknown): string {
  if (meta === undefined) return '';
  let json: string | undefined;
  try {
    json = JSON.stringify(meta);
  } catch {
    json = undefined;
  }
  if (json === undefined) badArgument('options.meta', 'a JSON value', meta);
  if (encoder.encode(json).length > 256) badArgument('options.meta', 'a JSON value of at most 256 bytes', meta);
  return json;
}

function decodeMeta(json: string): EntryMeta | undefined {
  return json === '' ? undefined : (JSON.parse(json) as EntryMeta);
}

function expectKey(value: unknown, name = 'mmHash'): string {
  if (typeof value !== 'string' || value.length === 0 || value.length > 255) {
    badArgument(name, 'a non-empty string of at most 255 bytes', value);
  }
  return value;
}

/** The bytes of a source or target: views, ArrayBuffers, host and external regions. */
function bytesOf(value: unknown, name: string): Uint8Array {
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  if (value instanceof Region) {
    if (!value.buffer) {
      throw new TransferError(
        `${name} is a device region; acquire() the entry and copy it with engine.device.write()`,
        'ERR_BACKEND_UNAVAILABLE',
      );
    }
    return value.buffer;
  }
  return badArgument(name, 'a Buffer, TypedArray, DataView, ArrayBuffer or host Region', value);
}

function resolveTarget(target: unknown): { bytes: Uint8Array; offset: number } {
  if (typeof target === 'object' && target !== null && !ArrayBuffer.isView(target) && !(target instanceof ArrayBuffer) && !(target instanceof Region)) {
    const t = target as { region?: unknown; offset?: unknown };
    return {
      bytes: bytesOf(t.region, 'target.region'),
      offset: t.offset === undefined ? 0 : expectInteger(t.offset, 'target.offset'),
    };
  }
  return { bytes: bytesOf(target, 'target'), offset: 0 };
}

/**
 * A zero-copy view of a stored embedding. The entry is pinned — never evicted or
 * reused — until {@link release} (or until `bytes` is garbage collected). Treat
 * `bytes` as read-only and do not use it after release.
 */
export class EncoderCacheEntry {
  private released = false;

  /** @internal */
  constructor(
    private readonly store: EncoderCacheStore,
    private readonly ticket: number,
    /** The key. */
    readonly mmHash: string,
    /** The embedding's bytes, in the shared store. */
    readonly bytes: Buffer,
    /** The meta saved with it. */
    readonly meta: EntryMeta | undefined,
  ) {}

  /** Bytes held. */
  get size(): number {
    return this.bytes.length;
  }

  /** Unpins the entry. Idempotent. */
  release(): void {
    if (this.released) return;
    this.released = true;
    this.store._release(this.ticket, this.bytes);
  }
}

/**
 * A reservation for one key: write the embedding into {@link bytes} (or with
 * {@link write}), then {@link commit} to publish it. Until then no process sees the
 * key; {@link abort} (or the writer's death) frees the space.
 */
export class EncoderCacheWriter {
  private state: 'open' | 'committed' | 'aborted' = 'open';
  private view: Buffer | undefined;

  /** @internal */
  constructor(
    private readonly store: EncoderCacheStore,
    private readonly ticket: number,
    /** The key. */
    readonly mmHash: string,
    /** Reserved size in bytes. */
    readonly size: number,
    private readonly makeView: () => Buffer,
  ) {}

  /** The reserved bytes, writable, in the shared store (entries up to 3 GiB; else ERR_OUT_OF_RANGE). */
  get bytes(): Buffer {
    return (this.view ??= this.makeView());
  }

  /** `open`, `committed` or `aborted`. */
  get status(): 'open' | 'committed' | 'aborted' {
    return this.state;
  }

  /** Copies `source` into the reservation at `offset` (off the JS thread when large). */
  write(source: ArrayBufferView | ArrayBuffer, offset = 0): Promise<void> {
    this.assertOpen();
    const bytes = bytesOf(source, 'source');
    expectInteger(offset, 'offset');
    return this.store._write(this.ticket, offset, bytes);
  }

  /** Publishes the entry: from now on every process finds it. */
  commit(): void {
    this.assertOpen();
    this.store._commit(this.ticket, this);
    this.state = 'committed';
  }

  /** Drops the reservation. Idempotent; a no-op after commit. */
  abort(): void {
    if (this.state !== 'open') return;
    this.state = 'aborted';
    this.store._abort(this.ticket, this);
  }

  private assertOpen(): void {
    if (this.state !== 'open') throw new TransferError(`the reservation for '${this.mmHash}' is ${this.state}`, 'ERR_ABORTED');
  }
}

/** Embeddings by mmHash in host shared memory, shared by every process that opens the same name. */
export class EncoderCacheStore {
  private readonly info: NativeEcInfo;
  private readonly windows: ArrayBuffer[] = [];
  private readonly inflight = new Set<Promise<unknown>>();
  private closing: Promise<void> | null = null;
  // A view that is garbage collected without release()/commit() gives back its pin or reservation.
  private readonly pins = new FinalizationRegistry<number>((ticket) => this.quietly(() => this.native.release(ticket)));
  private readonly reservations = new FinalizationRegistry<number>((ticket) => this.quietly(() => this.native.abort(ticket)));

  private constructor(private readonly native: NativeEcStore) {
    this.info = native.info();
  }

  /** Opens (or creates, given a capacity) the store `options.name` and attaches this process to it. */
  static async open(options: EncoderCacheStoreOptions): Promise<EncoderCacheStore> {
    const o = expectObject(options, 'options') as unknown as EncoderCacheStoreOptions;
    if (typeof o.name !== 'string' || !/^[A-Za-z0-9._-]{1,64}$/.test(o.name) || o.name === '.' || o.name === '..') {
      badArgument('options.name', 'a name of 1–64 characters from [A-Za-z0-9._-]', o.name);
    }
    const opt = (key: keyof EncoderCacheStoreOptions, min: number, max: number) =>
      o[key] === undefined ? undefined : expectInteger(o[key], `options.${key}`, min, max);
    const nativeOptions = {
      capacity: o.capacity === undefined ? undefined : parseBytes(o.capacity, 'options.capacity'),
      maxEntries: opt('maxEntries', 1, 1 << 20),
      alignment: opt('alignment', 64, 2 << 20),
      maxProcesses: opt('maxProcesses', 1, 4096),
      maxPinsPerProcess: opt('maxPinsPerProcess', 1, 65536),
      lockTimeoutMs: o.lockTimeoutMs === undefined ? undefined : Math.ceil(expectTimeout(o.lockTimeoutMs, 'options.lockTimeoutMs')),
      prefault: o.prefault === true,
    };
    if (nativeOptions.alignment !== undefined && (nativeOptions.alignment & (nativeOptions.alignment - 1)) !== 0) {
      badArgument('options.alignment', 'a power of two', nativeOptions.alignment);
    }
    if (o.reclaimStale !== false) native.reclaimStaleEcStores();
    return new EncoderCacheStore(new native.NativeEcStore(o.name, nativeOptions));
  }

  /** Removes stores on this host whose every attached process is dead. Returns how many. */
  static reclaimStale(): number {
    return native.reclaimStaleEcStores();
  }

  /** The store's name. */
  get name(): string {
    return this.info.name;
  }

  /** Bytes of embeddings it can hold (rounded up to the alignment). */
  get capacity(): number {
    return this.info.capacity;
  }

  /** The store's layout, fixed when it was created. */
  get layout(): Readonly<NativeEcInfo> {
    return { ...this.info };
  }

  /** True when the key holds a complete embedding. Neither pins nor counts as a use for LRU. */
  has(mmHash: string): boolean {
    if (typeof mmHash !== 'string') badArgument('mmHash', 'a string', mmHash);
    return this.native.has(mmHash);
  }

  /** Size and meta of a stored embedding, or null. */
  stat(mmHash: string): { bytes: number; meta: EntryMeta | undefined } | null {
    const s = this.native.stat(expectKey(mmHash));
    return s === null ? null : { bytes: s.size, meta: decodeMeta(s.meta) };
  }

  /**
   * Saves `source` under `mmHash` and publishes it once every byte is in place.
   * Concurrent saves of one key — from any process — write once: the others wait
   * for that write and resolve `{ stored: false, reason: 'exists' }`. Rejects with
   * ERR_CAPACITY (nothing stored is lost) when the entry is larger than the store
   * or only pinned entries could make room.
   */
  save(mmHash: string, source: ArrayBufferView | ArrayBuffer | Region, options?: SaveOptions): Promise<SaveResult> {
    const key = expectKey(mmHash);
    const bytes = bytesOf(source, 'source');
    if (bytes.length === 0) badArgument('source', 'at least one byte', source);
    const opts = this.saveOptions(options);
    return this.track(
      (async (): Promise<SaveResult> => {
        const writer = await this.reserveChecked(key, bytes.length, opts);
        if (writer === null) return { stored: false, reason: 'exists' };
        try {
          await writer.write(bytes);
          writer.commit();
        } catch (err) {
          writer.abort();
          throw err;
        }
        return { stored: true, bytes: bytes.length };
      })(),
    );
  }

  /**
   * Reserves `bytes` for `mmHash` so the caller can write the embedding in place
   * (zero-copy). Resolves null when the key already holds an embedding (after
   * waiting for a concurrent writer, as {@link save} does).
   */
  reserve(mmHash: string, bytes: number, options?: SaveOptions): Promise<EncoderCacheWriter | null> {
    const key = expectKey(mmHash);
    const size = expectInteger(bytes, 'bytes', 1);
    return this.track(this.reserveChecked(key, size, this.saveOptions(options)));
  }

  /**
   * Copies the embedding into `target` (one copy, off the JS thread when large).
   * Resolves null on a miss. The entry is pinned while it is copied.
   */
  load(mmHash: string, target: LoadTarget): Promise<LoadResult | null> {
    const key = expectKey(mmHash);
    const { bytes, offset } = resolveTarget(target);
    let started: Promise<{ size: number; meta: string }> | null;
    try {
      started = this.native.load(key, bytes, offset);
    } catch (err) {
      return Promise.reject(err);
    }
    if (started === null) return Promise.resolve(null);
    return this.track(started.then((r) => ({ bytes: r.size, meta: decodeMeta(r.meta) })));
  }

  /** A pinned zero-copy view of the embedding, or null on a miss. Call `release()` when done. */
  acquire(mmHash: string): EncoderCacheEntry | null {
    const r = this.native.acquire(expectKey(mmHash));
    if (r === null) return null;
    let view: Buffer;
    try {
      view = this.view(r.offset, r.size);
    } catch (err) {
      this.native.release(r.ticket);
      throw err;
    }
    this.pins.register(view, r.ticket, view);
    return new EncoderCacheEntry(this, r.ticket, mmHash, view, decodeMeta(r.meta));
  }

  /** Removes the entry; readers holding it keep their view until they release it. False if absent. */
  delete(mmHash: string): boolean {
    return this.native.delete(expectKey(mmHash));
  }

  /** Keys of every stored embedding, least recently used first. */
  keys(): string[] {
    return this.native.keys();
  }

  /** Counters of the shared store. */
  stats(): EncoderCacheStats {
    return { ...this.native.stats(), capacity: this.info.capacity };
  }

  /** Checks every attached process now and releases what dead ones held. Returns how many were dead. */
  recover(): number {
    return this.native.recover();
  }

  /**
   * Waits (up to `timeoutMs`, default 10 s) for this handle's saves and loads, then
   * detaches: its unfinished reservations are dropped and its pins released. The
   * last process to close removes the shared-memory object. Idempotent.
   */
  close(options?: { timeoutMs?: number }): Promise<void> {
    if (this.closing) return this.closing;
    const opts = expectOptionalObject(options, 'options');
    const timeoutMs = opts.timeoutMs === undefined ? 10_000 : expectTimeout(opts.timeoutMs, 'options.timeoutMs');
    this.closing = (async () => {
      if (this.inflight.size > 0) {
        const ac = new AbortController();
        await Promise.race([Promise.allSettled([...this.inflight]), sleep(timeoutMs, undefined, { signal: ac.signal }).catch(() => {})]);
        ac.abort();
      }
      this.native.close();
    })();
    return this.closing;
  }

  /** @internal */
  _write(ticket: number, offset: number, bytes: Uint8Array): Promise<void> {
    return this.native.write(ticket, offset, bytes);
  }

  /** @internal */
  _commit(ticket: number, writer: EncoderCacheWriter): void {
    this.native.commit(ticket);
    this.reservations.unregister(writer);
  }

  /** @internal */
  _abort(ticket: number, writer: EncoderCacheWriter): void {
    this.reservations.unregister(writer);
    this.quietly(() => this.native.abort(ticket));
  }

  /** @internal */
  _release(ticket: number, view: Buffer): void {
    this.pins.unregister(view);
    this.quietly(() => this.native.release(ticket));
  }

  private saveOptions(options: SaveOptions | undefined): { meta: string; timeoutMs: number; signal?: AbortSignal } {
    const o = expectOptionalObject(options, 'options') as SaveOptions;
    if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) badArgument('options.signal', 'an AbortSignal', o.signal);
    return {
      meta: encodeMeta(o.meta),
      timeoutMs: o.timeoutMs === undefined ? 30_000 : expectTimeout(o.timeoutMs, 'options.timeoutMs'),
      signal: o.signal,
    };
  }

  // Single flight across processes: while another live writer holds the key, poll
  // (1 ms doubling to 20 ms) until it publishes (→ null), disappears (→ ours), or
  // the deadline passes.
  private async reserveChecked(key: string, size: number, o: { meta: string; timeoutMs: number; signal?: AbortSignal }): Promise<EncoderCacheWriter | null> {
    const deadline = performance.now() + o.timeoutMs;
    let delay = 1;
    for (;;) {
      if (o.signal?.aborted) throw new TransferError(`save of '${key}' was aborted`, 'ERR_ABORTED');
      const r = this.native.reserve(key, size, o.meta);
      if (r === 'exists') return null;
      if (r !== 'busy') {
        const writer = new EncoderCacheWriter(this, r.ticket, key, size, () => this.view(r.offset, size));
        this.reservations.register(writer, r.ticket, writer);
        return writer;
      }
      const left = deadline - performance.now();
      if (left <= 0) {
        throw new TransferError(`another writer still holds '${key}' after ${o.timeoutMs} ms`, 'ERR_TIMEOUT');
      }
      await sleep(Math.min(delay, left), undefined, o.signal ? { signal: o.signal } : undefined).catch(() => {});
      delay = Math.min(delay * 2, 20);
    }
  }

  private view(offset: number, size: number): Buffer {
    if (size > MAX_VIEW_BYTES) {
      throw new TransferError(`a zero-copy view holds at most 3 GiB; use load() for this ${size}-byte entry`, 'ERR_OUT_OF_RANGE');
    }
    const k = Math.floor(offset / WINDOW_STRIDE);
    const window = (this.windows[k] ??= this.native.arena(k));
    return Buffer.from(window, offset - k * WINDOW_STRIDE, size);
  }

  private track<T>(p: Promise<T>): Promise<T> {
    this.inflight.add(p);
    const done = () => this.inflight.delete(p);
    p.then(done, done);
    return p;
  }

  private quietly(fn: () => void): void {
    try {
      fn();
    } catch {
      // closed: closing released every pin and reservation already
    }
  }
}
