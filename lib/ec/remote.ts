/**
 * Encoder cache across hosts. A host that holds embeddings serves them with an
 * {@link EncoderCacheHost} on its engine; a consumer elsewhere finds holders in the
 * {@link EncoderCacheDirectory} and pulls with an {@link EncoderCacheRemote}.
 *
 * Pull protocol (control request {@link FETCH_TOPIC} on the engine's control
 * connection, bytes on the engine's transport):
 *
 *   consumer → holder   { mmHash, address, region, offset, length }
 *   holder              pins the entry, registers its bytes, connects back to
 *                       `address` (which must be the asking engine) and writes the
 *                       entry into the consumer's `region` at `offset` — one
 *                       one-sided transfer straight out of the shared store
 *   holder → consumer   { found: true, bytes, meta }  (after the last byte landed)
 *                       or { found: false } — a miss, not an error
 *
 * The consumer names the destination and the holder moves the bytes. That keeps the
 * pin local to the holder for exactly the length of the write (a consumer that dies
 * mid-pull leaves nothing pinned), and needs nothing from the transport beyond
 * writing from registered memory.
 */
import { TransferEngine, Region } from '../engine.js';
import { TransferError, isTransferError } from '../errors.js';
import type { RequestContext } from '../meta/handshake.js';
import { badArgument, expectInteger, expectObject, expectOptionalObject, expectString, expectTimeout } from '../validate.js';
import type { EncoderCacheDirectory } from './directory.js';
import type { EncoderCacheStore, EntryMeta, LoadResult, LoadTarget } from './store.js';

/** Control-request topic of a pull. */
export const FETCH_TOPIC = 'epd.ec.fetch';
/** Control-request topic asking a holder for an entry's size and meta. */
export const STAT_TOPIC = 'epd.ec.stat';

/** Options of {@link EncoderCacheHost.serve}. */
export interface EncoderCacheHostOptions {
  /** Where to announce the store's keys. Without one the host only answers pulls. */
  directory?: EncoderCacheDirectory;
  /** How often the store is listed to announce new keys and withdraw evicted ones. Default 1000 ms. */
  syncIntervalMs?: number;
  /** Deadline of one write into a consumer. Default 30 000 ms. */
  writeTimeoutMs?: number;
}

interface FetchRequest {
  mmHash: string;
  address: string;
  region: number;
  offset: number;
  length: number;
}

function parseFetch(body: unknown): FetchRequest {
  const b = expectObject(body, 'request');
  return {
    mmHash: expectString(b.mmHash, 'mmHash'),
    address: expectString(b.address, 'address'),
    region: expectInteger(b.region, 'region', 1, 0xffffffff),
    offset: expectInteger(b.offset, 'offset'),
    length: expectInteger(b.length, 'length', 1),
  };
}

/** Serves a host's store to consumers on other hosts, and keeps the directory told. */
export class EncoderCacheHost {
  private announced = new Set<string>();
  private timer: NodeJS.Timeout | undefined;
  private syncing: Promise<void> | null = null;
  private readonly unhandle: Array<() => void> = [];
  private closed = false;

  private constructor(
    private readonly engine: TransferEngine,
    private readonly store: EncoderCacheStore,
    private readonly directory: EncoderCacheDirectory | undefined,
    private readonly writeTimeoutMs: number,
  ) {}

  /**
   * Answers pulls of `store`'s entries through `engine` (which must listen), and,
   * with a directory, announces the store's keys now and every `syncIntervalMs`.
   */
  static async serve(engine: TransferEngine, store: EncoderCacheStore, options?: EncoderCacheHostOptions): Promise<EncoderCacheHost> {
    if (!(engine instanceof TransferEngine)) badArgument('engine', 'a TransferEngine', engine);
    if (!engine.address) throw new TransferError('the engine does not listen; open it with listen: true to serve pulls', 'ERR_BAD_ARGUMENT');
    const o = expectOptionalObject(options, 'options') as EncoderCacheHostOptions;
    const interval = o.syncIntervalMs === undefined ? 1_000 : expectTimeout(o.syncIntervalMs, 'options.syncIntervalMs');
    const writeTimeoutMs = o.writeTimeoutMs === undefined ? 30_000 : expectTimeout(o.writeTimeoutMs, 'options.writeTimeoutMs');
    const host = new EncoderCacheHost(engine, store, o.directory, writeTimeoutMs);
    host.unhandle.push(engine.handle(FETCH_TOPIC, (body, ctx) => host.serveFetch(body, ctx)));
    host.unhandle.push(
      engine.handle(STAT_TOPIC, (body) => {
        const s = store.stat(expectString(expectObject(body, 'request').mmHash, 'mmHash'));
        return s === null ? { found: false } : { found: true, bytes: s.bytes, meta: s.meta ?? null };
      }),
    );
    if (o.directory) {
      try {
        await host.sync();
      } catch (err) {
        await host.close();
        throw err;
      }
      host.timer = setInterval(() => host.sync().catch(() => {}), interval);
      host.timer.unref();
    }
    return host;
  }

