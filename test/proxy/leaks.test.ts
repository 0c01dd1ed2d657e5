/** After a mix of successes, failures and cancellations, nothing is left behind. */
import { describe, expect, it } from 'vitest';
import { EpdProxy } from '../../lib/proxy/index.js';
import { startFakeWorker } from '../fixtures/proxy-worker.mjs';
import { collectChat, imageMessage, pngDataUrl, waitFor } from './helpers.js';
import OpenAI from 'openai';

function resources(): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const r of process.getActiveResourcesInfo()) counts[r] = (counts[r] ?? 0) + 1;
  return counts;
}

describe('no leaks', () => {
  it('sockets, timers and rendezvous entries all go away after close', async () => {
    const baseline = resources();
    const workers = await Promise.all([
      startFakeWorker({ role: 'encode' }),
      startFakeWorker({ role: 'prefill' }),
      startFakeWorker({ role: 'decode', behaviour: { tokens: 20, tokenDelayMs: 5 } }),
      startFakeWorker({ role: 'decode', behaviour: { tokens: 20, tokenDelayMs: 5 } }),
    ]);
    const [e, p, d1, d2] = workers;
    const px = await EpdProxy.start({
      port: 0,
      instances: { encode: [e.url], prefill: [p.url], decode: [d1.url, d2.url] },
      health: { intervalMs: 50, timeoutMs: 500 },
      timeouts: { metaserverMs: 2_000 },
      closeGraceMs: 100,
    });
    const c = new OpenAI({ baseURL: `${px.url}/v1`, apiKey: 'x', maxRetries: 0 });
    const jobs: Array<Promise<unknown>> = [];
    for (let i = 0; i < 10; i++) {
      jobs.push(c.chat.completions.create({ model: 'fake-model', messages: [imageMessage('x', pngDataUrl(10, 10, i % 3))] }));
      jobs.push(c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'x' }], stream: true }).then(collectChat));
      const controller = new AbortController();
      jobs.push(c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'y' }], stream: true }, { signal: controller.signal }).then(collectChat).catch(() => 'aborted'));
      setTimeout(() => controller.abort(), 15);
      jobs.push(c.completions.create({ model: 'fake-model', prompt: ['a', 'b'] }).catch(() => 'refused'));
    }
    await Promise.all(jobs);
    // Two more that run into the metaserver deadline on one of the decode instances.
    d2.behave({ skipMetaserver: true });
    await Promise.all([0, 1].map(() => c.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'z' }] }).catch(() => 'timeout')));
    expect((await (await fetch(`${px.url}/healthcheck`)).json()).rendezvousPending).toBe(0);
    expect(px.instances().every((i) => i.activeRequests === 0 && i.activeTokens === 0)).toBe(true);
    await px.close();
    await Promise.all(workers.map((w) => w.close()));
    const settled = () => {
      const now = resources();
      return ['TCPSocketWrap', 'TCPServerWrap', 'Timeout'].every((k) => (now[k] ?? 0) <= (baseline[k] ?? 0));
    };
    await waitFor(settled, 'sockets and timers to go away').catch(() => {
      expect(resources(), 'active handles after close').toEqual(baseline);
    });
  });
});
