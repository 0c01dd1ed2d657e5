/**
 * The demo at scale (`demo --metadata etcd://… --proxies 2`): a real etcd started
 * here, two proxies discovering the 2E2P2D workers from it, workers in network
 * namespaces where the host allows it (root and `ip netns`), the client balancing
 * over the proxies — and, with a process killed mid-run, no request lost that had
 * not reached it. Nothing may be left in etcd, /dev/shm, `ip netns` or the process
 * table afterwards. Skipped (with the reason) only when there is no etcd binary.
 */
import { execFileSync } from 'node:child_process';
import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { netnsSupport, reclaimStaleNetworks } from '../../lib/demo/netns.js';
import type { DemoSummary } from '../../lib/demo/summary.js';
import { EtcdSession } from '../../lib/meta/etcd.js';
import { noEtcd, useEtcd } from '../meta/etcd-helpers.js';
import { alive, childrenOf, leftovers, runDemo, startDemo, waitGone } from './helpers.js';

const etcd = useEtcd();
const netnsWhyNot = noEtcd ? null : netnsSupport();
if (!noEtcd && netnsWhyNot) console.warn(`[demo at scale] no network namespaces here (${netnsWhyNot}): the runs use loopback`);

/** Namespaces and links of the demo `pid` still present. */
function networkLeftovers(pid: number): string[] {
  if (netnsWhyNot) return [];
  const ns = execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' })
    .split('\n')
    .map((l) => l.split(' ')[0])
    .filter((n) => n.startsWith(`epd-demo-${pid}-`));
  const tag = pid.toString(36);
  const links = [...execFileSync('ip', ['-o', 'link', 'show'], { encoding: 'utf8' }).matchAll(/^\d+:\s+([^:@\s]+)/gm)]
    .map((m) => m[1])
    .filter((n) => n === `epdb${tag}` || new RegExp(`^epdv${tag}h\\d+$`).test(n));
  return [...ns, ...links];
}

/** Keys under the run's prefix in etcd (the summary names the prefix). */
async function etcdKeys(metadata: string): Promise<string[]> {
  const session = await EtcdSession.connect(metadata, { timeoutMs: 5_000 });
  try {
    return (await session.list('')).entries.map((e) => e.key);
  } finally {
    await session.close();
  }
}

/** Everything a finished run must have cleaned up. */
async function expectNothingLeft(pid: number, s: DemoSummary): Promise<void> {
  const pids = s.processes.map((p) => p.pid);
  expect(pids.filter(alive)).toEqual([]);
  expect(leftovers(pid, pids)).toEqual([]);
  expect(networkLeftovers(pid)).toEqual([]);
  expect(s.scale!.etcdKeysLeft).toBe(0);
  expect(await etcdKeys(s.scale!.metadata)).toEqual([]);
}

/** The fault-injection property: only requests that were running when the process died may fail. */
function expectOnlyInFlightFailed(s: DemoSummary): void {
  const c = s.scale!;
  expect(c.kill).not.toBeNull();
  for (const f of c.failures) {
    expect(f.sentAfterKill, `request #${f.index} was sent after the kill and failed: ${f.error}`).toBe(false);
    expect(f.start, `request #${f.index} failed before the kill: ${f.error}`).toBeLessThan(c.kill!.at);
  }
  expect(s.requests).toBeGreaterThan(c.kill!.afterRequests);
}

const base = ['--topology', '2e2p2d', '--proxies', '2', '--json', '--report', '-', '--concurrency', '4'];

