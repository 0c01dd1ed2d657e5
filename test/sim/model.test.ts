import { describe, expect, it } from 'vitest';
import { planRequest } from '../../lib/proxy/plan.js';
import { DEFAULT_ESTIMATES } from '../../lib/proxy/estimate.js';
import { mmHash } from '../../lib/ec/hash.js';
import { decodeStepUs, getProfile, imageEmbedding } from '../../lib/sim/profiles.js';
import { parsePrompt, simulatedToken } from '../../lib/sim/prompt.js';
import { pngDataUrl } from '../../lib/demo/images.js';
import { HttpError } from '../../lib/sim/http.js';
import { expectCode } from '../helpers.js';

const vl = getProfile('qwen2.5-vl-7b');

describe('simulated model numbers', () => {
  it('a 1920x1080 image is 69 x 39 tokens of 3584 bf16 values on Qwen2.5-VL', () => {
    const e = imageEmbedding(vl, 1920, 1080);
    expect(e.tokens).toBe(69 * 39);
    expect(e.bytes).toBe(69 * 39 * 3584 * 2);
    expect(e.encodeUs).toBeGreaterThan(imageEmbedding(vl, 448, 448).encodeUs);
  });

  it('refuses images for a profile without a vision encoder, and nonsense sizes', async () => {
    await expectCode(() => imageEmbedding(getProfile('llama3-8b'), 448, 448), 'ERR_BAD_ARGUMENT');
    await expectCode(() => imageEmbedding(vl, 0, 10), 'ERR_BAD_ARGUMENT');
  });

  it('a decode step costs more with a larger batch and longer contexts', () => {
    const one = decodeStepUs(vl, [1000]);
    expect(decodeStepUs(vl, [1000, 1000])).toBeGreaterThan(one);
    expect(decodeStepUs(vl, [8000])).toBeGreaterThan(one);
    expect(decodeStepUs(vl, [])).toBeGreaterThan(0);
  });
});

describe('parsePrompt', () => {
  const image = pngDataUrl(896, 672, 7);
  const chat = {
    model: 'qwen2.5-vl-7b',
    messages: [
      { role: 'system', content: 'be brief' },
      { role: 'user', content: [{ type: 'text', text: 'what is in this picture?' }, { type: 'image_url', image_url: { url: image } }] },
    ],
    max_tokens: 20,
    stream: true,
    stream_options: { include_usage: true },
  };

  it('counts the prompt exactly as the proxy estimates it (so P fills exactly the blocks D allocated)', () => {
    const p = parsePrompt('chat', structuredClone(chat), vl);
    const plan = planRequest('chat', structuredClone(chat), { estimates: DEFAULT_ESTIMATES, defaultMaxTokens: 256 });
    expect(p.tokens).toBe(plan.promptTokens);
    expect(p.images).toHaveLength(1);
    expect(p.images[0]).toMatchObject({ width: 896, height: 672 });
    expect(p.images[0].embedding.tokens).toBe(32 * 24);
    expect(p).toMatchObject({ maxTokens: 20, stream: true, includeUsage: true });
  });

  it("keys an image by the part's uuid (as vLLM does), else by the content hash of lib/ec", () => {
    const withUuid = structuredClone(chat);
    (withUuid.messages[1].content as Array<Record<string, unknown>>)[1].uuid = 'item-42';
    expect(parsePrompt('chat', withUuid, vl).images[0].mmHash).toBe('item-42');
    const bytes = Buffer.from(image.slice(image.indexOf(',') + 1), 'base64');
    expect(parsePrompt('chat', structuredClone(chat), vl).images[0].mmHash).toBe(mmHash({ model: 'qwen2.5-vl-7b', media: bytes, modality: 'image' }));
  });

  it('reads completions prompts as text or token ids', () => {
    expect(parsePrompt('completions', { prompt: 'abcdefgh' }, vl).tokens).toBe(2);
    expect(parsePrompt('completions', { prompt: [1, 2, 3, 4, 5] }, vl).tokens).toBe(5);
  });

  it('answers 400 for what it cannot simulate', () => {
    const bad: Array<[string, unknown]> = [
      ['not an object', 'hello'],
      ['no messages', { messages: [] }],
      ['two choices', { ...chat, n: 2 }],
      ['max_tokens 0', { ...chat, max_tokens: 0 }],
      ['stream not boolean', { ...chat, stream: 'yes' }],
      ['remote image', { messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'https://example.com/a.png' } }] }] }],
      ['audio', { messages: [{ role: 'user', content: [{ type: 'input_audio', input_audio: { data: 'AAAA', format: 'wav' } }] }] }],
      ['unreadable image', { messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'data:image/png;base64,AAAA' } }] }] }],
    ];
    for (const [what, body] of bad) {
      let err: unknown;
      try {
        parsePrompt('chat', body, vl);
      } catch (e) {
        err = e;
      }
      expect(err, what).toBeInstanceOf(HttpError);
      expect((err as HttpError).status, what).toBe(400);
    }
    expect(() => parsePrompt('chat', { messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: image } }] }] }, getProfile('llama3-8b'))).toThrow(/no vision encoder/);
    expect(() => parsePrompt('completions', { prompt: ['a', 'b'] }, vl)).toThrow(/one prompt per request/);
  });

  it('generates text that says it is simulated', () => {
    expect(simulatedToken('r', 0)).toBe('[simulated]');
    expect(simulatedToken('r', 5)).toBe(simulatedToken('r', 5));
    expect(simulatedToken('r', 5)).toMatch(/^ \w+$/);
  });
});
