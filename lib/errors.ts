/**
 * The one error class of epd-transfer. Every failure — argument checks in
 * TypeScript, failures inside the native core, remote errors — is a
 * `TransferError` with a string {@link ErrorCode}, so callers branch on `err.code`.
 */

/** Every code a {@link TransferError} can carry. */
export type ErrorCode =
  | 'ERR_BAD_ARGUMENT'
  | 'ERR_OUT_OF_RANGE'
  | 'ERR_UNKNOWN_REGION'
  | 'ERR_UNKNOWN_PEER'
  | 'ERR_CLOSED'
  | 'ERR_ABORTED'
  | 'ERR_TIMEOUT'
  | 'ERR_PEER_LOST'
  | 'ERR_REGION_FREED'
  | 'ERR_NOT_SHAREABLE'
  | 'ERR_BACKEND_UNAVAILABLE'
  | 'ERR_PROTOCOL_VERSION'
  | 'ERR_PROTOCOL'
  | 'ERR_CONNECT'
  | 'ERR_NO_HANDLER'
  | 'ERR_REMOTE'
  /** A peer failed (or could not attempt) the shared-secret proof. */
  | 'ERR_AUTH'
  /** A checksum did not match: the bytes that landed are not the bytes that were sent. */
  | 'ERR_INTEGRITY'
  /** The metadata service (etcd) could not be reached, or did not answer within the deadline. */
  | 'ERR_METADATA_UNAVAILABLE'
  /** Another live engine (or proxy) already published this name in the metadata service. */
  | 'ERR_NAME_IN_USE'
  /** This process's etcd lease expired or was revoked: what it published is gone until it is re-published. */
  | 'ERR_LEASE_LOST'
  /** A store is full of entries it may not evict (pinned, being written), or an item exceeds its capacity. */
  | 'ERR_CAPACITY'
  /** A named resource (e.g. an encoder-cache store opened without a capacity) does not exist. */
  | 'ERR_NOT_FOUND'
  | 'ERR_SYSTEM';

/** An error with a machine-readable {@link ErrorCode}. Also constructed by the native addon. */
export class TransferError extends Error {
  /** What went wrong, as a stable string. */
  readonly code: ErrorCode;
  /** For `ERR_SYSTEM`: the OS errno. */
  errno?: number;
  /** For failed batches: bytes that had been moved before the failure. */
  bytesMoved?: number;

  constructor(message: string, code: ErrorCode = 'ERR_SYSTEM', options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'TransferError';
    this.code = code;
  }
}

/** True when `err` is a {@link TransferError}, optionally with the given code. */
export function isTransferError(err: unknown, code?: ErrorCode): err is TransferError {
  return err instanceof TransferError && (code === undefined || err.code === code);
}

/**
 * Appends the stack of the call that started an async operation, so an error
 * raised later on a worker thread still points at the caller's line.
 */
export function withCallerStack<E>(err: E, caller: Error): E {
  if (err instanceof Error && caller.stack) {
    const frames = caller.stack.split('\n').slice(1).join('\n');
    err.stack = `${err.stack ?? String(err)}\n    --- submitted at ---\n${frames}`;
  }
  return err;
}

/**
 * Resolves or rejects as `promise` does, unless `signal` aborts first: then rejects
 * with `onAbort()` (also at once when it already has). The listener is removed
 * either way; `promise` itself is not cancelled.
 */
export function raceAbort<T>(promise: Promise<T>, signal: AbortSignal, onAbort: () => Error): Promise<T> {
  if (signal.aborted) return Promise.reject(onAbort());
  return new Promise<T>((resolve, reject) => {
    const abort = () => reject(onAbort());
    signal.addEventListener('abort', abort, { once: true });
    promise.then(
      (v) => {
        signal.removeEventListener('abort', abort);
        resolve(v);
      },
      (e) => {
        signal.removeEventListener('abort', abort);
        reject(e);
      },
    );
  });
}
