/**
 * One client request through the disaggregated system:
 *
 *   text        ──────────────────────────────► D ⇄ metaserver ⇄ P   (decode-first)   or  PD
 *   multimodal  ─► E (one sub-request per item) ─► D ⇄ metaserver ⇄ P                     or  PD
 *
 * Every hop charges its instance's load through a Lease released in `finally`, runs
 * under the request's AbortSignal (client disconnect cancels all upstream work) and a
 * deadline, and is retried on another instance only while nothing has reached the
 * client (a prefill only when P never started it).
 */
import type { ServerResponse } from 'node:http';
import { performance } from 'node:perf_hooks';
import { raceAbort } from '../errors.js';
import { ProxyError, asProxyError, badRequest } from './errors.js';
import type { HealthMonitor } from './health.js';
import type { Instance, InstancePool, Lease, Role } from './instances.js';
import type { EmbeddingLocation, EmbeddingLocator } from './locator.js';
import type { ProxyMetrics } from './metrics.js';
import { ENDPOINT_PATHS, decodeBody, encoderBody, pdBody, prefillBody, type MediaItem, type RequestPlan } from './plan.js';
import { StreamWriter, sendRaw } from './reply.js';
import type { Rendezvous } from './rendezvous.js';
import { deadline, readBody, upstreamError, type OpenResponse, type Upstream } from './upstream.js';

/** Deadlines of the hops (ms). */
export interface ProxyTimeouts {
  /** TCP connect to an instance. */
  connectMs: number;
  /** One encoder sub-request, start to finish. */
  encodeMs: number;
  /** The prefill request, start to finish. */
  prefillMs: number;
  /** From sending a request to D until D calls /v1/metaserver. */
  metaserverMs: number;
  /** Until D or PD sends response headers (a non-streamed answer sends them at the end). */
  responseMs: number;
  /** Longest silence between two chunks of a D/PD response. */
  idleMs: number;
  /** A locator lookup; a slow index counts as a miss. */
  locateMs: number;
}

/** The timeline of one request, handed to `onRequest` (the demo draws it). Times are epoch ms. */
export interface RequestTrace {
  id: string;
  endpoint: 'chat' | 'completions';
  stream: boolean;
  route: 'text' | 'multimodal';
  /** `p-d`: decode-first through D and P; `pd`: one combined instance. */
  path?: 'p-d' | 'pd';
  start: number;
  end: number;
  /** HTTP status of the answer; for a failure after the first byte, the status of that failure; 499 when the client left. */
  status: number;
  error?: { code: string; message: string };
  encode?: { start: number; end: number; items: number; encoded: number; cacheHits: number; coalesced: number; instances: string[] };
  prefill?: { start: number; end?: number; instance: string };
  decode?: { start: number; metaserver?: number; firstByte?: number; instance: string };
  retries: number;
}

/** What a request flow needs from the proxy. */
export interface FlowContext {
  pools: Map<Role, InstancePool>;
  upstream: Upstream;
  locator: EmbeddingLocator;
  rendezvous: Rendezvous;
  health: HealthMonitor;
  metrics: ProxyMetrics;
  timeouts: ProxyTimeouts;
  maxRetries: number;
  maxResponseBytes: number;
  metaserverUrl: string;
  /** Encodes in flight by item key, so identical items of concurrent requests are encoded once. */
  encoding: Map<string, Promise<void>>;
}

/** Wall-clock time in ms with sub-millisecond precision (trace timestamps). */
export function now(): number {
  return performance.timeOrigin + performance.now();
}

/** Reason of an attempt's scope when the attempt is over (one object: no stack captured per request). */
const ATTEMPT_ENDED = new ProxyError('the decode attempt ended', 'ERR_ABORTED', { status: 499 });

function noInstance(role: Role): ProxyError {
  return new ProxyError(`no ${role} instance is available`, 'ERR_BACKEND_UNAVAILABLE', { status: 503, type: 'service_unavailable' });
}

/** Which path a planned request takes; throws 503 when none can serve it. */
export function choosePath(ctx: FlowContext, plan: RequestPlan): 'p-d' | 'pd' {
  const disaggregated = ctx.pools.get('prefill')!.routableCount > 0 && ctx.pools.get('decode')!.routableCount > 0;
  if (disaggregated && !plan.batched) return 'p-d';
  if (ctx.pools.get('pd')!.routableCount > 0) return 'pd';
  if (disaggregated) {
    throw badRequest('a completions request with several prompts cannot take the decode-first path; send one prompt per request');
  }
  const missing = ctx.pools.get('decode')!.size > 0 || ctx.pools.get('prefill')!.size > 0 ? 'prefill and decode' : 'pd';
  throw new ProxyError(`no ${missing} instance is available`, 'ERR_BACKEND_UNAVAILABLE', { status: 503, type: 'service_unavailable' });
}

