/**
 * `epd-transfer bench metadata`: what the etcd metadata layer costs and how fast it
 * sees things, against a real etcd (the one given with --metadata, else a private
 * etcd-server started for the run):
 *
 * - lease expiry: a child process publishes a key under a lease of TTL t and is
 *   SIGKILLed at a random point of its keep-alive cycle; the time until a watcher sees
 *   the key deleted, per TTL;
 * - shared-load staleness: two proxy cluster members in this process; one changes its
 *   load on an instance at random intervals, the other records how old each change
 *   was when it arrived (sender timestamp → watch delivery; one clock), per loadSyncMs;
 * - the floor: one etcd put round trip.
 */
import { spawn } from 'node:child_process';
import os from 'node:os';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { EtcdSession } from '../lib/meta/etcd.js';
import { startEtcdServer, type EtcdServer } from '../lib/meta/etcd-server.js';
import { ProxyCluster } from '../lib/proxy/cluster.js';
import { InstancePool, type Role } from '../lib/proxy/instances.js';
import { ProxyMetrics } from '../lib/proxy/metrics.js';
import { environment, printTable, round, spread, type Spread } from './common.js';

export interface MetadataBenchOptions {
  /** etcd URL; default: a private etcd-server for the run. */
  metadata?: string;
  ttls: number[];
  runs: number;
  syncs: number[];
  changes: number;
}

export interface MetadataBenchResult {
  etcd: string;
  putRoundTripMs: Spread;
  leaseExpiry: Array<{ ttlSeconds: number; detectMs: Spread; runs: number }>;
  staleness: Array<{ loadSyncMs: number; samples: number; p50: number; p99: number; max: number }>;
  loadAverage: number[];
  environment: Record<string, unknown>;
}

const etcdModule = fileURLToPath(new URL('../lib/meta/etcd.js', import.meta.url));

/** A child that holds one key under a lease until it is killed. */
function holder(url: string, prefix: string, key: string, ttlSeconds: number): Promise<ReturnType<typeof spawn>> {
  const script = `
    const { EtcdSession } = await import(${JSON.stringify(etcdModule)});
    const s = await EtcdSession.connect(${JSON.stringify(url)}, { prefix: ${JSON.stringify(prefix)}, ttlSeconds: ${ttlSeconds} });
    await s.put(${JSON.stringify(key)}, { pid: process.pid });
    process.send('ready');`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  return new Promise((resolve, reject) => {
    child.once('message', () => resolve(child));
    child.once('exit', (code) => reject(new Error(`lease holder exited early (${code})`)));
  });
}

async function leaseExpiry(url: string, ttlSeconds: number, runs: number): Promise<number[]> {
  const prefix = `bench-${process.pid}-${ttlSeconds}/`;
  const watcher = await EtcdSession.connect(url, { prefix });
  const out: number[] = [];
  try {
    for (let i = 0; i < runs; i++) {
      const key = `k${i}`;
      let deleted = 0;
      const w = watcher.watchKey(key, { put: () => {}, delete: () => (deleted ||= Date.now()) });
      await w.ready;
      const child = await holder(url, prefix, key, ttlSeconds);
      // Die at a random point of the keep-alive cycle (renewals every TTL/3).
      await sleep(Math.random() * (ttlSeconds * 1000) / 3 + 100);
      const killedAt = Date.now();
      child.kill('SIGKILL');
      const deadline = killedAt + ttlSeconds * 3000;
      while (!deleted && Date.now() < deadline) await sleep(5);
      await w.cancel();
      if (deleted) out.push(deleted - killedAt);
    }
  } finally {
    await watcher.close();
  }
  return out;
}

async function staleness(url: string, loadSyncMs: number, changes: number) {
  const prefix = `bench-load-${process.pid}-${loadSyncMs}/`;
  const instanceUrl = 'http://10.255.0.1:8300';
  const member = async (id: string) => {
    const pools = new Map<Role, InstancePool>();
    let cluster: ProxyCluster | undefined;
    for (const role of ['encode', 'prefill', 'decode', 'pd'] as const) pools.set(role, new InstancePool(role, () => {}, (i) => cluster?.loadChanged(i)));
    const { instance } = pools.get('decode')!.add(instanceUrl);
    pools.get('decode')!.setHealthy(instance, true);
    cluster = await ProxyCluster.join(
      { pools, url: `http://127.0.0.1/${id}`, metrics: new ProxyMetrics(pools), forwardTimeoutMs: 1000, addInstance: async () => {}, removeInstance: () => {}, log: () => {} },
      { metadata: url, prefix, id, loadSyncMs },
    );
    return { pools, cluster };
  };
  const a = await member('a');
  const b = await member('b');
  try {
    const pool = a.pools.get('decode')!;
    const leases = [];
    for (let i = 0; i < changes; i++) {
      if (leases.length > 0 && (leases.length > 8 || Math.random() < 0.5)) leases.shift()!.release();
      else leases.push(pool.lease(100 + Math.floor(Math.random() * 4000))!);
      await sleep(2 + Math.random() * 20);
    }
    for (const l of leases) l.release();
    await sleep(loadSyncMs + 500);
    return b.cluster.stalenessStats();
  } finally {
    await a.cluster.close();
    await b.cluster.close();
  }
}

export async function runMetadataBench(o: MetadataBenchOptions): Promise<MetadataBenchResult> {
  let server: EtcdServer | undefined;
  const url = o.metadata ?? (server = await startEtcdServer()).url;
  try {
    const s = await EtcdSession.connect(url, { prefix: `bench-rt-${process.pid}/` });
    const rt: number[] = [];
    for (let i = 0; i < 200; i++) {
      const t = performance.now();
      await s.put('rt', { i });
      rt.push(performance.now() - t);
    }
    await s.close();
    const leaseResults = [];
    for (const ttl of o.ttls) {
      const ms = await leaseExpiry(url, ttl, o.runs);
      leaseResults.push({ ttlSeconds: ttl, detectMs: spread(ms), runs: ms.length });
    }
    const stale = [];
    for (const sync of o.syncs) stale.push({ loadSyncMs: sync, ...(await staleness(url, sync, o.changes)) });
    return { etcd: url, putRoundTripMs: spread(rt.map((x) => round(x, 3))), leaseExpiry: leaseResults, staleness: stale, loadAverage: os.loadavg().map((x) => round(x)), environment: environment() };
  } finally {
    await server?.stop();
  }
}

export function printMetadataResult(r: MetadataBenchResult): void {
  const rows: Array<[string, string | number]> = [['etcd', r.etcd], ['put round trip (ms)', `${r.putRoundTripMs.median} (${r.putRoundTripMs.min}–${r.putRoundTripMs.max})`]];
  for (const l of r.leaseExpiry) rows.push([`kill -9 → record gone, TTL ${l.ttlSeconds} s (ms)`, `${l.detectMs.median} (${l.detectMs.min}–${l.detectMs.max}), ${l.runs} runs`]);
  for (const s of r.staleness) rows.push([`shared-load staleness, loadSyncMs ${s.loadSyncMs} (ms)`, `p50 ${s.p50}, p99 ${s.p99}, max ${s.max} (${s.samples} samples)`]);
  rows.push(['load average', r.loadAverage.join(' ')], ['machine', `${r.environment.cpus} x ${r.environment.cpuModel}, node ${r.environment.node}, commit ${r.environment.commit}`]);
  printTable('etcd metadata (real etcd; one host: no network latency)', rows);
}
