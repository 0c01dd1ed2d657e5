/**
 * What each simulated role does with a request, using the real library:
 *
 * - encode: an image's embedding (size from the profile and the image size, bytes
 *   from lib/sim/content.ts) is computed on the device (a sleep of the profile's
 *   encoder time) and saved in the shared encoder cache with ECConnector; an item
 *   already in the cache costs nothing. The 2xx answer comes only once the
 *   embedding is visible to every process (vLLM's completion signal).
 * - prefill: embeddings come from the cache through ECConnector (scheduler and
 *   worker roles, as vLLM drives them) and are checked byte for byte; the prompt is
 *   prefilled on the device, each layer's KV really written, and LayerwiseSender
 *   pushes layer by layer into decode's blocks. It answers after decode accepted DONE.
 * - decode: allocates blocks, expects the KV (LayerwiseReceiver), calls the proxy's
 *   /v1/metaserver without blocking anything (with a deadline; a non-2xx answer
 *   fails the request), checks every byte of every layer as it lands, then
 *   generates tokens at the profile's decode-step time. A prefill that dies
 *   mid-push fails its request at once (ERR_PEER_LOST from the receiver), not at
 *   the KV deadline, and the request's blocks are freed right away.
 * - pd: embeddings, prefill and decode in one instance, nothing pushed.
 */
import type { ServerResponse } from 'node:http';
import { performance } from 'node:perf_hooks';
import type { ECConnector } from '../ec/connector.js';
import type { EncoderCacheStore } from '../ec/store.js';
import type { TransferEngine } from '../engine.js';
import { isTransferError } from '../errors.js';
import type { LayerwiseReceiver } from '../kv/receiver.js';
import type { LayerwiseSender } from '../kv/sender.js';
import { SIGNATURE_HEADER, signBody } from '../proxy/auth.js';
import { embeddingKey, findMismatch, makeContent } from './content.js';
import { EventStream, HttpError, badRequest, sendJson } from './http.js';
import type { SimKvCache } from './kv-cache.js';
import { chunkBody, completionBody, usageChunk } from './openai.js';
import type { ModelProfile } from './profiles.js';
import { simulatedToken, type SimImage, type SimPrompt } from './prompt.js';
import type { ModelRunner } from './runner.js';
import type { EcCounters, KvCounters, SimRequestRecord, SimRole } from './stats.js';
import type { RequestTraces } from './trace.js';

/** Settings the roles read. */
export interface RoleSettings {
  /** Decode: deadline of the whole KV receive, and of the metaserver call (ms). */
  kvTimeoutMs: number;
  /** Longest wait for free KV blocks before answering 503 (ms). */
  blockWaitMs: number;
  /** Decode: shared secret to sign /v1/metaserver calls with. */
  proxySecret: string | undefined;
  /** Prefill: ids of the requests whose KV is corrupted (fault injection). */
  corruptKv: ReadonlySet<string>;
}

/** Everything a role needs; one per worker. */
export interface RoleContext {
  role: SimRole;
  profile: ModelProfile;
  /** Model name echoed in answers. */
  model: string;
  engine: TransferEngine;
  runner: ModelRunner;
  cache: SimKvCache | undefined;
  store: EncoderCacheStore | undefined;
  ecScheduler: ECConnector | undefined;
  ecWorker: ECConnector | undefined;
  sender: LayerwiseSender | undefined;
  traces: RequestTraces | undefined;
  receiver: LayerwiseReceiver | undefined;
  settings: RoleSettings;
  ec: EcCounters;
  kv: KvCounters;
  /** Encoder: encodes in flight by mm_hash (one pass per item however many ask). */
  encoding: Map<string, Promise<void>>;
  /** The EC connector steps one request at a time, as a scheduler loop would. */
  ecTurn: Promise<void>;
  /** Block releases that wait for the receiver to settle (awaited on close). */
  pending: Set<Promise<void>>;
  /** Prefill/PD: a reused buffer of at least `bytes` for embedding loads (one load step at a time). */
  embeddingArena(bytes: number): Buffer;
}