/**
 * Leases an instance of `role` and runs `hop` on it; on a failure that `canRetry`
 * accepts, tries another instance (never one already tried), up to `maxRetries` times.
 */
async function onInstance<T>(
  ctx: FlowContext,
  role: Role,
  tokens: number,
  signal: AbortSignal,
  options: { prefer?: ReadonlySet<string>; canRetry(err: ProxyError, instance: Instance): boolean; trace?: RequestTrace },
  hop: (lease: Lease, attempt: number) => Promise<T>,
): Promise<T> {
  const pool = ctx.pools.get(role)!;
  const tried = new Set<Instance>();
  let last: ProxyError | undefined;
  for (let attempt = 0; ; attempt++) {
    const lease = pool.lease(tokens, { exclude: tried, prefer: options.prefer });
    if (!lease) throw last ?? noInstance(role);
    if (attempt > 0) {
      ctx.metrics.retries.inc({ role });
      if (options.trace) options.trace.retries++;
    }
    const instance = lease.instance;
    tried.add(instance);
    const started = performance.now();
    try {
      const result = await hop(lease, attempt);
      ctx.health.succeeded(instance);
      ctx.metrics.hops.inc({ role, outcome: 'ok' });
      return result;
    } catch (e) {
      const err = asProxyError(e);
      ctx.metrics.hops.inc({ role, outcome: err.code });
      ctx.health.observe(instance, err);
      if (signal.aborted) throw asProxyError(signal.reason);
      if (attempt >= ctx.maxRetries || !options.canRetry(err, instance)) throw err;
      last = err;
    } finally {
      ctx.metrics.hopDuration.observe({ role }, (performance.now() - started) / 1000);
      lease.release();
    }
  }
}

/** The failure is this instance's own and happened before anything reached the client. */
function ownFailureBeforeFirstByte(writer: StreamWriter | undefined) {
  return (err: ProxyError, instance: Instance) => err.instance === instance.url && err.retry !== 'final' && !writer?.started;
}

/** Resolves with `promise`, or rejects with the signal's reason when it aborts first. */
function abortable<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  return raceAbort(promise, signal, () => asProxyError(signal.reason));
}

// ---------------------------------------------------------------- encode

/**
 * Sends every media item to an encoder, concurrently; the first failure aborts
 * the others (fail fast). Resolves once every item's embedding is available.
 */
export async function encodeItems(ctx: FlowContext, plan: RequestPlan, requestId: string, parent: AbortSignal, trace: RequestTrace): Promise<void> {
  const stats = (trace.encode = { start: now(), end: 0, items: plan.items.length, encoded: 0, cacheHits: 0, coalesced: 0, instances: [] as string[] });
  const failFast = deadline(parent, undefined, () => 'encode');
  let first: unknown;
  try {
    const results = await Promise.allSettled(
      plan.items.map((item) =>
        encodeItem(ctx, plan, item, requestId, failFast.signal, stats).catch((err) => {
          first ??= err;
          failFast.abort(err);
          throw err;
        }),
      ),
    );
    if (results.some((r) => r.status === 'rejected')) throw first;
  } finally {
    failFast.done();
    stats.end = now();
  }
}

type EncodeStats = NonNullable<RequestTrace['encode']>;

async function locate(ctx: FlowContext, key: string): Promise<EmbeddingLocation | undefined> {
  let timer: NodeJS.Timeout | undefined;
  try {
    const answer = ctx.locator.locate(key);
    if (!(answer instanceof Promise)) return answer;
    // A slow or failing index must not hold requests up: it counts as a miss.
    const late = new Promise<undefined>((resolve) => (timer = setTimeout(resolve, ctx.timeouts.locateMs, undefined)));
    return await Promise.race([answer.catch(() => undefined), late]);
  } catch {
    return undefined;
  } finally {
    if (timer) clearTimeout(timer);
  }
}

async function encodeItem(ctx: FlowContext, plan: RequestPlan, item: MediaItem, requestId: string, signal: AbortSignal, stats: EncodeStats): Promise<void> {
  let where = await locate(ctx, item.key);
  if (where?.loadable) {
    stats.cacheHits++;
    ctx.metrics.mediaItems.inc({ result: 'cache_hit' });
    return;
  }
  const pending = ctx.encoding.get(item.key);
  if (pending) {
    // The same media is being encoded for another request: wait for it rather than encode it twice.
    try {
      await abortable(pending, signal);
    } catch (err) {
      if (signal.aborted) throw err;
      // The other request failed or was cancelled: encode it ourselves.
    }
    where = await locate(ctx, item.key);
    if (where?.loadable) {
      stats.coalesced++;
      ctx.metrics.mediaItems.inc({ result: 'coalesced' });
      return;
    }
  }
  const run = encodeOnce(ctx, plan, item, requestId, signal, stats, where?.encoders);
  ctx.encoding.set(item.key, run);
  try {
    await run;
  } finally {
    if (ctx.encoding.get(item.key) === run) ctx.encoding.delete(item.key);
  }
}

