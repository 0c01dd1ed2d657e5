/**
 * KV-cache layout: where every layer's cache tensors live in registered memory.
 *
 * A paged KV cache is, per layer, a few tensors (K and V for GQA/MHA; the latent
 * `kv_c` and rotary `k_pe` caches for MLA), each an array of `numBlocks` blocks of
 * `blockBytes` bytes (a block holds `blockSize` tokens). Block `b` of a tensor is at
 * `offset + b * blockBytes` inside its region, and block ids are shared by every
 * tensor of every layer — the layout of vLLM's paged cache.
 */
import { Region, type RemoteRegion } from '../engine.js';
import { TransferError } from '../errors.js';
import { badArgument, expectInteger, expectObject, expectString } from '../validate.js';

/** Bytes one token occupies in one tensor of one layer. */
export interface KvTensorShape {
  /** `k`, `v`, `kv_c`, `k_pe`, … (used in messages and traces). */
  name: string;
  bytesPerToken: number;
}

/** One cache tensor of one layer, placed in a local region. */
export interface KvTensor {
  readonly name: string;
  readonly region: Region;
  /** Byte offset of block 0 inside `region`. */
  readonly offset: number;
  /** Bytes of one block (`blockSize` tokens). */
  readonly blockBytes: number;
}

/** Input of the {@link KvLayout} constructor. */
export interface KvLayoutSpec {
  /** Tokens per block. */
  blockSize: number;
  /** Blocks per tensor (the same for every tensor). */
  numBlocks: number;
  /** `layers[l][t]`: tensor `t` of layer `l`. Every layer has the same number of tensors. */
  layers: ReadonlyArray<ReadonlyArray<{ name?: string; region: Region; offset?: number; blockBytes: number }>>;
}

/** Options of {@link KvLayout.packed} and {@link KvLayout.packedBytes}. */
export interface PackedLayoutOptions {
  layers: number;
  blockSize: number;
  numBlocks: number;
  /** Tensors of one layer (e.g. {@link gqaTensors} or {@link mlaTensors}). */
  tensors: readonly KvTensorShape[];
  /** Each tensor starts at a multiple of this many bytes. Default 4096. */
  alignment?: number;
}

/** A layout as it travels to peers: region ids instead of Region objects. */
export interface KvLayoutDescription {
  blockSize: number;
  numBlocks: number;
  layers: Array<Array<{ name: string; region: number; offset: number; blockBytes: number }>>;
}

/** K and V caches of a GQA/MHA layer: `[numBlocks, blockSize, kvHeads, headDim]` each. */
export function gqaTensors(options: { kvHeads: number; headDim: number; dtypeBytes?: number; headDimV?: number }): KvTensorShape[] {
  const o = expectObject(options, 'options');
  const kvHeads = expectInteger(o.kvHeads, 'options.kvHeads', 1);
  const headDim = expectInteger(o.headDim, 'options.headDim', 1);
  const headDimV = o.headDimV === undefined ? headDim : expectInteger(o.headDimV, 'options.headDimV', 1);
  const dtype = o.dtypeBytes === undefined ? 2 : expectInteger(o.dtypeBytes, 'options.dtypeBytes', 1, 8);
  return [
    { name: 'k', bytesPerToken: kvHeads * headDim * dtype },
    { name: 'v', bytesPerToken: kvHeads * headDimV * dtype },
  ];
}

/**
 * The two caches of a DeepSeek MLA layer: the compressed latent `kv_c`
 * (`kvLoraRank` values per token) and the decoupled rotary key `k_pe`
 * (`ropeHeadDim` values per token), one "head" each.
 */
export function mlaTensors(options: { kvLoraRank: number; ropeHeadDim: number; dtypeBytes?: number }): KvTensorShape[] {
  const o = expectObject(options, 'options');
  const rank = expectInteger(o.kvLoraRank, 'options.kvLoraRank', 1);
  const rope = expectInteger(o.ropeHeadDim, 'options.ropeHeadDim', 1);
  const dtype = o.dtypeBytes === undefined ? 2 : expectInteger(o.dtypeBytes, 'options.dtypeBytes', 1, 8);
  return [
    { name: 'kv_c', bytesPerToken: rank * dtype },
    { name: 'k_pe', bytesPerToken: rope * dtype },
  ];
}

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

function packedOptions(options: PackedLayoutOptions): Required<PackedLayoutOptions> {
  const o = expectObject(options, 'options');
  const layers = expectInteger(o.layers, 'options.layers', 1);
  const blockSize = expectInteger(o.blockSize, 'options.blockSize', 1);
  const numBlocks = expectInteger(o.numBlocks, 'options.numBlocks', 1);
  const alignment = o.alignment === undefined ? 4096 : expectInteger(o.alignment, 'options.alignment', 1);
  if (!Array.isArray(o.tensors) || o.tensors.length === 0) badArgument('options.tensors', 'a non-empty array of { name, bytesPerToken }', o.tensors);
  const tensors = (o.tensors as unknown[]).map((t, i) => {
    const x = expectObject(t, `options.tensors[${i}]`);
    return { name: expectString(x.name, `options.tensors[${i}].name`), bytesPerToken: expectInteger(x.bytesPerToken, `options.tensors[${i}].bytesPerToken`, 1) };
  });
  return { layers, blockSize, numBlocks, alignment, tensors };
}