/** One request being served. */
export interface Call {
  requestId: string;
  prompt: SimPrompt;
  res: ServerResponse;
  /** Aborts when the client goes away or the worker shuts down. */
  signal: AbortSignal;
  record: SimRequestRecord;
}

function now(): number {
  return performance.timeOrigin + performance.now();
}

/** Blocks for a request, or 503 (the proxy may send the hop elsewhere) when none free up in time. */
async function allocate(ctx: RoleContext, call: Call): Promise<number[]> {
  const cache = ctx.cache!;
  try {
    return await cache.blocks.allocate(cache.blocksFor(call.prompt.tokens), { timeoutMs: ctx.settings.blockWaitMs, signal: call.signal });
  } catch (err) {
    if (isTransferError(err, 'ERR_TIMEOUT')) throw new HttpError(`no free KV blocks for ${call.prompt.tokens} tokens: ${err.message}`, 'ERR_TIMEOUT', 503, 'overloaded_error');
    if (isTransferError(err, 'ERR_CAPACITY')) throw new HttpError(`the prompt does not fit this instance's KV cache: ${err.message}`, 'ERR_CAPACITY', 400);
    throw err;
  }
}

// ------------------------------------------------------------------ encode

/** Encoder: every image of the request encoded (or found) and saved; answers with the mm_hashes. */
export async function serveEncode(ctx: RoleContext, call: Call): Promise<void> {
  const { prompt } = call;
  if (prompt.endpoint !== 'chat' || prompt.images.length === 0) throw badRequest('an encoder instance takes chat requests with image parts');
  const items = await Promise.all(prompt.images.map((image) => encodeImage(ctx, image)));
  call.record.items = items;
  sendJson(
    call.res,
    200,
    completionBody(prompt, call.requestId, ctx.model, '', 1, {
      ec_transfer_params: { mm_hashes: prompt.images.map((i) => i.mmHash), cache_hits: items.map((i) => i.hit), simulated: true },
    }),
  );
}

async function encodeImage(ctx: RoleContext, image: SimImage): Promise<NonNullable<SimRequestRecord['items']>[number]> {
  const start = now();
  const bytes = image.embedding.bytes;
  ctx.ec.items++;
  const done = (hit: boolean) => ({ mmHash: image.mmHash, hit, bytes, start, end: now() });
  if (ctx.store!.has(image.mmHash)) {
    ctx.ec.hits++;
    return done(true);
  }
  const running = ctx.encoding.get(image.mmHash);
  if (running) {
    // Another request is encoding the same item right now: wait for it instead of a second pass.
    await running;
    ctx.ec.hits++;
    return done(true);
  }
  const pass = (async () => {
    await ctx.runner.compute(image.embedding.encodeUs);
    const embedding = makeContent(embeddingKey(image.mmHash), bytes);
    const meta = { tokens: image.embedding.tokens, width: ctx.profile.vision!.embeddingWidth, dtype: 'bf16', simulated: true };
    const saved = await ctx.ecWorker!.saveCaches(image.mmHash, embedding, { meta });
    if (saved.stored) {
      ctx.ec.encoded++;
      ctx.ec.savedBytes += bytes;
    }
  })();
  ctx.encoding.set(image.mmHash, pass);
  try {
    await pass;
  } finally {
    ctx.encoding.delete(image.mmHash);
  }
  return done(false);
}

// ------------------------------------------------------------------ embeddings on P / PD

/**
 * Loads the request's embeddings from the shared cache the way vLLM's scheduler
 * and worker drive an ECConnector, checks every byte, and encodes any missing item
 * locally (a simulated encoder pass on this device).
 */
