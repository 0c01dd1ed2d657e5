/**
 * LayerwiseReceiver — the decode side of the layerwise push.
 *
 * Decode allocates blocks for a request, calls `expect()` and only then publishes
 * its block ids (decode-first flow); prefill engines connect and write the layers
 * straight into those blocks. The receiver answers their control messages: it
 * grants byte credit, checks that every chunk of every layer lands in the
 * request's own blocks and in order, verifies checksums when the sender sends
 * them, emits per-layer arrival events, and resolves the request once DONE came
 * from the expected number of distinct senders. On failure or at the deadline it
 * rejects with the request's invalid block ids.
 *
 * ```ts
 * const receiver = new LayerwiseReceiver(engine, layout);
 * const ready = receiver.expect(requestId, { blocks, senders: 1, deadlineMs: 30_000 });
 * // … publish blocks to the proxy's metaserver …
 * try { await ready; startDecoding(); } catch (err) { recompute(err.invalidBlockIds); }
 * ```
 */
import { EventEmitter } from 'node:events';
import type { PeerLostEvent, TransferEngine } from '../engine.js';
import { TransferError, type ErrorCode } from '../errors.js';
import type { RequestContext } from '../meta/handshake.js';
import { badArgument, expectInteger, expectObject, expectOptionalObject, expectString, expectTimeout } from '../validate.js';
import { RegionReader } from './checksum.js';
import { KvLayout } from './layout.js';
import { blockRuns, expandBlockIds } from './plan.js';
import {
  KV_PROTOCOL_VERSION,
  KvRequestError,
  protocolError,
  remoteCode,
  TOPIC_DONE,
  TOPIC_FAILED,
  TOPIC_HELLO,
  TOPIC_LAYER,
  type HelloReply,
  type LayerReply,
  type OutcomeReply,
  type Refusal,
} from './protocol.js';
import type { KvTracer } from './trace.js';

/** Options of {@link LayerwiseReceiver}. */
export interface LayerwiseReceiverOptions {
  /** Credit per sender: bytes it may have written and not yet had acknowledged. Default 256 MiB. */
  windowBytes?: number;
  /** Refuse layers that arrive without a checksum. Default false (verify when present). */
  requireIntegrity?: boolean;
  /**
   * After a request failed, how long {@link LayerwiseReceiver.settled} waits at most
   * for its senders to confirm they stopped writing. Default 30 000 ms.
   */
  quiesceMs?: number;
  trace?: KvTracer;
}

/** Options of {@link LayerwiseReceiver.expect}. */
export interface KvExpectOptions {
  /** Decode block ids allocated for the request, in token order. */
  blocks: readonly number[];
  /** Distinct senders whose DONE completes the request. Default 1. */
  senders?: number;
  /** The request fails with ERR_TIMEOUT if not complete by then (ms from now). */
  deadlineMs: number;
  /** Tokens decode already holds (its prefix hit; a multiple of the block size). Default 0. */
  cachedTokens?: number;
}

/** A completed receive. */
export interface KvReceiveResult {
  requestId: string;
  /** The senders whose DONE completed it. */
  senders: string[];
  /** (layer, chunk) pieces received. */
  chunks: number;
  /** Pieces whose checksum was verified. */
  verifiedChunks: number;
}

/** Emitted as `'layer'` when every expected sender delivered a layer's final chunk. */
export interface KvLayerEvent {
  requestId: string;
  layer: number;
}

/** Counters of a receiver. */
export interface LayerwiseReceiverStats {
  requestsPending: number;
  requestsDone: number;
  requestsFailed: number;
  /** Bytes senders reported written (acknowledged batches). */
  bytesReceived: number;
  /** Batch notices dropped as repeats. */
  duplicates: number;
  checksumFailures: number;
}

interface SenderInfo {
  session: string;
  /** The control connection its hello came on (engine session id). */
  connection: string | undefined;
  blockSize: number;
  ratio: number;
  lastSeq: number;
}

interface SenderProgress {
  /** Per layer: the logical block the next chunk must start at. */
  next: Array<number | undefined>;
  chunks: number;
}

