/**
 * LayerwiseSender — the prefill side of the layerwise push.
 *
 * Prefill computes layer by layer; after each layer's KV is in the paged cache it
 * calls `layerReady(layer, signal)` with a device event recorded right after the
 * cache write (or a promise). The sender waits for the signals strictly in layer
 * order and pushes each layer's blocks of every request of the step into its
 * decode instance's blocks while the next layer computes. Requests going to the
 * same decode instance are fused into one batch per layer; each decode instance
 * has its own lane, so a slow or dead one delays or fails only its own requests.
 * When layers are ready faster than a lane's writes complete, the layers already
 * waiting in the lane go out as one batch with one notice (capped; see
 * docs/LAYERWISE.md, "Layer fusing"); decode still learns each layer, in order.
 *
 * ```ts
 * const sender = new LayerwiseSender(engine, layout);
 * const h = sender.add({ requestId, peer: decodeAddress, localBlocks, remoteBlocks, tokens });
 * for (let l = 0; l < layout.numLayers; l++) { computeLayer(l, stream); ev[l].record(stream); sender.layerReady(l, ev[l]); }
 * await h.released;            // P may free localBlocks now
 * await h.result;              // decode acknowledged DONE
 * ```
 */
import { DeviceEvent } from '../device.js';
import { DescriptorBatch, Peer, type TransferEngine } from '../engine.js';
import { TransferError, type ErrorCode } from '../errors.js';
import { badArgument, expectInteger, expectObject, expectOptionalObject, expectString, expectTimeout } from '../validate.js';
import { RegionReader } from './checksum.js';
import { CreditGate } from './credits.js';
import { checkRemoteLayout, KvLayout, type RemoteKvLayout } from './layout.js';
import { blockRuns, chunkBlockRange, DESCRIPTOR_STRIDE, expandBlockIds, planLayer, splitPlan, type BlockRun, type PeerLayerPlan, type TensorPlacement } from './plan.js';
import {
  describeError,
  KV_PROTOCOL_VERSION,
  KvRequestError,
  newSession,
  remoteCode,
  TOPIC_DONE,
  TOPIC_FAILED,
  TOPIC_HELLO,
  TOPIC_LAYER,
  type DoneBody,
  type FailedBody,
  type HelloBody,
  type LayerBody,
  type LayerEntry,
  type OutcomeReply,
} from './protocol.js';
import type { KvTracer } from './trace.js';

/** One request to push: where its KV is on prefill and where it goes on decode. */
export interface KvSendRequest {
  /** The id decode expects (the proxy's request id). */
  requestId: string;
  /** The decode engine: a connected Peer of this engine, or its control address "host:port". */
  peer: Peer | string;
  /** Prefill block ids holding the prompt's KV, in token order (at least ⌈tokens / blockSize⌉). */
  localBlocks: readonly number[];
  /** Decode block ids allocated for the prompt, in token order, in decode's block size. */
  remoteBlocks: readonly number[];
  /** Prompt tokens whose KV is pushed. */
  tokens: number;
  /** Tokens decode already holds (its prefix-cache hit); those blocks are skipped. Default 0. */
  remoteCachedTokens?: number;
}

/** Progress of one request in a prefill step (chunked prefill). */
export interface KvChunkProgress {
  requestId: string;
  /** Tokens computed once this step is done; `tokens` makes it the final chunk. */
  computedTokens: number;
}

/** What a completed push moved. */
export interface KvSendResult {
  requestId: string;
  /** Bytes written for the request (all layers, all chunks). */
  bytes: number;
  /** (layer, chunk) pieces decode acknowledged. */
  chunks: number;
  /** The decode engine's address. */
  peer: string;
}

/** Returned by {@link LayerwiseSender.add}. */
export interface KvSendHandle {
  readonly requestId: string;
  /** Resolves when decode acknowledged DONE; rejects with a {@link KvRequestError} if the push failed. */
  readonly result: Promise<KvSendResult>;
  /** Resolves once no write reads the request's prefill blocks any more and none will: free them then. */
  readonly released: Promise<void>;
}

/** Options of {@link LayerwiseSender}. */
export interface LayerwiseSenderOptions {
  /** Identity decode counts distinct senders by. Default: the engine's name. */
  senderId?: string;
  /** Compute a CRC-32 per (request, layer) that decode verifies before DONE counts. Default false. */
  integrity?: boolean;
  /** Deadline for each layer's ready signal, from `layerReady`. Default 30 000 ms. */
  signalTimeoutMs?: number;
  /** Deadline of each control message (hello, layer ack, DONE, FAILED). Default 5 000 ms. */
  ackTimeoutMs?: number;
  /** Deadline of each batch write. Default: the engine's `timeoutMs`. */
  writeTimeoutMs?: number;
  /** Deadline of connecting to a decode engine given by address. Default 5 000 ms. */
  connectTimeoutMs?: number;
  /** Extra attempts of DONE / FAILED after a timeout. Default 3. */
  retries?: number;
  /** Delay before the first retry; doubles each time. Default 100 ms. */
  retryDelayMs?: number;
  /**
   * When a lane gets to send and several consecutive layers of the step are already
   * ready, send them as one batch with one notice (decode still learns each layer,
   * in order). Only towards a decode that speaks version 2 of the `kv.*` messages.
   * Default true.
   */
  fuseLayers?: boolean;
  /** Most bytes of a batch of several layers; also at most half the credit window. Default 16 MiB. */
  maxFusedBytes?: number;
  /** Most descriptors of a batch of several layers. Default 1024. */
  maxFusedDescriptors?: number;
  /** Records ready / send / ack events. */
  trace?: KvTracer;
}

