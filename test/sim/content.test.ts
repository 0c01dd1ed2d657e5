import { describe, expect, it } from 'vitest';
import { CONTENT_CHUNK, STAMP_BYTES, embeddingKey, fillContent, findMismatch, kvBlockKey, makeContent } from '../../lib/sim/content.js';

describe('deterministic content', () => {
  it('depends on the key alone', () => {
    const a = makeContent('key-a', 3 * CONTENT_CHUNK + 123);
    expect(makeContent('key-a', 3 * CONTENT_CHUNK + 123).equals(a)).toBe(true);
    expect(makeContent('key-b', a.length).equals(a)).toBe(false);
    // A prefix of longer content is the content of the shorter length.
    expect(makeContent('key-a', 1000).equals(a.subarray(0, 1000))).toBe(true);
  });

  it('every chunk of every key starts differently (a block in the wrong place is caught)', () => {
    const keys = [kvBlockKey('r', 0, 0, 0), kvBlockKey('r', 0, 0, 1), kvBlockKey('r', 0, 1, 0), kvBlockKey('r', 1, 0, 0), kvBlockKey('s', 0, 0, 0)];
    const stamps = keys.map((k) => makeContent(k, STAMP_BYTES).toString('hex'));
    expect(new Set(stamps).size).toBe(keys.length);
    const block = makeContent(keys[0], 4096);
    expect(findMismatch(block, keys[1])).toBe(0);
    expect(findMismatch(makeContent(embeddingKey('h'), 64), kvBlockKey('h', 0, 0, 0))).toBe(0);
  });

  it('finds a single changed byte anywhere', () => {
    const key = embeddingKey('mm-1');
    const length = 2 * CONTENT_CHUNK + 777;
    for (const at of [0, STAMP_BYTES - 1, STAMP_BYTES, CONTENT_CHUNK - 1, CONTENT_CHUNK, CONTENT_CHUNK + STAMP_BYTES + 5, length - 1]) {
      const bytes = makeContent(key, length);
      expect(findMismatch(bytes, key)).toBe(-1);
      bytes[at] ^= 0x01;
      expect(findMismatch(bytes, key)).toBe(at);
    }
  });

  it('fills any typed array in place, short content included', () => {
    for (const n of [1, STAMP_BYTES, STAMP_BYTES + 1, 1000]) {
      const view = new Uint8Array(n);
      fillContent(view, 'k');
      expect(findMismatch(view, 'k')).toBe(-1);
      expect(Buffer.from(view).equals(makeContent('k', n))).toBe(true);
    }
  });
});