async function encodeOnce(
  ctx: FlowContext,
  plan: RequestPlan,
  item: MediaItem,
  requestId: string,
  signal: AbortSignal,
  stats: EncodeStats,
  holders: readonly string[] | undefined,
): Promise<void> {
  const body = encoderBody(plan, item);
  const prefer = holders && holders.length > 0 ? new Set(holders) : undefined;
  // An encoder answer is never streamed: any failure of the instance itself may go elsewhere.
  const canRetry = (err: ProxyError, i: Instance) => err.instance === i.url && err.retry !== 'final';
  await onInstance(ctx, 'encode', item.tokens, signal, { prefer, canRetry }, async (lease) => {
    const e = lease.instance;
    const hop = deadline(signal, ctx.timeouts.encodeMs, () => `encode instance ${e.url} did not finish item ${item.index}`, e.url);
    try {
      const res = await ctx.upstream.postRead(e, ENDPOINT_PATHS.chat, body, {
        requestId: `${requestId}:e${item.index}`,
        signal: hop.signal,
        headersTimeoutMs: ctx.timeouts.encodeMs,
        idleTimeoutMs: ctx.timeouts.encodeMs,
      });
      recordEncoded(ctx, item, e, res.raw);
      stats.encoded++;
      stats.instances.push(e.url);
      ctx.metrics.mediaItems.inc({ result: 'encoded' });
    } catch (err) {
      throw upstreamError(err, e, hop.signal);
    } finally {
      hop.done();
    }
  });
}

/** Feeds the locator with the hashes an encoder reports in `ec_transfer_params`. */
function recordEncoded(ctx: FlowContext, item: MediaItem, encoder: Instance, raw: Buffer): void {
  let params: Record<string, unknown> = {};
  try {
    const json = JSON.parse(raw.toString('utf8')) as { ec_transfer_params?: unknown };
    if (typeof json.ec_transfer_params === 'object' && json.ec_transfer_params !== null) params = json.ec_transfer_params as Record<string, unknown>;
  } catch {
    // An encoder that answers 2xx with something else still encoded the item; only the hint is lost.
  }
  const hashes = Array.isArray(params.mm_hashes) ? params.mm_hashes.filter((h): h is string => typeof h === 'string') : [];
  ctx.locator.recordEncoded({ itemKey: item.key, mmHashes: hashes, encoder: encoder.url, params });
}

// ---------------------------------------------------------------- decode / pd