/** Counters of a sender. */
export interface LayerwiseSenderStats {
  /** Bytes written and acknowledged or in flight, all requests. */
  bytesSent: number;
  /** Bytes written (or being written) and not yet acknowledged by decode, all lanes. */
  bytesInFlight: number;
  /** Highest bytes in flight seen on any one lane. */
  peakBytesInFlight: number;
  /** Batches that waited for credit. */
  creditWaits: number;
  /** Batches written (each one engine write and one `kv.layer` notice). */
  batches: number;
  /** Batches that carried several layers (see {@link LayerwiseSenderOptions.fuseLayers}). */
  fusedBatches: number;
  /** Layers those batches carried together. */
  fusedLayers: number;
  requestsActive: number;
  requestsDone: number;
  requestsFailed: number;
}

interface PeerState {
  key: string;
  peer?: Peer;
  ready: Promise<void>;
  remote?: RemoteKvLayout;
  credit?: CreditGate;
  /** Send ready layers together (fusing on, and decode speaks version 2). */
  fuse: boolean;
  queue: Part[];
  running: boolean;
  broken: TransferError | null;
  requests: Set<RequestState>;
}

interface RequestState {
  id: string;
  ps: PeerState;
  local: number[];
  remoteIds: number[];
  remote?: number[];
  tokens: number;
  cachedTokens: number;
  computed: number;
  sentTokens: number;
  finalStepped: boolean;
  finalWritten: boolean;
  endBlock: number;
  chunks: number;
  bytes: number;
  writesInFlight: number;
  pendingAcks: number;
  failure: KvRequestError | null;
  finished: boolean;
  releasedDone: boolean;
  doneSent: boolean;
  failedSent: boolean;
  resolveResult(r: KvSendResult): void;
  rejectResult(e: Error): void;
  resolveReleased(): void;
  result: Promise<KvSendResult>;
  released: Promise<void>;
}

interface StepEntry {
  req: RequestState;
  first: number;
  end: number;
  final: boolean;
  runs?: BlockRun[];
}

interface Step {
  entries: StepEntry[];
  byPeer: Map<PeerState, StepEntry[]>;
  nextLayer: number;
}

interface Part {
  layer: number;
  entries: StepEntry[];
}

/** Consecutive layers of one step that a lane sends together (often just one). */
interface LayerGroup {
  first: number;
  /** The step's entries to this lane. */
  entries: StepEntry[];
  /** Those still alive when the group was taken; plan owners index into it. */
  live: StepEntry[];
  /** One plan per layer, from `first` on. */
  plans: PeerLayerPlan[];
}

/** One batch: a slice of one layer, or several whole layers. */
interface Piece {
  first: number;
  layers: number;
  descriptors: number[];
  owners: number[];
  /** The layer of each descriptor (null: all `first`). */
  layerOf: number[] | null;
  bytes: number;
}

const RECENT_LIMIT = 4096;

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Runs a control request; a synchronous throw becomes a rejection. */
function request(peer: Peer, topic: string, body: unknown, timeoutMs: number): Promise<unknown> {
  try {
    return peer.request(topic, body, { timeoutMs });
  } catch (err) {
    return Promise.reject(err);
  }
}

function isThenable(v: unknown): v is PromiseLike<unknown> {
  return (typeof v === 'object' || typeof v === 'function') && v !== null && typeof (v as PromiseLike<unknown>).then === 'function';
}

function expectBlockIds(value: unknown, name: string, max: number): number[] {
  if (!Array.isArray(value) || value.length === 0) badArgument(name, 'a non-empty array of block ids', value);
  const ids = value.map((v, i) => expectInteger(v, `${name}[${i}]`, 0, max));
  if (new Set(ids).size !== ids.length) badArgument(name, 'distinct block ids', value);
  return ids;
}

/** Pushes prefill KV into decode blocks layer by layer. See the module comment. */
export class LayerwiseSender {
  private readonly senderId: string;
  private readonly session = newSession();
  private readonly integrity: boolean;
  private readonly signalTimeoutMs: number;
  private readonly ackTimeoutMs: number;
  private readonly writeTimeoutMs: number | undefined;
  private readonly connectTimeoutMs: number;
  private readonly retries: number;
  private readonly retryDelayMs: number;
  private readonly fuseLayers: boolean;
  private readonly maxFusedBytes: number;
  private readonly maxFusedDescriptors: number;
  private readonly trace: KvTracer | undefined;
  private readonly local: TensorPlacement[][];
  private readonly reader: RegionReader;
  private readonly requests = new Map<string, RequestState>();
  private readonly recent = new Set<string>();
  private readonly peers = new Map<string, PeerState>();
  private readonly lanes = new Set<PeerState>();
  private current: Step | null = null;
  private readyChain: Promise<void> = Promise.resolve();
  private closed = false;
  /** Batch sequence number, strictly increasing per sender (decode drops repeats). */
  private seq = 0;
  private counts = { bytesSent: 0, batches: 0, fusedBatches: 0, fusedLayers: 0, done: 0, failed: 0, peak: 0, waits: 0 };

  /** @internal Test-only fault injection: return true to write a (request, layer) from the wrong source block. */
  _misdirect: ((requestId: string, layer: number) => boolean) | undefined;