interface RequestState {
  id: string;
  blocks: number[];
  senders: number;
  cachedTokens: number;
  status: 'pending' | 'complete' | 'failed';
  failure: KvRequestError | null;
  progress: Map<string, SenderProgress>;
  expanded: Map<number, number[]>;
  finals: Array<Set<string>>;
  arrived: boolean[];
  waiters: Map<number, Array<{ resolve(): void; reject(err: Error): void }>>;
  done: Set<string>;
  quiesced: Set<string>;
  /** Control connection (engine session id) → senders whose layers of this request came on it. */
  connections: Map<string, Set<string>>;
  chunks: number;
  verified: number;
  timer: NodeJS.Timeout | undefined;
  quiesceTimer: NodeJS.Timeout | undefined;
  settledWaiters: Array<() => void>;
  isSettled: boolean;
  resolve(r: KvReceiveResult): void;
  reject(err: Error): void;
}

const FINISHED_LIMIT = 4096;

/** Receives layerwise pushes into decode blocks. See the module comment. */
export class LayerwiseReceiver extends EventEmitter {
  private readonly windowBytes: number;
  private readonly requireIntegrity: boolean;
  private readonly quiesceMs: number;
  private readonly trace: KvTracer | undefined;
  private readonly reader: RegionReader;
  private readonly senders = new Map<string, SenderInfo>();
  private readonly requests = new Map<string, RequestState>();
  private readonly finished = new Map<string, { status: 'complete' | 'failed'; failure: KvRequestError | null }>();
  private readonly removers: Array<() => void>;
  private closed = false;
  private counts = { done: 0, failed: 0, bytes: 0, duplicates: 0, checksum: 0 };

  /**
   * Registers the `kv.*` control handlers on `engine` (one receiver per engine).
   * @param layout where decode's KV cache is (regions of `engine`).
   */
  constructor(
    engine: TransferEngine,
    private readonly layout: KvLayout,
    options?: LayerwiseReceiverOptions,
  ) {
    super();
    const o = expectOptionalObject(options, 'options') as LayerwiseReceiverOptions;
    this.windowBytes = o.windowBytes === undefined ? 256 << 20 : expectInteger(o.windowBytes, 'options.windowBytes', 4096);
    this.requireIntegrity = o.requireIntegrity === true;
    this.quiesceMs = o.quiesceMs === undefined ? 30_000 : expectTimeout(o.quiesceMs, 'options.quiesceMs');
    this.trace = o.trace;
    if (!(layout instanceof KvLayout)) badArgument('layout', 'a KvLayout', layout);
    for (const t of layout.layers.flat()) {
      if (t.region.engine !== engine) badArgument('layout', 'a KvLayout over regions of this engine', layout);
    }
    this.reader = new RegionReader((target, ptr) => engine.device.read(target, ptr));
    const handlers: Array<[string, (body: unknown, context: RequestContext) => unknown]> = [
      [TOPIC_HELLO, (b, c) => this.onHello(b, c)],
      [TOPIC_LAYER, (b, c) => this.onLayer(b, c)],
      [TOPIC_DONE, (b) => this.onDone(b)],
      [TOPIC_FAILED, (b) => this.onFailed(b)],
    ];
    this.removers = [];
    try {
      for (const [topic, handler] of handlers) this.removers.push(engine.handle(topic, handler));
      this.removers.push(engine.onPeerLost((e) => this.onPeerLost(e)));
    } catch (err) {
      for (const remove of this.removers) remove();
      throw err;
    }
  }

