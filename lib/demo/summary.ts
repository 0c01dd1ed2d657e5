/**
 * The demo's numbers: what the client saw (requests, errors, time to first
 * token, inter-token latency), what the workers moved and checked (embedding and
 * KV bytes, transfer rates, encoder-cache hits, the layerwise exposed tail), and
 * one joined timeline per request for the report.
 */
import type { StalenessStats } from '../proxy/cluster.js';
import type { RequestTrace } from '../proxy/flow.js';
import type { LayerSpan } from '../sim/trace.js';
import type { SimRequestRecord, SimRole, WorkerStats } from '../sim/stats.js';
import type { ClientResult, RequestKind } from './load.js';

/** Shapes of the embedded system. */
export type Topology = '1e1pd' | '1e1p1d' | '2e2p2d';

/** Latency percentiles of one kind of request. */
export interface KindSummary {
  requests: number;
  errors: number;
  ttftP50Ms: number | null;
  ttftP99Ms: number | null;
}

/** What `demo --json` prints (and the report shows). */
export interface DemoSummary {
  simulation: string;
  topology: Topology;
  model: string;
  /** Requests that ran (sent and not cancelled by an interruption). */
  requests: number;
  errors: number;
  /** True when Ctrl-C (or SIGTERM) cut the load short. */
  interrupted: boolean;
  /** Requests in flight when the demo was interrupted (neither successes nor errors). */
  cancelled: number;
  concurrency: number;
  /** Wall time of the load (s). */
  durationS: number;
  requestsPerSec: number;
  ttftP50Ms: number | null;
  ttftP99Ms: number | null;
  itlP50Ms: number | null;
  itlP99Ms: number | null;
  e2eP50Ms: number | null;
  e2eP99Ms: number | null;
  byKind: Record<RequestKind, KindSummary>;
  /** Share of media items whose embedding was reused instead of encoded (null without media). */
  ecHitRate: number | null;
  media: {
    /** Items in requests that reached the encoders. */
    items: number;
    /** The proxy found the embedding already loadable: no encoder at all. */
    proxyCacheHits: number;
    /** Same item being encoded for another request: waited for it. */
    coalesced: number;
    /** The encoder found it in the shared store. */
    encoderHits: number;
    /** Encoder passes (simulated) whose embedding was saved. */
    encoded: number;
    /** Embeddings prefill / PD loaded from the shared cache. */
    loaded: number;
    /** Items prefill / PD had to encode themselves (not in the cache). */
    encodedLocally: number;
  };
  /**
   * Bytes moved per path: ec = embeddings loaded by prefill/PD (saved = written by
   * encoders; of ec, ecPulled = pulled from another host's store over the transfer
   * engine, the rest read from a store on the same host); kv = KV pushed prefill → decode.
   */
  bytes: { ec: number; ecSaved: number; ecPulled: number; kv: number };
  /** Bytes checked byte for byte by the receiving side. */
  verifiedBytes: { ec: number; kv: number };
  /** Decode requests whose KV failed the byte check. */
  kvVerifyFailures: number;
  /** KV push rate while writes were in flight (bytes ÷ summed batch time), GB/s (1e9 B/s). */
  kvGBps: number | null;
  /** Embedding load rate (bytes ÷ summed load time), GB/s. */
  ecGBps: number | null;
  /** Layerwise: decode's DONE after the last layer's compute (ms). */
  exposedTailP50Ms: number | null;
  exposedTailP99Ms: number | null;
  /** Up to five distinct error messages. */
  errorSamples: string[];
  processes: Array<{ name: string; role: string; pid: number; url: string }>;
  /** Workers whose numbers could not be read at the end (they died during the run): their bytes are missing above. */
  unreachable: string[];
  /** Where the HTML report was written. */
  report: string | null;
  /** Only with `--metadata`: the cluster (proxies, network, faults). */
  scale?: ScaleSummary;
}

/** One proxy of a run at scale. */
export interface ProxyReport {
  name: string;
  url: string;
  pid: number;
  /** Requests of the load it accepted (what the client saw), and how many of those failed. */
  requests: number;
  errors: number;
  /** Age of the other proxies' load shares when they arrived here (null: it was killed before it could say). */
  staleness: StalenessStats | null;
  killed: boolean;
}