  /**
   * @param engine the prefill engine (its regions hold `layout`).
   * @param layout where prefill's KV cache is.
   */
  constructor(
    private readonly engine: TransferEngine,
    private readonly layout: KvLayout,
    options?: LayerwiseSenderOptions,
  ) {
    const o = expectOptionalObject(options, 'options') as LayerwiseSenderOptions;
    this.senderId = o.senderId === undefined ? engine.name : expectString(o.senderId, 'options.senderId');
    this.integrity = o.integrity === true;
    this.signalTimeoutMs = o.signalTimeoutMs === undefined ? 30_000 : expectTimeout(o.signalTimeoutMs, 'options.signalTimeoutMs');
    this.ackTimeoutMs = o.ackTimeoutMs === undefined ? 5_000 : expectTimeout(o.ackTimeoutMs, 'options.ackTimeoutMs');
    this.writeTimeoutMs = o.writeTimeoutMs === undefined ? undefined : expectTimeout(o.writeTimeoutMs, 'options.writeTimeoutMs');
    this.connectTimeoutMs = o.connectTimeoutMs === undefined ? 5_000 : expectTimeout(o.connectTimeoutMs, 'options.connectTimeoutMs');
    this.retries = o.retries === undefined ? 3 : expectInteger(o.retries, 'options.retries', 0, 100);
    this.retryDelayMs = o.retryDelayMs === undefined ? 100 : expectInteger(o.retryDelayMs, 'options.retryDelayMs', 0, 60_000);
    if (o.fuseLayers !== undefined && typeof o.fuseLayers !== 'boolean') badArgument('options.fuseLayers', 'a boolean', o.fuseLayers);
    this.fuseLayers = o.fuseLayers !== false;
    this.maxFusedBytes = o.maxFusedBytes === undefined ? 16 << 20 : expectInteger(o.maxFusedBytes, 'options.maxFusedBytes', 1);
    this.maxFusedDescriptors = o.maxFusedDescriptors === undefined ? 1024 : expectInteger(o.maxFusedDescriptors, 'options.maxFusedDescriptors', 1);
    this.trace = o.trace;
    if (!(layout instanceof KvLayout)) badArgument('layout', 'a KvLayout', layout);
    for (const t of layout.layers.flat()) {
      if (t.region.engine !== engine) badArgument('layout', 'a KvLayout over regions of this engine', layout);
    }
    this.local = layout.layers.map((layer) => layer.map((t) => ({ region: t.region.id, offset: t.offset, blockBytes: t.blockBytes })));
    this.reader = new RegionReader((target, ptr) => engine.device.read(target, ptr));
  }

  /** The identity decode counts this sender by. */
  get id(): string {
    return this.senderId;
  }

  /**
   * Registers a request. Validates it at once (ERR_BAD_ARGUMENT, ERR_OUT_OF_RANGE)
   * and starts the handshake with its decode engine if there is none yet. The
   * request is pushed in the steps that name it (see {@link step}); without
   * explicit steps, the next `layerReady(0)` starts a step that completes it.
   */
  add(request: KvSendRequest): KvSendHandle {
    this.assertOpen();
    const r = expectObject(request, 'request');
    const id = expectString(r.requestId, 'request.requestId');
    if (this.requests.has(id)) badArgument('request.requestId', 'an id not already being sent', id);
    if (!(r.peer instanceof Peer) && typeof r.peer !== 'string') badArgument('request.peer', 'a Peer or a "host:port" address', r.peer);
    if (r.peer instanceof Peer && r.peer.engine !== this.engine) badArgument('request.peer', "a Peer of this sender's engine", r.peer);
    if (typeof r.peer === 'string') expectString(r.peer, 'request.peer');
    const tokens = expectInteger(r.tokens, 'request.tokens', 1);
    const bs = this.layout.blockSize;
    const local = expectBlockIds(r.localBlocks, 'request.localBlocks', this.layout.numBlocks - 1);
    if (local.length < Math.ceil(tokens / bs)) {
      badArgument('request.localBlocks', `at least ${Math.ceil(tokens / bs)} blocks for ${tokens} tokens`, r.localBlocks);
    }
    const remoteIds = expectBlockIds(r.remoteBlocks, 'request.remoteBlocks', Number.MAX_SAFE_INTEGER);
    const cachedTokens = r.remoteCachedTokens === undefined ? 0 : expectInteger(r.remoteCachedTokens, 'request.remoteCachedTokens', 0, tokens);
    if (cachedTokens % bs !== 0) badArgument('request.remoteCachedTokens', `a multiple of the block size ${bs}`, cachedTokens);

    const ps = this.peerFor(r.peer as Peer | string);
    let resolveResult!: (v: KvSendResult) => void;
    let rejectResult!: (e: Error) => void;
    let resolveReleased!: () => void;
    const result = new Promise<KvSendResult>((res, rej) => {
      resolveResult = res;
      rejectResult = rej;
    });
    result.catch(() => {}); // the caller may only await `released`
    const released = new Promise<void>((res) => (resolveReleased = res));
    const state: RequestState = {
      id, ps, local, remoteIds, tokens, cachedTokens,
      computed: 0, sentTokens: 0, finalStepped: false, finalWritten: false, endBlock: Math.ceil(tokens / bs),
      chunks: 0, bytes: 0, writesInFlight: 0, pendingAcks: 0,
      failure: null, finished: false, releasedDone: false, doneSent: false, failedSent: false,
      resolveResult, rejectResult, resolveReleased, result, released,
    };
    this.requests.set(id, state);
    this.recent.delete(id);
    ps.requests.add(state);
    if (ps.broken) this.fail(state, ps.broken);
    return { requestId: id, result, released };
  }