  /**
   * Expects a request's KV in `blocks`. Call it before publishing the blocks.
   * Resolves when DONE came from `senders` distinct senders and every layer of
   * each is fully in; rejects with a {@link KvRequestError} carrying the invalid
   * block ids on a sender's failure, a bad checksum, a protocol violation,
   * `cancel()` or the deadline.
   */
  expect(requestId: string, options: KvExpectOptions): Promise<KvReceiveResult> {
    if (this.closed) return Promise.reject(new TransferError('receiver is closed', 'ERR_CLOSED'));
    const id = expectString(requestId, 'requestId');
    if (this.requests.has(id)) badArgument('requestId', 'an id not already expected', id);
    const o = expectObject(options, 'options');
    if (!Array.isArray(o.blocks) || o.blocks.length === 0) badArgument('options.blocks', 'a non-empty array of block ids', o.blocks);
    const blocks = (o.blocks as unknown[]).map((b, i) => expectInteger(b, `options.blocks[${i}]`, 0, this.layout.numBlocks - 1));
    if (new Set(blocks).size !== blocks.length) badArgument('options.blocks', 'distinct block ids', o.blocks);
    const senders = o.senders === undefined ? 1 : expectInteger(o.senders, 'options.senders', 1, 1024);
    const deadlineMs = expectTimeout(o.deadlineMs, 'options.deadlineMs');
    const bs = this.layout.blockSize;
    const cachedTokens = o.cachedTokens === undefined ? 0 : expectInteger(o.cachedTokens, 'options.cachedTokens', 0, blocks.length * bs);
    if (cachedTokens % bs !== 0) badArgument('options.cachedTokens', `a multiple of the block size ${bs}`, cachedTokens);
    this.finished.delete(id);

    let resolve!: (r: KvReceiveResult) => void;
    let reject!: (e: Error) => void;
    const promise = new Promise<KvReceiveResult>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    // Decode usually awaits this only after publishing its blocks (an HTTP call): an early
    // failure must not count as an unhandled rejection meanwhile.
    promise.catch(() => {});
    const L = this.layout.numLayers;
    const req: RequestState = {
      id, blocks, senders, cachedTokens, status: 'pending', failure: null,
      progress: new Map(), expanded: new Map(), finals: Array.from({ length: L }, () => new Set<string>()),
      arrived: new Array<boolean>(L).fill(false), waiters: new Map(), done: new Set(), quiesced: new Set(), connections: new Map(),
      chunks: 0, verified: 0, timer: undefined, quiesceTimer: undefined, settledWaiters: [], isSettled: false, resolve, reject,
    };
    req.timer = setTimeout(() => {
      const have = req.done.size;
      this.failRequest(req, 'ERR_TIMEOUT', `KV of request '${id}' was not complete within ${deadlineMs} ms (DONE from ${have} of ${senders} senders)`);
    }, deadlineMs);
    this.requests.set(id, req);
    return promise;
  }

  /** Resolves when every expected sender delivered `layer` of the request (for early decode starts). */
  layerArrived(requestId: string, layer: number): Promise<void> {
    const id = expectString(requestId, 'requestId');
    expectInteger(layer, 'layer', 0, this.layout.numLayers - 1);
    const req = this.requests.get(id);
    if (!req) {
      const f = this.finished.get(id);
      if (f?.status === 'complete') return Promise.resolve();
      if (f?.failure) return Promise.reject(f.failure);
      return Promise.reject(new TransferError(`request '${id}' is not expected`, 'ERR_BAD_ARGUMENT'));
    }
    if (req.failure) return Promise.reject(req.failure);
    if (req.arrived[layer]) return Promise.resolve();
    return new Promise((resolve, reject) => {
      let list = req.waiters.get(layer);
      if (!list) req.waiters.set(layer, (list = []));
      list.push({ resolve, reject });
    });
  }

  /**
   * Resolves once the request's blocks may be reused: it completed, or it failed
   * and each expected sender confirmed it stopped writing (FAILED or DONE), or
   * `quiesceMs` passed since the failure.
   */
  settled(requestId: string): Promise<void> {
    const id = expectString(requestId, 'requestId');
    const req = this.requests.get(id);
    if (!req) {
      if (this.finished.has(id)) return Promise.resolve();
      return Promise.reject(new TransferError(`request '${id}' is not expected`, 'ERR_BAD_ARGUMENT'));
    }
    if (req.isSettled) return Promise.resolve();
    return new Promise((resolve) => req.settledWaiters.push(resolve));
  }

  /** Fails an expected request (ERR_ABORTED); its senders are refused from then on. */
  cancel(requestId: string, reason = 'cancelled by decode'): void {
    const req = this.requests.get(expectString(requestId, 'requestId'));
    if (req && req.status === 'pending') this.failRequest(req, 'ERR_ABORTED', reason);
  }

