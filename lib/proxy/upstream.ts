/**
 * Calls to upstream instances over pooled keep-alive connections (undici). Every
 * call has a deadline and an AbortSignal; every failure becomes a {@link ProxyError}
 * that says what the client should see, whether another instance may be tried and
 * whether it says something about the instance's health.
 */
import type { Readable } from 'node:stream';
import { Agent, errors as undiciErrors } from 'undici';
import { ProxyError, asProxyError } from './errors.js';
import type { Instance } from './instances.js';

/** Settings of the upstream HTTP client. */
export interface UpstreamOptions {
  /** TCP connect deadline (ms). */
  connectTimeoutMs: number;
  /** Largest response body read into memory (non-streamed answers, error bodies). */
  maxResponseBytes: number;
}

/** Per-call settings of an upstream POST. */
export interface HopOptions {
  /** Sent as X-Request-Id. */
  requestId: string;
  /** Aborts the call; its `reason` becomes the error. */
  signal: AbortSignal;
  /** Deadline for the response headers (ms). */
  headersTimeoutMs: number;
  /** Longest silence between two body chunks (ms). */
  idleTimeoutMs: number;
}

/** An upstream response whose body is still arriving. */
export interface OpenResponse {
  status: number;
  contentType: string;
  /** Declared body length, when the upstream sent Content-Length. */
  contentLength?: number;
  body: Readable;
}

/** A fully read upstream response. */
export interface ReadResponse {
  status: number;
  contentType: string;
  raw: Buffer;
}

const CONNECT_CODES = new Set(['ECONNREFUSED', 'UND_ERR_CONNECT_TIMEOUT', 'ENOTFOUND', 'EHOSTUNREACH', 'ENETUNREACH', 'EADDRNOTAVAIL', 'EAI_AGAIN']);
const LOST_CODES = new Set(['UND_ERR_SOCKET', 'ECONNRESET', 'EPIPE', 'UND_ERR_CLOSED']);

/** Maps a failed call to a ProxyError. An aborted call reports the abort's reason. */
export function upstreamError(err: unknown, instance: Instance, signal?: AbortSignal): ProxyError {
  if (signal?.aborted) return asProxyError(signal.reason);
  if (err instanceof ProxyError) return err;
  const code = (err as { code?: string })?.code ?? '';
  const cause = (err as { cause?: { code?: string } })?.cause?.code ?? '';
  const where = `${instance.role} instance ${instance.url}`;
  if (CONNECT_CODES.has(code) || CONNECT_CODES.has(cause)) {
    return new ProxyError(`cannot connect to ${where} (${code || cause})`, 'ERR_CONNECT', {
      status: 502,
      retry: 'not-started',
      healthEvidence: 'down',
      instance: instance.url,
      cause: err,
    });
  }
  if (LOST_CODES.has(code) || LOST_CODES.has(cause)) {
    return new ProxyError(`${where} closed the connection (${code || cause})`, 'ERR_PEER_LOST', {
      status: 502,
      retry: 'before-first-byte',
      healthEvidence: 'suspect',
      instance: instance.url,
      cause: err,
    });
  }
  if (err instanceof undiciErrors.HeadersTimeoutError) {
    return new ProxyError(`${where} sent no response headers within its deadline`, 'ERR_TIMEOUT', { status: 504, instance: instance.url, cause: err });
  }
  if (err instanceof undiciErrors.BodyTimeoutError) {
    return new ProxyError(`${where} stalled in the middle of its response`, 'ERR_TIMEOUT', { status: 504, instance: instance.url, cause: err });
  }
  const message = err instanceof Error ? err.message : String(err);
  return new ProxyError(`${where} failed: ${message}`, 'ERR_REMOTE', { status: 502, retry: 'before-first-byte', instance: instance.url, cause: err });
}

/** Maps a non-2xx upstream answer to a ProxyError carrying the upstream's message. */
export function statusError(status: number, raw: Buffer, instance: Instance): ProxyError {
  const detail = errorMessage(raw);
  const message = `${instance.role} instance ${instance.url} answered ${status}${detail ? `: ${detail}` : ''}`;
  if (status === 429 || status === 503) {
    // The instance refused the work outright (overloaded, draining): another one may take it.
    return new ProxyError(message, 'ERR_REMOTE', { status: 503, type: 'overloaded_error', retry: 'not-started', instance: instance.url });
  }
  if (status >= 400 && status < 500) {
    // The client's request is at fault; the same request fails anywhere.
    return new ProxyError(detail || message, 'ERR_REMOTE', { status, instance: instance.url });
  }
  return new ProxyError(message, 'ERR_REMOTE', { status: 502, retry: 'before-first-byte', instance: instance.url });
}

function errorMessage(raw: Buffer): string {
  const text = raw.subarray(0, 4096).toString('utf8').trim();
  try {
    const j = JSON.parse(text) as { error?: { message?: unknown } | string; message?: unknown; detail?: unknown };
    const m = typeof j.error === 'string' ? j.error : (j.error?.message ?? j.message ?? j.detail);
    if (typeof m === 'string') return m.slice(0, 1000);
  } catch {
    /* not JSON */
  }
  return text.slice(0, 1000);
}

