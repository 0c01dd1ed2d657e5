/**
 * What a simulated worker reports at `GET /sim/stats`: counters of the real work
 * underneath (bytes saved to and loaded from the encoder cache, KV bytes pushed,
 * received and verified) and, on request, the per-request records the demo draws.
 */
import type { RequestKvTimeline } from './trace.js';

/** Roles of a simulated worker. */
export type SimRole = 'encode' | 'prefill' | 'decode' | 'pd';

/** Encoder-cache activity of a worker. */
export interface EcCounters {
  /** Encoder: items asked for. */
  items: number;
  /** Encoder: items found already in the shared store (no encoder pass). */
  hits: number;
  /** Encoder: items encoded here (simulated pass) and saved. */
  encoded: number;
  /** Encoder: bytes saved into the store. */
  savedBytes: number;
  /** Prefill/PD: embeddings loaded from the store, their bytes and the time the loads took (ms). */
  loaded: number;
  loadedBytes: number;
  loadMs: number;
  /** Prefill/PD: embeddings that were not in the store (encoded locally instead). */
  missed: number;
  /** Bytes of loaded embeddings checked byte for byte. */
  verifiedBytes: number;
  /** Prefill/PD: of the loaded embeddings, those pulled from another host's store over the transfer engine, and their bytes. */
  pulled: number;
  pulledBytes: number;
}

/** KV activity of a worker. */
export interface KvCounters {
  /** Prefill: requests whose KV decode accepted, and their bytes. */
  pushed: number;
  pushedBytes: number;
  /** Prefill: every batch written (failed requests' too), their bytes and summed write time (ms). */
  batches: number;
  writtenBytes: number;
  writeMs: number;
  /** Decode: requests received, bytes checked byte for byte, time spent checking (ms), failures. */
  received: number;
  verifiedBytes: number;
  verifyMs: number;
  verifyFailures: number;
}

/** `GET /sim/stats`. */
export interface WorkerStats {
  simulation: string;
  role: SimRole;
  model: string;
  pid: number;
  requests: { total: number; ok: number; failed: number; active: number };
  ec: EcCounters;
  kv: KvCounters;
  /** Simulated device time by kind (ms), steps run, prompts waiting for prefill and sequences decoding now. */
  device: {
    busyMs: { prefill: number; decode: number; encode: number };
    steps: { prefill: number; decode: number; encode: number };
    queued: number;
    decoding: number;
  };
  /** KV cache blocks (0 for an encoder): total, free, requests waiting for blocks, bytes. */
  cache: { blocks: number; free: number; waiting: number; bytes: number };
  /** Per-request records since the last drain (only with `?records=1`). */
  records?: SimRequestRecord[];
  /** Records discarded because nobody drained them in time (the newest are kept). */
  recordsDropped: number;
}

/** One request as a worker saw it (times are epoch ms). */
export interface SimRequestRecord {
  id: string;
  role: SimRole;
  start: number;
  end: number;
  ok: boolean;
  error?: { code: string; message: string };
  /** Prompt tokens. */
  tokens?: number;
  /** Encoder: the items and whether each was a cache hit. */
  items?: Array<{ mmHash: string; hit: boolean; bytes: number; start: number; end: number }>;
  /** Prefill/PD: embedding loads. */
  ecLoad?: { start: number; end: number; loaded: number; missed: number; bytes: number };
  /** Prefill/PD: the forward pass (first layer's compute start to last layer's KV written), and requests in its step. */
  prefill?: { start: number; end: number; batch: number };
  /** Prefill: the layerwise push. */
  kv?: RequestKvTimeline & { bytes: number; exposedTailMs?: number };
  /** Decode: KV blocks allocated, metaserver call, KV complete, bytes verified. */
  decode?: {
    allocated: number;
    metaserverCalled?: number;
    metaserverAnswered?: number;
    metaserverStatus?: number;
    kvComplete?: number;
    verifiedBytes: number;
    firstToken?: number;
    lastToken?: number;
    tokens: number;
  };
}

/** Keeps the newest `limit` records. */
export class RecordLog {
  private list: SimRequestRecord[] = [];
  private dropped = 0;

  constructor(private readonly limit = 20_000) {}

  push(record: SimRequestRecord): void {
    if (this.list.length >= this.limit) {
      this.list.shift();
      this.dropped++;
    }
    this.list.push(record);
  }

  /** Returns the records and forgets them. */
  drain(): SimRequestRecord[] {
    const out = this.list;
    this.list = [];
    return out;
  }

  /** Records discarded because the log was full. */
  get droppedRecords(): number {
    return this.dropped;
  }
}

/** Counters at zero. */
export function emptyEc(): EcCounters {
  return { items: 0, hits: 0, encoded: 0, savedBytes: 0, loaded: 0, loadedBytes: 0, loadMs: 0, missed: 0, verifiedBytes: 0, pulled: 0, pulledBytes: 0 };
}

/** Counters at zero. */
export function emptyKv(): KvCounters {
  return { pushed: 0, pushedBytes: 0, batches: 0, writtenBytes: 0, writeMs: 0, received: 0, verifiedBytes: 0, verifyMs: 0, verifyFailures: 0 };
}
