// Block planning, checked against a naive plan (one descriptor per tensor per block):
// exhaustively over small chunkings and with seeded random block tables.
import { describe, expect, it } from 'vitest';
import {
  blockRuns,
  chunkBlockRange,
  DESCRIPTOR_STRIDE,
  expandBlockIds,
  planLayer,
  splitPlan,
  type TensorPlacement,
} from '../../lib/kv/plan.js';

/** xorshift32: deterministic per seed. */
function rng(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n) => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % n;
  };
}

/** A block table with contiguous stretches and jumps, like a real allocator's. */
function blockTable(rand: (n: number) => number, count: number, space: number): number[] {
  const free = Array.from({ length: space }, (_, i) => i);
  const out: number[] = [];
  while (out.length < count) {
    let at = rand(free.length);
    const stretch = 1 + rand(4);
    for (let i = 0; i < stretch && out.length < count && free.length > 0; i++) {
      if (at >= free.length) at = 0;
      out.push(free.splice(at, 1)[0]);
    }
  }
  return out;
}

type Piece = [number, number, number, number];

/** The naive plan: one descriptor of one local-sized block per tensor per logical block. */
function naive(local: number[], remote: number[], first: number, end: number, lt: TensorPlacement[], rt: TensorPlacement[]): Piece[] {
  const out: Piece[] = [];
  for (let t = 0; t < lt.length; t++) {
    for (let k = first; k < end; k++) {
      out.push([lt[t].region, lt[t].offset + local[k] * lt[t].blockBytes, rt[t].region, rt[t].offset + remote[k] * rt[t].blockBytes]);
    }
  }
  return out;
}

const byKey = (a: Piece, b: Piece) => a[0] - b[0] || a[1] - b[1] || a[2] - b[2] || a[3] - b[3];

describe('chunkBlockRange', () => {
  it('over every chunking of small prompts, sends each block once, as soon as it is full, the tail last', () => {
    for (const blockSize of [1, 2, 4]) {
      for (let tokens = 1; tokens <= 10; tokens++) {
        for (let cached = 0; cached <= tokens; cached += blockSize) {
          // Every composition of `tokens` into chunks: bit i set = a chunk ends after token i + 1.
          for (let mask = 0; mask < 1 << (tokens - 1); mask++) {
            const ends = [];
            for (let i = 0; i < tokens - 1; i++) if (mask & (1 << i)) ends.push(i + 1);
            ends.push(tokens);
            const sent: number[] = [];
            let sentTokens = 0;
            const problems: string[] = [];
            for (const computed of ends) {
              const r = chunkBlockRange({ tokens, blockSize, cachedTokens: cached, sentTokens, computedTokens: computed });
              if (r.final !== (computed === tokens)) problems.push(`final flag at ${computed}`);
              for (let k = r.first; k < r.end; k++) {
                sent.push(k);
                // Only full blocks before the final chunk.
                if (!r.final && (k + 1) * blockSize > computed) problems.push(`partial block ${k} sent at ${computed}`);
              }
              sentTokens = r.sentTokens;
              // Nothing that is full and not cached is held back.
              const fullNow = Math.floor(computed / blockSize);
              for (let k = cached / blockSize; k < fullNow; k++) if (!sent.includes(k)) problems.push(`full block ${k} held back at ${computed}`);
            }
            const expected = [];
            for (let k = cached / blockSize; k < Math.ceil(tokens / blockSize); k++) expected.push(k);
            const where = `blockSize ${blockSize}, tokens ${tokens}, cached ${cached}, chunks ends ${ends.join(',')}`;
            if (problems.length > 0) expect(problems, where).toEqual([]);
            if (sent.join() !== expected.join())             expect(sent).toEqual(expected);
          }
        }
      }
    }
  });

  it('sends nothing for a chunk that completes no block beyond the cached prefix', () => {
    expect(chunkBlockRange({ tokens: 64, blockSize: 16, cachedTokens: 32, sentTokens: 0, computedTokens: 20 })).toMatchObject({ first: 2, end: 2, final: false });
    expect(chunkBlockRange({ tokens: 64, blockSize: 16, cachedTokens: 0, sentTokens: 16, computedTokens: 31 })).toMatchObject({ first: 1, end: 1 });
  });
});

