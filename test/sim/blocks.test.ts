import { describe, expect, it } from 'vitest';
import { BlockPool } from '../../lib/sim/blocks.js';
import { expectCode } from '../helpers.js';

describe('BlockPool', () => {
  it('hands out distinct ids and takes them back', async () => {
    const pool = new BlockPool(8);
    const a = await pool.allocate(3, { timeoutMs: 1000 });
    const b = await pool.allocate(5, { timeoutMs: 1000 });
    expect(new Set([...a, ...b]).size).toBe(8);
    expect(pool.free).toBe(0);
    pool.release(a);
    expect(pool.free).toBe(3);
    expect((await pool.allocate(3, { timeoutMs: 1000 })).sort()).toEqual([...a].sort());
  });

  it('serves waiters in arrival order: a large request is not overtaken', async () => {
    const pool = new BlockPool(4);
    const held = await pool.allocate(4, { timeoutMs: 1000 });
    const order: string[] = [];
    const big = pool.allocate(3, { timeoutMs: 5000 }).then((ids) => (order.push('big'), ids));
    const small = pool.allocate(1, { timeoutMs: 5000 }).then((ids) => (order.push('small'), ids));
    pool.release(held.slice(0, 1));
    await new Promise((r) => setImmediate(r));
    expect(order).toEqual([]); // one block free, but the big request is first in line
    pool.release(held.slice(1));
    await Promise.all([big, small]);
    expect(order).toEqual(['big', 'small']);
  });

  it('fails a wait at its deadline and lets the line move on', async () => {
    const pool = new BlockPool(2);
    const held = await pool.allocate(2, { timeoutMs: 1000 });
    const late = pool.allocate(2, { timeoutMs: 20 });
    const next = pool.allocate(1, { timeoutMs: 5000 });
    await expectCode(() => late, 'ERR_TIMEOUT');
    pool.release(held.slice(0, 1));
    expect(await next).toHaveLength(1);
  });

  it('fails on abort, on a request larger than the pool and on close', async () => {
    const pool = new BlockPool(2);
    await expectCode(() => pool.allocate(3, { timeoutMs: 1000 }), 'ERR_CAPACITY');
    const held = await pool.allocate(2, { timeoutMs: 1000 });
    const ac = new AbortController();
    const aborted = pool.allocate(1, { timeoutMs: 5000, signal: ac.signal });
    ac.abort();
    await expectCode(() => aborted, 'ERR_ABORTED');
    const pending = pool.allocate(1, { timeoutMs: 5000 });
    pool.close();
    await expectCode(() => pending, 'ERR_CLOSED');
    expect(held).toHaveLength(2);
  });
});