  /** The control address consumers pull from. */
  get address(): string {
    return this.engine.address!;
  }

  /** Announces keys at once (e.g. right after a save) instead of at the next sync. */
  async announce(mmHashes: readonly string[]): Promise<void> {
    if (!this.directory || this.closed) return;
    const fresh = mmHashes.filter((k) => !this.announced.has(k));
    if (fresh.length === 0) return;
    await this.directory.announce(this.address, fresh);
    for (const k of fresh) this.announced.add(k);
  }

  /** Lists the store now: announces keys it gained, withdraws keys it lost (evicted, deleted). */
  sync(): Promise<void> {
    if (!this.directory || this.closed) return Promise.resolve();
    if (this.syncing) return this.syncing;
    const directory = this.directory;
    this.syncing = (async () => {
      const now = new Set(this.store.keys());
      const added = [...now].filter((k) => !this.announced.has(k));
      const gone = [...this.announced].filter((k) => !now.has(k));
      if (added.length > 0) await directory.announce(this.address, added);
      for (const k of added) this.announced.add(k);
      if (gone.length > 0) await directory.withdraw(this.address, gone);
      for (const k of gone) this.announced.delete(k);
    })().finally(() => {
      this.syncing = null;
    });
    return this.syncing;
  }

  /** Stops serving and withdraws this host from the directory (best effort). Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.timer);
    for (const off of this.unhandle) off();
    await this.syncing?.catch(() => {});
    if (this.directory) await this.directory.forget(this.address).catch(() => {});
    this.announced.clear();
  }

  private async serveFetch(body: unknown, ctx: RequestContext): Promise<unknown> {
    const req = parseFetch(body);
    const entry = this.store.acquire(req.mmHash);
    if (entry === null) return { found: false };
    try {
      if (entry.size > req.length) {
        throw new TransferError(`'${req.mmHash}' holds ${entry.size} bytes; the target has room for ${req.length}`, 'ERR_OUT_OF_RANGE');
      }
      const peer = await this.engine.connect(req.address);
      // Write only into the engine that asked: a request cannot aim our bytes at a third party.
      if (peer.name !== ctx.peer) {
        throw new TransferError(`target ${req.address} is engine '${peer.name}', not the requester '${ctx.peer}'`, 'ERR_BAD_ARGUMENT');
      }
      const local = this.engine.register(entry.bytes);
      try {
        await this.engine.write(
          peer,
          [{ localRegion: local, localOffset: 0, remoteRegion: req.region, remoteOffset: req.offset, length: entry.size }],
          { timeoutMs: this.writeTimeoutMs },
        );
      } finally {
        await local.free();
      }
      return { found: true, bytes: entry.size, meta: entry.meta ?? null };
    } finally {
      entry.release();
    }
  }
}

/** A remote pull's result: a load, plus who served it. */
export type PullResult = LoadResult & { holder: string };

/** Pulls embeddings from holders on other hosts into this engine's regions. */
export class EncoderCacheRemote {
  private readonly timeoutMs: number;

  /**
   * @param engine this side's engine; it must listen, because the holder connects
   *   back to it to write.
   * @param directory where holders are found.
   */
  constructor(
    readonly engine: TransferEngine,
    readonly directory: EncoderCacheDirectory,
    options?: { timeoutMs?: number },
  ) {
    if (!(engine instanceof TransferEngine)) badArgument('engine', 'a TransferEngine', engine);
    if (typeof directory !== 'object' || directory === null || typeof directory.locate !== 'function') {
      badArgument('directory', 'an EncoderCacheDirectory', directory);
    }
    const o = expectOptionalObject(options, 'options');
    this.timeoutMs = o.timeoutMs === undefined ? 30_000 : expectTimeout(o.timeoutMs, 'options.timeoutMs');
  }

  /** Holders of `mmHash` other than this engine, best first. */
  async locate(mmHash: string): Promise<string[]> {
    const holders = await this.directory.locate(expectString(mmHash, 'mmHash'));
    return holders.filter((h) => h !== this.engine.address);
  }

  /** Size and meta of `mmHash` at `holder`, or null when it does not have it. */
  async stat(holder: string, mmHash: string): Promise<{ bytes: number; meta: EntryMeta | undefined } | null> {
    const peer = await this.engine.connect(expectString(holder, 'holder'));
    const r = (await peer.request(STAT_TOPIC, { mmHash: expectString(mmHash, 'mmHash') }, { timeoutMs: this.timeoutMs })) as {
      found?: boolean;
      bytes?: number;
      meta?: EntryMeta;
    };
    return r?.found === true && typeof r.bytes === 'number' ? { bytes: r.bytes, meta: r.meta ?? undefined } : null;
  }

