/**
 * `epd-transfer demo`: the whole disaggregated system on this machine.
 *
 * 1. Creates a shared encoder cache for the run and starts the simulated workers
 *    of the topology and the proxy, each its own process on 127.0.0.1, with a
 *    fresh shared secret for the proxy's metaserver and one for the transfer
 *    engines (in their environment, never on a command line).
 * 2. Sends one warm-up request (not counted), then a seeded mix of text,
 *    new-image and repeated-image requests through the proxy with the official
 *    `openai` client, a few at a time.
 * 3. Collects what the client saw, the proxy's per-request timelines and every
 *    worker's counters and records, and writes the HTML report.
 * 4. Stops every process (orderly, with deadlines, then by force) and closes the
 *    cache — nothing is left running and nothing in /dev/shm.
 *
 * With `metadata` (the demo at scale, lib/demo/scale.ts) the workers register in
 * etcd under a run-unique prefix, in network namespaces where the host allows it,
 * and N cluster-mode proxies discover them; the load is balanced over the proxies
 * (lib/demo/load.ts), and `kill` injects a process death mid-run. Namespaces,
 * relay and the run's etcd keys are removed on every exit path.
 */
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { EncoderCacheStore } from '../ec/store.js';
import { raceAbort, TransferError } from '../errors.js';
import { native } from '../native.js';
import type { RequestTrace } from '../proxy/flow.js';
import { getProfile, REFERENCE_ACCELERATOR } from '../sim/profiles.js';
import type { SimRole, WorkerStats } from '../sim/stats.js';
import { planLoad, ProxyBalancer, runLoad, type ClientResult } from './load.js';
import { packageRoot, Supervisor, type Child } from './processes.js';
import type { ProxyClusterView, ProxyProcessConfig } from './proxy-process.js';
import { Progress } from './progress.js';
import { renderReport } from './report.js';
import { setUpScale, type NetnsMode, type ScaleSetup } from './scale.js';
import { joinTimelines, summarize, summarizeScale, type DemoSummary, type ScaleSummary, type Topology, type WorkerReport } from './summary.js';

/** Options of {@link runDemo}. */
export interface DemoOptions {
  topology: Topology;
  /** Requests in the load. */
  requests: number;
  /** Requests in flight. */
  concurrency: number;
  /** Model profile id. */
  model: string;
  /** Seed of the request mix. */
  seed: number;
  /** Where to write the HTML report; null for none. */
  report: string | null;
  /** Fault injection: the KV of the load's n-th request (1-based) is corrupted on prefill; decode's check must fail it. */
  corruptKv?: number;
  /** Simulated KV cache of each P, D and PD (bytes). Default 384 MiB. */
  kvMemory?: number;
  /**
   * etcd URL (`etcd://host:port[/prefix]`): the demo at scale. Workers publish their
   * engines and register there; the proxies discover them from there (cluster mode).
   */
  metadata?: string;
  /** Proxies (cluster mode needs `metadata` for more than one). Default 1. */
  proxies?: number;
  /** With `metadata`: workers in network namespaces (`auto`: where the host allows it). Default `auto`. */
  netns?: NetnsMode;
  /** Fault injection: SIGKILL the process named `target` once `after` requests of the load completed. */
  kill?: { target: string; after: number };
  /** Interrupts the run: the load stops, everything shuts down, the summary covers what ran. */
  signal: AbortSignal;
  /** Where the progress bar goes (stderr); undefined for none. */
  progress?: NodeJS.WritableStream;
  /** Status lines ("starting…"). */
  log: (line: string) => void;
  /** The command line, shown in the report. */
  command: string;
}

/** Workers of a topology, in start order. */
export function topologyRoles(topology: Topology): Array<{ name: string; role: SimRole }> {
  const n = topology === '2e2p2d' ? 2 : 1;
  const roles: SimRole[] = topology === '1e1pd' ? ['encode', 'pd'] : ['encode', 'prefill', 'decode'];
  return roles.flatMap((role) => Array.from({ length: role === 'pd' ? 1 : n }, (_, i) => ({ name: `${role}-${i}`, role })));
}

/** The run's shared encoder cache (its pages are used only as embeddings are saved). */
const EC_CAPACITY = 1024 ** 3;

function epochMs(): number {
  return performance.timeOrigin + performance.now();
}

/** Resolves with `promise`, or rejects once `signal` aborts. */
function unlessAborted<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  return raceAbort(promise, signal, () => new TransferError('the demo was interrupted', 'ERR_ABORTED'));
}

/** Writes the report at `file`, or in the temp directory when that place cannot be written. Returns where. */
function writeReport(file: string, html: string, log: (line: string) => void): string {
  try {
    writeFileSync(file, html);
    return path.resolve(file);
  } catch (err) {
    const fallback = path.join(os.tmpdir(), `epd-demo-report-${process.pid}.html`);
    log(`cannot write ${file} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); writing ${fallback} instead`);
    writeFileSync(fallback, html);
    return fallback;
  }
}