/** Reads a whole body, failing once it exceeds `limit` bytes. */
export async function readBody(body: Readable, limit: number, instance: Instance, signal?: AbortSignal, contentLength?: number): Promise<Buffer> {
  if (contentLength !== undefined && contentLength <= limit) {
    // The common case (a JSON answer with Content-Length): one read, no async iteration.
    try {
      return Buffer.from(await (body as unknown as { arrayBuffer(): Promise<ArrayBuffer> }).arrayBuffer());
    } catch (err) {
      throw upstreamError(err, instance, signal);
    }
  }
  const chunks: Buffer[] = [];
  let size = 0;
  try {
    for await (const chunk of body as AsyncIterable<Buffer>) {
      size += chunk.length;
      if (size > limit) {
        body.destroy();
        throw new ProxyError(`${instance.role} instance ${instance.url} sent more than ${limit} bytes`, 'ERR_PROTOCOL', { status: 502, instance: instance.url });
      }
      chunks.push(chunk);
    }
  } catch (err) {
    throw upstreamError(err, instance, signal);
  }
  return chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, size);
}

/** A child AbortSignal with an optional deadline. */
export interface Scope {
  signal: AbortSignal;
  /** Aborts this scope (not the parent) with `reason`. */
  abort(reason: unknown): void;
  /** Clears the timer and detaches from the parent; call it on every path. */
  done(): void;
}

/**
 * A signal that aborts when `parent` does, when `abort()` is called, or with a 504
 * after `timeoutMs` (the message is `what()` + " within N ms").
 */
export function deadline(parent: AbortSignal, timeoutMs: number | undefined, what: () => string, instance?: string): Scope {
  const controller = new AbortController();
  const onAbort = () => controller.abort(parent.reason);
  if (parent.aborted) controller.abort(parent.reason);
  else parent.addEventListener('abort', onAbort, { once: true });
  const timer =
    timeoutMs === undefined
      ? undefined
      : setTimeout(() => controller.abort(new ProxyError(`${what()} within ${timeoutMs} ms`, 'ERR_TIMEOUT', { status: 504, instance })), timeoutMs);
  return {
    signal: controller.signal,
    abort(reason: unknown) {
      if (!controller.signal.aborted) controller.abort(reason);
    },
    done() {
      if (timer) clearTimeout(timer);
      parent.removeEventListener('abort', onAbort);
    },
  };
}

/** The proxy's HTTP client for all upstream instances. */
export class Upstream {
  private readonly agent: Agent;

  constructor(private readonly options: UpstreamOptions) {
    // Keep-alive is shorter than the workers' (Node and uvicorn default to 5 s), so the
    // proxy never sends on a connection the worker is about to close.
    this.agent = new Agent({ connect: { timeout: options.connectTimeoutMs }, keepAliveTimeout: 4_000, keepAliveMaxTimeout: 4_000 });
  }

  /** POSTs JSON; resolves once a 2xx answer's headers are in, with the body still streaming. */
  async post(instance: Instance, path: string, body: string, options: HopOptions): Promise<OpenResponse> {
    let res;
    try {
      res = await this.agent.request({
        origin: instance.origin,
        path: instance.basePath + path,
        method: 'POST',
        headers: { 'content-type': 'application/json', 'x-request-id': options.requestId },
        body,
        signal: options.signal,
        headersTimeout: options.headersTimeoutMs,
        bodyTimeout: options.idleTimeoutMs,
      });
    } catch (err) {
      throw upstreamError(err, instance, options.signal);
    }
    const contentType = String(res.headers['content-type'] ?? 'application/json');
    const length = res.headers['content-length'];
    const contentLength = typeof length === 'string' && /^\d+$/.test(length) ? Number(length) : undefined;
    if (res.statusCode < 200 || res.statusCode >= 300) {
      const raw = await readBody(res.body, this.options.maxResponseBytes, instance, options.signal, contentLength);
      throw statusError(res.statusCode, raw, instance);
    }
    return { status: res.statusCode, contentType, contentLength, body: res.body };
  }

  /** POSTs JSON and reads the whole 2xx answer. */
  async postRead(instance: Instance, path: string, body: string, options: HopOptions): Promise<ReadResponse> {
    const res = await this.post(instance, path, body, options);
    return { status: res.status, contentType: res.contentType, raw: await readBody(res.body, this.options.maxResponseBytes, instance, options.signal, res.contentLength) };
  }

  /** GETs a path; any status resolves (health probes and /v1/models decide for themselves). */
  async get(instance: Instance, path: string, options: { timeoutMs: number; signal: AbortSignal; requestId?: string }): Promise<ReadResponse> {
    const limit = deadline(options.signal, options.timeoutMs, () => `${instance.role} instance ${instance.url} did not answer GET ${path}`);
    try {
      const res = await this.agent.request({
        origin: instance.origin,
        path: instance.basePath + path,
        method: 'GET',
        headers: options.requestId ? { 'x-request-id': options.requestId } : {},
        signal: limit.signal,
      });
      const raw = await readBody(res.body, this.options.maxResponseBytes, instance, limit.signal);
      return { status: res.statusCode, contentType: String(res.headers['content-type'] ?? ''), raw };
    } catch (err) {
      throw upstreamError(err, instance, limit.signal);
    } finally {
      limit.done();
    }
  }

  /** Closes idle connections and aborts the rest. */
  async close(): Promise<void> {
    await this.agent.destroy();
  }
}
