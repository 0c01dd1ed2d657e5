/**
 * Block plans: which bytes of which blocks go where. Pure functions over numbers,
 * no I/O, so they are tested exhaustively against a naive one-descriptor-per-block plan.
 *
 * Units: all block ids here are in *local* (prefill) block units. A decode block
 * `ratio` times larger is `ratio` consecutive local-sized sub-blocks
 * ({@link expandBlockIds}); a request's logical block `k` (tokens
 * `[k·blockSize, (k+1)·blockSize)`) lives in local block `local[k]` and is written
 * to remote sub-block `remote[k]`.
 *
 * Descriptors are flat: 5 numbers each, `localRegion, localOffset, remoteRegion,
 * remoteOffset, length` — the layout of {@link DescriptorBatch}.
 */
import { TransferError } from '../errors.js';

/** Numbers per descriptor in a flat descriptor array. */
export const DESCRIPTOR_STRIDE = 5;

/** Where a tensor's block 0 is, and the bytes of one (local-sized) block. */
export interface TensorPlacement {
  region: number;
  offset: number;
  blockBytes: number;
}

/** A run of logical blocks that is contiguous on both sides. */
export interface BlockRun {
  /** First logical block of the run. */
  logical: number;
  /** Its local block id. */
  local: number;
  /** Its remote (sub-)block id. */
  remote: number;
  count: number;
}

/** Progress of one request through chunked prefill. */
export interface ChunkState {
  /** Prompt tokens whose KV is transferred. */
  tokens: number;
  /** Local tokens per block. */
  blockSize: number;
  /** Tokens the receiver already holds (its prefix-cache hit); a multiple of `blockSize`. */
  cachedTokens: number;
  /** Tokens whose blocks were already sent by earlier chunks (a multiple of `blockSize`). */
  sentTokens: number;
  /** Tokens computed once this chunk is done (`tokens` for the final chunk). */
  computedTokens: number;
}

/** Logical blocks `[first, end)` one chunk sends. */
export interface ChunkRange {
  first: number;
  end: number;
  /** This is the final chunk: the partial tail block goes with it. */
  final: boolean;
  /** `sentTokens` for the next chunk. */
  sentTokens: number;
}

/**
 * The blocks one chunk of prefill sends: those that became full during it, plus
 * the partial tail block when it is the final chunk. Blocks below the receiver's
 * cached prefix or already sent are skipped.
 */
export function chunkBlockRange(s: ChunkState): ChunkRange {
  const final = s.computedTokens === s.tokens;
  const first = Math.floor(Math.max(s.cachedTokens, s.sentTokens) / s.blockSize);
  const last = final ? Math.ceil(s.computedTokens / s.blockSize) : Math.floor(s.computedTokens / s.blockSize);
  const end = Math.max(first, last);
  return { first, end, final, sentTokens: final ? s.tokens : Math.max(s.sentTokens, end * s.blockSize) };
}

/** Remote block ids of size `ratio` × local, as local-sized sub-block ids: `b → b·ratio + j`. */
export function expandBlockIds(ids: readonly number[], ratio: number): number[] {
  if (ratio === 1) return ids.slice();
  const out = new Array<number>(ids.length * ratio);
  for (let i = 0; i < ids.length; i++) for (let j = 0; j < ratio; j++) out[i * ratio + j] = ids[i] * ratio + j;
  return out;
}

/**
 * Splits logical blocks `[first, end)` into maximal runs whose ids are consecutive
 * in `local` *and* in `remote` — a new run starts wherever either side jumps.
 */
export function blockRuns(local: readonly number[], remote: readonly number[], first: number, end: number): BlockRun[] {
  const runs: BlockRun[] = [];
  for (let k = first; k < end; k++) {
    const prev = runs[runs.length - 1];
    if (prev && local[k] === prev.local + prev.count && remote[k] === prev.remote + prev.count) prev.count++;
    else runs.push({ logical: k, local: local[k], remote: remote[k], count: 1 });
  }
  return runs;
}