  /**
   * Starts a prefill step (one forward pass) that advances the named requests to
   * `computedTokens`. Each chunk pushes only blocks that became full; the final
   * chunk (computedTokens = tokens) also pushes the partial tail block. Call it
   * before the step's `layerReady(0)`; the previous step must have reported all layers.
   */
  step(progress: readonly KvChunkProgress[]): void {
    this.assertOpen();
    if (this.current) {
      badArgument('step', `no open step (the current step has reported ${this.current.nextLayer} of ${this.layout.numLayers} layers)`, progress);
    }
    if (!Array.isArray(progress)) badArgument('progress', 'an array of { requestId, computedTokens }', progress);
    const seen = new Set<string>();
    const updates = progress.map((p: unknown, i) => {
      const x = expectObject(p, `progress[${i}]`);
      const id = expectString(x.requestId, `progress[${i}].requestId`);
      const req = this.requests.get(id);
      if (!req) badArgument(`progress[${i}].requestId`, 'the id of an added request', id);
      if (seen.has(id)) badArgument(`progress[${i}].requestId`, 'each request at most once per step', id);
      seen.add(id);
      if (req.finalStepped) badArgument(`progress[${i}].requestId`, 'a request whose final chunk has not been stepped', id);
      const computed = expectInteger(x.computedTokens, `progress[${i}].computedTokens`, req.computed + 1, req.tokens);
      return { req, computed };
    });
    this.current = this.buildStep(updates);
  }

  /**
   * Reports that layer `layer` of the current step has been written to the KV
   * cache once `signal` completes: a {@link DeviceEvent} recorded after the cache
   * write, or a promise. Layers are reported strictly in order 0, 1, …; the sender
   * waits for each signal (up to `signalTimeoutMs`) in that order and then pushes
   * the layer. A signal that fails or times out fails the step's requests.
   */
  layerReady(layer: number, signal: DeviceEvent | PromiseLike<unknown>): void {
    this.assertOpen();
    expectInteger(layer, 'layer', 0, this.layout.numLayers - 1);
    if (!(signal instanceof DeviceEvent) && !isThenable(signal)) badArgument('signal', 'a DeviceEvent or a promise', signal);
    if (!this.current) {
      if (layer !== 0) badArgument('layer', 'layer 0 (no step is open)', layer);
      const pending = [...this.requests.values()].filter((r) => !r.finalStepped && !r.failure);
      this.current = this.buildStep(pending.map((req) => ({ req, computed: req.tokens })));
    }
    const step = this.current;
    if (layer !== step.nextLayer) badArgument('layer', `layer ${step.nextLayer} (layers are reported in order)`, layer);
    step.nextLayer++;
    if (step.nextLayer === this.layout.numLayers) this.current = null;

    const deadline = Date.now() + this.signalTimeoutMs;
    let wait: () => Promise<unknown>;
    if (signal instanceof DeviceEvent) {
      wait = () => (signal.query() ? Promise.resolve() : signal.synchronize(Math.max(1, deadline - Date.now())));
    } else {
      const settled = Promise.resolve(signal).then(
        () => null,
        (err: unknown) => err ?? new Error('ready signal rejected'),
      );
      wait = async () => {
        let timer: NodeJS.Timeout | undefined;
        const timeout = new Promise<Error>((resolve) => {
          timer = setTimeout(
            () => resolve(new TransferError(`layer ${layer} was not ready within ${this.signalTimeoutMs} ms`, 'ERR_TIMEOUT')),
            Math.max(0, deadline - Date.now()),
          );
        });
        const err = await Promise.race([settled, timeout]);
        clearTimeout(timer);
        if (err) throw err;
      };
    }
    this.readyChain = this.readyChain
      .then(() => this.onReady(step, layer, wait))
      .catch((err: unknown) => {
        // Not expected (onReady handles signal failures); never let one layer break the chain.
        const { code, message } = describeError(err);
        for (const e of step.entries) this.fail(e.req, new TransferError(`layer ${layer}: ${message}`, code));
      });
  }

  /** The result promise of a request being sent (see {@link KvSendHandle.result}). */
  result(requestId: string): Promise<KvSendResult> {
    const req = this.requests.get(expectString(requestId, 'requestId'));
    if (!req) return Promise.reject(new TransferError(`no request '${requestId}' is being sent`, 'ERR_BAD_ARGUMENT'));
    return req.result;
  }

  /**
   * Resolves once the request's prefill blocks are no longer read by any write
   * and none will be issued (last write completed, or the request failed and its
   * in-flight writes settled). Resolves at once for a request that recently finished.
   */
  released(requestId: string): Promise<void> {
    const id = expectString(requestId, 'requestId');
    const req = this.requests.get(id);
    if (req) return req.released;
    if (this.recent.has(id)) return Promise.resolve();
    return Promise.reject(new TransferError(`no request '${requestId}' is known to this sender`, 'ERR_BAD_ARGUMENT'));
  }

  /** Fails a request (ERR_ABORTED): no more of it is pushed; decode is told FAILED. */
  abort(requestId: string, reason = 'aborted by the caller'): void {
    const req = this.requests.get(expectString(requestId, 'requestId'));
    if (req) this.fail(req, new TransferError(reason, 'ERR_ABORTED'));
  }