/** A worker's counters, and its per-request records since the previous call (drained). */
async function workerStats(child: Child): Promise<WorkerStats> {
  const res = await fetch(`${child.ready.url}/sim/stats?records=1`, { signal: AbortSignal.timeout(10_000) });
  if (!res.ok) throw new TransferError(`${child.name} answered ${res.status} to /sim/stats`, 'ERR_REMOTE');
  return (await res.json()) as WorkerStats;
}

/** A worker's counters since `before` (the warm-up left out); records were drained at `before`. */
function since(after: WorkerStats, before: WorkerStats): WorkerStats {
  const minus = <T extends object>(a: T, b: T): T =>
    Object.fromEntries(Object.entries(a).map(([k, v]) => [k, typeof v === 'number' ? v - ((b as Record<string, number>)[k] ?? 0) : v])) as T;
  return { ...after, ec: minus(after.ec, before.ec), kv: minus(after.kv, before.kv) };
}

/** Lease TTL of the demo's etcd sessions (s): a killed worker leaves the registry this long after its death at the latest. */
const DEMO_LEASE_TTL_S = 5;

/** The names a `--kill` target may take. */
function processNames(roles: ReadonlyArray<{ name: string }>, proxies: readonly string[]): string[] {
  return [...proxies, ...roles.map((r) => r.name)];
}

