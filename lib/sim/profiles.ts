/**
 * Model profiles for simulation: the architecture numbers that size KV caches
 * and embeddings, and prefill compute times on a stated reference accelerator.
 *
 * Architecture numbers are those of each model's published `config.json`
 * (Hugging Face model cards; listed in `source`). Compute times are *derived, not
 * measured*: the FLOPs of one layer's prefill (2 × the layer's activated
 * parameters per token for the matmuls, plus causal attention, which grows with
 * the square of the prompt) divided by the throughput of {@link REFERENCE_ACCELERATOR}.
 * They make simulated timings proportionate (a 32K prompt costs more than 8 × a 4K
 * one; a layer's KV transfer compares with a layer's compute as it would on such a
 * part), not predictions for any particular chip.
 */
import { TransferError } from '../errors.js';
import { gqaTensors, mlaTensors, type KvTensorShape } from '../kv/layout.js';

/** The accelerator the compute times refer to. */
export const REFERENCE_ACCELERATOR = Object.freeze({
  name: 'reference 300-TFLOPS-class accelerator (Ascend 910B / A100 class)',
  /** Dense bf16 peak, TFLOP/s (A100: 312). */
  peakTflops: 312,
  /** Share of peak prefill sustains (assumption; prefill matmuls are compute-bound). */
  utilisation: 0.5,
  /** Effective FLOP/s used for every compute time here. */
  get effectiveFlops(): number {
    return this.peakTflops * 1e12 * this.utilisation;
  },
  /** Memory bandwidth, TB/s (Ascend 910B and A100-40GB: about 1.6). Decode is bound by it. */
  memoryTBps: 1.6,
  /** Share of the memory bandwidth a decode step sustains (assumption). */
  memoryUtilisation: 0.7,
  /** Effective bytes/s used for every decode time here. */
  get effectiveMemoryBytesPerSec(): number {
    return this.memoryTBps * 1e12 * this.memoryUtilisation;
  },
});

/** Grouped-query (or multi-head) attention. */
export interface GqaAttention {
  kind: 'gqa';
  heads: number;
  kvHeads: number;
  headDim: number;
}

/** DeepSeek multi-head latent attention. */
export interface MlaAttention {
  kind: 'mla';
  heads: number;
  /** 0 when queries are not compressed. */
  qLoraRank: number;
  kvLoraRank: number;
  qkNopeHeadDim: number;
  qkRopeHeadDim: number;
  vHeadDim: number;
}

/** Feed-forward: dense SwiGLU, or mixture of experts after some dense layers. */
export interface FeedForward {
  /** SwiGLU width of dense layers. */
  intermediateSize: number;
  moe?: {
    /** Layers before the first MoE layer (dense). */
    firstDenseLayers: number;
    expertIntermediateSize: number;
    /** Routed experts a token activates. */
    activatedExperts: number;
    sharedExperts: number;
    routedExperts: number;
  };
}

/** A multimodal model's vision encoder (for EC transfer sizing). */
export interface VisionEncoder {
  patchSize: number;
  /** Patches merged into one LLM token per side (2 → 4 patches per token). */
  spatialMergeSize: number;
  /** Width of one embedding token handed to the LLM. */
  embeddingWidth: number;
  layers: number;
  hiddenSize: number;
  intermediateSize: number;
  /** Encoder time per patch on the reference accelerator, µs (derived like the LLM's). */
  usPerPatch: number;
}

export interface ModelProfile {
  /** What `--model` takes. */
  id: string;
  name: string;
  /** Where the architecture numbers come from. */
  source: string;
  layers: number;
  hiddenSize: number;
  attention: GqaAttention | MlaAttention;
  ffn: FeedForward;
  /** KV-cache tokens per block (vLLM-Ascend's default is 128). */
  blockSize: number;
  /** Bytes per KV value (bf16). */
  dtypeBytes: number;
  /** Devices of one prefill instance the times are for (compute divided evenly). */
  prefillDevices: number;
  /** Prefill time of one layer per prompt token, µs (matmuls). */
  layerUsPerToken: number;
  /** Prefill time of one layer per token² (causal attention), µs. */
  layerUsPerToken2: number;
  vision?: VisionEncoder;
}

type ProfileInput = Omit<ModelProfile, 'layerUsPerToken' | 'layerUsPerToken2' | 'vision'> & {
  vision?: Omit<VisionEncoder, 'usPerPatch'>;
};