  /** Counters (cheap to read). */
  get stats(): LayerwiseSenderStats {
    let inFlight = 0;
    let peak = this.counts.peak;
    let waits = this.counts.waits;
    for (const ps of this.lanes) {
      if (!ps.credit) continue;
      inFlight += ps.credit.inFlight;
      peak = Math.max(peak, ps.credit.peak);
      waits += ps.credit.waits;
    }
    return {
      bytesSent: this.counts.bytesSent,
      bytesInFlight: inFlight,
      peakBytesInFlight: peak,
      creditWaits: waits,
      batches: this.counts.batches,
      fusedBatches: this.counts.fusedBatches,
      fusedLayers: this.counts.fusedLayers,
      requestsActive: this.requests.size,
      requestsDone: this.counts.done,
      requestsFailed: this.counts.failed,
    };
  }

  /**
   * Fails every active request with ERR_CLOSED and resolves once all their
   * in-flight writes have settled. The engine stays open (it is the caller's).
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const all = [...this.requests.values()];
    for (const req of all) this.fail(req, new TransferError('sender is closed', 'ERR_CLOSED'));
    await Promise.all(all.map((r) => r.released));
  }

  // ---- internals -------------------------------------------------------------------------------

  private assertOpen(): void {
    if (this.closed) throw new TransferError('sender is closed', 'ERR_CLOSED');
  }

  private buildStep(updates: Array<{ req: RequestState; computed: number }>): Step {
    const step: Step = { entries: [], byPeer: new Map(), nextLayer: 0 };
    for (const { req, computed } of updates) {
      const range = chunkBlockRange({
        tokens: req.tokens,
        blockSize: this.layout.blockSize,
        cachedTokens: req.cachedTokens,
        sentTokens: req.sentTokens,
        computedTokens: computed,
      });
      req.computed = computed;
      req.sentTokens = range.sentTokens;
      if (range.final) req.finalStepped = true;
      if (req.failure) continue;
      const entry: StepEntry = { req, first: range.first, end: range.end, final: range.final };
      step.entries.push(entry);
      let list = step.byPeer.get(req.ps);
      if (!list) step.byPeer.set(req.ps, (list = []));
      list.push(entry);
    }
    return step;
  }

  private peerFor(target: Peer | string): PeerState {
    const key = typeof target === 'string' ? target : target.address;
    const existing = this.peers.get(key);
    if (existing && !existing.broken && !existing.peer?.lost) return existing;
    const ps: PeerState = { key, ready: Promise.resolve(), fuse: false, queue: [], running: false, broken: null, requests: new Set() };
    ps.ready = this.handshake(ps, target);
    ps.ready.catch((err: unknown) => this.breakPeer(ps, err instanceof TransferError ? err : new TransferError(String(err), 'ERR_REMOTE')));
    this.peers.set(key, ps);
    this.lanes.add(ps);
    return ps;
  }

  private async handshake(ps: PeerState, target: Peer | string): Promise<void> {
    const peer = typeof target === 'string' ? await this.engine.connect(target, { timeoutMs: this.connectTimeoutMs }) : target;
    ps.peer = peer;
    const hello: HelloBody = {
      sender: this.senderId,
      session: this.session,
      blockSize: this.layout.blockSize,
      layers: this.layout.layers.map((layer) => layer.map((t) => t.blockBytes)),
      version: KV_PROTOCOL_VERSION,
    };
    const reply = expectObject(await request(peer, TOPIC_HELLO, hello, this.ackTimeoutMs), 'hello reply');
    const windowBytes = expectInteger(reply.windowBytes, 'hello reply windowBytes', 1);
    let remote: RemoteKvLayout;
    try {
      remote = checkRemoteLayout(reply.layout, peer.regions, this.layout);
    } catch (err) {
      if (!(err instanceof TransferError) || err.code !== 'ERR_UNKNOWN_REGION') throw err;
      await peer.refresh(this.ackTimeoutMs);
      remote = checkRemoteLayout(reply.layout, peer.regions, this.layout);
    }
    ps.remote = remote;
    ps.credit = new CreditGate(windowBytes);
    // A version-1 decode reads only `layer` of a notice: it gets one layer per notice.
    ps.fuse = this.fuseLayers && typeof reply.version === 'number' && reply.version >= 2;
  }

  /** Checks a request's decode block ids against decode's layout once it is known. */
  private remoteOf(req: RequestState, remote: RemoteKvLayout): number[] | null {
    if (req.remote) return req.remote;
    const bad = req.remoteIds.find((b) => b >= remote.numBlocks);
    if (bad !== undefined) {
      this.fail(req, new TransferError(`decode block id ${bad} is outside decode's ${remote.numBlocks} blocks`, 'ERR_OUT_OF_RANGE'));
      return null;
    }
    if (req.remoteIds.length * remote.ratio < req.endBlock) {
      const need = Math.ceil(req.tokens / remote.blockSize);
      this.fail(req, new TransferError(`${req.remoteIds.length} decode blocks cannot hold ${req.tokens} tokens (${need} needed)`, 'ERR_BAD_ARGUMENT'));
      return null;
    }
    if (req.cachedTokens % remote.blockSize !== 0) {
      this.fail(req, new TransferError(`remoteCachedTokens ${req.cachedTokens} is not a multiple of decode's block size ${remote.blockSize}`, 'ERR_BAD_ARGUMENT'));
      return null;
    }
    req.remote = expandBlockIds(req.remoteIds, remote.ratio);
    return req.remote;
  }

  private async onReady(step: Step, layer: number, wait: () => Promise<unknown>): Promise<void> {
    try {
      await wait();
    } catch (err) {
      const { code, message } = describeError(err);
      for (const e of step.entries) this.fail(e.req, new TransferError(`layer ${layer} ready signal failed: ${message}`, code));
      return;
    }
    this.trace?.record({ phase: 'ready', layer, requests: step.entries.map((e) => e.req.id) });
    for (const [ps, entries] of step.byPeer) {
      ps.queue.push({ layer, entries });
      if (!ps.running) {
        ps.running = true;
        void this.runLane(ps);
      }
    }
  }

