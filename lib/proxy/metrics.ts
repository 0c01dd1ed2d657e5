/**
 * Prometheus metrics of the proxy (GET /metrics). Each proxy has its own registry,
 * so several proxies in one process do not mix their figures. Instance gauges are
 * read from the pools at scrape time: nothing is written on the request path for
 * them, and a removed instance disappears from the next scrape.
 */
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { InstancePool } from './instances.js';

const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];

/** The proxy's Prometheus metrics and their registry. */
export class ProxyMetrics {
  readonly registry = new Registry();
  /** Client requests by endpoint, route (text|multimodal), path (p-d|pd|none) and HTTP status. */
  readonly requests: Counter<'endpoint' | 'route' | 'path' | 'status'>;
  /** Whole-request duration as the client sees it. */
  readonly duration: Histogram<'endpoint' | 'stream'>;
  /** Time until the first response byte went to the client (for streams: time to first token). */
  readonly firstByte: Histogram<'endpoint' | 'stream'>;
  /** Upstream hops by role and outcome (ok, or the error code). */
  readonly hops: Counter<'role' | 'outcome'>;
  readonly hopDuration: Histogram<'role'>;
  /** Hops sent to another instance after a failure. */
  readonly retries: Counter<'role'>;
  /** Media items by how they were served: encoded, cache_hit (skipped the encoder), coalesced (joined an identical in-flight encode). */
  readonly mediaItems: Counter<'result'>;
  /** Calls to /v1/metaserver by outcome. */
  readonly metaserver: Counter<'outcome'>;
  /** Instance state changes. */
  readonly stateChanges: Counter<'role' | 'to'>;

  constructor(pools: Map<string, InstancePool>) {
    const registers = [this.registry];
    this.requests = new Counter({ name: 'epd_proxy_requests_total', help: 'Client requests by endpoint, route, path and HTTP status', labelNames: ['endpoint', 'route', 'path', 'status'], registers });
    this.duration = new Histogram({ name: 'epd_proxy_request_duration_seconds', help: 'Client request duration', labelNames: ['endpoint', 'stream'], buckets: LATENCY_BUCKETS, registers });
    this.firstByte = new Histogram({ name: 'epd_proxy_first_byte_seconds', help: 'Time to the first response byte sent to the client', labelNames: ['endpoint', 'stream'], buckets: LATENCY_BUCKETS, registers });
    this.hops = new Counter({ name: 'epd_proxy_upstream_requests_total', help: 'Upstream hops by role and outcome', labelNames: ['role', 'outcome'], registers });
    this.hopDuration = new Histogram({ name: 'epd_proxy_upstream_duration_seconds', help: 'Upstream hop duration, until its answer was complete (encode, prefill) or its stream ended (decode, pd)', labelNames: ['role'], buckets: LATENCY_BUCKETS, registers });
    this.retries = new Counter({ name: 'epd_proxy_retries_total', help: 'Hops retried on another instance', labelNames: ['role'], registers });
    this.mediaItems = new Counter({ name: 'epd_proxy_media_items_total', help: 'Media items by how they were served', labelNames: ['result'], registers });
    this.metaserver = new Counter({ name: 'epd_proxy_metaserver_calls_total', help: 'Calls to /v1/metaserver by outcome', labelNames: ['outcome'], registers });
    this.stateChanges = new Counter({ name: 'epd_proxy_instance_state_changes_total', help: 'Instance state changes', labelNames: ['role', 'to'], registers });

    const perInstance = (read: (i: ReturnType<InstancePool['list']>[number]) => number) =>
      function (this: Gauge<'role' | 'instance'>) {
        this.reset();
        for (const pool of pools.values()) for (const i of pool.list()) this.set({ role: i.role, instance: i.url }, read(i));
      };
    new Gauge({ name: 'epd_proxy_instance_active_tokens', help: 'Estimated tokens in flight per instance (the balancing key)', labelNames: ['role', 'instance'], registers, collect: perInstance((i) => i.activeTokens) });
    new Gauge({ name: 'epd_proxy_instance_active_requests', help: 'Hops in flight per instance', labelNames: ['role', 'instance'], registers, collect: perInstance((i) => i.activeRequests) });
    new Gauge({ name: 'epd_proxy_instance_healthy', help: '1 when the instance is routable', labelNames: ['role', 'instance'], registers, collect: perInstance((i) => (i.routable ? 1 : 0)) });
  }
}
