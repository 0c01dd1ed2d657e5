import { describe, expect, it } from 'vitest';
import { InstancePool } from '../../lib/proxy/instances.js';
import { DEFAULT_ESTIMATES, imageSize, inspectDataUrl, imageTokens } from '../../lib/proxy/estimate.js';
import { client, expectNoLoad, imageMessage, pngDataUrl, proxy, waitFor, worker } from './helpers.js';

function healthyPool(n: number) {
  const pool = new InstancePool('decode');
  const all = Array.from({ length: n }, (_, i) => {
    const { instance } = pool.add(`127.0.0.1:${9000 + i}`);
    pool.setHealthy(instance, true);
    return instance;
  });
  return { pool, all };
}

describe('least-loaded queue', () => {
  it('picks the instance with the fewest active tokens', () => {
    const { pool, all } = healthyPool(3);
    const a = pool.lease(1000)!;
    const b = pool.lease(10)!;
    const c = pool.lease(500)!;
    expect(new Set([a.instance, b.instance, c.instance]).size).toBe(3);
    // Loads are now 1000, 10, 500: the next goes to the 10.
    expect(pool.lease(1)!.instance).toBe(b.instance);
    a.release();
    // 0, 11, 500.
    expect(pool.lease(1)!.instance).toBe(a.instance);
    expect(all.map((i) => i.activeTokens).sort((x, y) => x - y)).toEqual([1, 11, 500]);
  });

  it('idle instances take turns', () => {
    const { pool } = healthyPool(3);
    const order: string[] = [];
    for (let i = 0; i < 6; i++) {
      const l = pool.lease(5)!;
      order.push(l.instance.url);
      l.release();
    }
    expect(order.slice(0, 3)).toEqual(order.slice(3));
    expect(new Set(order).size).toBe(3);
  });

  it('release is idempotent; unhealthy, draining and excluded instances are skipped', () => {
    const { pool, all } = healthyPool(3);
    const l = pool.lease(7)!;
    l.release();
    l.release();
    expect(l.instance.activeTokens).toBe(0);
    expect(l.instance.activeRequests).toBe(0);
    pool.setHealthy(all[0], false);
    pool.remove(all[1].url);
    expect(pool.lease(1)!.instance).toBe(all[2]);
    expect(pool.lease(1, { exclude: new Set([all[2]]) })).toBeUndefined();
    pool.setHealthy(all[0], true);
    expect(pool.lease(1, { exclude: new Set([all[2]]) })!.instance).toBe(all[0]);
  });

  it('a preferred instance wins while routable', () => {
    const { pool, all } = healthyPool(3);
    pool.lease(100, { prefer: new Set([all[2].url]) });
    expect(all[2].activeTokens).toBe(100);
    // Still preferred although it is now the most loaded.
    expect(pool.lease(1, { prefer: new Set([all[2].url]) })!.instance).toBe(all[2]);
    pool.setHealthy(all[2], false);
    expect(pool.lease(1, { prefer: new Set([all[2].url]) })!.instance).not.toBe(all[2]);
  });

  it('keeps order through many random load changes', () => {
    const { pool, all } = healthyPool(16);
    const leases = [];
    let seed = 12345;
    const rand = () => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff);
    for (let step = 0; step < 2000; step++) {
      if (leases.length > 0 && rand() < 0.45) leases.splice(Math.floor(rand() * leases.length), 1)[0].release();
      else {
        const min = Math.min(...all.map((i) => i.activeTokens));
        const l = pool.lease(1 + Math.floor(rand() * 1000))!;
        expect(l.instance.activeTokens - l.tokens).toBe(min);
        leases.push(l);
      }
    }
  });
});