  private async runLane(ps: PeerState): Promise<void> {
    while (ps.queue.length > 0) {
      try {
        await ps.ready;
      } catch {
        ps.queue.length = 0; // breakPeer failed the requests
        break;
      }
      const group = this.takeGroup(ps);
      try {
        await this.sendGroup(ps, group);
      } catch (err) {
        // Not expected: every failure path is handled per request. Keep the lane alive.
        const e = err instanceof TransferError ? err : new TransferError(String((err as Error)?.message ?? err), 'ERR_REMOTE');
        for (const entry of group.entries) this.fail(entry.req, e);
      }
    }
    ps.running = false;
  }

  /**
   * Takes the next layer off the lane's queue, with the consecutive layers of the same
   * step that are already ready behind it while the whole group fits the fusing cap.
   * Nothing waits for more layers: a group is only what was queued when the lane got to it.
   */
  private takeGroup(ps: PeerState): LayerGroup {
    const head = ps.queue.shift()!;
    const remote = ps.remote!;
    const live: StepEntry[] = [];
    for (const e of head.entries) {
      if (e.req.failure || !this.remoteOf(e.req, remote)) continue;
      e.runs ??= blockRuns(e.req.local, e.req.remote!, e.first, e.end);
      live.push(e);
    }
    const plan = (layer: number): PeerLayerPlan =>
      planLayer(
        live.map((e) => ({ peer: 0, runs: e.runs!, remote: remote.layers[layer] })),
        this.local[layer],
      ).get(0) ?? { descriptors: [], owners: [], bytes: 0 };
    const group: LayerGroup = { first: head.layer, entries: head.entries, live, plans: [plan(head.layer)] };
    if (!ps.fuse) return group;
    const maxBytes = Math.min(this.maxFusedBytes, Math.floor(ps.credit!.window / 2));
    let bytes = group.plans[0].bytes;
    let descriptors = group.plans[0].owners.length;
    while (bytes <= maxBytes && descriptors <= this.maxFusedDescriptors && ps.queue.length > 0) {
      const next = ps.queue[0];
      if (next.entries !== head.entries || next.layer !== group.first + group.plans.length) break;
      const p = plan(next.layer);
      if (bytes + p.bytes > maxBytes || descriptors + p.owners.length > this.maxFusedDescriptors) break;
      ps.queue.shift();
      group.plans.push(p);
      bytes += p.bytes;
      descriptors += p.owners.length;
    }
    return group;
  }

  private async sendGroup(ps: PeerState, group: LayerGroup): Promise<void> {
    const layers = group.plans.length;
    if (layers === 1) {
      // One layer: cut to the credit window when it is larger.
      const plan = group.plans[0];
      if (plan.bytes > 0) {
        const slices = splitPlan(plan, ps.credit!.window);
        const lastSlice = new Map<number, number>();
        slices.forEach((s, i) => s.owners.forEach((o) => lastSlice.set(o, i)));
        for (let i = 0; i < slices.length; i++) {
          const s = slices[i];
          const piece: Piece = { first: group.first, layers: 1, descriptors: s.descriptors, owners: s.owners, layerOf: null, bytes: s.bytes };
          await this.sendPiece(ps, group.live, piece, (o) => lastSlice.get(o) === i);
        }
      }
    } else {
      // Several whole layers (they fit the cap, so the window): one batch, one notice.
      const piece: Piece = { first: group.first, layers, descriptors: [], owners: [], layerOf: [], bytes: 0 };
      group.plans.forEach((p, i) => {
        for (const x of p.descriptors) piece.descriptors.push(x);
        for (const o of p.owners) {
          piece.owners.push(o);
          piece.layerOf!.push(group.first + i);
        }
        piece.bytes += p.bytes;
      });
      if (piece.bytes > 0) await this.sendPiece(ps, group.live, piece, () => true);
    }
    if (group.first + layers === this.layout.numLayers) {
      for (const e of group.entries) {
        if (!e.final || e.req.failure) continue;
        e.req.finalWritten = true;
        this.settle(e.req);
      }
    }
  }