/** Activated matmul parameters of one layer, averaged over the layers. */
function layerParams(p: ProfileInput): number {
  const h = p.hiddenSize;
  const a = p.attention;
  let attn: number;
  if (a.kind === 'gqa') {
    attn = h * a.heads * a.headDim + 2 * h * a.kvHeads * a.headDim + a.heads * a.headDim * h;
  } else {
    const qk = a.qkNopeHeadDim + a.qkRopeHeadDim;
    const q = a.qLoraRank > 0 ? h * a.qLoraRank + a.qLoraRank * a.heads * qk : h * a.heads * qk;
    attn = q + h * (a.kvLoraRank + a.qkRopeHeadDim) + a.kvLoraRank * a.heads * (a.qkNopeHeadDim + a.vHeadDim) + a.heads * a.vHeadDim * h;
  }
  const dense = 3 * h * p.ffn.intermediateSize;
  const moe = p.ffn.moe;
  let ffn = dense;
  if (moe) {
    const moeLayer = 3 * h * moe.expertIntermediateSize * (moe.activatedExperts + moe.sharedExperts) + h * moe.routedExperts;
    ffn = (dense * moe.firstDenseLayers + moeLayer * (p.layers - moe.firstDenseLayers)) / p.layers;
  }
  return attn + ffn;
}

/** Attention FLOPs of one layer per (query, key) pair. */
function attentionFlopsPerPair(p: ProfileInput): number {
  const a = p.attention;
  // QKᵀ and AV: 2 FLOPs per multiply-add, over the score and value widths.
  return a.kind === 'gqa' ? 2 * a.heads * 2 * a.headDim : 2 * a.heads * (a.qkNopeHeadDim + a.qkRopeHeadDim + a.vHeadDim);
}

function define(p: ProfileInput): ModelProfile {
  const flops = REFERENCE_ACCELERATOR.effectiveFlops * p.prefillDevices;
  const us = (f: number) => (f / flops) * 1e6;
  let vision: VisionEncoder | undefined;
  if (p.vision) {
    const v = p.vision;
    const perLayer = 2 * (4 * v.hiddenSize * v.hiddenSize + 3 * v.hiddenSize * v.intermediateSize);
    vision = { ...v, usPerPatch: (perLayer * v.layers) / REFERENCE_ACCELERATOR.effectiveFlops * 1e6 };
  }
  return Object.freeze({
    ...p,
    layerUsPerToken: us(2 * layerParams(p)),
    // Causal: token i attends to i keys, so n tokens make n²/2 pairs.
    layerUsPerToken2: us(attentionFlopsPerPair(p) / 2),
    vision,
  }) as ModelProfile;
}

/** Every profile by id. */
export const PROFILES: Readonly<Record<string, ModelProfile>> = Object.freeze({
  'llama3-8b': define({
    id: 'llama3-8b',
    name: 'Llama-3-8B',
    source: 'meta-llama/Meta-Llama-3-8B config.json',
    layers: 32,
    hiddenSize: 4096,
    attention: { kind: 'gqa', heads: 32, kvHeads: 8, headDim: 128 },
    ffn: { intermediateSize: 14336 },
    blockSize: 128,
    dtypeBytes: 2,
    prefillDevices: 1,
  }),
  'qwen2.5-7b': define({
    id: 'qwen2.5-7b',
    name: 'Qwen2.5-7B-Instruct',
    source: 'Qwen/Qwen2.5-7B-Instruct config.json',
    layers: 28,
    hiddenSize: 3584,
    attention: { kind: 'gqa', heads: 28, kvHeads: 4, headDim: 128 },
    ffn: { intermediateSize: 18944 },
    blockSize: 128,
    dtypeBytes: 2,
    prefillDevices: 1,
  }),
  'qwen2.5-vl-7b': define({
    id: 'qwen2.5-vl-7b',
    name: 'Qwen2.5-VL-7B-Instruct',
    source: 'Qwen/Qwen2.5-VL-7B-Instruct config.json (language model and vision_config)',
    layers: 28,
    hiddenSize: 3584,
    attention: { kind: 'gqa', heads: 28, kvHeads: 4, headDim: 128 },
    ffn: { intermediateSize: 18944 },
    blockSize: 128,
    dtypeBytes: 2,
    prefillDevices: 1,
    vision: { patchSize: 14, spatialMergeSize: 2, embeddingWidth: 3584, layers: 32, hiddenSize: 1280, intermediateSize: 3420 },
  }),
  'deepseek-v2-lite': define({
    id: 'deepseek-v2-lite',
    name: 'DeepSeek-V2-Lite',
    source: 'deepseek-ai/DeepSeek-V2-Lite config.json',
    layers: 27,
    hiddenSize: 2048,
    attention: { kind: 'mla', heads: 16, qLoraRank: 0, kvLoraRank: 512, qkNopeHeadDim: 128, qkRopeHeadDim: 64, vHeadDim: 128 },
    ffn: {
      intermediateSize: 10944,
      moe: { firstDenseLayers: 1, expertIntermediateSize: 1408, activatedExperts: 6, sharedExperts: 2, routedExperts: 64 },
    },
    blockSize: 128,
    dtypeBytes: 2,
    prefillDevices: 1,
  }),
  'deepseek-r1': define({
    id: 'deepseek-r1',
    name: 'DeepSeek-R1 (V3 architecture)',
    source: 'deepseek-ai/DeepSeek-R1 config.json; prefill instance of 16 devices',
    layers: 61,
    hiddenSize: 7168,
    attention: { kind: 'mla', heads: 128, qLoraRank: 1536, kvLoraRank: 512, qkNopeHeadDim: 128, qkRopeHeadDim: 64, vHeadDim: 128 },
    ffn: {
      intermediateSize: 18432,
      moe: { firstDenseLayers: 3, expertIntermediateSize: 2048, activatedExperts: 8, sharedExperts: 1, routedExperts: 256 },
    },
    blockSize: 128,
    dtypeBytes: 2,
    prefillDevices: 16,
  }),
});

