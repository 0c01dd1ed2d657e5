// mmHash: the key every process must derive identically from the same item.
import { createHash } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { mmHash, type MmHashInput } from '../../lib/index.js';
import { expectCode, startWorker, stopWorkers } from './helpers.js';

afterEach(stopWorkers);

const base: MmHashInput = {
  model: 'Qwen/Qwen2.5-VL-7B-Instruct',
  media: Buffer.from('a tiny image'),
  processorOptions: { max_pixels: 1003520, min_pixels: 3136 },
};

// The documented encoding (docs/ENCODER_CACHE.md), written out independently.
function reference(model: string, modality: string, optionsJson: string, parts: Buffer[]): string {
  const h = createHash('sha256');
  const field = (b: Buffer) => {
    const len = Buffer.alloc(8);
    len.writeBigUInt64BE(BigInt(b.length));
    h.update(len).update(b);
  };
  for (const f of ['epd-transfer/mm-hash/v1', model, modality, optionsJson, String(parts.length)]) field(Buffer.from(f));
  for (const p of parts) field(p);
  return h.digest('hex');
}

describe('mmHash', () => {
  it('follows the documented encoding and never changes', () => {
    const key = mmHash(base);
    expect(key).toBe(reference(base.model, 'image', '{"max_pixels":1003520,"min_pixels":3136}', [Buffer.from('a tiny image')]));
    expect(key).toBe('6fb4b14787ef11ebdee36f00e00131742a8c0ef59220f46f28d39f83c79c51d5');
  });

  it('is the same in another process', async () => {
    const w = await startWorker();
    const theirs = await w.call('mmHash', { input: { ...base, media: (base.media as Buffer).toString('base64') } });
    expect(theirs).toBe(mmHash(base));
  });

  it('ignores the order of processor options and the kind of byte view', () => {
    const bytes = Buffer.from('a tiny image');
    const same = [
      mmHash({ ...base, processorOptions: { min_pixels: 3136, max_pixels: 1003520 } }),
      mmHash({ ...base, media: new Uint8Array(bytes) }),
      mmHash({ ...base, media: new Uint8Array(bytes).buffer }),
      mmHash({ ...base, media: new DataView(new Uint8Array(bytes).buffer) }),
      mmHash({ ...base, media: [bytes] }),
    ];
    expect(new Set(same)).toEqual(new Set([mmHash(base)]));
  });

  it('changes with every input that changes the embedding', () => {
    const keys = [
      mmHash(base),
      mmHash({ ...base, model: './models/qwen2.5-vl-7b' }), // a local path is another model id
      mmHash({ ...base, media: Buffer.from('a tiny imagE') }),
      mmHash({ ...base, modality: 'video' }),
      mmHash({ ...base, processorOptions: { max_pixels: 1003520 } }),
      mmHash({ ...base, processorOptions: { max_pixels: 1003520, min_pixels: '3136' } }),
      mmHash({ ...base, processorOptions: undefined }),
      mmHash({ ...base, media: [Buffer.from('a tiny '), Buffer.from('image')] }), // parts are not concatenated
    ];
    expect(new Set(keys).size).toBe(keys.length);
    expect(mmHash({ ...base, loraName: 'med-adapter' })).toBe(`med-adapter:${mmHash(base)}`);
  });

  it('rejects bad input with ERR_BAD_ARGUMENT', async () => {
    const bad: unknown[] = [
      undefined,
      { media: Buffer.alloc(1) },
      { model: '', media: Buffer.alloc(1) },
      { model: 'm', media: 'pixels' },
      { model: 'm', media: [] },
      { model: 'm', media: [Buffer.alloc(1), 7] },
      { model: 'm', media: Buffer.alloc(1), modality: 3 },
      { model: 'm', media: Buffer.alloc(1), processorOptions: [1] },
      { model: 'm', media: Buffer.alloc(1), processorOptions: { fps: NaN } },
      { model: 'm', media: Buffer.alloc(1), processorOptions: { size: undefined } },
      { model: 'm', media: Buffer.alloc(1), processorOptions: { n: 1n } },
      { model: 'm', media: Buffer.alloc(1), processorOptions: { when: new Date(0) } },
      { model: 'm', media: Buffer.alloc(1), loraName: '' },
    ];
    for (const input of bad) await expectCode(() => mmHash(input as MmHashInput), 'ERR_BAD_ARGUMENT');
  });
});