describe('estimates', () => {
  it('reads image sizes from PNG, GIF, JPEG, WebP and BMP headers', () => {
    expect(imageSize(inspectDataUrl(pngDataUrl(1920, 1080))!.head)).toEqual({ width: 1920, height: 1080 });
    const gif = Buffer.from('GIF89a\x40\x01\xf0\x00', 'latin1');
    expect(imageSize(gif)).toEqual({ width: 320, height: 240 });
    // JPEG: SOI, an APP0 segment, then SOF0 with height 480 and width 640.
    const jpeg = Buffer.from([0xff, 0xd8, 0xff, 0xe0, 0x00, 0x04, 0x00, 0x00, 0xff, 0xc0, 0x00, 0x11, 0x08, 0x01, 0xe0, 0x02, 0x80, 0x03, 0, 0, 0, 0, 0, 0]);
    expect(imageSize(jpeg)).toEqual({ width: 640, height: 480 });
    const webp = Buffer.alloc(30);
    webp.write('RIFF', 0, 'latin1');
    webp.write('WEBPVP8X', 8, 'latin1');
    webp.writeUIntLE(799, 24, 3);
    webp.writeUIntLE(599, 27, 3);
    expect(imageSize(webp)).toEqual({ width: 800, height: 600 });
    const bmp = Buffer.alloc(26);
    bmp.write('BM', 0, 'latin1');
    bmp.writeInt32LE(100, 18);
    bmp.writeInt32LE(-50, 22);
    expect(imageSize(bmp)).toEqual({ width: 100, height: 50 });
    expect(imageSize(Buffer.from('not an image'))).toBeUndefined();
  });

  it('counts image tokens from the size: 1920x1080 at 28 px per token is 69 x 39', () => {
    expect(imageTokens({ width: 1920, height: 1080 }, DEFAULT_ESTIMATES)).toBe(69 * 39);
  });
});

describe('through the proxy', () => {
  it('a new request goes to the decode instance with less work in flight', async () => {
    const p = await worker({ role: 'prefill' });
    const d1 = await worker({ role: 'decode', behaviour: { tokens: 3, tokenDelayMs: 60_000 } });
    const d2 = await worker({ role: 'decode', behaviour: { tokens: 3, tokenDelayMs: 60_000 } });
    const px = await proxy({ instances: { prefill: [p.url], decode: [d1.url, d2.url] } });
    const c = client(px);
    const controller = new AbortController();
    // A long request (many tokens to generate) on one instance, a short one on the other.
    const big = c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x'.repeat(4000) }], max_tokens: 2000, stream: true }, { signal: controller.signal });
    const bigStream = await big;
    const bigIt = bigStream[Symbol.asyncIterator]();
    await bigIt.next();
    const small = await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'y' }], max_tokens: 10, stream: true }, { signal: controller.signal });
    const smallIt = small[Symbol.asyncIterator]();
    await smallIt.next();
    const bigOn = d1.log.length === 1 ? d1 : d2;
    const smallOn = bigOn === d1 ? d2 : d1;
    expect(smallOn.log).toHaveLength(1);
    // Loads: big ≈ 1000 + 2000 tokens, small ≈ 5 + 10. Both next requests go to the small one.
    for (let i = 0; i < 2; i++) {
      const s = await c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'z' }], max_tokens: 10, stream: true }, { signal: controller.signal });
      await s[Symbol.asyncIterator]().next();
    }
    expect(smallOn.log).toHaveLength(3);
    expect(bigOn.log).toHaveLength(1);
    const loads = Object.fromEntries(px.instances().map((i) => [i.url, i]));
    expect(loads[bigOn.url].activeTokens).toBe(Math.ceil(4000 / 4) + 4 + 2000);
    expect(loads[smallOn.url].activeRequests).toBe(3);
    controller.abort();
    await expectNoLoad(px);
  });

  it('encoders are charged the image tokens of the item, read from its size', async () => {
    const e = await worker({ role: 'encode', behaviour: { hang: true } });
    const pd = await worker({ role: 'pd' });
    const px = await proxy({ instances: { encode: [e.url], pd: [pd.url] } });
    const controller = new AbortController();
    const pending = client(px)
      .chat.completions.create({ model: 'fake-model', messages: [imageMessage('x', pngDataUrl(1920, 1080))] }, { signal: controller.signal })
      .catch(() => 'aborted');
    await waitFor(() => e.log.length === 1, 'the encoder to get the item');
    const enc = px.instances().find((i) => i.role === 'encode')!;
    expect(enc.activeTokens).toBe(69 * 39);
    expect(enc.activeRequests).toBe(1);
    controller.abort();
    expect(await pending).toBe('aborted');
    await expectNoLoad(px);
  });
});