/** Where every layer's cache tensors live; validated against their regions. */
export class KvLayout {
  /** Tokens per block. */
  readonly blockSize: number;
  /** Blocks per tensor. */
  readonly numBlocks: number;
  /** `layers[l][t]`. */
  readonly layers: ReadonlyArray<ReadonlyArray<KvTensor>>;

  /**
   * Validates `spec`: positive sizes, every layer with the same tensors, every
   * tensor inside its region, no two tensors overlapping. Throws ERR_BAD_ARGUMENT
   * or ERR_OUT_OF_RANGE.
   */
  constructor(spec: KvLayoutSpec) {
    const s = expectObject(spec, 'spec');
    this.blockSize = expectInteger(s.blockSize, 'spec.blockSize', 1);
    this.numBlocks = expectInteger(s.numBlocks, 'spec.numBlocks', 1);
    if (!Array.isArray(s.layers) || s.layers.length === 0) badArgument('spec.layers', 'a non-empty array of layers', s.layers);
    const layers = s.layers as unknown[];
    let perLayer = -1;
    this.layers = Object.freeze(
      layers.map((layer, l) => {
        if (!Array.isArray(layer) || layer.length === 0) badArgument(`spec.layers[${l}]`, 'a non-empty array of tensors', layer);
        if (perLayer === -1) perLayer = layer.length;
        else if (layer.length !== perLayer) badArgument(`spec.layers[${l}]`, `${perLayer} tensors like layer 0`, layer);
        return Object.freeze(layer.map((t: unknown, i) => this.tensor(t, `spec.layers[${l}][${i}]`, i)));
      }),
    );
    this.checkOverlap();
  }

  /** Bytes a {@link KvLayout.packed} layout needs (including alignment padding). */
  static packedBytes(options: PackedLayoutOptions): number {
    const o = packedOptions(options);
    let end = 0;
    for (let l = 0; l < o.layers; l++) {
      for (const t of o.tensors) end = alignUp(end, o.alignment) + t.bytesPerToken * o.blockSize * o.numBlocks;
    }
    return end;
  }

  /**
   * Lays every layer's tensors out one after another in `region` (from `offset`),
   * layer-major, each tensor aligned to `alignment` — one registration for the
   * whole cache, as vLLM-Ascend merges its registrations.
   */
  static packed(region: Region, options: PackedLayoutOptions & { offset?: number }): KvLayout {
    const o = packedOptions(options);
    const start = options.offset === undefined ? 0 : expectInteger(options.offset, 'options.offset');
    let at = start;
    const layers = [];
    for (let l = 0; l < o.layers; l++) {
      const tensors = [];
      for (const t of o.tensors) {
        at = alignUp(at, o.alignment);
        const blockBytes = t.bytesPerToken * o.blockSize;
        tensors.push({ name: t.name, region, offset: at, blockBytes });
        at += blockBytes * o.numBlocks;
      }
      layers.push(tensors);
    }
    return new KvLayout({ blockSize: o.blockSize, numBlocks: o.numBlocks, layers });
  }

  /** Number of layers. */
  get numLayers(): number {
    return this.layers.length;
  }

  /** Tensors in each layer (2 for GQA's K and V, and for MLA's two caches). */
  get tensorsPerLayer(): number {
    return this.layers[0].length;
  }

  /** Bytes of one block in one layer (all its tensors). */
  layerBlockBytes(layer = 0): number {
    return this.layers[layer].reduce((sum, t) => sum + t.blockBytes, 0);
  }

  /** Bytes of one token across all layers and tensors. */
  get bytesPerToken(): number {
    let sum = 0;
    for (let l = 0; l < this.layers.length; l++) sum += this.layerBlockBytes(l);
    return sum / this.blockSize;
  }

  /** The layout with region ids, for peers. */
  describe(): KvLayoutDescription {
    return {
      blockSize: this.blockSize,
      numBlocks: this.numBlocks,
      layers: this.layers.map((layer) => layer.map((t) => ({ name: t.name, region: t.region.id, offset: t.offset, blockBytes: t.blockBytes }))),
    };
  }