  /** Counters (cheap to read). */
  get stats(): LayerwiseReceiverStats {
    let pending = 0;
    for (const r of this.requests.values()) if (r.status === 'pending') pending++;
    return {
      requestsPending: pending,
      requestsDone: this.counts.done,
      requestsFailed: this.counts.failed,
      bytesReceived: this.counts.bytes,
      duplicates: this.counts.duplicates,
      checksumFailures: this.counts.checksum,
    };
  }

  /** Removes the handlers and fails every pending request with ERR_CLOSED. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const remove of this.removers) remove();
    for (const req of [...this.requests.values()]) {
      if (req.status === 'pending') this.failRequest(req, 'ERR_CLOSED', 'receiver is closed');
      this.settle(req);
    }
  }

  // ---- handlers --------------------------------------------------------------------------------

  private onHello(raw: unknown, context: RequestContext): HelloReply {
    const b = expectObject(raw, 'hello');
    const sender = expectString(b.sender, 'hello.sender');
    const session = expectString(b.session, 'hello.session');
    const blockSize = expectInteger(b.blockSize, 'hello.blockSize', 1);
    const L = this.layout.numLayers;
    if (this.layout.blockSize % blockSize !== 0) {
      throw new TransferError(`decode block size ${this.layout.blockSize} is not a multiple of the sender's ${blockSize}`, 'ERR_BAD_ARGUMENT');
    }
    const ratio = this.layout.blockSize / blockSize;
    if (!Array.isArray(b.layers) || b.layers.length !== L) {
      throw new TransferError(`the sender's layout does not have decode's ${L} layers`, 'ERR_BAD_ARGUMENT');
    }
    (b.layers as unknown[]).forEach((layer, l) => {
      const mine = this.layout.layers[l];
      if (!Array.isArray(layer) || layer.length !== mine.length) {
        throw new TransferError(`the sender's layer ${l} does not have decode's ${mine.length} tensors`, 'ERR_BAD_ARGUMENT');
      }
      layer.forEach((bytes: unknown, t) => {
        if (bytes !== mine[t].blockBytes / ratio) {
          throw new TransferError(
            `the sender's layers[${l}][${t}] has ${String(bytes)}-byte blocks; decode's ${mine[t].blockBytes}-byte blocks need ${mine[t].blockBytes / ratio}`,
            'ERR_BAD_ARGUMENT',
          );
        }
      });
    });
    const known = this.senders.get(sender);
    const connection = context.session?.id;
    if (!known || known.session !== session) this.senders.set(sender, { session, connection, blockSize, ratio, lastSeq: 0 });
    else known.connection = connection;
    return { layout: this.layout.describe(), windowBytes: this.windowBytes, version: KV_PROTOCOL_VERSION };
  }

  /** The sender of a message, or why it is not accepted (no hello in this session). */
  private senderOf(b: Record<string, unknown>): [string, SenderInfo] | string {
    const sender = expectString(b.sender, 'sender');
    const info = this.senders.get(sender);
    if (!info || info.session !== b.session) return `sender '${sender}' has not said hello in this session`;
    return [sender, info];
  }

  private onLayer(raw: unknown, context: RequestContext): LayerReply {
    const b = expectObject(raw, 'layer notice');
    const from = this.senderOf(b);
    const seq = expectInteger(b.seq, 'seq', 1);
    const layer = expectInteger(b.layer, 'layer', 0, this.layout.numLayers - 1);
    const layers = b.layers === undefined ? 1 : expectInteger(b.layers, 'layers', 1, this.layout.numLayers - layer);
    const bytes = expectInteger(b.bytes, 'bytes');
    if (!Array.isArray(b.entries)) protocolError('entries is not an array');
    if (typeof from === 'string') {
      const refused = (b.entries as unknown[]).map((e) => ({ id: String((e as { id?: unknown })?.id), code: 'ERR_PROTOCOL' as const, message: from }));
      return { credit: bytes, refused };
    }
    const [sender, info] = from;
    if (seq <= info.lastSeq) {
      this.counts.duplicates++;
      return { credit: 0, refused: [] };
    }
    info.lastSeq = seq;
    this.counts.bytes += bytes;
    const refused: Refusal[] = [];
    const done: Array<{ id: string } & OutcomeReply> = [];
    for (const rawEntry of b.entries as unknown[]) {
      const e = expectObject(rawEntry, 'entry');
      const id = expectString(e.id, 'entry.id');
      const req = this.requests.get(id);
      const outcome = this.refusalFor(id, req);
      if (outcome) {
        refused.push(outcome);
        if (e.done !== undefined) done.push({ id, ...this.doneAfterSettled(id, req) });
        continue;
      }
      this.attribute(req!, sender, context);
      this.onEntries(req!, sender, info, layer, layers, e);
      if (!req!.failure && e.done !== undefined) {
        const d = expectObject(e.done, 'entry.done');
        done.push({ id, ...this.acceptDone(req!, sender, info, expectInteger(d.end, 'done.end'), expectInteger(d.chunks, 'done.chunks')) });
      }
      if (req!.failure) refused.push({ id, code: req!.failure.code, message: req!.failure.message });
    }
    return done.length > 0 ? { credit: bytes, refused, done } : { credit: bytes, refused };
  }