/** The profile for `id`; ERR_BAD_ARGUMENT listing the known ids otherwise. */
export function getProfile(id: string): ModelProfile {
  const p = Object.prototype.hasOwnProperty.call(PROFILES, id) ? PROFILES[id] : undefined;
  if (!p) throw new TransferError(`unknown model profile '${id}'; known: ${Object.keys(PROFILES).join(', ')}`, 'ERR_BAD_ARGUMENT');
  return p;
}

/** The KV-cache tensors of one layer. */
export function kvTensors(p: ModelProfile): KvTensorShape[] {
  const a = p.attention;
  return a.kind === 'gqa'
    ? gqaTensors({ kvHeads: a.kvHeads, headDim: a.headDim, dtypeBytes: p.dtypeBytes })
    : mlaTensors({ kvLoraRank: a.kvLoraRank, ropeHeadDim: a.qkRopeHeadDim, dtypeBytes: p.dtypeBytes });
}

/** KV bytes of one token across all layers. */
export function kvBytesPerToken(p: ModelProfile): number {
  return kvTensors(p).reduce((s, t) => s + t.bytesPerToken, 0) * p.layers;
}

/** Prefill time of one layer for a prompt of `tokens` tokens (one chunk), µs. */
export function layerPrefillUs(p: ModelProfile, tokens: number): number {
  return tokens * p.layerUsPerToken + tokens * tokens * p.layerUsPerToken2;
}

/** Bytes of the weights one decode step reads: every layer's activated matmul parameters (embeddings and LM head left out). */
export function decodeWeightBytes(p: ModelProfile): number {
  return layerParams(p) * p.layers * p.dtypeBytes;
}

/**
 * Time of one decode step (one token for each sequence of the batch), µs. Decode
 * is memory-bound: a step reads the activated weights once for the whole batch
 * plus every sequence's KV cache, at the reference accelerator's effective memory
 * bandwidth, spread over the instance's `prefillDevices`. Like the prefill times,
 * derived, not measured.
 */
export function decodeStepUs(p: ModelProfile, contextTokens: readonly number[]): number {
  const perToken = kvBytesPerToken(p);
  let bytes = decodeWeightBytes(p);
  for (const n of contextTokens) bytes += n * perToken;
  return (bytes / (REFERENCE_ACCELERATOR.effectiveMemoryBytesPerSec * p.prefillDevices)) * 1e6;
}

/** What the vision encoder makes of one image. */
export interface ImageEmbedding {
  /** Embedding tokens handed to the language model (patches merged `spatialMergeSize`² to one). */
  tokens: number;
  /** Embedding bytes: tokens × embedding width × dtype bytes. */
  bytes: number;
  /** Encoder time on the reference accelerator, µs (derived like the prefill times). */
  encodeUs: number;
}

/**
 * The embedding of a `width` × `height` image: one token per
 * (patch × merge)² pixels, each side rounded up (28 px for Qwen2.5-VL, the proxy's
 * default estimate too). ERR_BAD_ARGUMENT for a profile without a vision encoder.
 */
export function imageEmbedding(p: ModelProfile, width: number, height: number): ImageEmbedding {
  const v = p.vision;
  if (!v) throw new TransferError(`model profile '${p.id}' has no vision encoder`, 'ERR_BAD_ARGUMENT');
  if (!Number.isSafeInteger(width) || !Number.isSafeInteger(height) || width < 1 || height < 1) {
    throw new TransferError(`Expected a positive image size but received ${width}x${height}`, 'ERR_BAD_ARGUMENT');
  }
  const side = v.patchSize * v.spatialMergeSize;
  const tokens = Math.ceil(width / side) * Math.ceil(height / side);
  return { tokens, bytes: tokens * v.embeddingWidth * p.dtypeBytes, encodeUs: tokens * v.spatialMergeSize ** 2 * v.usPerPatch };
}
