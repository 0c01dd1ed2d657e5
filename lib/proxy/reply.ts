/**
 * Writing to the client: JSON answers, streamed pass-through with backpressure,
 * and errors in the form the client can still receive (a JSON body before the
 * first byte; an SSE error event in the middle of a stream; a cut connection in
 * the middle of any other body).
 */
import { once } from 'node:events';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { ProxyError, asProxyError, badRequest, clientGone } from './errors.js';

/** Sends a JSON body. */
export function sendJson(res: ServerResponse, status: number, value: unknown, headers: Record<string, string> = {}): void {
  const body = JSON.stringify(value);
  res.writeHead(status, { ...headers, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

/** Sends bytes as they are. */
export function sendRaw(res: ServerResponse, status: number, contentType: string, body: Buffer): void {
  res.writeHead(status, { 'content-type': contentType, 'content-length': body.length });
  res.end(body);
}

function isEventStream(res: ServerResponse): boolean {
  return String(res.getHeader('content-type') ?? '').startsWith('text/event-stream');
}

/**
 * Reports `err` to the client as well as the response's state allows. Does
 * nothing when the client is gone.
 */
export function sendError(res: ServerResponse, err: ProxyError, streamAtEventBoundary = true): void {
  if (res.destroyed || res.writableEnded) return;
  if (!res.headersSent) {
    // A 413 leaves an unread body behind: close rather than parse it as the next request.
    sendJson(res, err.status === 499 ? 500 : err.status, err.toJSON(), err.status === 413 ? { connection: 'close' } : {});
    return;
  }
  if (isEventStream(res)) {
    // OpenAI clients raise an error on an SSE event carrying `error`. A blank line first
    // ends any event the upstream left half-written.
    res.end(`${streamAtEventBoundary ? '' : '\n\n'}data: ${JSON.stringify(err.toJSON())}\n\n`);
    return;
  }
  // Half a JSON body cannot be repaired: a cut connection is the honest signal.
  res.destroy();
}

/** A streamed response to the client. Headers go out with the first chunk. */
export class StreamWriter {
  /** The last bytes written end an SSE event (so an error event can follow cleanly). */
  atEventBoundary = true;

  constructor(
    private readonly res: ServerResponse,
    /** Longest wait for a client that stopped reading (ms); then the response is cut. */
    private readonly drainTimeoutMs: number,
  ) {}

  get started(): boolean {
    return this.res.headersSent;
  }

  /** Writes one chunk, waiting while the client's socket is full. */
  async write(chunk: Buffer, contentType: string, signal: AbortSignal): Promise<void> {
    const res = this.res;
    if (!res.headersSent) {
      res.writeHead(200, { 'content-type': contentType, 'cache-control': 'no-cache', 'x-accel-buffering': 'no' });
    }
    const len = chunk.length;
    if (len > 0) this.atEventBoundary = len >= 2 && chunk[len - 1] === 0x0a && chunk[len - 2] === 0x0a;
    if (res.write(chunk)) return;
    // A client that keeps its connection open but stops reading would otherwise hold the
    // upstream stream and its instance's load for ever.
    const stalled = new AbortController();
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      stalled.abort();
    }, this.drainTimeoutMs);
    const onAbort = () => stalled.abort();
    signal.addEventListener('abort', onAbort, { once: true });
    try {
      await once(res, 'drain', { signal: stalled.signal });
    } catch {
      if (signal.aborted) throw asProxyError(signal.reason);
      if (!timedOut) throw clientGone();
      res.destroy();
      throw new ProxyError(`the client read nothing for ${this.drainTimeoutMs} ms`, 'ERR_TIMEOUT', { status: 499, type: 'client_closed_request' });
    } finally {
      clearTimeout(timer);
      signal.removeEventListener('abort', onAbort);
    }
  }

  end(): void {
    this.res.end();
  }
}

/** Reads a request body up to `limit` bytes (events rather than an async iterator: this runs for every request). */
export function readRequestBody(req: IncomingMessage, limit: number, signal: AbortSignal): Promise<Buffer> {
  const declared = Number(req.headers['content-length']);
  if (Number.isFinite(declared) && declared > limit) return Promise.reject(tooLarge(limit));
  return new Promise<Buffer>((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const cleanup = () => {
      req.off('data', onData);
      req.off('end', onEnd);
      req.off('error', onError);
      req.off('aborted', onError);
    };
    const onData = (chunk: Buffer) => {
      size += chunk.length;
      if (size > limit) {
        cleanup();
        req.resume(); // let the rest drain; the 413 closes the connection
        reject(tooLarge(limit));
        return;
      }
      chunks.push(chunk);
    };
    const onEnd = () => {
      cleanup();
      resolve(chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, size));
    };
    const onError = () => {
      cleanup();
      reject(signal.aborted ? asProxyError(signal.reason) : clientGone());
    };
    req.on('data', onData);
    req.on('end', onEnd);
    req.on('error', onError);
    req.on('aborted', onError);
  });
}

function tooLarge(limit: number): ProxyError {
  return new ProxyError(`the request body is larger than ${limit} bytes`, 'ERR_OUT_OF_RANGE', { status: 413 });
}

/** Parses a JSON body (400 when it is not JSON). */
export function parseJson(raw: Buffer): unknown {
  try {
    return JSON.parse(raw.toString('utf8'));
  } catch {
    throw badRequest('the request body is not valid JSON');
  }
}