async function loadEmbeddings(ctx: RoleContext, call: Call): Promise<void> {
  const images = call.prompt.images;
  if (images.length === 0) return;
  const start = now();
  const features = images.map((i) => ({ mmHash: i.mmHash, numTokens: i.embedding.tokens }));
  const bytesOf = new Map(images.map((i) => [i.mmHash, i.embedding.bytes]));
  const step = async () => {
    const scheduler = ctx.ecScheduler!;
    for (const f of features) await scheduler.hasCacheItem(f.mmHash);
    features.forEach((_, i) => scheduler.updateStateAfterAlloc({ requestId: call.requestId, mmFeatures: features }, i));
    const meta = scheduler.buildConnectorMeta();
    // Destinations in one reused arena, like the encoder-cache tensor a serving engine preallocates.
    const destinations = new Map<string, Buffer>();
    const arena = ctx.embeddingArena(meta.items.reduce((n, it) => n + bytesOf.get(it.mmHash)!, 0));
    let offset = 0;
    for (const it of meta.items) {
      const n = bytesOf.get(it.mmHash)!;
      destinations.set(it.mmHash, arena.subarray(offset, offset + n));
      offset += n;
    }
    const t0 = performance.now();
    if (meta.items.length > 0) await ctx.ecWorker!.startLoadCaches(meta, destinations);
    const loadMs = performance.now() - t0;
    const finished = ctx.ecWorker!.getFinished();
    if (finished.failedLoads.length > 0) {
      const f = finished.failedLoads[0];
      throw new HttpError(`loading embedding ${f.mmHash} from the encoder cache failed: ${f.error.message}`, f.error.code, 500);
    }
    // Checked before the arena is reused by the next load.
    let loadedBytes = 0;
    for (const mmHash of finished.loaded) {
      const buffer = destinations.get(mmHash)!;
      const at = findMismatch(buffer, embeddingKey(mmHash));
      if (at >= 0) throw new HttpError(`embedding ${mmHash} loaded from the encoder cache differs at byte ${at}`, 'ERR_INTEGRITY', 500);
      loadedBytes += buffer.length;
    }
    return { loaded: finished.loaded, loadedBytes, loadMs };
  };
  const turn = ctx.ecTurn.then(step);
  ctx.ecTurn = turn.then(
    () => undefined,
    () => undefined,
  );
  const { loaded: loadedKeys, loadedBytes, loadMs } = await turn;
  const loaded = new Set(loadedKeys);
  const missing = images.filter((i) => !loaded.has(i.mmHash));
  ctx.ec.loaded += loadedKeys.length;
  ctx.ec.loadedBytes += loadedBytes;
  ctx.ec.verifiedBytes += loadedBytes;
  ctx.ec.loadMs += loadMs;
  ctx.ec.missed += missing.length;
  // Not in the cache (evicted, or no encoder ran): encode here, as vLLM falls back to.
  if (missing.length > 0) await ctx.runner.compute(missing.reduce((s, i) => s + i.embedding.encodeUs, 0));
  call.record.ecLoad = { start, end: now(), loaded: loadedKeys.length, missed: missing.length, bytes: loadedBytes };
}

// ------------------------------------------------------------------ prefill

interface RemoteParams {
  requestId: string;
  peer: string;
  blocks: number[];
  blockSize: number;
  cachedTokens: number;
}

function integerList(value: unknown): number[] | undefined {
  const flat = Array.isArray(value) && value.length > 0 && Array.isArray(value[0]) ? (value[0] as unknown[]) : value;
  if (!Array.isArray(flat) || flat.length === 0 || !flat.every((v) => Number.isSafeInteger(v) && (v as number) >= 0)) return undefined;
  return flat as number[];
}