/** A request of the load that failed, and where it stood relative to the injected fault. */
export interface FailedRequest {
  index: number;
  id: string;
  proxy?: string;
  error: string;
  start: number;
  end: number;
  /** Sent before the fault and still running at it: it had reached the killed process, or may have. */
  inFlightAtKill: boolean;
  /** Sent after the killed process had exited: such a request must never fail. */
  sentAfterKill: boolean;
}

/** What `--metadata` adds to the summary. */
export interface ScaleSummary {
  /** etcd URL with the run's own key prefix. */
  metadata: string;
  /** Keys under the run's prefix after the run (0: nothing left in etcd). */
  etcdKeysLeft: number | null;
  network: {
    /** `netns`: one network namespace per worker on a bridge; `loopback`: every process on 127.0.0.1. */
    mode: 'netns' | 'loopback';
    /** Why loopback. */
    reason: string | null;
    subnet?: string;
    /** Worker → namespace and address. */
    namespaces?: Array<{ worker: string; ns: string; address: string }>;
  };
  /** Which path moved the bytes, in words. */
  paths: { kv: string; embeddings: string };
  proxies: ProxyReport[];
  /** Hops the proxies routed to each worker (from their timelines; a killed proxy's are missing). */
  instances: Record<string, number>;
  /** Requests whose connection a proxy refused, sent on to the next one (the client's load balancing). */
  failovers: number;
  /** The injected fault: SIGKILL sent `at`, the process gone at `exitedAt` (epoch ms); no request was sent in between. */
  kill: { target: string; afterRequests: number; pid: number; at: number; exitedAt: number } | null;
  failures: FailedRequest[];
}

/** A worker's final stats, with its name. */
export interface WorkerReport {
  name: string;
  role: SimRole;
  url: string;
  stats: WorkerStats;
}

/** One request joined across client, proxy and workers (epoch ms). */
export interface RequestTimeline {
  id: string;
  index: number;
  kind: RequestKind;
  ok: boolean;
  error?: string;
  start: number;
  end: number;
  firstToken?: number;
  tokens: number;
  path?: 'p-d' | 'pd';
  encode: Array<{ start: number; end: number; hit: boolean; instance: string }>;
  proxyCacheHits: number;
  ecLoad?: { start: number; end: number; instance: string };
  prefill?: { start: number; end: number; batch: number; instance: string };
  layers: LayerSpan[];
  kvDone?: number;
  decode?: { kvComplete?: number; firstToken?: number; lastToken?: number; instance: string };
}

/** Nearest-rank percentile; null for no values. */
export function percentile(values: readonly number[], p: number): number | null {
  if (values.length === 0) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))];
}

function round(v: number | null, digits = 2): number | null {
  if (v === null || !Number.isFinite(v)) return null;
  const f = 10 ** digits;
  return Math.round(v * f) / f;
}

function belongsTo(recordId: string, requestId: string): boolean {
  return recordId === requestId || recordId.startsWith(`${requestId}:`);
}

/** Joins what everyone recorded about each request. */
export function joinTimelines(clients: readonly ClientResult[], traces: readonly RequestTrace[], workers: readonly WorkerReport[]): RequestTimeline[] {
  const records: Array<{ worker: WorkerReport; record: SimRequestRecord }> = [];
  for (const w of workers) for (const r of w.stats.records ?? []) records.push({ worker: w, record: r });
  const byRequest = new Map<string, typeof records>();
  for (const entry of records) {
    // Hop ids are the request id, `<id>:e<i>` for encoder items and `<id>:r<n>` for retries.
    const base = entry.record.id.replace(/:(?:e|r)\d+$/, '');
    let list = byRequest.get(base);
    if (!list) byRequest.set(base, (list = []));
    list.push(entry);
  }
  const traceOf = new Map(traces.map((t) => [t.id, t]));
  return clients.map((c) => {
    const t: RequestTimeline = {
      id: c.id,
      index: c.index,
      kind: c.kind,
      ok: c.ok,
      error: c.error,
      start: c.start,
      end: c.end,
      firstToken: c.firstToken,
      tokens: c.tokens,
      encode: [],
      proxyCacheHits: 0,
      layers: [],
    };
    const trace = traceOf.get(c.id);
    t.path = trace?.path;
    t.proxyCacheHits = trace?.encode?.cacheHits ?? 0;
    for (const { worker, record } of byRequest.get(c.id) ?? []) {
      if (!belongsTo(record.id, c.id)) continue;
      if (record.role === 'encode') {
        for (const item of record.items ?? []) t.encode.push({ start: item.start, end: item.end, hit: item.hit, instance: worker.name });
      }
      if (record.ecLoad) t.ecLoad = { start: record.ecLoad.start, end: record.ecLoad.end, instance: worker.name };
      if (record.prefill) t.prefill = { ...record.prefill, instance: worker.name };
      if (record.kv) {
        t.layers = record.kv.layers;
        t.kvDone = record.kv.done;
      }
      if (record.decode) {
        t.decode = { kvComplete: record.decode.kvComplete, firstToken: record.decode.firstToken, lastToken: record.decode.lastToken, instance: worker.name };
      }
    }
    return t;
  });
}

