/**
 * Errors of the proxy. A {@link ProxyError} is a {@link TransferError} (same `code`
 * vocabulary, `instanceof` holds) that also carries the HTTP status the client gets
 * and whether another instance may be tried.
 */
import { TransferError, type ErrorCode } from '../errors.js';

/** How far an upstream call got before it failed; decides what may be retried. */
export type RetryClass =
  /** The instance never started the work (connection refused, 429, 503): any hop may go elsewhere. */
  | 'not-started'
  /** The instance failed before its first response byte reached the client: a streamed hop may go elsewhere. */
  | 'before-first-byte'
  /** Must not be retried (client error, deadline, cancelled, or bytes already sent). */
  | 'final';

/** What a {@link ProxyError} carries besides its message and code. */
export interface ProxyErrorOptions {
  /** HTTP status for the client (or for the worker calling /v1/metaserver). */
  status: number;
  /** OpenAI-style error `type`; default derived from the status. */
  type?: string;
  retry?: RetryClass;
  /** The failure says something about the instance's health (connection refused or reset). */
  healthEvidence?: 'down' | 'suspect';
  /** The upstream instance involved, if any. */
  instance?: string;
  cause?: unknown;
}

/** A failure with an HTTP status, raised anywhere in the proxy. */
export class ProxyError extends TransferError {
  readonly status: number;
  readonly type: string;
  readonly retry: RetryClass;
  readonly healthEvidence?: 'down' | 'suspect';
  readonly instance?: string;

  constructor(message: string, code: ErrorCode, options: ProxyErrorOptions) {
    super(message, code, { cause: options.cause });
    this.name = 'ProxyError';
    this.status = options.status;
    this.type = options.type ?? defaultType(options.status);
    this.retry = options.retry ?? 'final';
    this.healthEvidence = options.healthEvidence;
    this.instance = options.instance;
  }

  /** The OpenAI-shaped JSON body (`{ error: { message, type, code } }`). */
  toJSON(): { error: { message: string; type: string; code: string } } {
    return { error: { message: this.message, type: this.type, code: this.code } };
  }
}

function defaultType(status: number): string {
  if (status === 401) return 'authentication_error';
  if (status === 404) return 'not_found_error';
  if (status === 413) return 'request_too_large';
  if (status === 429) return 'rate_limit_error';
  if (status === 499) return 'client_closed_request';
  if (status < 500) return 'invalid_request_error';
  if (status === 504) return 'timeout_error';
  return 'upstream_error';
}

/** 400: the client sent something the proxy cannot route. */
export function badRequest(message: string): ProxyError {
  return new ProxyError(message, 'ERR_BAD_ARGUMENT', { status: 400 });
}

/** The client went away; nothing is sent back. */
export function clientGone(): ProxyError {
  return new ProxyError('client disconnected', 'ERR_ABORTED', { status: 499 });
}

/** Normalises anything thrown into a ProxyError (unknown errors become 500). */
export function asProxyError(err: unknown): ProxyError {
  if (err instanceof ProxyError) return err;
  if (err instanceof TransferError) {
    const status = err.code === 'ERR_BAD_ARGUMENT' || err.code === 'ERR_OUT_OF_RANGE' ? 400 : err.code === 'ERR_TIMEOUT' ? 504 : 500;
    return new ProxyError(err.message, err.code, { status, cause: err });
  }
  const message = err instanceof Error ? err.message : String(err);
  return new ProxyError(`internal error: ${message}`, 'ERR_SYSTEM', { status: 500, type: 'internal_error', cause: err });
}