function remoteParams(ctx: RoleContext, call: Call): RemoteParams {
  const kv = call.prompt.kvTransferParams;
  if (!kv || kv.do_remote_decode !== true) {
    throw badRequest("a prefill instance takes the decode-first request: kv_transfer_params with do_remote_decode and decode's block ids (send requests through the proxy)");
  }
  if (call.prompt.stream) throw badRequest('a prefill request must not stream');
  const blocks = integerList(kv.remote_block_ids);
  if (!blocks) throw badRequest('kv_transfer_params.remote_block_ids must be a non-empty list of block ids');
  if (typeof kv.remote_host !== 'string' || kv.remote_host.length === 0) throw badRequest('kv_transfer_params.remote_host must be a string');
  const port = kv.remote_port;
  if (!Number.isSafeInteger(port) || (port as number) < 1 || (port as number) > 65535) throw badRequest('kv_transfer_params.remote_port must be a port number');
  const blockSize = integerList(kv.remote_block_size)?.[0] ?? ctx.profile.blockSize;
  const cachedTokens = kv.remote_cached_tokens ?? 0;
  if (!Number.isSafeInteger(cachedTokens) || (cachedTokens as number) < 0) throw badRequest('kv_transfer_params.remote_cached_tokens must be a non-negative integer');
  const needed = Math.ceil(call.prompt.tokens / blockSize);
  if (blocks.length < needed) {
    throw badRequest(`decode allocated ${blocks.length} blocks of ${blockSize} tokens for a prompt of ${call.prompt.tokens} tokens (${needed} needed)`);
  }
  const host = kv.remote_host.includes(':') ? `[${kv.remote_host}]` : kv.remote_host;
  return {
    requestId: typeof kv.request_id === 'string' && kv.request_id.length > 0 ? kv.request_id : call.requestId,
    peer: `${host}:${port}`,
    blocks,
    blockSize,
    cachedTokens: cachedTokens as number,
  };
}

/** Prefill (decode-first): prompt in, KV pushed layer by layer into decode's blocks, one token out. */
export async function servePrefill(ctx: RoleContext, call: Call): Promise<void> {
  const remote = remoteParams(ctx, call);
  const sender = ctx.sender!;
  const blocks = await allocate(ctx, call);
  const scope = new AbortController();
  const onAbort = () => {
    scope.abort();
    sender.abort(remote.requestId, 'the prefill request was cancelled');
  };
  call.signal.addEventListener('abort', onAbort, { once: true });
  let released: Promise<void> = Promise.resolve();
  let bytes = 0;
  try {
    await loadEmbeddings(ctx, call);
    ctx.traces!.track(remote.requestId);
    const handle = sender.add({
      requestId: remote.requestId,
      peer: remote.peer,
      localBlocks: blocks,
      remoteBlocks: remote.blocks,
      tokens: call.prompt.tokens,
      remoteCachedTokens: remote.cachedTokens,
    });
    released = handle.released;
    // A push that fails while the prompt still waits for the device leaves the queue.
    handle.result.catch(() => scope.abort());
    const corruptLayer = ctx.settings.corruptKv.has(remote.requestId) ? ctx.profile.layers >> 1 : undefined;
    try {
      call.record.prefill = await ctx.runner.prefill({ requestId: remote.requestId, tokens: call.prompt.tokens, blocks, corruptLayer, signal: scope.signal });
    } catch (err) {
      sender.abort(remote.requestId, 'the prefill did not run');
      // The push's own failure says more than "aborted".
      throw await handle.result.then(() => err, (pushError: unknown) => pushError);
    }
    const result = await handle.result;
    bytes = result.bytes;
    ctx.kv.pushed++;
    ctx.kv.pushedBytes += result.bytes;
    sendJson(call.res, 200, completionBody(call.prompt, call.requestId, ctx.model, simulatedToken(remote.requestId, 0), 1));
  } finally {
    call.signal.removeEventListener('abort', onAbort);
    // Free the blocks only when no write reads them any more (vLLM-Ascend #7164).
    await released;
    ctx.cache!.blocks.release(blocks);
    const timeline = ctx.traces!.take(remote.requestId);
    const last = timeline.layers[timeline.layers.length - 1];
    const exposedTailMs = timeline.done !== undefined && last?.ready !== undefined ? timeline.done - last.ready : undefined;
    call.record.kv = { ...timeline, bytes, exposedTailMs };
    ctx.kv.batches = ctx.traces!.totals.batches;
    ctx.kv.writtenBytes = ctx.traces!.totals.bytes;
    ctx.kv.writeMs = ctx.traces!.totals.writeMs;
  }
}