describe('expandBlockIds', () => {
  it('maps a decode block b of ratio r to local-sized sub-blocks b·r … b·r + r − 1', () => {
    expect(expandBlockIds([5, 2], 1)).toEqual([5, 2]);
    expect(expandBlockIds([5, 2], 2)).toEqual([10, 11, 4, 5]);
    expect(expandBlockIds([0, 3], 4)).toEqual([0, 1, 2, 3, 12, 13, 14, 15]);
  });
});

describe('blockRuns', () => {
  it('breaks a run wherever either side jumps, and nowhere else', () => {
    const local = [0, 1, 2, 3, 7, 8, 9];
    const remote = [4, 5, 9, 10, 11, 12, 13];
    expect(blockRuns(local, remote, 0, 7)).toEqual([
      { logical: 0, local: 0, remote: 4, count: 2 },
      { logical: 2, local: 2, remote: 9, count: 2 },
      { logical: 4, local: 7, remote: 11, count: 3 },
    ]);
    expect(blockRuns(local, remote, 3, 5)).toEqual([
      { logical: 3, local: 3, remote: 10, count: 1 },
      { logical: 4, local: 7, remote: 11, count: 1 },
    ]);
    expect(blockRuns(local, remote, 2, 2)).toEqual([]);
  });
});

describe('planLayer against the naive plan', () => {
  const seeds = Array.from({ length: 300 }, (_, i) => i + 1);

  it('moves the same bytes to the same places with the fewest descriptors (random tables, ratios, prefixes, chunks)', () => {
    for (const seed of seeds) {
      const rand = rng(seed);
      const blockSize = [1, 2, 4, 16][rand(4)];
      const ratio = [1, 1, 2, 4][rand(4)];
      const tokens = 1 + rand(200);
      const nLocal = Math.ceil(tokens / blockSize);
      const nRemote = Math.ceil(tokens / (blockSize * ratio));
      const local = blockTable(rand, nLocal + rand(3), nLocal + 8 + rand(40));
      const remoteIds = blockTable(rand, nRemote, nRemote + 4 + rand(20));
      const remote = expandBlockIds(remoteIds, ratio);
      const cached = rand(3) === 0 ? blockSize * ratio * rand(nRemote) : 0;
      const tensors = 1 + rand(3);
      const lt: TensorPlacement[] = [];
      const rt: TensorPlacement[] = [];
      for (let t = 0; t < tensors; t++) {
        const bb = 8 * (1 + t);
        lt.push({ region: 1 + rand(2), offset: t * 100_000, blockBytes: bb });
        rt.push({ region: 7, offset: t * 200_000 + 64, blockBytes: bb });
      }
      const regionBlockBytes = (region: number, offset: number) => lt.find((t) => t.region === region && offset >= t.offset && offset < t.offset + 90_000)!.blockBytes;

      let sentTokens = 0;
      let computed = 0;
      const all: Piece[] = [];
      while (computed < tokens) {
        computed = Math.min(tokens, computed + 1 + rand(60));
        const range = chunkBlockRange({ tokens, blockSize, cachedTokens: cached, sentTokens, computedTokens: computed });
        sentTokens = range.sentTokens;
        const runs = blockRuns(local, remote, range.first, range.end);
        const plan = planLayer([{ peer: 'd', runs, remote: rt }], lt).get('d')!;
        const got: Piece[] = [];
        for (let i = 0; i < plan.descriptors.length; i += DESCRIPTOR_STRIDE) {
          const [lr, lo, rr, ro, len] = plan.descriptors.slice(i, i + DESCRIPTOR_STRIDE);
          const bb = regionBlockBytes(lr, lo);
          for (let o = 0; o < len; o += bb) got.push([lr, lo + o, rr, ro + o]);
        }
        const want = naive(local, remote, range.first, range.end, lt, rt);
        expect(got.slice().sort(byKey), `seed ${seed}`).toEqual(want.slice().sort(byKey));
        // Fewest: one descriptor per tensor per maximal run contiguous on both sides.
        let breaks = 0;
        for (let k = range.first + 1; k < range.end; k++) if (local[k] !== local[k - 1] + 1 || remote[k] !== remote[k - 1] + 1) breaks++;
        const expectedCount = range.end > range.first ? tensors * (breaks + 1) : 0;
        expect(plan.descriptors.length / DESCRIPTOR_STRIDE, `seed ${seed}`).toBe(expectedCount);
        all.push(...want);
      }
      // Over all chunks: every block not cached lands exactly once, per tensor.
      const first = cached / blockSize;
      expect(all.length).toBe(tensors * (nLocal - first));
      expect(new Set(all.map((p) => p.join(','))).size).toBe(all.length);
    }
  });

  it('fuses every request going to the same peer into one batch and keeps each descriptor with its request', () => {
    const lt: TensorPlacement[] = [{ region: 1, offset: 0, blockBytes: 16 }, { region: 1, offset: 4096, blockBytes: 16 }];
    const rtA: TensorPlacement[] = [{ region: 5, offset: 0, blockBytes: 16 }, { region: 5, offset: 8192, blockBytes: 16 }];
    const rtB: TensorPlacement[] = [{ region: 9, offset: 0, blockBytes: 16 }, { region: 9, offset: 8192, blockBytes: 16 }];
    const reqs = [
      { peer: 'A', runs: blockRuns([0, 1, 2], [3, 4, 9], 0, 3), remote: rtA },
      { peer: 'B', runs: blockRuns([5], [0], 0, 1), remote: rtB },
      { peer: 'A', runs: blockRuns([7, 8], [20, 21], 0, 2), remote: rtA },
    ];
    const plans = planLayer(reqs, lt);
    expect([...plans.keys()].sort()).toEqual(['A', 'B']);
    const a = plans.get('A')!;
    // Request 0: 2 runs × 2 tensors; request 2: 1 run × 2 tensors.
    expect(a.owners).toEqual([0, 0, 0, 0, 2, 2]);
    expect(a.bytes).toBe((3 + 2) * 16 * 2);
    expect(plans.get('B')!.owners).toEqual([1, 1]);
    for (let i = 0; i < a.descriptors.length; i += DESCRIPTOR_STRIDE) expect(a.descriptors[i + 2]).toBe(5);
  });
});

