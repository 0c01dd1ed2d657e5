/**
 * Control messages of the layerwise push. Prefill connects to decode and sends
 * them with `peer.request(topic, body)`; decode answers in its `engine.handle`
 * handlers. Bytes never travel here — only which blocks landed, checksums,
 * credits and completion.
 *
 *   kv.hello   P → D  sender id, session, local geometry   ← D's layout, the credit window, its version
 *   kv.layer   P → D  one written batch of one layer, or    ← credit returned, per-request refusals
 *                      of several whole consecutive layers (version 2: `layers`)
 *                      (a request's last batch carries its DONE, answered in the same reply)
 *   kv.done    P → D  a request's last layer is in          ← accepted (idempotent) or the failure
 *                      (alone: when the last batch was empty, or its reply was lost)
 *   kv.failed  P → D  a request failed on prefill           ← acknowledged (idempotent)
 */
import { TransferError, type ErrorCode } from '../errors.js';

export const TOPIC_HELLO = 'kv.hello';
export const TOPIC_LAYER = 'kv.layer';
export const TOPIC_DONE = 'kv.done';
export const TOPIC_FAILED = 'kv.failed';

/**
 * Version of the `kv.*` messages. 1: one layer per `kv.layer` notice. 2: a notice may
 * cover several whole consecutive layers (`LayerBody.layers`, `LayerEntry.crcs`). Each
 * side says its version in `kv.hello`; a sender fuses layers only for a receiver that
 * answered 2 or more. A message without `version` is version 1.
 */
export const KV_PROTOCOL_VERSION = 2;

/** P → D: who is sending and with what geometry. */
export interface HelloBody {
  sender: string;
  /** Random per sender instance: a restarted sender is a new session. */
  session: string;
  /** Prefill tokens per block. */
  blockSize: number;
  /** `layers[l][t]`: prefill bytes per block of tensor t of layer l. */
  layers: number[][];
  /** The sender's {@link KV_PROTOCOL_VERSION}; absent: 1. */
  version?: number;
}

export interface HelloReply {
  layout: unknown;
  /** Bytes this sender may have written but not yet acknowledged. */
  windowBytes: number;
  /** The receiver's {@link KV_PROTOCOL_VERSION}; absent: 1 (no multi-layer notices). */
  version?: number;
}

/** One request's share of a layer batch. Blocks are logical, in prefill-block units. */
export interface LayerEntry {
  id: string;
  /** The chunk's logical blocks `[first, end)`. */
  first: number;
  end: number;
  /** Last batch of this layer for this chunk: the chunk's blocks of the layer are all in. */
  last: boolean;
  /** The chunk is the request's final chunk. */
  final: boolean;
  /** CRC-32 of the chunk's blocks of this layer (on `last` entries of a one-layer notice, when integrity is on). */
  crc?: number;
  /** In a notice of several layers (where every entry is `last`): one CRC-32 per layer, in layer order. */
  crcs?: number[];
  /** On the request's very last write: its DONE (see {@link DoneBody}), answered in the reply's `done`. */
  done?: { end: number; chunks: number };
}

export interface LayerBody {
  sender: string;
  session: string;
  /** Per sender, strictly increasing; a repeated seq is a duplicate. */
  seq: number;
  /** The (first) layer of the batch. */
  layer: number;
  /**
   * Version 2: the batch holds whole layers `[layer, layer + layers)`, each entry standing
   * for the same blocks in every one of them (and `last` in each). Absent: 1.
   */
  layers?: number;
  /** Bytes of the batch (the credit it used). */
  bytes: number;
  entries: LayerEntry[];
}

export interface Refusal {
  id: string;
  code: ErrorCode;
  message: string;
}

export interface LayerReply {
  /** Credit returned to the sender. */
  credit: number;
  /** Requests decode will not accept more of; the sender fails them. */
  refused: Refusal[];
  /** Answers to DONEs that rode on entries of this notice. */
  done?: Array<{ id: string } & OutcomeReply>;
}

export interface DoneBody {
  sender: string;
  session: string;
  id: string;
  /** Logical end block of the request (all layers cover `[start, end)`). */
  end: number;
  /** Layer entries with `last` the sender sent for this request. */
  chunks: number;
}

export interface FailedBody {
  sender: string;
  session: string;
  id: string;
  code: string;
  message: string;
}

/** `{ ok: true }` or the request's failure. Duplicates are answered like the first. */
export type OutcomeReply = { ok: true; complete?: boolean; duplicate?: boolean } | ({ ok: false } & Omit<Refusal, 'id'>);

/** A request that failed, with the decode blocks it leaves invalid. */
export class KvRequestError extends TransferError {
  readonly requestId: string;
  /**
   * Decode side: the request's blocks that do not hold valid KV (every block not
   * covered by the receiver's own prefix hit). The caller fails or recomputes them.
   * Empty on the prefill side.
   */
  readonly invalidBlockIds: readonly number[];

  constructor(message: string, code: ErrorCode, details: { requestId: string; invalidBlockIds?: readonly number[]; cause?: unknown }) {
    super(message, code, { cause: details.cause });
    this.name = 'KvRequestError';
    this.requestId = details.requestId;
    this.invalidBlockIds = Object.freeze([...(details.invalidBlockIds ?? [])]);
  }
}

// Every ErrorCode (the Record type makes the compiler insist on all of them).
const KNOWN_CODES: Readonly<Record<ErrorCode, true>> = {
  ERR_BAD_ARGUMENT: true, ERR_OUT_OF_RANGE: true, ERR_UNKNOWN_REGION: true, ERR_UNKNOWN_PEER: true, ERR_CLOSED: true,
  ERR_ABORTED: true, ERR_TIMEOUT: true, ERR_PEER_LOST: true, ERR_REGION_FREED: true, ERR_NOT_SHAREABLE: true,
  ERR_BACKEND_UNAVAILABLE: true, ERR_PROTOCOL_VERSION: true, ERR_PROTOCOL: true, ERR_CONNECT: true, ERR_NO_HANDLER: true,
  ERR_REMOTE: true, ERR_AUTH: true, ERR_INTEGRITY: true, ERR_CAPACITY: true, ERR_NOT_FOUND: true, ERR_SYSTEM: true,
  ERR_METADATA_UNAVAILABLE: true, ERR_NAME_IN_USE: true, ERR_LEASE_LOST: true,
};

/** A code received from a peer, kept if known, else ERR_REMOTE. */
export function remoteCode(code: unknown): ErrorCode {
  return typeof code === 'string' && Object.prototype.hasOwnProperty.call(KNOWN_CODES, code) ? (code as ErrorCode) : 'ERR_REMOTE';
}

/** The code and message of any error (TransferError or not). */
export function describeError(err: unknown): { code: ErrorCode; message: string } {
  if (err instanceof TransferError) return { code: err.code, message: err.message };
  return { code: 'ERR_REMOTE', message: err instanceof Error ? err.message : String(err) };
}

/** Throws ERR_PROTOCOL for a malformed message. */
export function protocolError(what: string): never {
  throw new TransferError(`malformed layerwise message: ${what}`, 'ERR_PROTOCOL');
}

/** A random session id. */
export function newSession(): string {
  return `${process.pid.toString(36)}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}