// ------------------------------------------------------------------ decode

async function callMetaserver(ctx: RoleContext, url: string, body: Record<string, unknown>, signal: AbortSignal): Promise<number> {
  const raw = JSON.stringify(body);
  const headers: Record<string, string> = { 'content-type': 'application/json', 'x-request-id': String(body.request_id) };
  if (ctx.settings.proxySecret) headers[SIGNATURE_HEADER] = signBody(ctx.settings.proxySecret, raw);
  const deadline = AbortSignal.timeout(ctx.settings.kvTimeoutMs);
  const both = AbortSignal.any([signal, deadline]);
  let status: number;
  let text: string;
  try {
    const res = await fetch(url, { method: 'POST', headers, body: raw, signal: both });
    status = res.status;
    text = await res.text();
  } catch (err) {
    if (deadline.aborted) throw new HttpError(`the metaserver ${url} did not answer within ${ctx.settings.kvTimeoutMs} ms`, 'ERR_TIMEOUT', 504);
    if (signal.aborted) throw new HttpError('the request was cancelled', 'ERR_ABORTED', 499);
    throw new HttpError(`cannot reach the metaserver ${url}: ${(err as Error).cause ?? (err as Error).message}`, 'ERR_CONNECT', 502);
  }
  if (status < 200 || status > 299) {
    let detail = text;
    try {
      const j = JSON.parse(text) as { error?: { message?: string } };
      detail = j.error?.message ?? text;
    } catch {
      // not JSON: keep the text
    }
    throw new HttpError(`the metaserver answered ${status}: ${detail.slice(0, 500)}`, 'ERR_REMOTE', 502);
  }
  return status;
}

/** Streams (or collects) the generated tokens at the decode-step pace. */
async function generate(ctx: RoleContext, call: Call, events: EventStream | undefined): Promise<void> {
  const { prompt } = call;
  const n = prompt.maxTokens;
  const record = call.record;
  const timing = (record.decode ??= { allocated: now(), verifiedBytes: 0, tokens: 0 });
  let text = '';
  await ctx.runner.decode({
    requestId: call.requestId,
    context: prompt.tokens,
    remaining: n,
    signal: call.signal,
    onToken: (i) => {
      const token = simulatedToken(call.requestId, i);
      const t = now();
      if (i === 0) timing.firstToken = t;
      timing.lastToken = t;
      timing.tokens = i + 1;
      if (events) events.send(chunkBody(prompt, call.requestId, ctx.model, token, i === 0, i === n - 1));
      else text += token;
    },
  });
  if (events) {
    if (prompt.includeUsage) events.send(usageChunk(prompt, call.requestId, ctx.model, n));
    events.end();
  } else {
    sendJson(call.res, 200, completionBody(prompt, call.requestId, ctx.model, text, n));
  }
}

