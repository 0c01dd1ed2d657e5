// KvLayout validation, the GQA/MLA examples, remote-layout compatibility and model profiles.
import { afterAll, describe, expect, it } from 'vitest';
import { checkRemoteLayout, gqaTensors, KvLayout, mlaTensors } from '../../lib/kv/layout.js';
import { getProfile, kvBytesPerToken, kvTensors, layerPrefillUs, PROFILES } from '../../lib/sim/profiles.js';
import { closeEngines, expectCode, openEngine } from '../helpers.js';

afterAll(closeEngines);

describe('KvLayout', () => {
  it('packs a GQA cache layer-major, K then V, each tensor aligned, inside one region', async () => {
    const engine = await openEngine({ listen: false });
    // 16 tokens × 2 heads × 48 dims × 2 bytes = 3072-byte blocks; 10 blocks = 30720 bytes, aligned up to 32768.
    const opts = { layers: 3, blockSize: 16, numBlocks: 10, tensors: gqaTensors({ kvHeads: 2, headDim: 48 }), alignment: 4096 };
    const bytes = KvLayout.packedBytes(opts);
    const region = engine.allocate(bytes);
    const layout = KvLayout.packed(region, opts);
    const blockBytes = 3072;
    expect(layout.layers.map((l) => l.map((t) => [t.name, t.offset, t.blockBytes]))).toEqual([
      [['k', 0, blockBytes], ['v', 32768, blockBytes]],
      [['k', 65536, blockBytes], ['v', 98304, blockBytes]],
      [['k', 131072, blockBytes], ['v', 163840, blockBytes]],
    ]);
    expect(bytes).toBe(163840 + 30720);
    expect(layout.bytesPerToken).toBe(3 * 2 * 2 * 48 * 2);
    expect(layout.describe().layers[1][1]).toEqual({ name: 'v', region: region.id, offset: 98304, blockBytes });
  });
  it('describes MLA layers as a 512-wide latent cache and a 64-wide rotary cache', () => {
    expect(mlaTensors({ kvLoraRank: 512, ropeHeadDim: 64 })).toEqual([
      { name: 'kv_c', bytesPerToken: 1024 },
      { name: 'k_pe', bytesPerToken: 128 },
    ]);
  });

  it('refuses tensors outside their region, overlapping tensors, ragged layers and bad sizes', async () => {
    const engine = await openEngine({ listen: false });
    const region = engine.allocate(1 << 16);
    const t = (offset: number, blockBytes = 1024) => ({ region, offset, blockBytes });
    await expectCode(() => new KvLayout({ blockSize: 16, numBlocks: 65, layers: [[t(0)]] }), 'ERR_OUT_OF_RANGE');
    await expectCode(() => new KvLayout({ blockSize: 16, numBlocks: 8, layers: [[t(0), t(4096)]] }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => new KvLayout({ blockSize: 16, numBlocks: 8, layers: [[t(0)], [t(8192), t(16384)]] }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => new KvLayout({ blockSize: 0, numBlocks: 8, layers: [[t(0)]] }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => new KvLayout({ blockSize: 16, numBlocks: 8, layers: [] }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => new KvLayout({ blockSize: 16, numBlocks: 8, layers: [[{ region: { id: 1, length: 1 << 20 }, blockBytes: 64 }]] } as never), 'ERR_BAD_ARGUMENT');
    await expectCode(() => new KvLayout({ blockSize: 16, numBlocks: 8, layers: [[t(-1)]] }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => KvLayout.packed(region, { layers: 4, blockSize: 16, numBlocks: 8, tensors: gqaTensors({ kvHeads: 8, headDim: 128 }) }), 'ERR_OUT_OF_RANGE');
    await expectCode(() => KvLayout.packed(region, { layers: 1, blockSize: 16, numBlocks: 8, tensors: [] }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => gqaTensors({ kvHeads: 0, headDim: 128 }), 'ERR_BAD_ARGUMENT');
    // Non-overlapping tensors of several layers in one region are fine.
    expect(new KvLayout({ blockSize: 16, numBlocks: 4, layers: [[t(0), t(4096)], [t(8192), t(12288)]] }).numLayers).toBe(2);
  });
});

describe('checkRemoteLayout', () => {
  it('accepts a decode layout with a block size that is a multiple of ours and converts it to our block units', async () => {
    const engine = await openEngine({ listen: false });
    const tensors = gqaTensors({ kvHeads: 1, headDim: 32 });
    const local = KvLayout.packed(engine.allocate(1 << 20), { layers: 2, blockSize: 8, numBlocks: 16, tensors });
    const remoteRegion = engine.allocate(1 << 20);
    const remote = KvLayout.packed(remoteRegion, { layers: 2, blockSize: 32, numBlocks: 4, tensors });
    const advertised = [{ id: remoteRegion.id, length: remoteRegion.length, kind: 'host' }];
    const r = checkRemoteLayout(remote.describe(), advertised, local);
    expect(r.ratio).toBe(4);
    expect(r.layers[1][1]).toEqual({ region: remoteRegion.id, offset: remote.layers[1][1].offset, blockBytes: local.layers[1][1].blockBytes });
  });

  it('refuses a smaller or non-multiple block size, other shapes, unknown regions and tensors past a region', async () => {
    const engine = await openEngine({ listen: false });
    const tensors = gqaTensors({ kvHeads: 1, headDim: 32 });
    const local = KvLayout.packed(engine.allocate(1 << 20), { layers: 2, blockSize: 8, numBlocks: 16, tensors });
    const region = engine.allocate(1 << 20);
    const adv = [{ id: region.id, length: region.length, kind: 'host' }];
    const of = (o: { layers?: number; blockSize?: number; numBlocks?: number; tensors?: typeof tensors }) =>
      KvLayout.packed(region, { layers: 2, blockSize: 16, numBlocks: 4, tensors, ...o }).describe();
    await expectCode(() => checkRemoteLayout(of({ blockSize: 4, numBlocks: 8 }), adv, local), 'ERR_BAD_ARGUMENT');
    await expectCode(() => checkRemoteLayout(of({ blockSize: 12 }), adv, local), 'ERR_BAD_ARGUMENT');
    await expectCode(() => checkRemoteLayout(of({ layers: 3 }), adv, local), 'ERR_BAD_ARGUMENT');
    await expectCode(() => checkRemoteLayout(of({ tensors: gqaTensors({ kvHeads: 2, headDim: 32 }) }), adv, local), 'ERR_BAD_ARGUMENT');
    await expectCode(() => checkRemoteLayout(of({}), [], local), 'ERR_UNKNOWN_REGION');
    await expectCode(() => checkRemoteLayout(of({}), [{ ...adv[0], length: 4096 }], local), 'ERR_OUT_OF_RANGE');
    await expectCode(() => checkRemoteLayout('nonsense', adv, local), 'ERR_BAD_ARGUMENT');
  });
});

describe('model profiles', () => {
  it('size KV caches as the published configs do', () => {
    // Llama-3-8B: 32 layers × 8 KV heads × 128 × 2 (K, V) × 2 bytes = 128 KiB per token.
    expect(kvBytesPerToken(getProfile('llama3-8b'))).toBe(128 * 1024);
    // Qwen2.5-7B (and the VL model's LLM): 28 × 4 × 128 × 2 × 2.
    expect(kvBytesPerToken(getProfile('qwen2.5-7b'))).toBe(57_344);
    expect(kvBytesPerToken(getProfile('qwen2.5-vl-7b'))).toBe(57_344);
    // DeepSeek-R1 MLA: 61 layers × (512 + 64) × 2 bytes ≈ 70 KB per token (274.5 MB at 4K).
    expect(kvBytesPerToken(getProfile('deepseek-r1'))).toBe(70_272);
    expect(kvTensors(getProfile('deepseek-v2-lite')).map((t) => t.name)).toEqual(['kv_c', 'k_pe']);
    expect(getProfile('qwen2.5-vl-7b').vision?.embeddingWidth).toBe(3584);
  });

  it('make prefill time grow faster than linearly with the prompt (attention)', () => {
    for (const p of Object.values(PROFILES)) {
      expect(p.layerUsPerToken).toBeGreaterThan(0);
      expect(layerPrefillUs(p, 32768)).toBeGreaterThan(8 * layerPrefillUs(p, 4096));
    }
  });

  it('refuses an unknown id, naming the known ones', async () => {
    const err = await expectCode(() => getProfile('gpt-9'), 'ERR_BAD_ARGUMENT');
    expect(err.message).toContain('llama3-8b');
    await expectCode(() => getProfile('toString'), 'ERR_BAD_ARGUMENT');
  });
});