  /**
   * Applies one entry of a notice to each layer it covers, in layer order, so decode
   * learns the layers of a multi-layer notice one by one, exactly as from one notice each.
   */
  private onEntries(req: RequestState, sender: string, info: SenderInfo, layer: number, layers: number, e: Record<string, unknown>): void {
    if (layers === 1) {
      this.onEntry(req, sender, info, layer, e, e.crc);
      return;
    }
    // Several layers: only whole layers travel together, each with its own checksum.
    if (e.last !== true) {
      this.failRequest(req, 'ERR_PROTOCOL', `sender '${sender}' sent part of a layer in a notice of layers ${layer}–${layer + layers - 1}`);
      return;
    }
    if (e.crcs !== undefined && (!Array.isArray(e.crcs) || e.crcs.length !== layers)) {
      this.failRequest(req, 'ERR_PROTOCOL', `sender '${sender}' sent ${Array.isArray(e.crcs) ? e.crcs.length : 'no list of'} checksums for ${layers} layers`);
      return;
    }
    const crcs = e.crcs as unknown[] | undefined;
    for (let i = 0; i < layers && !req.failure; i++) this.onEntry(req, sender, info, layer + i, e, crcs?.[i]);
  }

  private onEntry(req: RequestState, sender: string, info: SenderInfo, layer: number, e: Record<string, unknown>, rawCrc: unknown): void {
    const first = expectInteger(e.first, 'entry.first');
    const end = expectInteger(e.end, 'entry.end');
    const start = req.cachedTokens / info.blockSize;
    const limit = req.blocks.length * info.ratio;
    if (!(start <= first && first < end && end <= limit)) {
      this.failRequest(req, 'ERR_PROTOCOL', `sender '${sender}' wrote blocks [${first}, ${end}) of layer ${layer}; the request has [${start}, ${limit})`);
      return;
    }
    if (e.last !== true) return;
    let p = req.progress.get(sender);
    if (!p) req.progress.set(sender, (p = { next: new Array(this.layout.numLayers).fill(undefined), chunks: 0 }));
    const expected = p.next[layer] ?? start;
    if (first !== expected) {
      this.failRequest(req, 'ERR_PROTOCOL', `sender '${sender}' sent layer ${layer} blocks from ${first}; expected ${expected}`);
      return;
    }
    if (rawCrc !== undefined) {
      const crc = expectInteger(rawCrc, 'entry.crc', 0, 0xffffffff);
      if (crc !== this.checksum(req, info.ratio, layer, first, end)) {
        this.counts.checksum++;
        this.failRequest(req, 'ERR_INTEGRITY', `checksum mismatch in layer ${layer}, blocks [${first}, ${end}) from sender '${sender}'`);
        return;
      }
      req.verified++;
    } else if (this.requireIntegrity) {
      this.failRequest(req, 'ERR_INTEGRITY', `sender '${sender}' sent layer ${layer} without the checksum this receiver requires`);
      return;
    }
    p.next[layer] = end;
    p.chunks++;
    req.chunks++;
    if (e.final === true) {
      req.finals[layer].add(sender);
      if (req.finals[layer].size >= req.senders) this.markArrived(req, layer);
    }
  }

