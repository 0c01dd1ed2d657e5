// Several proxies, one view, over a real etcd: instances registered in etcd are
// found by every proxy and leave without a restart; two proxies balance one pool
// through shared load counters (staleness measured and reported); D may call the
// metaserver of a proxy that does not hold its request.
import { afterEach, describe, expect, it } from 'vitest';
import { registerInstance, type InstanceRegistration } from '../../lib/meta/registry.js';
import { EpdProxy } from '../../lib/proxy/index.js';
import { noEtcd, uniquePrefix, useEtcd } from '../meta/etcd-helpers.js';
import { cli, client, collectChat, expectNoLoad, proxy, waitFor, worker, type FakeWorker } from './helpers.js';

const etcd = useEtcd();
const registrations: InstanceRegistration[] = [];
let seq = 0;

afterEach(async () => {
  await Promise.all(registrations.splice(0).map((r) => r.close()));
});

async function clusterProxy(prefix: string, extra: Parameters<typeof proxy>[0] = {}): Promise<EpdProxy> {
  return proxy({ ...extra, cluster: { metadata: etcd.url, prefix, ttlSeconds: 2, id: `proxy-${++seq}`, loadSyncMs: 20, ...extra.cluster } });
}

async function register(prefix: string, role: 'encode' | 'prefill' | 'decode' | 'pd', w: FakeWorker, model?: string): Promise<InstanceRegistration> {
  const r = await registerInstance(etcd.url, { role, url: w.url, ...(model ? { model } : {}) }, { prefix, ttlSeconds: 2 });
  registrations.push(r);
  return r;
}

function routable(p: EpdProxy, role: string): number {
  return p.instances().filter((i) => i.role === role && i.state === 'healthy').length;
}

const chat = (p: EpdProxy, text: string) =>
  client(p).chat.completions.create({ model: 'fake', messages: [{ role: 'user', content: text }], max_tokens: 20, stream: true });

