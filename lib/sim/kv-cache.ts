/**
 * The paged KV cache of a simulated instance, in real registered memory, with the
 * deterministic content of lib/sim/content.ts.
 *
 * - Prefill (and PD) keep theirs in device memory (`engine.device.alloc`, registered
 *   as a device region): the simulated forward pass writes each layer's blocks with
 *   copies on the device stream, after the layer's compute, as attention would.
 * - Decode keeps its cache in a host region peers can write (one-sided pushes land
 *   there) and checks every byte of every block it received.
 */
import type { DeviceStream } from '../device.js';
import type { Region, TransferEngine } from '../engine.js';
import { TransferError } from '../errors.js';
import { KvLayout } from '../kv/layout.js';
import { formatBytes } from '../validate.js';
import { BlockPool } from './blocks.js';
import { SOURCE_BYTES, STAMP_BYTES, contentChunks, contentSource, findMismatch, kvBlockKey } from './content.js';
import { kvTensors, type ModelProfile } from './profiles.js';

/** Shape of a simulated cache. */
export interface KvGeometry {
  layers: number;
  blockSize: number;
  numBlocks: number;
  tensors: ReturnType<typeof kvTensors>;
}

/** Bytes one block takes across every tensor of every layer. */
export function bytesPerBlock(profile: ModelProfile): number {
  return kvTensors(profile).reduce((s, t) => s + t.bytesPerToken, 0) * profile.blockSize * profile.layers;
}

/** The geometry of a cache of about `memoryBytes` for `profile` (at least one block). */
export function kvGeometry(profile: ModelProfile, memoryBytes: number): KvGeometry {
  const numBlocks = Math.floor(memoryBytes / bytesPerBlock(profile));
  if (numBlocks < 1) {
    throw new TransferError(
      `a KV cache of ${formatBytes(memoryBytes)} holds no ${profile.id} block (one block of ${profile.blockSize} tokens takes ${formatBytes(bytesPerBlock(profile))})`,
      'ERR_BAD_ARGUMENT',
    );
  }
  return { layers: profile.layers, blockSize: profile.blockSize, numBlocks, tensors: kvTensors(profile) };
}

/** Where the first differing byte of a verified request is. */
export interface KvMismatch {
  layer: number;
  tensor: string;
  /** Position of the block in the prompt. */
  logicalBlock: number;
  /** Cache block id. */
  block: number;
  /** Byte offset inside the block. */
  offset: number;
}

/** A simulated paged KV cache. Create with {@link SimKvCache.device} or {@link SimKvCache.host}. */
export class SimKvCache {
  /** Block allocator. */
  readonly blocks: BlockPool;

  private constructor(
    private readonly engine: TransferEngine,
    /** Where the blocks are, for LayerwiseSender / LayerwiseReceiver. */
    readonly layout: KvLayout,
    readonly geometry: KvGeometry,
    private readonly region: Region,
    private readonly memory: { cache: bigint; source: bigint } | undefined,
  ) {
    this.blocks = new BlockPool(geometry.numBlocks);
  }

  /** A cache in device memory, written by the device stream (prefill, PD). */
  static device(engine: TransferEngine, geometry: KvGeometry): SimKvCache {
    const bytes = KvLayout.packedBytes(geometry);
    const cache = engine.device.alloc(bytes);
    const source = engine.device.alloc(SOURCE_BYTES);
    try {
      engine.device.write(source.ptr, contentSource());
      const region = engine.register({ devicePtr: cache.ptr, length: bytes });
      return new SimKvCache(engine, KvLayout.packed(region, geometry), geometry, region, { cache: cache.ptr, source: source.ptr });
    } catch (err) {
      engine.device.free(cache.ptr);
      engine.device.free(source.ptr);
      throw err;
    }
  }

  /** A cache in a host region that peers write into (decode). */
  static host(engine: TransferEngine, geometry: KvGeometry): SimKvCache {
    const region = engine.allocate(KvLayout.packedBytes(geometry));
    return new SimKvCache(engine, KvLayout.packed(region, geometry), geometry, region, undefined);
  }

  /** Total bytes of the cache. */
  get bytes(): number {
    return this.region.length;
  }

  /** Blocks needed for `tokens` tokens. */
  blocksFor(tokens: number): number {
    return Math.ceil(tokens / this.geometry.blockSize);
  }

  /**
   * Enqueues, on `stream`, the write of one layer of a request's KV into `blocks`
   * (device caches only). The bytes land when the stream reaches them, so an event
   * recorded after this call marks the layer as written. Each block's stamp is
   * stored at once: the block is the request's alone, and nothing reads it before
   * that event.
   */
  writeLayer(stream: DeviceStream, requestId: string, layer: number, blocks: readonly number[]): void {
    if (!this.memory) throw new TransferError('writeLayer needs a device cache', 'ERR_BAD_ARGUMENT');
    const tensors = this.layout.layers[layer];
    tensors.forEach((t, ti) => {
      blocks.forEach((block, logical) => {
        const base = this.memory!.cache + BigInt(t.offset + block * t.blockBytes);
        for (const c of contentChunks(kvBlockKey(requestId, layer, ti, logical), t.blockBytes)) {
          this.engine.device.write(base + BigInt(c.at), c.stamp);
          if (c.length > STAMP_BYTES) stream.copy(base + BigInt(c.at + STAMP_BYTES), this.memory!.source + BigInt(c.sourceOffset + STAMP_BYTES), c.length - STAMP_BYTES);
        }
      });
    });
  }

  /**
   * Fault injection: flips one byte in the middle of the request's first block of
   * `layer` (tensor 0), as silent corruption in the cache would. Call it after the
   * layer's write has landed.
   */
  corrupt(layer: number, block: number): void {
    if (!this.memory) throw new TransferError('corrupt needs a device cache', 'ERR_BAD_ARGUMENT');
    const t = this.layout.layers[layer][0];
    const ptr = this.memory.cache + BigInt(t.offset + block * t.blockBytes + (t.blockBytes >> 1));
    const byte = Buffer.alloc(1);
    this.engine.device.read(byte, ptr);
    byte[0] ^= 0x5a;
    this.engine.device.write(ptr, byte);
  }

  /**
   * Checks every byte of one layer of a request (host caches only): every tensor,
   * every block from `firstLogical` on. Returns the first mismatch, or null, and
   * the bytes checked.
   */
  verifyLayer(requestId: string, layer: number, blocks: readonly number[], firstLogical = 0): { mismatch: KvMismatch | null; bytes: number } {
    const buffer = this.region.buffer;
    if (!buffer || this.memory) throw new TransferError('verifyLayer needs a host cache', 'ERR_BAD_ARGUMENT');
    let bytes = 0;
    const tensors = this.layout.layers[layer];
    for (let ti = 0; ti < tensors.length; ti++) {
      const t = tensors[ti];
      for (let logical = firstLogical; logical < blocks.length; logical++) {
        const start = t.offset + blocks[logical] * t.blockBytes;
        const at = findMismatch(buffer.subarray(start, start + t.blockBytes), kvBlockKey(requestId, layer, ti, logical));
        if (at >= 0) return { mismatch: { layer, tensor: t.name, logicalBlock: logical, block: blocks[logical], offset: at }, bytes };
        bytes += t.blockBytes;
      }
    }
    return { mismatch: null, bytes };
  }

  /** Fails block waiters and frees the memory (after the engine's transfers settled). */
  async close(): Promise<void> {
    this.blocks.close();
    await this.region.free().catch(() => {});
    if (this.memory) {
      this.engine.device.free(this.memory.cache);
      this.engine.device.free(this.memory.source);
    }
  }
}