  private checksum(req: RequestState, ratio: number, layer: number, first: number, end: number): number {
    let ids = req.expanded.get(ratio);
    if (!ids) req.expanded.set(ratio, (ids = expandBlockIds(req.blocks, ratio)));
    const tensors = this.layout.layers[layer];
    return this.reader.blocks(tensors, blockRuns(ids, ids, first, end), (t) => tensors[t].blockBytes / ratio);
  }

  private onDone(raw: unknown): OutcomeReply {
    const b = expectObject(raw, 'done');
    const from = this.senderOf(b);
    if (typeof from === 'string') return { ok: false, code: 'ERR_PROTOCOL', message: from };
    const [sender, info] = from;
    const id = expectString(b.id, 'done.id');
    const end = expectInteger(b.end, 'done.end');
    const chunks = expectInteger(b.chunks, 'done.chunks');
    const req = this.requests.get(id);
    if (!req || req.status !== 'pending') return this.doneAfterSettled(id, req);
    return this.acceptDone(req, sender, info, end, chunks);
  }

  /** The answer to a DONE for a request that is no longer pending (or was never expected). */
  private doneAfterSettled(id: string, req: RequestState | undefined): OutcomeReply {
    const f = req ?? this.finished.get(id);
    if (f?.status === 'complete') {
      this.counts.duplicates++;
      return { ok: true, complete: true, duplicate: true };
    }
    const refusal = this.refusalFor(id, req)!;
    return { ok: false, code: refusal.code, message: refusal.message };
  }

  /** Counts a sender's DONE once every layer of its part is in; a DONE that comes early fails the request. */
  private acceptDone(req: RequestState, sender: string, info: SenderInfo, end: number, chunks: number): OutcomeReply {
    if (req.done.has(sender)) {
      this.counts.duplicates++;
      return { ok: true, complete: false, duplicate: true };
    }
    const start = req.cachedTokens / info.blockSize;
    const limit = req.blocks.length * info.ratio;
    const p = req.progress.get(sender);
    let problem: string | undefined;
    if (!(start <= end && end <= limit && end > (req.blocks.length - 1) * info.ratio)) {
      problem = `DONE from '${sender}' ends at block ${end}; the request's blocks end at ${limit}`;
    } else if ((p?.chunks ?? 0) !== chunks) {
      problem = `DONE from '${sender}' counts ${chunks} chunks; ${p?.chunks ?? 0} arrived`;
    } else {
      const missing = p === undefined ? (start === end ? -1 : 0) : p.next.findIndex((n) => (n ?? start) !== end);
      if (missing >= 0) problem = `DONE from '${sender}' before layer ${missing} was complete`;
    }
    if (problem) {
      this.failRequest(req, 'ERR_PROTOCOL', problem);
      return { ok: false, code: 'ERR_PROTOCOL', message: problem };
    }
    req.done.add(sender);
    req.quiesced.add(sender);
    const complete = req.done.size >= req.senders;
    if (complete) this.complete(req);
    return { ok: true, complete };
  }

  private onFailed(raw: unknown): OutcomeReply {
    const b = expectObject(raw, 'failed');
    const from = this.senderOf(b);
    if (typeof from === 'string') return { ok: false, code: 'ERR_PROTOCOL', message: from };
    const [sender] = from;
    const id = expectString(b.id, 'failed.id');
    const req = this.requests.get(id);
    if (!req) return { ok: true, duplicate: true };
    req.quiesced.add(sender);
    if (req.status === 'pending') {
      this.failRequest(req, remoteCode(b.code), `sender '${sender}' failed: ${typeof b.message === 'string' ? b.message : 'no reason given'}`);
    } else if (req.status === 'failed' && req.quiesced.size >= req.senders) {
      this.settle(req);
    }
    return { ok: true };
  }