  private tensor(value: unknown, name: string, index: number): KvTensor {
    const t = expectObject(value, name);
    if (!(t.region instanceof Region)) badArgument(`${name}.region`, 'a Region', t.region);
    const region = t.region;
    const offset = t.offset === undefined ? 0 : expectInteger(t.offset, `${name}.offset`);
    const blockBytes = expectInteger(t.blockBytes, `${name}.blockBytes`, 1);
    const tensorName = t.name === undefined ? `t${index}` : expectString(t.name, `${name}.name`);
    const end = offset + blockBytes * this.numBlocks;
    if (end > region.length) {
      throw new TransferError(
        `${name} needs bytes [${offset}, ${end}) but its region ${region.id} has ${region.length} bytes`,
        'ERR_OUT_OF_RANGE',
      );
    }
    return Object.freeze({ name: tensorName, region, offset, blockBytes });
  }

  private checkOverlap(): void {
    const spans: Array<{ region: Region; start: number; end: number; where: string }> = [];
    this.layers.forEach((layer, l) =>
      layer.forEach((t, i) => spans.push({ region: t.region, start: t.offset, end: t.offset + t.blockBytes * this.numBlocks, where: `layers[${l}][${i}]` })),
    );
    spans.sort((a, b) => (a.region.id - b.region.id) || (a.start - b.start));
    for (let i = 1; i < spans.length; i++) {
      const a = spans[i - 1];
      const b = spans[i];
      if (a.region === b.region && b.start < a.end) {
        badArgument(`spec.${b.where}`, `a tensor that does not overlap ${a.where} (bytes [${a.start}, ${a.end}) of region ${a.region.id})`, b.start);
      }
    }
  }
}

/** A peer's layout as this side uses it: placements in units of this side's blocks. */
export interface RemoteKvLayout {
  /** The peer's tokens per block. */
  blockSize: number;
  numBlocks: number;
  /** Remote block size ÷ local block size: one remote block is `ratio` local-sized sub-blocks. */
  ratio: number;
  /** `layers[l][t]`: the remote tensor with `blockBytes` of a local-sized sub-block. */
  layers: Array<Array<{ region: number; offset: number; blockBytes: number }>>;
}

/**
 * Checks that a peer's layout (as received in the handshake) can receive this
 * layout's blocks: same layers and tensors, a block size that is a multiple of
 * ours with proportionally larger blocks, and every tensor inside a region the peer
 * advertises. Returns it in local-block units. Throws ERR_BAD_ARGUMENT or
 * ERR_OUT_OF_RANGE (ERR_UNKNOWN_REGION when a region is not advertised).
 */
export function checkRemoteLayout(description: unknown, regions: readonly RemoteRegion[], local: KvLayout): RemoteKvLayout {
  const d = expectObject(description, 'remote layout');
  const blockSize = expectInteger(d.blockSize, 'remote layout blockSize', 1);
  const numBlocks = expectInteger(d.numBlocks, 'remote layout numBlocks', 1);
  if (blockSize % local.blockSize !== 0) {
    throw new TransferError(
      `remote block size ${blockSize} is not a multiple of the local block size ${local.blockSize}`,
      'ERR_BAD_ARGUMENT',
    );
  }
  const ratio = blockSize / local.blockSize;
  if (!Array.isArray(d.layers) || d.layers.length !== local.numLayers) {
    throw new TransferError(`remote layout has ${Array.isArray(d.layers) ? d.layers.length : 'no'} layers; the local one has ${local.numLayers}`, 'ERR_BAD_ARGUMENT');
  }
  const byId = new Map(regions.map((r) => [r.id, r]));
  const layers = (d.layers as unknown[]).map((layer, l) => {
    if (!Array.isArray(layer) || layer.length !== local.tensorsPerLayer) {
      throw new TransferError(`remote layer ${l} does not have ${local.tensorsPerLayer} tensors`, 'ERR_BAD_ARGUMENT');
    }
    return layer.map((raw: unknown, t) => {
      const x = expectObject(raw, `remote layers[${l}][${t}]`);
      const region = expectInteger(x.region, `remote layers[${l}][${t}].region`);
      const offset = expectInteger(x.offset, `remote layers[${l}][${t}].offset`);
      const blockBytes = expectInteger(x.blockBytes, `remote layers[${l}][${t}].blockBytes`, 1);
      const mine = local.layers[l][t];
      if (blockBytes !== mine.blockBytes * ratio) {
        throw new TransferError(
          `remote layers[${l}][${t}] has ${blockBytes}-byte blocks; ${ratio} × the local ${mine.blockBytes} bytes expected`,
          'ERR_BAD_ARGUMENT',
        );
      }
      const r = byId.get(region);
      if (!r) throw new TransferError(`remote layers[${l}][${t}] names region ${region}, which the peer does not advertise`, 'ERR_UNKNOWN_REGION');
      if (offset + blockBytes * numBlocks > r.length) {
        throw new TransferError(`remote layers[${l}][${t}] does not fit in region ${region} (${r.length} bytes)`, 'ERR_OUT_OF_RANGE');
      }
      return { region, offset, blockBytes: mine.blockBytes };
    });
  });
  return { blockSize, numBlocks, ratio, layers };
}