/** The numbers of a run. */
export function summarize(input: {
  simulation: string;
  topology: Topology;
  model: string;
  concurrency: number;
  interrupted: boolean;
  clients: readonly ClientResult[];
  traces: readonly RequestTrace[];
  workers: readonly WorkerReport[];
  durationS: number;
  processes: DemoSummary['processes'];
  unreachable: string[];
}): DemoSummary {
  const { traces, workers } = input;
  const clients = input.clients.filter((c) => !c.cancelled);
  const ok = clients.filter((c) => c.ok);
  const ttft = ok.map((c) => c.ttftMs!).filter((v) => v !== undefined);
  const itl = ok.flatMap((c) => c.itlMs);
  const e2e = ok.map((c) => c.end - c.start);
  const kinds: RequestKind[] = ['text', 'image', 'image-repeat'];
  const byKind = Object.fromEntries(
    kinds.map((k) => {
      const of = clients.filter((c) => c.kind === k);
      const times = of.filter((c) => c.ok && c.ttftMs !== undefined).map((c) => c.ttftMs!);
      return [k, { requests: of.length, errors: of.filter((c) => !c.ok).length, ttftP50Ms: round(percentile(times, 50)), ttftP99Ms: round(percentile(times, 99)) }];
    }),
  ) as Record<RequestKind, KindSummary>;

  const sum = (role: SimRole | SimRole[], pick: (s: WorkerStats) => number) =>
    workers.filter((w) => (Array.isArray(role) ? role.includes(w.role) : w.role === role)).reduce((s, w) => s + pick(w.stats), 0);
  let items = 0;
  let proxyCacheHits = 0;
  let coalesced = 0;
  for (const t of traces) {
    if (!t.encode) continue;
    items += t.encode.items;
    proxyCacheHits += t.encode.cacheHits;
    coalesced += t.encode.coalesced;
  }
  const encoderHits = sum('encode', (s) => s.ec.hits);
  const consumers: SimRole[] = ['prefill', 'pd'];
  const loadMs = sum(consumers, (s) => s.ec.loadMs);
  const ecLoaded = sum(consumers, (s) => s.ec.loadedBytes);
  const kvBytes = sum('prefill', (s) => s.kv.pushedBytes);
  const kvWriteMs = sum('prefill', (s) => s.kv.writeMs);
  const kvWritten = sum('prefill', (s) => s.kv.writtenBytes);
  const tails: number[] = [];
  for (const w of workers) for (const r of w.stats.records ?? []) if (r.kv?.exposedTailMs !== undefined && r.ok) tails.push(r.kv.exposedTailMs);
  const errorSamples = [...new Set(clients.filter((c) => !c.ok && c.error).map((c) => c.error!))].slice(0, 5);
  return {
    simulation: input.simulation,
    topology: input.topology,
    model: input.model,
    requests: clients.length,
    errors: clients.length - ok.length,
    interrupted: input.interrupted,
    cancelled: input.clients.length - clients.length,
    concurrency: input.concurrency,
    durationS: round(input.durationS, 3)!,
    requestsPerSec: round(input.durationS > 0 ? ok.length / input.durationS : 0, 2)!,
    ttftP50Ms: round(percentile(ttft, 50)),
    ttftP99Ms: round(percentile(ttft, 99)),
    itlP50Ms: round(percentile(itl, 50)),
    itlP99Ms: round(percentile(itl, 99)),
    e2eP50Ms: round(percentile(e2e, 50)),
    e2eP99Ms: round(percentile(e2e, 99)),
    byKind,
    ecHitRate: items > 0 ? round((proxyCacheHits + coalesced + encoderHits) / items, 4) : null,
    media: {
      items,
      proxyCacheHits,
      coalesced,
      encoderHits,
      encoded: sum('encode', (s) => s.ec.encoded),
      loaded: sum(consumers, (s) => s.ec.loaded),
      encodedLocally: sum(consumers, (s) => s.ec.missed),
    },
    bytes: { ec: ecLoaded, ecSaved: sum('encode', (s) => s.ec.savedBytes), ecPulled: sum(consumers, (s) => s.ec.pulledBytes ?? 0), kv: kvBytes },
    verifiedBytes: { ec: sum(consumers, (s) => s.ec.verifiedBytes), kv: sum('decode', (s) => s.kv.verifiedBytes) },
    kvVerifyFailures: sum('decode', (s) => s.kv.verifyFailures),
    kvGBps: kvWriteMs > 0 ? round(kvWritten / (kvWriteMs / 1000) / 1e9, 3) : null,
    ecGBps: loadMs > 0 ? round(ecLoaded / (loadMs / 1000) / 1e9, 3) : null,
    exposedTailP50Ms: round(percentile(tails, 50), 3),
    exposedTailP99Ms: round(percentile(tails, 99), 3),
    errorSamples,
    processes: input.processes,
    unreachable: input.unreachable,
    report: null,
  };
}