  /**
   * A prefill engine's control connection to this engine closed or broke: nothing
   * more comes from it. Every pending request one of its senders had begun and not
   * finished (DONE) fails ERR_PEER_LOST now instead of at its deadline; the rest —
   * other senders, the same name on a newer connection — are untouched. Its senders
   * count as stopped for `settled()`: the process is gone, or its engine dropped us
   * and the connection's tcp grant is revoked.
   */
  private onPeerLost(e: PeerLostEvent): void {
    for (const [name, info] of this.senders) {
      if (info.connection === e.session) this.senders.delete(name);
    }
    for (const req of [...this.requests.values()]) {
      const senders = req.connections.get(e.session);
      if (!senders) continue;
      req.connections.delete(e.session);
      const unfinished = [...senders].filter((s) => !req.done.has(s));
      for (const s of senders) req.quiesced.add(s);
      if (req.status === 'pending' && unfinished.length > 0) {
        const who = unfinished.map((s) => `'${s}'`).join(', ');
        this.failRequest(req, 'ERR_PEER_LOST', `sender ${who} of request '${req.id}' is gone before DONE: ${e.error.message}`);
      } else if (req.status === 'failed' && req.quiesced.size >= req.senders) {
        this.settle(req);
      }
    }
  }

  // ---- state -----------------------------------------------------------------------------------

  /** Remembers which control connection carries this sender's part of the request. */
  private attribute(req: RequestState, sender: string, context: RequestContext): void {
    const connection = context.session?.id;
    if (connection === undefined) return;
    let senders = req.connections.get(connection);
    if (!senders) req.connections.set(connection, (senders = new Set()));
    senders.add(sender);
  }

  /** Why an entry for `id` is refused, or null if the request accepts it. */
  private refusalFor(id: string, req: RequestState | undefined): Refusal | null {
    if (req?.status === 'pending') return null;
    const f = req ?? this.finished.get(id);
    if (f?.failure) return { id, code: f.failure.code, message: f.failure.message };
    if (f?.status === 'complete') return { id, code: 'ERR_PROTOCOL', message: `request '${id}' is already complete` };
    return { id, code: 'ERR_BAD_ARGUMENT', message: `decode does not expect request '${id}'` };
  }

  private markArrived(req: RequestState, layer: number): void {
    if (req.arrived[layer]) return;
    req.arrived[layer] = true;
    this.trace?.record({ phase: 'arrived', layer, requests: [req.id] });
    for (const w of req.waiters.get(layer) ?? []) w.resolve();
    req.waiters.delete(layer);
    this.emit('layer', { requestId: req.id, layer } satisfies KvLayerEvent);
  }

  private complete(req: RequestState): void {
    req.status = 'complete';
    clearTimeout(req.timer);
    for (let l = 0; l < req.arrived.length; l++) this.markArrived(req, l);
    this.counts.done++;
    this.trace?.record({ phase: 'done', requests: [req.id] });
    req.resolve({ requestId: req.id, senders: [...req.done], chunks: req.chunks, verifiedChunks: req.verified });
    this.settle(req);
  }

  private failRequest(req: RequestState, code: ErrorCode, message: string): void {
    if (req.status !== 'pending') return;
    req.status = 'failed';
    clearTimeout(req.timer);
    const firstInvalid = req.cachedTokens / this.layout.blockSize;
    req.failure = new KvRequestError(message, code, { requestId: req.id, invalidBlockIds: req.blocks.slice(firstInvalid) });
    this.counts.failed++;
    this.trace?.record({ phase: 'failed', requests: [req.id], code });
    req.reject(req.failure);
    for (const list of req.waiters.values()) for (const w of list) w.reject(req.failure);
    req.waiters.clear();
    if (req.quiesced.size >= req.senders || this.closed) {
      this.settle(req);
    } else {
      req.quiesceTimer = setTimeout(() => this.settle(req), this.quiesceMs);
    }
  }

  /** The request's blocks may be reused: forget it (keeping its outcome for late messages). */
  private settle(req: RequestState): void {
    if (req.isSettled) return;
    req.isSettled = true;
    clearTimeout(req.quiesceTimer);
    if (this.requests.get(req.id) === req) this.requests.delete(req.id);
    this.finished.set(req.id, { status: req.status === 'complete' ? 'complete' : 'failed', failure: req.failure });
    if (this.finished.size > FINISHED_LIMIT) this.finished.delete(this.finished.keys().next().value!);
    for (const w of req.settledWaiters.splice(0)) w();
  }
}