/** Decode (decode-first): blocks, metaserver, KV received and verified, then tokens. */
export async function serveDecode(ctx: RoleContext, call: Call): Promise<void> {
  const kv = call.prompt.kvTransferParams;
  if (!kv || kv.do_remote_prefill !== true || typeof kv.metaserver !== 'string' || !/^https?:\/\//.test(kv.metaserver)) {
    throw badRequest('a decode instance takes requests with kv_transfer_params.do_remote_prefill and a metaserver URL (send requests through the proxy)');
  }
  const metaserver = kv.metaserver;
  const receiver = ctx.receiver!;
  const cache = ctx.cache!;
  const blocks = await allocate(ctx, call);
  const timing = (call.record.decode = { allocated: now(), verifiedBytes: 0, tokens: 0 } as NonNullable<SimRequestRecord['decode']>);
  const id = call.requestId;
  let complete = false;
  let expect: Promise<unknown> | undefined;
  try {
    expect = receiver.expect(id, { blocks, deadlineMs: ctx.settings.kvTimeoutMs });
    const events = call.prompt.stream ? new EventStream(call.res) : undefined;
    events?.open();
    const onAbort = () => receiver.cancel(id, 'the decode request was cancelled');
    call.signal.addEventListener('abort', onAbort, { once: true });
    // Publish the blocks. The call lasts as long as the prefill: it runs on its own while
    // this request waits for the KV (never blocking anything), and a failure answer
    // fails the request at once instead of at the KV deadline (vLLM-Ascend #5404).
    let metaFailure: Error | undefined;
    const address = ctx.engine.address!;
    const colon = address.lastIndexOf(':');
    timing.metaserverCalled = now();
    const call_ = callMetaserver(
      ctx,
      metaserver,
      {
        request_id: id,
        do_remote_prefill: false,
        do_remote_decode: true,
        token_ids: [],
        remote_block_ids: [blocks],
        remote_block_size: [cache.geometry.blockSize],
        remote_engine_id: ctx.engine.name,
        remote_host: address.slice(0, colon).replace(/^\[|\]$/g, ''),
        remote_port: Number(address.slice(colon + 1)),
        remote_tp_size: 1,
        remote_pcp_size: 1,
        remote_dcp_size: 1,
        remote_cached_tokens: 0,
      },
      call.signal,
    ).then(
      (status) => {
        timing.metaserverAnswered = now();
        timing.metaserverStatus = status;
      },
      (err: Error) => {
        timing.metaserverAnswered = now();
        timing.metaserverStatus = err instanceof HttpError ? err.status : 0;
        metaFailure = err;
        receiver.cancel(id, err.message);
      },
    );
    ctx.pending.add(call_);
    void call_.finally(() => ctx.pending.delete(call_));
    try {
      // Check every byte of each layer as it lands, while later layers are still moving.
      for (let layer = 0; layer < ctx.profile.layers; layer++) {
        await receiver.layerArrived(id, layer);
        const t0 = performance.now();
        const { mismatch, bytes } = cache.verifyLayer(id, layer, blocks);
        ctx.kv.verifyMs += performance.now() - t0;
        ctx.kv.verifiedBytes += bytes;
        timing.verifiedBytes += bytes;
        if (mismatch) {
          ctx.kv.verifyFailures++;
          const m = mismatch;
          const message = `KV verification failed: layer ${m.layer}, tensor ${m.tensor}, prompt block ${m.logicalBlock} (cache block ${m.block}), byte ${m.offset} differs from what prefill computed`;
          receiver.cancel(id, message);
          throw new HttpError(message, 'ERR_INTEGRITY', 500);
        }
      }
      await expect;
    } catch (err) {
      throw metaFailure && !isTransferError(err, 'ERR_INTEGRITY') ? metaFailure : err;
    } finally {
      call.signal.removeEventListener('abort', onAbort);
    }
    timing.kvComplete = now();
    ctx.kv.received++;
    complete = true;
    await generate(ctx, call, events);
  } finally {
    if (complete || !expect) {
      cache.blocks.release(blocks);
    } else {
      // After a failure a sender may still have one batch in flight into these blocks.
      const release = receiver.settled(id).then(
        () => cache.blocks.release(blocks),
        () => cache.blocks.release(blocks),
      );
      ctx.pending.add(release);
      void release.finally(() => ctx.pending.delete(release));
    }
  }
}

// ------------------------------------------------------------------ pd

/** Combined instance: embeddings, prefill and decode here; nothing is pushed. */
export async function servePd(ctx: RoleContext, call: Call): Promise<void> {
  if (call.prompt.kvTransferParams) {
    throw badRequest('a combined (PD) instance takes plain requests; kv_transfer_params belong to the decode-first path');
  }
  const blocks = await allocate(ctx, call);
  try {
    const events = call.prompt.stream ? new EventStream(call.res) : undefined;
    events?.open();
    await loadEmbeddings(ctx, call);
    call.record.prefill = await ctx.runner.prefill({ requestId: call.requestId, tokens: call.prompt.tokens, blocks, signal: call.signal });
    await generate(ctx, call, events);
  } finally {
    ctx.cache!.blocks.release(blocks);
  }
}
