/**
 * HTTP plumbing of the simulated workers: OpenAI-shaped errors, JSON answers,
 * and server-sent events with backpressure.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { TransferError, type ErrorCode } from '../errors.js';

/** Every simulated answer carries this header, so no one mistakes it for a model's output. */
export const SIMULATION_HEADER = 'x-epd-simulation';

/** A failure with the HTTP status a worker answers it with. */
export class HttpError extends TransferError {
  /**
   * @param status HTTP status.
   * @param type OpenAI error type (`invalid_request_error`, `server_error`, …).
   */
  constructor(
    message: string,
    code: ErrorCode,
    readonly status: number,
    readonly type = status < 500 ? 'invalid_request_error' : 'server_error',
    options?: { cause?: unknown },
  ) {
    super(message, code, options);
    this.name = 'HttpError';
  }
}

/** A 400 for a request the simulation cannot take. */
export function badRequest(message: string): HttpError {
  return new HttpError(message, 'ERR_BAD_ARGUMENT', 400);
}

const STATUS_OF: Partial<Record<ErrorCode, number>> = {
  ERR_BAD_ARGUMENT: 400,
  ERR_OUT_OF_RANGE: 400,
  ERR_ABORTED: 499,
  ERR_CLOSED: 503,
  ERR_TIMEOUT: 504,
};

/** The status and body of any error. */
export function errorBody(err: unknown): { status: number; body: { error: { message: string; type: string; code: string } } } {
  if (err instanceof HttpError) return { status: err.status, body: { error: { message: err.message, type: err.type, code: err.code } } };
  const code = err instanceof TransferError ? err.code : 'ERR_SYSTEM';
  const message = err instanceof Error ? err.message : String(err);
  const status = STATUS_OF[code] ?? 500;
  return { status, body: { error: { message, type: status < 500 ? 'invalid_request_error' : 'server_error', code } } };
}

/** Sends a JSON body. */
export function sendJson(res: ServerResponse, status: number, value: unknown): void {
  if (res.headersSent || res.destroyed) return;
  const body = JSON.stringify(value);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), [SIMULATION_HEADER]: '1' });
  res.end(body);
}

/** Reports `err` as well as the response's state allows: JSON before the headers, an SSE error event after. */
export function sendError(res: ServerResponse, err: unknown): void {
  if (res.destroyed || res.writableEnded) return;
  const { status, body } = errorBody(err);
  if (!res.headersSent) {
    sendJson(res, status, body);
    return;
  }
  // vLLM's shape: an error event, then the end of the stream.
  res.end(`data: ${JSON.stringify(body)}\n\ndata: [DONE]\n\n`);
}

/** Reads a request body up to `limit` bytes. */
export async function readBody(req: IncomingMessage, limit: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > limit) throw new HttpError(`request body larger than ${limit} bytes`, 'ERR_BAD_ARGUMENT', 413);
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

/**
 * Server-sent events on a response. Events are written as they are produced: a
 * serving engine does not hold its batch for a slow reader (the socket buffers).
 */
export class EventStream {
  constructor(private readonly res: ServerResponse) {}

  /** Sends the headers (vLLM sends them before any work is done). */
  open(): void {
    if (this.res.headersSent) return;
    this.res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', [SIMULATION_HEADER]: '1' });
    this.res.flushHeaders();
  }

  /** Writes one `data:` event (dropped when the client is gone). */
  send(value: unknown): void {
    if (!this.res.destroyed && !this.res.writableEnded) this.res.write(`data: ${JSON.stringify(value)}\n\n`);
  }

  /** Ends the stream with `[DONE]`. */
  end(): void {
    if (!this.res.writableEnded) this.res.end('data: [DONE]\n\n');
  }
}