describe('splitPlan', () => {
  it('cuts a plan into slices of at most maxBytes that together move exactly the same bytes in order', () => {
    for (const seed of [1, 2, 3, 4, 5, 6, 7, 8]) {
      const rand = rng(seed);
      const descriptors: number[] = [];
      const owners: number[] = [];
      let off = 0;
      for (let i = 0; i < 20; i++) {
        const len = 1 + rand(5000);
        descriptors.push(1, off, 2, off * 3, len);
        owners.push(i % 3);
        off += len + rand(100);
      }
      const max = 1 + rand(9000);
      const slices = splitPlan({ descriptors, owners }, max);
      const bytes = (d: number[]) => pieces1(d);
      expect(slices.every((s) => s.bytes <= max && s.bytes > 0)).toBe(true);
      expect(slices.flatMap((s) => bytes(s.descriptors))).toEqual(bytes(descriptors));
      // Owners follow their bytes.
      const ownerOfByte = (list: Array<{ descriptors: number[]; owners: number[] }>) =>
        list.flatMap((s) => s.owners.flatMap((o, i) => new Array<number>(s.descriptors[i * DESCRIPTOR_STRIDE + 4]).fill(o)));
      expect(ownerOfByte(slices)).toEqual(ownerOfByte([{ descriptors, owners }]));
    }
  });

  it('refuses a non-positive maxBytes', () => {
    expect(() => splitPlan({ descriptors: [1, 0, 2, 0, 10], owners: [0] }, 0)).toThrow(/maxBytes/);
  });
});

/** Byte-level (local offset, remote offset) pairs of descriptors. */
function pieces1(d: number[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < d.length; i += DESCRIPTOR_STRIDE) for (let b = 0; b < d[i + 4]; b++) out.push(`${d[i + 1] + b}>${d[i + 3] + b}`);
  return out;
}
