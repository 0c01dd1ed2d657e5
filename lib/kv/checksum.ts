/**
 * The opt-in integrity checksum of a (request, layer): CRC-32 over the request's
 * blocks of that layer in a canonical order — tensor by tensor, logical blocks
 * ascending — so prefill (over its source blocks) and decode (over the blocks it
 * received) get the same value whatever the merging and splitting of descriptors.
 * CRC-32 detects corruption and misplaced blocks; it is not a defence against a
 * malicious peer (the authenticated control plane is).
 */
import zlib from 'node:zlib';
import type { Region } from '../engine.js';
import type { BlockRun } from './plan.js';

/** The algorithm named in messages. */
export const CHECKSUM_ALGORITHM = 'crc32';

const SCRATCH_BYTES = 4 << 20;

let table: Uint32Array | undefined;

/** Table CRC-32 (IEEE), used only where zlib.crc32 is missing (Node < 20.15). */
function crc32Fallback(data: Uint8Array, crc: number): number {
  if (!table) {
    table = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      table[n] = c >>> 0;
    }
  }
  let c = ~crc >>> 0;
  for (let i = 0; i < data.length; i++) c = table[(c ^ data[i]) & 0xff] ^ (c >>> 8);
  return ~c >>> 0;
}

const crc32: (data: Uint8Array, crc: number) => number =
  typeof (zlib as { crc32?: unknown }).crc32 === 'function'
    ? (data, crc) => (zlib as unknown as { crc32(d: Uint8Array, v: number): number }).crc32(data, crc)
    : crc32Fallback;

/** Reads registered local memory for checksums: host bytes in place, device bytes through a scratch buffer. */
export class RegionReader {
  private scratch: Buffer | undefined;

  constructor(private readonly deviceRead: (target: Buffer, ptr: bigint) => void) {}

  /** CRC-32 of `length` bytes at `offset` of `region`, continuing from `crc`. */
  crc(region: Region, offset: number, length: number, crc: number): number {
    if (region.buffer) return crc32(region.buffer.subarray(offset, offset + length), crc);
    if (region.devicePtr === undefined) throw new Error(`region ${region.id} is neither host nor device memory`);
    this.scratch ??= Buffer.allocUnsafe(SCRATCH_BYTES);
    for (let done = 0; done < length; ) {
      const n = Math.min(SCRATCH_BYTES, length - done);
      const view = this.scratch.subarray(0, n);
      this.deviceRead(view, region.devicePtr + BigInt(offset + done));
      crc = crc32(view, crc);
      done += n;
    }
    return crc;
  }

  /**
   * Checksum of logical blocks covered by `runs` (using the `local` ids of the
   * runs) in every tensor of a layer, in canonical order.
   */
  blocks(tensors: ReadonlyArray<{ region: Region; offset: number; blockBytes: number }>, runs: readonly BlockRun[], blockBytesOf: (t: number) => number): number {
    let crc = 0;
    tensors.forEach((t, i) => {
      const bb = blockBytesOf(i);
      for (const run of runs) crc = this.crc(t.region, t.offset + run.local * bb, run.count * bb, crc);
    });
    return crc;
  }
}