describe.skipIf(noEtcd)('demo at scale (etcd, two proxies)', { timeout: 90_000 }, () => {
  it('2e2p2d behind two proxies: no errors, every byte checked, load spread over both proxies and every instance, nothing left', async () => {
    const { pid, code, summary, stderr } = await runDemo(['--metadata', etcd.url, ...base, '--requests', '20']);
    expect(code, stderr).toBe(0);
    const s = summary!;
    expect(s).toMatchObject({ topology: '2e2p2d', requests: 20, errors: 0, kvVerifyFailures: 0 });
    expect(s.bytes.kv).toBeGreaterThan(0);
    expect(s.verifiedBytes.kv).toBe(s.bytes.kv);
    expect(s.bytes.ec).toBeGreaterThan(0);
    expect(s.verifiedBytes.ec).toBe(s.bytes.ec);
    const c = s.scale!;
    expect(c.metadata).toMatch(new RegExp(`^${etcd.url}/epd-transfer/demo-`));
    expect(c.proxies.map((p) => p.name)).toEqual(['proxy-0', 'proxy-1']);
    for (const p of c.proxies) {
      expect(p.requests, p.name).toBeGreaterThan(0);
      expect(p.staleness, p.name).not.toBeNull();
    }
    expect(c.proxies[0].requests + c.proxies[1].requests).toBe(20);
    for (const name of ['encode-0', 'encode-1', 'prefill-0', 'prefill-1', 'decode-0', 'decode-1']) expect(c.instances[name], name).toBeGreaterThan(0);
    expect(c.failures).toEqual([]);
    if (netnsWhyNot) {
      expect(c.network).toMatchObject({ mode: 'loopback', reason: netnsWhyNot });
    } else {
      // Workers in namespaces: KV over tcp through the veths, embeddings pulled from the encoders' hosts.
      expect(c.network.mode).toBe('netns');
      expect(c.network.namespaces).toHaveLength(6);
      expect(c.paths.kv).toMatch(/^tcp between network namespaces/);
      expect(s.bytes.ecPulled).toBeGreaterThan(0);
      for (const w of s.processes.filter((p) => p.role !== 'proxy')) expect(w.url).toMatch(new RegExp(`^http://${c.network.subnet!.replace(/\.0\/24$/, '').replace(/\./g, '\\.')}\\.`));
    }
    await expectNothingLeft(pid, s);
  });

  it('a proxy killed mid-run: only requests in flight at it fail, later ones go to the other proxy', async () => {
    const { pid, summary, stderr } = await runDemo(['--metadata', etcd.url, ...base, '--requests', '24', '--kill', 'proxy-1@8']);
    const s = summary!;
    expect(s, stderr).toBeDefined();
    expectOnlyInFlightFailed(s);
    const c = s.scale!;
    expect(c.proxies.find((p) => p.name === 'proxy-1')!.killed).toBe(true);
    // Its connection was refused once; the client sent that request on and left proxy-1 out.
    expect(c.failovers).toBeGreaterThanOrEqual(1);
    expect(s.errors).toBe(c.failures.length);
    await expectNothingLeft(pid, s);
  });

  it('a decode instance killed mid-run: only requests in flight at it fail', async () => {
    const { pid, summary, stderr } = await runDemo(['--metadata', etcd.url, ...base, '--requests', '24', '--kill', 'decode-0@8']);
    const s = summary!;
    expect(s, stderr).toBeDefined();
    expectOnlyInFlightFailed(s);
    expect(s.unreachable).toEqual(['decode-0']);
    // The proxies kept routing: decode-1 took what came after.
    expect(s.scale!.instances['decode-1']).toBeGreaterThan(0);
    await expectNothingLeft(pid, s);
  });

  it('no etcd reachable: a typed error that says how to start one, and nothing started', async () => {
    const port = await new Promise<number>((resolve) => {
      const server = net.createServer().listen(0, '127.0.0.1', () => {
        const { port } = server.address() as net.AddressInfo;
        server.close(() => resolve(port));
      });
    });
    const demo = startDemo(['--metadata', `etcd://127.0.0.1:${port}`, ...base]);
    expect(await demo.exited).toBe(1);
    expect(demo.stderr()).toMatch(/ERR_METADATA_UNAVAILABLE/);
    expect(demo.stderr()).toContain(`etcd --data-dir /tmp/epd-etcd --listen-client-urls http://127.0.0.1:${port}`);
    expect(demo.stderr()).toContain('apt-get install etcd-server');
    expect(childrenOf(demo.child.pid!)).toEqual([]);
  });

  it.skipIf(netnsWhyNot !== null)('a demo killed with SIGKILL leaves its namespaces; the next run removes them', async () => {
    const demo = startDemo(['--metadata', etcd.url, '--topology', '2e2p2d', '--proxies', '2', '--report', '-', '--requests', '400']);
    await demo.waitForStderr(/progress: \d+\/400/);
    const children = childrenOf(demo.child.pid!);
    demo.child.kill('SIGKILL');
    await demo.exited;
    expect(await waitGone(children)).toEqual([]);
    const left = networkLeftovers(demo.child.pid!);
    expect(left.length).toBeGreaterThan(0); // the bridge and the namespaces outlive a SIGKILL
    const removed = reclaimStaleNetworks();
    // Its namespaces by name (a veth goes with its namespace), and the bridge.
    for (const name of left.filter((n) => n.startsWith('epd-demo-') || n.startsWith('epdb'))) expect(removed).toContain(name);
    expect(networkLeftovers(demo.child.pid!)).toEqual([]);
  });
});