/** The cluster part of the summary (`--metadata`). */
export function summarizeScale(input: {
  metadata: string;
  network: ScaleSummary['network'];
  kvOverNetwork: boolean;
  bytes: DemoSummary['bytes'];
  proxies: Array<{ name: string; url: string; pid: number; killed: boolean; staleness: StalenessStats | null }>;
  /** Worker base URL → worker name. */
  workerNames: ReadonlyMap<string, string>;
  clients: readonly ClientResult[];
  traces: readonly RequestTrace[];
  kill: ScaleSummary['kill'];
}): ScaleSummary {
  const clients = input.clients.filter((c) => !c.cancelled);
  const instances: Record<string, number> = {};
  const count = (url: string | undefined) => {
    if (url === undefined) return;
    const name = input.workerNames.get(url) ?? url;
    instances[name] = (instances[name] ?? 0) + 1;
  };
  for (const t of input.traces) {
    for (const url of t.encode?.instances ?? []) count(url);
    count(t.prefill?.instance);
    count(t.decode?.instance);
  }
  const kill = input.kill;
  const { ec, ecPulled, kv } = input.bytes;
  return {
    metadata: input.metadata,
    etcdKeysLeft: null,
    network: input.network,
    paths: {
      kv:
        kv === 0
          ? 'none moved'
          : input.kvOverNetwork
            ? `tcp between network namespaces, through veth pairs and a bridge (${input.network.subnet})`
            : "the transfer engine's shm transport (every worker on this host; 'auto' picks shared memory for a peer with the same boot id)",
      embeddings:
        ec === 0
          ? 'none loaded'
          : ecPulled === ec
            ? "pulled from the encoders' own stores over the transfer engine (etcd encoder-cache index; tcp across the namespaces)"
            : ecPulled > 0
              ? `${ecPulled} of ${ec} bytes pulled from the encoders' stores over the transfer engine; the rest from copies already pulled to the consumer's host`
              : 'one shared-memory encoder cache (/dev/shm) that every worker on this host opens',
    },
    proxies: input.proxies.map((p) => {
      const mine = clients.filter((c) => c.proxy === p.name);
      return { name: p.name, url: p.url, pid: p.pid, requests: mine.length, errors: mine.filter((c) => !c.ok).length, staleness: p.staleness, killed: p.killed };
    }),
    instances: Object.fromEntries(Object.entries(instances).sort(([a], [b]) => a.localeCompare(b))),
    failovers: clients.filter((c) => (c.failovers ?? 0) > 0).length,
    kill,
    failures: clients
      .filter((c) => !c.ok)
      .map((c) => ({
        index: c.index,
        id: c.id,
        proxy: c.proxy,
        error: c.error ?? 'unknown',
        start: c.start,
        end: c.end,
        inFlightAtKill: kill !== null && c.start < kill.at && c.end >= kill.at,
        sentAfterKill: kill !== null && c.start >= kill.exitedAt,
      })),
  };
}
