/**
 * Deterministic content for the simulation. Every simulated embedding and every
 * KV block has bytes that depend only on a key (an embedding's mm_hash; a KV
 * block's request, layer, tensor and position in the prompt), so the process that
 * receives them can check every byte without being sent a copy.
 *
 * Content is cut into chunks of {@link CONTENT_CHUNK} bytes. Chunk j of key k is
 * a 16-byte stamp (the first bytes of SHA-256(k, j)) followed by a slice of one
 * shared pseudo-random source (AES-128-CTR keystream of a fixed key) at an
 * offset also taken from that digest. The stamp makes every chunk of every key
 * distinct (a block written to the wrong place is caught); the source slice makes
 * filling and checking run at memcpy / memcmp speed.
 */
import { createCipheriv, createHash } from 'node:crypto';

/** Bytes per content chunk (a KV block of up to this size is one chunk). */
export const CONTENT_CHUNK = 256 << 10;
/** Bytes at the start of a chunk that identify it. */
export const STAMP_BYTES = 16;
/** Chunks start at a multiple of 64 bytes within this span of the source. */
const SOURCE_SPAN = 1 << 20;
/** Length of the shared source. */
export const SOURCE_BYTES = SOURCE_SPAN + CONTENT_CHUNK;

let source: Buffer | undefined;

/** The shared pseudo-random source (the same bytes in every process and version). */
export function contentSource(): Buffer {
  if (!source) {
    const key = createHash('sha256').update('epd-transfer/sim-content/v1').digest().subarray(0, 16);
    source = createCipheriv('aes-128-ctr', key, Buffer.alloc(16)).update(Buffer.alloc(SOURCE_BYTES));
  }
  return source;
}

/** One chunk of a key's content: where it starts, its stamp, and the source slice that follows. */
export interface ContentChunk {
  /** Offset of the chunk within the content. */
  at: number;
  /** Chunk length (the last one may be short). */
  length: number;
  /** The first min(16, length) bytes. */
  stamp: Buffer;
  /** Where bytes [16, length) of the chunk come from in {@link contentSource}. */
  sourceOffset: number;
}

/** The chunks of `length` bytes of content for `key`. */
export function contentChunks(key: string, length: number): ContentChunk[] {
  const chunks: ContentChunk[] = [];
  for (let at = 0, j = 0; at < length; at += CONTENT_CHUNK, j++) {
    const digest = createHash('sha256').update(key).update(`#${j}`).digest();
    const n = Math.min(CONTENT_CHUNK, length - at);
    chunks.push({
      at,
      length: n,
      stamp: digest.subarray(0, Math.min(STAMP_BYTES, n)),
      sourceOffset: (digest.readUInt32LE(16) % (SOURCE_SPAN / 64)) * 64,
    });
  }
  return chunks;
}

/** Writes the content of `key` into all of `target`. */
export function fillContent(target: Uint8Array, key: string): void {
  const src = contentSource();
  for (const c of contentChunks(key, target.length)) {
    target.set(c.stamp, c.at);
    if (c.length > STAMP_BYTES) target.set(src.subarray(c.sourceOffset + STAMP_BYTES, c.sourceOffset + c.length), c.at + STAMP_BYTES);
  }
}

/** The content of `key`, `length` bytes long. */
export function makeContent(key: string, length: number): Buffer {
  const out = Buffer.allocUnsafe(length);
  fillContent(out, key);
  return out;
}

/**
 * Checks every byte of `actual` against the content of `key`. Returns -1 when
 * they match, else the offset of the first byte that differs.
 */
export function findMismatch(actual: Uint8Array, key: string): number {
  const src = contentSource();
  const view = Buffer.from(actual.buffer, actual.byteOffset, actual.byteLength);
  for (const c of contentChunks(key, view.length)) {
    const stampEnd = c.at + c.stamp.length;
    const same =
      view.compare(c.stamp, 0, c.stamp.length, c.at, stampEnd) === 0 &&
      (c.length <= STAMP_BYTES || view.compare(src, c.sourceOffset + STAMP_BYTES, c.sourceOffset + c.length, stampEnd, c.at + c.length) === 0);
    if (same) continue;
    // Slow path, failures only: locate the byte.
    const expected = Buffer.concat([c.stamp, src.subarray(c.sourceOffset + STAMP_BYTES, c.sourceOffset + Math.max(STAMP_BYTES, c.length))]);
    for (let i = 0; i < c.length; i++) if (view[c.at + i] !== expected[i]) return c.at + i;
  }
  return -1;
}

/** The key of one KV block: request, layer, tensor index and the block's position in the prompt. */
export function kvBlockKey(requestId: string, layer: number, tensor: number, logicalBlock: number): string {
  return `kv\0${requestId}\0${layer}\0${tensor}\0${logicalBlock}`;
}

/** The key of an embedding. */
export function embeddingKey(mmHash: string): string {
  return `ec\0${mmHash}`;
}