  /**
   * Writes one batch (a slice of one layer, or several whole layers), then sends its
   * `kv.layer` notice without waiting for the answer. `lastOf(owner)`: the batch holds the
   * owner's last bytes of its layer(s).
   */
  private async sendPiece(ps: PeerState, live: StepEntry[], piece: Piece, lastOf: (owner: number) => boolean): Promise<void> {
    const credit = ps.credit!;
    try {
      await credit.acquire(piece.bytes);
    } catch {
      return; // the lane broke: its requests are failed
    }
    const { first } = piece;
    const lastLayer = first + piece.layers - 1;
    const what = piece.layers === 1 ? `layer ${first}` : `layers ${first}–${lastLayer}`;
    const at = piece.layers === 1 ? { layer: first } : { layer: first, lastLayer };
    const batch = new DescriptorBatch(piece.owners.length);
    const owners: number[] = [];
    const misdirected = new Set<string>();
    const d = piece.descriptors;
    let bytes = 0;
    for (let i = 0; i < piece.owners.length; i++) {
      const entry = live[piece.owners[i]];
      if (entry.req.failure) continue; // failed while waiting for credit
      const o = i * DESCRIPTOR_STRIDE;
      const layer = piece.layerOf?.[i] ?? first;
      let localOffset = d[o + 1];
      const key = `${piece.owners[i]}:${layer}`;
      if (this._misdirect?.(entry.req.id, layer) && !misdirected.has(key)) {
        misdirected.add(key);
        const t = this.layout.layers[layer].find((x) => x.region.id === d[o] && localOffset >= x.offset && localOffset < x.offset + x.blockBytes * this.layout.numBlocks)!;
        const span = t.blockBytes * this.layout.numBlocks;
        localOffset = t.offset + ((localOffset - t.offset + t.blockBytes) % span);
        if (localOffset + d[o + 4] > t.offset + span) localOffset = t.offset;
      }
      batch.add(d[o], localOffset, d[o + 2], d[o + 3], d[o + 4]);
      owners.push(piece.owners[i]);
      bytes += d[o + 4];
    }
    if (bytes < piece.bytes) credit.release(piece.bytes - bytes);
    if (batch.length === 0) return;
    const ownerSet = [...new Set(owners)];
    const reqs = ownerSet.map((o) => live[o].req);
    const ids = reqs.map((r) => r.id);
    const seq = ++this.seq;
    for (const r of reqs) r.writesInFlight++;
    this.counts.batches++;
    if (piece.layers > 1) {
      this.counts.fusedBatches++;
      this.counts.fusedLayers += piece.layers;
    }
    this.trace?.record({ phase: 'sendStart', ...at, requests: ids, peer: ps.key, bytes, seq });
    const written = this.engine.write(ps.peer!, batch, this.writeTimeoutMs === undefined ? undefined : { timeoutMs: this.writeTimeoutMs });
    // Checksums of the source blocks are computed while the bytes move.
    const body: LayerEntry[] = ownerSet.map((o) => {
      const e = live[o];
      const last = lastOf(o);
      const entry: LayerEntry = { id: e.req.id, first: e.first, end: e.end, last, final: e.final };
      if (last && this.integrity) {
        const crcs: number[] = [];
        for (let l = first; l <= lastLayer; l++) {
          const tensors = this.layout.layers[l];
          crcs.push(this.reader.blocks(tensors, e.runs!, (t) => tensors[t].blockBytes));
        }
        if (piece.layers === 1) entry.crc = crcs[0];
        else entry.crcs = crcs;
      }
      return entry;
    });
    let writeError: unknown = null;
    try {
      await written;
    } catch (err) {
      writeError = err;
    }
    for (const r of reqs) r.writesInFlight--;
    if (writeError !== null) {
      credit.release(bytes);
      const { code, message } = describeError(writeError);
      const err = new TransferError(`${what} write to ${ps.key} failed: ${message}`, code, { cause: writeError });
      this.trace?.record({ phase: 'failed', ...at, requests: ids, peer: ps.key, code, seq });
      if (code === 'ERR_PEER_LOST' || code === 'ERR_CLOSED' || code === 'ERR_UNKNOWN_PEER') this.breakPeer(ps, err);
      for (const r of reqs) this.fail(r, err);
      return;
    }
    this.trace?.record({ phase: 'sendEnd', ...at, requests: ids, peer: ps.key, bytes, seq });
    this.counts.bytesSent += bytes;
    for (let i = 0; i < owners.length; i++) {
      live[owners[i]].req.bytes += batch.data[i * DESCRIPTOR_STRIDE + 4];
    }
    // The request's last write of its final chunk carries DONE with it: one round trip less
    // after the last layer. (Decode handles the notices of a sender in order, and the layers of
    // one notice in layer order, so every earlier layer is in before it looks at this DONE.)
    const withDone = new Set<RequestState>();
    body.forEach((e, i) => {
      const req = live[ownerSet[i]].req;
      if (!e.last) return;
      req.chunks += piece.layers;
      if (e.final && lastLayer === this.layout.numLayers - 1) {
        req.finalWritten = true;
        req.doneSent = true;
        e.done = { end: req.endBlock, chunks: req.chunks };
        withDone.add(req);
      }
    });
    for (const r of reqs) r.pendingAcks++;
    const notice: LayerBody = { sender: this.senderId, session: this.session, seq, layer: first, bytes, entries: body };
    if (piece.layers > 1) notice.layers = piece.layers;
    request(ps.peer!, TOPIC_LAYER, notice, this.ackTimeoutMs).then(
      (raw) => {
        const reply = (raw ?? {}) as { credit?: unknown; refused?: unknown; done?: unknown };
        const granted = typeof reply.credit === 'number' && reply.credit >= 0 ? Math.min(reply.credit, bytes) : bytes;
        credit.release(granted);
        this.trace?.record({ phase: 'acked', ...at, requests: ids, peer: ps.key, bytes, seq });
        if (Array.isArray(reply.refused)) {
          for (const x of reply.refused as Array<{ id?: unknown; code?: unknown; message?: unknown }>) {
            const req = reqs.find((r) => r.id === x.id);
            if (req) this.fail(req, new TransferError(`decode refused ${what}: ${String(x.message ?? 'refused')}`, remoteCode(x.code)));
          }
        }
        const outcomes = Array.isArray(reply.done) ? (reply.done as Array<{ id?: unknown }>) : [];
        for (const req of withDone) {
          const outcome = outcomes.find((o) => o.id === req.id);
          if (outcome) this.doneOutcome(req, outcome);
          else if (!req.failure) void this.sendDone(req); // not answered with the notice: ask on its own
        }
        this.acked(reqs);
      },
      (err: unknown) => {
        credit.release(bytes);
        const { code, message } = describeError(err);
        const e = new TransferError(`${what} acknowledgement from ${ps.key} failed: ${message}`, code, { cause: err });
        if (code === 'ERR_PEER_LOST' || code === 'ERR_CLOSED') this.breakPeer(ps, e);
        for (const r of reqs) {
          // A DONE that rode on a notice that timed out is retried on its own (decode ignores repeats).
          if (withDone.has(r) && code === 'ERR_TIMEOUT') void this.sendDone(r);
          else this.fail(r, e);
        }
        this.acked(reqs);
      },
    );
    for (const r of reqs) this.settle(r);
  }