  /**
   * Pulls `mmHash` from `holder` into `target`. A host region of this engine is
   * written directly by the holder; any other target is filled through a staging
   * region (one extra copy). Resolves null when the holder does not have it.
   */
  async pull(holder: string, mmHash: string, target: LoadTarget): Promise<PullResult | null> {
    expectString(holder, 'holder');
    expectString(mmHash, 'mmHash');
    const address = this.engine.address;
    if (!address) throw new TransferError('the engine does not listen; a holder cannot connect back to write', 'ERR_BAD_ARGUMENT');
    const direct = directRegion(target);
    if (direct) return this.pullInto(holder, address, mmHash, direct.region, direct.offset, direct.region.length - direct.offset);
    const { bytes, offset } = hostBytes(target);
    const room = bytes.length - offset;
    if (room <= 0) badArgument('target', 'room for at least one byte', target);
    const staging = this.engine.allocate(room);
    try {
      const r = await this.pullInto(holder, address, mmHash, staging, 0, room);
      if (r) bytes.set(staging.buffer!.subarray(0, r.bytes), offset);
      return r;
    } finally {
      await staging.free();
    }
  }

  /**
   * Finds a holder and pulls from it. Holders that fail (gone, stale) are withdrawn
   * from the directory and the next one is tried; resolves null when none has it.
   */
  async fetch(mmHash: string, target: LoadTarget): Promise<PullResult | null> {
    for (const holder of await this.locate(mmHash)) {
      try {
        const r = await this.pull(holder, mmHash, target);
        if (r) return r;
        await this.directory.withdraw(holder, [mmHash]).catch(() => {});
      } catch (err) {
        if (!isTransferError(err) || !UNREACHABLE.has(err.code)) throw err;
        await this.directory.forget(holder).catch(() => {});
      }
    }
    return null;
  }

  private async pullInto(holder: string, address: string, mmHash: string, region: Region, offset: number, length: number): Promise<PullResult | null> {
    if (length <= 0) throw new TransferError(`offset ${offset} leaves no room in a region of ${region.length} bytes`, 'ERR_OUT_OF_RANGE');
    const peer = await this.engine.connect(holder, { timeoutMs: Math.min(this.timeoutMs, 5_000) });
    const r = (await peer.request(FETCH_TOPIC, { mmHash, address, region: region.id, offset, length }, { timeoutMs: this.timeoutMs })) as {
      found?: boolean;
      bytes?: number;
      meta?: EntryMeta;
    };
    if (r?.found !== true) return null;
    if (typeof r.bytes !== 'number' || r.bytes > length) {
      throw new TransferError(`holder ${holder} answered a pull of '${mmHash}' with a malformed reply`, 'ERR_PROTOCOL');
    }
    return { bytes: r.bytes, meta: r.meta ?? undefined, holder };
  }
}

/** Errors after which a holder is treated as gone. */
const UNREACHABLE = new Set(['ERR_CONNECT', 'ERR_PEER_LOST', 'ERR_TIMEOUT', 'ERR_CLOSED', 'ERR_NO_HANDLER', 'ERR_BACKEND_UNAVAILABLE']);

function directRegion(target: unknown): { region: Region; offset: number } | null {
  if (target instanceof Region) return target.kind === 'host' ? { region: target, offset: 0 } : null;
  if (typeof target === 'object' && target !== null && (target as { region?: unknown }).region instanceof Region) {
    const t = target as { region: Region; offset?: unknown };
    const offset = t.offset === undefined ? 0 : expectInteger(t.offset, 'target.offset');
    return t.region.kind === 'host' ? { region: t.region, offset } : null;
  }
  return null;
}

function hostBytes(target: unknown): { bytes: Uint8Array; offset: number } {
  let view: unknown = target;
  let offset = 0;
  if (typeof target === 'object' && target !== null && (target as { region?: unknown }).region instanceof Region) {
    view = (target as { region: Region }).region;
    const o = (target as { offset?: unknown }).offset;
    offset = o === undefined ? 0 : expectInteger(o, 'target.offset');
  }
  if (view instanceof Region) {
    if (!view.buffer) throw new TransferError('target is a device region; pull into a host region and copy it', 'ERR_BACKEND_UNAVAILABLE');
    return { bytes: view.buffer, offset };
  }
  if (ArrayBuffer.isView(view)) return { bytes: new Uint8Array(view.buffer, view.byteOffset, view.byteLength), offset };
  if (view instanceof ArrayBuffer) return { bytes: new Uint8Array(view), offset };
  return badArgument('target', 'a Buffer, TypedArray, ArrayBuffer or Region', target);
}