/**
 * Appends one descriptor per (tensor, run) to `out`: tensor-major, runs in
 * logical order (the order checksums use). Returns the bytes appended.
 */
export function appendRunDescriptors(
  out: number[],
  runs: readonly BlockRun[],
  local: readonly TensorPlacement[],
  remote: readonly TensorPlacement[],
): number {
  let bytes = 0;
  for (let t = 0; t < local.length; t++) {
    const l = local[t];
    const r = remote[t];
    for (const run of runs) {
      const length = run.count * l.blockBytes;
      out.push(l.region, l.offset + run.local * l.blockBytes, r.region, r.offset + run.remote * r.blockBytes, length);
      bytes += length;
    }
  }
  return bytes;
}

/** One request's part of a layer plan. */
export interface LayerPlanInput<K> {
  /** Destination (a peer); requests with the same key are fused into one batch. */
  peer: K;
  runs: readonly BlockRun[];
  /** The destination's tensors of this layer, in local-block units. */
  remote: readonly TensorPlacement[];
}

/** One destination's batch for a layer. */
export interface PeerLayerPlan {
  /** Flat descriptors of every request to this destination. */
  descriptors: number[];
  /** `owners[i]`: index (into the input) of the request descriptor `i` belongs to. */
  owners: number[];
  bytes: number;
}

/**
 * Plans one layer for many requests: per request the fewest descriptors (runs
 * contiguous on both sides, per tensor), and every request going to the same
 * destination fused into one batch.
 */
export function planLayer<K>(requests: readonly LayerPlanInput<K>[], local: readonly TensorPlacement[]): Map<K, PeerLayerPlan> {
  const plans = new Map<K, PeerLayerPlan>();
  requests.forEach((req, index) => {
    let plan = plans.get(req.peer);
    if (!plan) plans.set(req.peer, (plan = { descriptors: [], owners: [], bytes: 0 }));
    const before = plan.descriptors.length / DESCRIPTOR_STRIDE;
    plan.bytes += appendRunDescriptors(plan.descriptors, req.runs, local, req.remote);
    for (let i = before; i < plan.descriptors.length / DESCRIPTOR_STRIDE; i++) plan.owners.push(index);
  });
  return plans;
}

/** A slice of a plan of at most `maxBytes`. */
export interface PlanSlice {
  descriptors: number[];
  owners: number[];
  bytes: number;
}

/**
 * Cuts a plan into consecutive slices of at most `maxBytes` each (splitting a
 * descriptor where needed), so a sender never has more than its credit in flight.
 */
export function splitPlan(plan: { descriptors: readonly number[]; owners: readonly number[] }, maxBytes: number): PlanSlice[] {
  if (!(maxBytes >= 1)) throw new TransferError(`Expected maxBytes >= 1 but received ${maxBytes}`, 'ERR_BAD_ARGUMENT');
  const slices: PlanSlice[] = [];
  let cur: PlanSlice = { descriptors: [], owners: [], bytes: 0 };
  const d = plan.descriptors;
  for (let i = 0; i < d.length; i += DESCRIPTOR_STRIDE) {
    const owner = plan.owners[i / DESCRIPTOR_STRIDE];
    let lo = d[i + 1];
    let ro = d[i + 3];
    let left = d[i + 4];
    while (left > 0) {
      if (cur.bytes === maxBytes) {
        slices.push(cur);
        cur = { descriptors: [], owners: [], bytes: 0 };
      }
      const n = Math.min(left, maxBytes - cur.bytes);
      cur.descriptors.push(d[i], lo, d[i + 2], ro, n);
      cur.owners.push(owner);
      cur.bytes += n;
      lo += n;
      ro += n;
      left -= n;
    }
  }
  if (cur.bytes > 0) slices.push(cur);
  return slices;
}