  private acked(reqs: RequestState[]): void {
    for (const r of reqs) {
      r.pendingAcks--;
      this.settle(r);
    }
  }

  /** Moves a request on when nothing it waits for is left: release, DONE, FAILED. */
  private settle(req: RequestState): void {
    if (req.writesInFlight > 0) return;
    if (req.failure) {
      if (!req.releasedDone) {
        req.releasedDone = true;
        req.resolveReleased();
      }
      if (!req.failedSent) {
        req.failedSent = true;
        void this.sendFailed(req);
      }
      return;
    }
    if (!req.finalWritten) return;
    if (!req.releasedDone) {
      req.releasedDone = true;
      req.resolveReleased();
    }
    if (req.pendingAcks === 0 && !req.doneSent) {
      req.doneSent = true;
      void this.sendDone(req);
    }
  }

  private fail(req: RequestState, cause: TransferError): void {
    if (req.failure || req.finished) return;
    req.failure =
      cause instanceof KvRequestError && cause.requestId === req.id
        ? cause
        : new KvRequestError(`request '${req.id}' failed: ${cause.message}`, cause.code, { requestId: req.id, cause });
    this.counts.failed++;
    this.trace?.record({ phase: 'failed', requests: [req.id], peer: req.ps.key, code: req.failure.code });
    req.rejectResult(req.failure);
    this.settle(req);
  }

  private breakPeer(ps: PeerState, err: TransferError): void {
    if (ps.broken) return;
    ps.broken = err;
    ps.credit?.break(err);
    if (this.peers.get(ps.key) === ps) this.peers.delete(ps.key);
    for (const r of ps.requests) this.fail(r, err);
    if (ps.requests.size === 0) this.retireLane(ps);
  }

  private async sendDone(req: RequestState): Promise<void> {
    const ps = req.ps;
    const body: DoneBody = { sender: this.senderId, session: this.session, id: req.id, end: req.endBlock, chunks: req.chunks };
    const reply = await this.withRetries(() => request(ps.peer!, TOPIC_DONE, body, this.ackTimeoutMs));
    if (req.failure) return this.forget(req);
    if (reply instanceof Error) {
      const { code, message } = describeError(reply);
      this.fail(req, new TransferError(`DONE to ${ps.key} failed: ${message}`, code, { cause: reply }));
      return;
    }
    this.doneOutcome(req, reply);
  }

  /** Applies decode's answer to a DONE: the request completes, or fails with decode's reason. */
  private doneOutcome(req: RequestState, reply: unknown): void {
    if (req.failure || req.finished) return;
    const r = (reply ?? {}) as OutcomeReply;
    if (r.ok === true) {
      req.finished = true;
      this.counts.done++;
      this.trace?.record({ phase: 'done', requests: [req.id], peer: req.ps.key, bytes: req.bytes });
      req.resolveResult({ requestId: req.id, bytes: req.bytes, chunks: req.chunks, peer: req.ps.key });
      this.forget(req);
    } else {
      const code = remoteCode((r as { code?: unknown }).code);
      this.fail(req, new TransferError(`decode did not accept DONE: ${String((r as { message?: unknown }).message ?? 'refused')}`, code));
    }
  }

  private async sendFailed(req: RequestState): Promise<void> {
    const ps = req.ps;
    const code = req.failure!.code;
    const reachable = ps.peer && !ps.peer.lost && code !== 'ERR_PEER_LOST';
    if (reachable) {
      const body: FailedBody = { sender: this.senderId, session: this.session, id: req.id, code, message: req.failure!.message };
      await this.withRetries(() => request(ps.peer!, TOPIC_FAILED, body, this.ackTimeoutMs));
    }
    this.forget(req);
  }

  /** Runs `send`, retrying after ERR_TIMEOUT; resolves with the reply or the last error. */
  private async withRetries(send: () => Promise<unknown>): Promise<unknown> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await send();
      } catch (err) {
        const code: ErrorCode | undefined = err instanceof TransferError ? err.code : undefined;
        if (code !== 'ERR_TIMEOUT' || attempt >= this.retries) return err instanceof Error ? err : new Error(String(err));
        await sleep(this.retryDelayMs * 2 ** attempt);
      }
    }
  }

  private forget(req: RequestState): void {
    if (this.requests.get(req.id) !== req) return;
    this.requests.delete(req.id);
    const ps = req.ps;
    ps.requests.delete(req);
    if (ps.requests.size === 0 && this.peers.get(ps.key) !== ps) this.retireLane(ps);
    this.recent.add(req.id);
    if (this.recent.size > RECENT_LIMIT) this.recent.delete(this.recent.values().next().value!);
  }

  /** Drops a lane that no request uses any more, keeping its counters. */
  private retireLane(ps: PeerState): void {
    if (!this.lanes.delete(ps) || !ps.credit) return;
    this.counts.peak = Math.max(this.counts.peak, ps.credit.peak);
    this.counts.waits += ps.credit.waits;
  }
}