/** Streams (or, for a non-streamed request, reads then sends) an upstream answer to the client. */
async function relay(ctx: FlowContext, res: OpenResponse, client: ServerResponse, writer: StreamWriter, plan: RequestPlan, from: Instance, signal: AbortSignal, trace: RequestTrace): Promise<void> {
  if (!plan.stream) {
    // Read whole, so a failure anywhere in the body can still go to another instance.
    const raw = await readBody(res.body, ctx.maxResponseBytes, from, signal, res.contentLength);
    if (trace.decode) trace.decode.firstByte = now();
    sendRaw(client, 200, res.contentType, raw);
    return;
  }
  const chunks = res.body[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  const next = async () => {
    try {
      return await chunks.next();
    } catch (err) {
      throw upstreamError(err, from, signal);
    }
  };
  let chunk = await next();
  if (chunk.done) {
    // A 200 with an empty stream is a failure (the original relayed it as success).
    throw new ProxyError(`${from.role} instance ${from.url} ended its stream without sending anything`, 'ERR_PROTOCOL', {
      status: 502,
      retry: 'before-first-byte',
      instance: from.url,
    });
  }
  if (trace.decode) trace.decode.firstByte = now();
  while (!chunk.done) {
    await writer.write(chunk.value, res.contentType, signal);
    chunk = await next();
  }
  writer.end();
}

/** E→PD / text→PD: forwards the request to one combined instance. */
export async function forwardPd(ctx: FlowContext, plan: RequestPlan, requestId: string, signal: AbortSignal, client: ServerResponse, writer: StreamWriter, trace: RequestTrace): Promise<void> {
  const body = pdBody(plan);
  const canRetry = ownFailureBeforeFirstByte(writer);
  await onInstance(ctx, 'pd', plan.promptTokens + plan.maxTokens, signal, { canRetry, trace }, async (lease, attempt) => {
    const pd = lease.instance;
    const hopId = attempt === 0 ? requestId : `${requestId}:r${attempt}`;
    trace.decode = { start: now(), instance: pd.url };
    let res: OpenResponse | undefined;
    try {
      res = await ctx.upstream.post(pd, ENDPOINT_PATHS[plan.endpoint], body, {
        requestId: hopId,
        signal,
        headersTimeoutMs: ctx.timeouts.responseMs,
        idleTimeoutMs: ctx.timeouts.idleMs,
      });
      await relay(ctx, res, client, writer, plan, pd, signal, trace);
    } catch (err) {
      // Relaying may have stopped early: release the upstream connection now.
      res?.body.destroy();
      throw upstreamError(err, pd, signal);
    }
  });
}

/**
 * The decode-first flow: D gets the request with `do_remote_prefill` and the
 * metaserver URL; when D calls the metaserver with its block ids, P gets the prompt
 * as a one-token request carrying D's parameters; D's answer streams to the client.
 */
export async function decodeFirst(ctx: FlowContext, plan: RequestPlan, requestId: string, signal: AbortSignal, client: ServerResponse, writer: StreamWriter, trace: RequestTrace): Promise<void> {
  const body = decodeBody(plan, ctx.metaserverUrl);
  const canRetry = ownFailureBeforeFirstByte(writer);
  await onInstance(ctx, 'decode', plan.promptTokens + plan.maxTokens, signal, { canRetry, trace }, async (lease, attempt) => {
    const d = lease.instance;
    const hopId = attempt === 0 ? requestId : `${requestId}:r${attempt}`;
    // Aborted when the client leaves, when D misses the metaserver deadline, when the prefill
    // fails, and when this attempt ends (so a prefill still running for it is cancelled).
    const attemptScope = deadline(signal, undefined, () => 'decode');
    const decode = (trace.decode = { start: now(), instance: d.url } as NonNullable<RequestTrace['decode']>);
    const close = ctx.rendezvous.open(
      hopId,
      ctx.timeouts.metaserverMs,
      (err) => attemptScope.abort(err),
      async (params) => {
        decode.metaserver = now();
        try {
          return await prefill(ctx, plan, hopId, params, attemptScope.signal, trace);
        } catch (e) {
          const err = asProxyError(e);
          // D cannot produce anything without its KV: stop it now rather than at its own deadline.
          attemptScope.abort(err);
          throw err;
        }
      },
    );
    try {
      const res = await ctx.upstream.post(d, ENDPOINT_PATHS[plan.endpoint], body, {
        requestId: hopId,
        signal: attemptScope.signal,
        headersTimeoutMs: ctx.timeouts.responseMs,
        idleTimeoutMs: ctx.timeouts.idleMs,
      });
      await relay(ctx, res, client, writer, plan, d, attemptScope.signal, trace);
    } catch (err) {
      throw upstreamError(err, d, attemptScope.signal);
    } finally {
      close();
      // Cancels a prefill still running for this attempt (after a success it has finished: a no-op).
      attemptScope.abort(ATTEMPT_ENDED);
      attemptScope.done();
    }
  });
}

/** The prefill hop. Retried only when P never started it: a P that began may have pushed KV into D. */
async function prefill(ctx: FlowContext, plan: RequestPlan, hopId: string, decodeParams: Record<string, unknown>, signal: AbortSignal, trace: RequestTrace) {
  const body = prefillBody(plan, decodeParams);
  const canRetry = (err: ProxyError, i: Instance) => err.instance === i.url && err.retry === 'not-started';
  return onInstance(ctx, 'prefill', plan.promptTokens, signal, { canRetry, trace }, async (lease) => {
    const p = lease.instance;
    const span = (trace.prefill = { start: now(), instance: p.url } as NonNullable<RequestTrace['prefill']>);
    const hop = deadline(signal, ctx.timeouts.prefillMs, () => `prefill instance ${p.url} did not finish`, p.url);
    try {
      await ctx.upstream.postRead(p, ENDPOINT_PATHS[plan.endpoint], body, {
        requestId: hopId,
        signal: hop.signal,
        headersTimeoutMs: ctx.timeouts.prefillMs,
        idleTimeoutMs: ctx.timeouts.prefillMs,
      });
      span.end = now();
      return { prefill: p.url };
    } catch (err) {
      throw upstreamError(err, p, hop.signal);
    } finally {
      hop.done();
    }
  });
}