/** Waits until every proxy routes to every worker (it discovered them in etcd and a health check passed). */
async function waitForViews(supervisor: Supervisor, proxies: readonly Child[], workerUrls: readonly string[], signal: AbortSignal, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const views = await Promise.all(proxies.map((p) => supervisor.ask<ProxyClusterView>(p, { type: 'cluster' }, 'cluster', 5_000)));
    const missing = views.flatMap((v, i) => {
      const healthy = new Set(v.instances.filter((x) => x.state === 'healthy').map((x) => x.url));
      return workerUrls.filter((u) => !healthy.has(u)).map((u) => `${proxies[i].name} → ${u}`);
    });
    if (missing.length === 0) return;
    if (signal.aborted) throw new TransferError('the demo was interrupted', 'ERR_ABORTED');
    if (Date.now() > deadline) {
      throw new TransferError(`the proxies did not discover every instance in etcd within ${timeoutMs} ms; missing: ${missing.join(', ')}`, 'ERR_TIMEOUT');
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Runs the demo (see the module comment) and returns its numbers. */
export async function runDemo(o: DemoOptions): Promise<DemoSummary> {
  const profile = getProfile(o.model);
  const proxyCount = o.proxies ?? 1;
  if (proxyCount > 1 && !o.metadata) {
    throw new TransferError(`--proxies ${proxyCount} needs --metadata etcd://…: several proxies share their instances and load through etcd`, 'ERR_BAD_ARGUMENT');
  }
  const root = packageRoot();
  const bin = path.join(root, 'bin', 'epd-transfer.js');
  const proxyModule = path.join(root, 'dist', 'lib', 'demo', 'proxy-process.js');
  const runId = `${process.pid.toString(36)}${randomBytes(2).toString('hex')}`;
  const storeName = `epd-demo-${runId}`;
  const env = {
    EPD_PROXY_SECRET: randomBytes(24).toString('base64url'),
    EPD_TRANSFER_SECRET: randomBytes(24).toString('base64url'),
  };
  const roles = topologyRoles(o.topology);
  const proxyNames = o.metadata ? Array.from({ length: proxyCount }, (_, i) => `proxy-${i}`) : ['proxy'];
  if (o.kill) {
    const names = processNames(roles, proxyNames);
    if (!names.includes(o.kill.target)) throw new TransferError(`--kill ${o.kill.target}: this run has ${names.join(', ')}`, 'ERR_BAD_ARGUMENT');
    if (o.kill.after >= o.requests) throw new TransferError(`--kill …@${o.kill.after}: the load has only ${o.requests} requests, none would be sent after the kill`, 'ERR_BAD_ARGUMENT');
  }
  const requests = planLoad(o.requests, { seed: o.seed, vision: profile.vision !== undefined, runId });
  const corrupt = o.corruptKv === undefined ? undefined : requests[o.corruptKv - 1]?.id;
  if (o.corruptKv !== undefined && corrupt === undefined) {
    throw new TransferError(`--corrupt-kv ${o.corruptKv}: the load has only ${requests.length} requests`, 'ERR_BAD_ARGUMENT');
  }
  const lost: string[] = [];
  const supervisor = new Supervisor((name, how) => {
    lost.push(name);
    if (name !== o.kill?.target) o.log(`${name} exited during the run (${how}); requests routed to it fail`);
  });
  let store: EncoderCacheStore | undefined;
  let scale: ScaleSetup | undefined;
  let balancer: ProxyBalancer | undefined;
  let summary: DemoSummary | undefined;
  try {
    if (o.metadata) {
      scale = await setUpScale({ metadata: o.metadata, netns: o.netns ?? 'auto', runId, workers: roles.map((r) => r.name), log: o.log });
      const net = scale.network;
      o.log(`etcd ${scale.metadata} answers; ` + (net ? `workers in network namespaces on ${net.subnet} (bridge ${net.bridge})` : `workers on 127.0.0.1: ${scale.loopbackReason}`));
    }
    const network = scale?.network ?? null;
    // In namespaces every worker stands for a host of its own, with its own encoder cache;
    // otherwise the run's one store is created here so it exists before anyone opens it
    // (the last process to close it removes it).
    if (!network) store = await EncoderCacheStore.open({ name: storeName, capacity: EC_CAPACITY });
    o.log(`starting ${roles.map((r) => r.name).join(', ')} and ${proxyNames.join(', ')} (${o.topology}, ${profile.id}, simulated) ...`);
    const kvMemory = String(o.kvMemory ?? 384 << 20);
    const workers = await unlessAborted(
      Promise.all(
        roles.map((r) => {
          const place = network?.places.get(r.name);
          return supervisor.start({
            name: r.name,
            module: bin,
            args: [
              'worker', '--role', r.role, '--model', profile.id, '--ec-capacity', String(EC_CAPACITY), '--kv-memory', kvMemory,
              ...(r.role === 'prefill' && corrupt !== undefined ? ['--corrupt-kv', corrupt] : []),
              ...(scale ? ['--metadata', scale.workerMetadata, '--metadata-ttl', String(DEMO_LEASE_TTL_S), '--engine-name', `epd-${runId}-${r.name}`, '--register'] : []),
              ...(place ? ['--host', place.address, '--transport', 'tcp', '--remote-ec', '--ec-store', `${storeName}-${r.name}`] : ['--ec-store', storeName]),
            ],
            env,
            netns: place?.ns,
            readyTimeoutMs: 60_000,
          });
        }),
      ),
      o.signal,
    );
    const instances: ProxyProcessConfig['instances'] = {};
    for (const w of workers) (instances[w.ready.role as SimRole] ??= []).push(w.ready.url);
    const proxies = await unlessAborted(
      Promise.all(
        proxyNames.map((name) => {
          const config: ProxyProcessConfig = scale
            ? {
                host: scale.proxyHost,
                ecStore: network ? undefined : storeName,
                cluster: { metadata: scale.metadata, id: name, sharedEmbeddings: network !== null, ttlSeconds: DEMO_LEASE_TTL_S },
              }
            : { instances, ecStore: storeName, host: '127.0.0.1' };
          return supervisor.start({ name, module: proxyModule, args: [JSON.stringify(config)], env, readyTimeoutMs: 30_000 });
        }),
      ),
      o.signal,
    );
    if (scale) {
      await waitForViews(supervisor, proxies, workers.map((w) => w.ready.url), o.signal);
      o.log(`every proxy discovered all ${workers.length} instances in etcd`);
    }
    o.log(`${proxies.map((p) => `${p.name} ${p.ready.url}`).join(', ')}; sending ${o.requests} requests, ${o.concurrency} at a time, with the openai client`);
    if (!profile.vision) o.log(`${profile.id} has no vision encoder: text requests only`);

    // A few short text requests first, not counted: the client's connections, the prefill →
    // decode handshakes and first-use costs would otherwise land on the first measured requests.
    balancer = new ProxyBalancer(
      proxies.map((p) => ({ name: p.name, url: p.ready.url })),
      120_000,
    );
    const load = { balancer, model: profile.id, signal: o.signal };
    const warmups = Array.from({ length: Math.max(Math.min(o.concurrency, 8), 2 * proxies.length) }, (_, i) => ({
      index: i,
      id: `demo-${runId}-warmup-${i}`,
      kind: 'text' as const,
      messages: [{ role: 'user' as const, content: 'Warm up.' }],
      maxTokens: 2,
    }));
    const failed = (await runLoad(warmups, { ...load, concurrency: Math.min(warmups.length, 8) })).find((r) => !r.ok);
    if (failed && !o.signal.aborted) throw new TransferError(`a warm-up request failed: ${failed.error}`, 'ERR_REMOTE');
    await Promise.all(proxies.map((p) => supervisor.ask(p, { type: 'traces' }, 'traces', 10_000)));
    const baseline = new Map(await Promise.all(workers.map(async (w) => [w.name, await workerStats(w)] as const)));

    const children = [...proxies, ...workers];
    let kill: ScaleSummary['kill'] = null;
    let completed = 0;
    const progress = new Progress(requests.length, o.progress);
    const t0 = epochMs();
    let clients: ClientResult[];
    try {
      clients = await runLoad(requests, {
        ...load,
        concurrency: o.concurrency,
        onResult: (r) => {
          progress.tick(r.ok);
          if (!o.kill || ++completed !== o.kill.after) return;
          // Further sends wait until the target is dead: every later request meets the system without it.
          const target = children.find((c) => c.name === o.kill!.target)!;
          const at = epochMs();
          return supervisor.kill(target).then(
            () => {
              kill = { target: target.name, afterRequests: o.kill!.after, pid: target.ready.pid, at, exitedAt: epochMs() };
              o.log(`killed ${target.name} (pid ${target.ready.pid}, SIGKILL) after request ${o.kill!.after} completed`);
            },
            (err: Error) => o.log(`--kill ${target.name}: ${err.message}`),
          );
        },
      });
    } finally {
      progress.finish();
    }
    const durationS = (epochMs() - t0) / 1000;

    const live = proxies.filter((p) => p.process.exitCode === null && p.process.signalCode === null);
    const traces = (await Promise.all(live.map((p) => supervisor.ask<{ traces: RequestTrace[] }>(p, { type: 'traces' }, 'traces', 10_000)))).flatMap((t) => t.traces);
    const views = new Map(await Promise.all(live.map(async (p) => [p.name, await supervisor.ask<ProxyClusterView>(p, { type: 'cluster' }, 'cluster', 10_000)] as const)));
    // A worker that died during the load (its requests already count as errors) has no stats to give.
    const unreachable: string[] = [];
    const reports: WorkerReport[] = (
      await Promise.all(
        workers.map(async (w) => {
          try {
            return { name: w.name, role: w.ready.role as SimRole, url: w.ready.url, stats: since(await workerStats(w), baseline.get(w.name)!) };
          } catch (err) {
            unreachable.push(w.name);
            if (w.name !== o.kill?.target) o.log(`cannot read ${w.name}'s numbers: ${(err as Error).message}`);
            return undefined;
          }
        }),
      )
    ).filter((r): r is WorkerReport => r !== undefined);
    summary = summarize({
      simulation:
        `simulated E/P/D workers: compute times derived from the ${profile.name} profile for a ${REFERENCE_ACCELERATOR.name}; ` +
        'embeddings and KV are real bytes, moved through the encoder cache and the transfer engine and checked byte for byte',
      topology: o.topology,
      model: profile.id,
      concurrency: o.concurrency,
      interrupted: o.signal.aborted,
      clients,
      traces,
      workers: reports,
      durationS,
      processes: children.map((c) => ({ name: c.name, role: c.ready.role ?? 'proxy', pid: c.ready.pid, url: c.ready.url })),
      unreachable,
    });
    if (scale) {
      summary.scale = summarizeScale({
        metadata: scale.metadata,
        network: network
          ? { mode: 'netns', reason: null, subnet: network.subnet, namespaces: [...network.places].map(([worker, p]) => ({ worker, ns: p.ns, address: p.address })) }
          : { mode: 'loopback', reason: scale.loopbackReason },
        kvOverNetwork: network !== null,
        bytes: summary.bytes,
        proxies: proxies.map((p) => ({ name: p.name, url: p.ready.url, pid: p.ready.pid, killed: !live.includes(p), staleness: views.get(p.name)?.staleness ?? null })),
        workerNames: new Map(workers.map((w) => [w.ready.url, w.name])),
        clients,
        traces,
        kill,
      });
    }
    if (o.report !== null) {
      const html = renderReport({
        summary,
        timelines: joinTimelines(clients, traces, reports),
        t0,
        createdAt: new Date().toISOString(),
        command: o.command,
        itlMs: clients.filter((c) => c.ok).flatMap((c) => c.itlMs),
      });
      summary.report = writeReport(o.report, html, o.log);
    }
    return summary;
  } finally {
    // After the load nothing is in flight; after an interrupt, what is in flight is abandoned.
    const killed = await supervisor.stopAll(o.signal.aborted ? 0 : 5_000);
    await balancer?.close();
    await store?.close();
    if (killed.length + lost.length > 0) {
      // A process that died or had to be killed could not remove its shared memory: do it for it.
      native.reclaimStaleShm();
      native.reclaimStaleEcStores();
      if (killed.length > 0) o.log(`had to kill ${killed.join(', ')}`);
    }
    if (scale) {
      const { etcdKeysLeft } = await scale.close();
      if (summary?.scale) summary.scale.etcdKeysLeft = etcdKeysLeft;
    }
  }
}