describe.skipIf(noEtcd)('proxy cluster', () => {
  it('every proxy discovers instances registered in etcd and drains one that leaves, without a restart', async () => {
    const prefix = uniquePrefix();
    const [a, b] = [await clusterProxy(prefix), await clusterProxy(prefix)];
    expect(a.instances()).toEqual([]);
    const p = await worker({ role: 'prefill' });
    const d1 = await worker({ role: 'decode' });
    const d2 = await worker({ role: 'decode' });
    await register(prefix, 'prefill', p);
    const r1 = await register(prefix, 'decode', d1);
    await register(prefix, 'decode', d2);
    for (const x of [a, b]) await waitFor(() => routable(x, 'decode') === 2 && routable(x, 'prefill') === 1, 'instances discovered');
    expect(await collectChat(await chat(b, 'hello'))).toMatch(/tok0/);
    await r1.close();
    for (const x of [a, b]) await waitFor(() => !x.instances().some((i) => i.url === d1.url), 'the removed instance to be drained');
    await expectNoLoad(a);
    await expectNoLoad(b);
  });

  it("'epd-transfer register' keeps an instance registered until SIGTERM; proxies follow it", async () => {
    const prefix = uniquePrefix();
    const a = await clusterProxy(prefix);
    const pd = await worker({ role: 'pd' });
    const sidecar = cli(['register', '--metadata', `${etcd.url}/${prefix.replace(/\/$/, '')}`, '--role', 'pd', '--url', pd.url, '--lease-ttl', '2']);
    try {
      await waitFor(() => routable(a, 'pd') === 1, 'the registered instance');
      sidecar.child.kill('SIGTERM');
      expect((await sidecar.exited).code).toBe(0);
      await waitFor(() => a.instances().length === 0, 'the instance to leave');
    } finally {
      sidecar.child.kill('SIGKILL');
    }
  });

  it('a proxy whose etcd does not answer fails to start with ERR_METADATA_UNAVAILABLE', async () => {
    const err = await EpdProxy.start({ port: 0, cluster: { metadata: 'etcd://127.0.0.1:1', timeoutMs: 500 } }).then(
      () => null,
      (e: { code?: string }) => e,
    );
    expect(err?.code).toBe('ERR_METADATA_UNAVAILABLE');
  });

  it("a proxy id held by a live proxy is ERR_NAME_IN_USE; a crashed proxy's id is taken over at once", async () => {
    const prefix = uniquePrefix();
    const metadata = `${etcd.url}/${prefix.replace(/\/$/, '')}`;
    const other = cli(['proxy', '--port', '0', '--metadata', metadata, '--proxy-id', 'twin', '--lease-ttl', '30']);
    await waitFor(() => /cluster member 'twin'/.test(other.stderr()), 'the CLI proxy to join');
    const refused = await clusterProxy(prefix, { cluster: { metadata: etcd.url, id: 'twin' } }).then(
      () => null,
      (e: { code?: string }) => e,
    );
    expect(refused?.code).toBe('ERR_NAME_IN_USE');
    other.child.kill('SIGKILL');
    await other.exited;
    // Same host, dead pid: no need to wait out its 30 s lease.
    const again = await clusterProxy(prefix, { cluster: { metadata: etcd.url, id: 'twin' } });
    expect(again.cluster!.id).toBe('twin');
  });

  it('a proxy started with a model uses only instances of that model', async () => {
    const prefix = uniquePrefix();
    const a = await clusterProxy(prefix, { cluster: { metadata: etcd.url, model: 'qwen' } });
    const qwen = await worker({ role: 'pd' });
    const llama = await worker({ role: 'pd' });
    await register(prefix, 'pd', qwen, 'qwen');
    await register(prefix, 'pd', llama, 'llama');
    await waitFor(() => routable(a, 'pd') === 1, 'the qwen instance');
    expect(a.instances().map((i) => i.url)).toEqual([qwen.url]);
  });

  it('without shared load, two proxies pile onto the same instance (the premise of the next test)', async () => {
    const d1 = await worker({ role: 'decode', behaviour: { tokens: 20, tokenDelayMs: 50 } });
    const d2 = await worker({ role: 'decode', behaviour: { tokens: 20, tokenDelayMs: 50 } });
    const p = await worker({ role: 'prefill' });
    const instances = { prefill: [p.url], decode: [d1.url, d2.url] };
    const [a, b] = [await proxy({ instances }), await proxy({ instances })];
    await Promise.all([collectChat(await chat(a, 'one')), collectChat(await chat(b, 'two'))]);
    const served = [d1.log.filter((e) => e.role === 'decode').length, d2.log.filter((e) => e.role === 'decode').length];
    expect(served.sort()).toEqual([0, 2]);
  });

  it('two proxies balance one pool through shared load', async () => {
    const prefix = uniquePrefix();
    const [a, b] = [await clusterProxy(prefix), await clusterProxy(prefix)];
    const ds = [
      await worker({ role: 'decode', behaviour: { tokens: 40, tokenDelayMs: 50 } }),
      await worker({ role: 'decode', behaviour: { tokens: 40, tokenDelayMs: 50 } }),
    ];
    const p = await worker({ role: 'prefill' });
    await register(prefix, 'prefill', p);
    for (const d of ds) await register(prefix, 'decode', d);
    for (const x of [a, b]) await waitFor(() => routable(x, 'decode') === 2 && routable(x, 'prefill') === 1, 'instances discovered');

    // Four long requests, alternating proxies (what a round-robin load balancer does).
    // Before each, the receiving proxy has seen every share the other wrote (waited
    // for, not timed: the time it takes is the staleness reported below).
    const streams: Promise<string>[] = [];
    const order = [a, b, a, b];
    for (let i = 0; i < order.length; i++) {
      const via = order[i];
      const other = via === a ? b : a;
      const inFlightElsewhere = () => other.instances().reduce((n, x) => n + x.activeRequests, 0);
      await waitFor(() => via.instances().reduce((n, x) => n + (x.sharedRequests ?? 0), 0) === inFlightElsewhere(), 'the other proxy\'s load to arrive');
      streams.push(chat(via, `request ${i}`).then(collectChat));
      await waitFor(() => ds.reduce((n, d) => n + d.log.filter((e) => e.role === 'decode').length, 0) === i + 1, 'the request to reach a decode instance');
    }
    const served = ds.map((d) => d.log.filter((e) => e.role === 'decode').length);
    expect(served).toEqual([2, 2]);
    await Promise.all(streams);
    const stats = [a.cluster!.stalenessStats(), b.cluster!.stalenessStats()];
    console.info(`[shared load] staleness seen by proxy A: ${JSON.stringify(stats[0])}; by proxy B: ${JSON.stringify(stats[1])} (loadSyncMs 20)`);
    expect(stats[0].samples + stats[1].samples).toBeGreaterThan(0);
    // Shares go back to zero once everything finished.
    for (const x of [a, b]) await waitFor(() => x.instances().every((i) => (i.sharedTokens ?? 0) === 0), 'shares to return to zero');
  });

  it("a proxy that leaves takes its load share with it", async () => {
    const prefix = uniquePrefix();
    const a = await clusterProxy(prefix, { closeGraceMs: 50 });
    const b = await clusterProxy(prefix);
    const d = await worker({ role: 'pd', behaviour: { tokens: 200, tokenDelayMs: 50 } });
    await register(prefix, 'pd', d);
    for (const x of [a, b]) await waitFor(() => routable(x, 'pd') === 1, 'instance discovered');
    const stream = chat(a, 'long').then(collectChat).catch(() => 'cut');
    await waitFor(() => (b.instances()[0]?.sharedRequests ?? 0) === 1, "A's share to arrive at B");
    await a.close();
    await waitFor(() => (b.instances()[0]?.sharedRequests ?? 0) === 0, "A's share to vanish");
    await stream;
  });

  describe('metaserver across proxies', () => {
    async function setup(behaviour: Record<string, unknown>, secret?: string) {
      const prefix = uniquePrefix();
      const a = await clusterProxy(prefix, { secret });
      const b = await clusterProxy(prefix, { secret });
      const p = await worker({ role: 'prefill' });
      const d = await worker({ role: 'decode', secret, behaviour });
      await register(prefix, 'prefill', p);
      await register(prefix, 'decode', d);
      for (const x of [a, b]) await waitFor(() => routable(x, 'decode') === 1 && routable(x, 'prefill') === 1 && x.cluster!.peers().size === 1, 'cluster ready');
      return { a, b, p, d };
    }

    it('D calls another proxy (a load balancer in between): it forwards to the owner named in the URL', async () => {
      const { a, b, p, d } = await setup({}, 'a shared secret of enough length');
      d.behave({ metaserverOrigin: b.url });
      expect(a.metaserverUrl).toMatch(/\?owner=proxy-/);
      expect(await collectChat(await chat(a, 'via A, metaserver via B'))).toMatch(/tok0/);
      const hop = d.log.find((e) => e.role === 'decode')!;
      expect(hop.metaserver).toMatchObject({ status: 200, body: { status: 'ok', prefill: p.url } });
      expect(p.log.filter((e) => e.role === 'prefill')).toHaveLength(1);
      expect(await (await fetch(`${b.url}/metrics`)).text()).toMatch(/epd_proxy_metaserver_calls_total\{outcome="forwarded_200"\} 1/);
      await expectNoLoad(a);
    });

    it('without the owner in the URL, the call is offered to every proxy and the owner takes it', async () => {
      const { a, b, d } = await setup({});
      d.behave({ metaserverOrigin: b.url, metaserverDropQuery: true });
      expect(await collectChat(await chat(a, 'no hint'))).toMatch(/tok0/);
      expect(d.log.find((e) => e.role === 'decode')!.metaserver?.status).toBe(200);
    });

    it('a request no proxy holds is 404 from any of them, and a forwarded call is never forwarded again', async () => {
      const { a, b } = await setup({});
      const body = JSON.stringify({ request_id: 'nobody-has-this' });
      const res = await fetch(`${b.url}/v1/metaserver?owner=${encodeURIComponent(a.cluster!.id)}`, { method: 'POST', body, headers: { 'content-type': 'application/json' } });
      expect(res.status).toBe(404);
      const looped = await fetch(`${a.url}/v1/metaserver`, { method: 'POST', body, headers: { 'content-type': 'application/json', 'x-epd-forwarded-by': 'someone' } });
      expect(looped.status).toBe(404);
    });
  });
});
