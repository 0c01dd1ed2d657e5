/**
 * The EPD load-balancing proxy: an OpenAI-compatible HTTP front for Encoder /
 * Prefill / Decode (or combined PD) instances.
 *
 *   POST /v1/chat/completions, /v1/completions   streamed (SSE) or not
 *   GET  /v1/models                              from a healthy instance
 *   GET  /healthcheck (and /health)              200 when a full path is routable, else 503
 *   POST /v1/metaserver                          decode-first rendezvous (shared secret when set)
 *   GET  /instances, POST /instances/add, POST /instances/remove   admin (shared secret when set)
 *   GET  /metrics                                Prometheus text
 *
 * See docs/PROXY.md for the routing policy, load accounting, retry and health rules.
 */
import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { performance } from 'node:perf_hooks';
import { TransferError } from '../errors.js';
import { checkSecret } from './auth.js';
import { FORWARDED_HEADER, ProxyCluster, type ClusterOptions } from './cluster.js';
import { ProxyError, asProxyError, badRequest, clientGone } from './errors.js';
import { DEFAULT_ESTIMATES, type EstimateOptions } from './estimate.js';
import { choosePath, decodeFirst, encodeItems, forwardPd, now, type FlowContext, type ProxyTimeouts, type RequestTrace } from './flow.js';
import { HealthMonitor, type HealthOptions } from './health.js';
import { InstancePool, ROLES, normalizeInstanceUrl, type InstanceInfo, type Role } from './instances.js';
import { MemoryEmbeddingLocator, type EmbeddingLocator } from './locator.js';
import { ProxyMetrics } from './metrics.js';
import { planRequest, type Endpoint } from './plan.js';
import { StreamWriter, parseJson, readRequestBody, sendError, sendJson } from './reply.js';
import { Rendezvous } from './rendezvous.js';
import { Upstream } from './upstream.js';

/** Options of {@link EpdProxy.start}. Everything is optional. */
export interface ProxyOptions {
  /** Address to listen on. Default 127.0.0.1. */
  host?: string;
  /** Port; 0 picks a free one. Default 8000. */
  port?: number;
  /**
   * Base URL instances use to reach this proxy (the metaserver URL given to D is
   * `<advertiseUrl>/v1/metaserver`). Default `http://<host>:<port>`; required when
   * `host` is a wildcard address, which D cannot call.
   */
  advertiseUrl?: string;
  /** Instances per role (base URLs like http://127.0.0.1:8100, or host:port). */
  instances?: Partial<Record<Role, readonly string[]>>;
  /** Shared secret required on /v1/metaserver and the admin endpoints. Default: none (open, loopback deployments only). */
  secret?: string;
  /** Retries on another instance per hop. Default 2. */
  maxRetries?: number;
  /** Largest client request body (inline images are base64). Default 64 MiB. */
  maxBodyBytes?: number;
  /** Largest non-streamed upstream answer. Default 64 MiB. */
  maxResponseBytes?: number;
  /** Output tokens assumed for load accounting when a request sets no max_tokens. Default 256. */
  defaultMaxTokens?: number;
  timeouts?: Partial<ProxyTimeouts>;
  health?: Partial<HealthOptions>;
  estimates?: Partial<EstimateOptions>;
  /** Where embeddings already are. Default: a {@link MemoryEmbeddingLocator} fed by encoder answers. */
  locator?: EmbeddingLocator;
  /** Called when a client request ends, with its timeline. Must not throw. */
  onRequest?: (trace: RequestTrace) => void;
  /** Operational messages (instance state changes, shutdown). Default: none. */
  log?: (message: string, fields?: Record<string, unknown>) => void;
  /** On close, how long in-flight requests may finish before they are cut (ms). Default 5000. */
  closeGraceMs?: number;
  /**
   * Cluster mode: share instances, load and the metaserver rendezvous with every
   * other proxy started on the same etcd (see lib/proxy/cluster.ts, docs/PROXY.md).
   * Instances registered in etcd are added and removed as they come and go.
   */
  cluster?: ClusterOptions;
}

/** Deadlines used unless `ProxyOptions.timeouts` overrides them (docs/PROXY.md, "Deadlines"). */
export const DEFAULT_TIMEOUTS: ProxyTimeouts = {
  connectMs: 5_000,
  encodeMs: 120_000,
  prefillMs: 300_000,
  metaserverMs: 30_000,
  responseMs: 600_000,
  idleMs: 300_000,
  locateMs: 50,
};

/** Health-check settings used unless `ProxyOptions.health` overrides them. */
export const DEFAULT_HEALTH: HealthOptions = {
  intervalMs: 2_000,
  timeoutMs: 1_000,
  path: '/health',
  unhealthyAfter: 2,
  healthyAfter: 2,
};

const REQUEST_ID = /^[\w.:-]{1,128}$/;
const METASERVER_BODY_LIMIT = 1 << 20;
const ADMIN_BODY_LIMIT = 1 << 16;

function isWildcard(host: string): boolean {
  return host === '0.0.0.0' || host === '::' || host === '';
}

/** The proxy. Create with {@link EpdProxy.start}; stop with {@link EpdProxy.close}. */
export class EpdProxy {
  private readonly server: Server;
  private readonly pools = new Map<Role, InstancePool>();
  private readonly ctx: FlowContext;
  private readonly health: HealthMonitor;
  private readonly active = new Set<AbortController>();
  private readonly metricsSink: ProxyMetrics;
  private closing: Promise<void> | undefined;
  private baseUrl = '';
  private clusterMember: ProxyCluster | undefined;

  private constructor(private readonly options: ProxyOptions) {
    for (const role of ROLES) {
      this.pools.set(role, new InstancePool(role, (i) => this.forgotten(i.role, i.url), (i) => this.clusterMember?.loadChanged(i)));
    }
    const timeouts = { ...DEFAULT_TIMEOUTS, ...options.timeouts };
    const upstream = new Upstream({ connectTimeoutMs: timeouts.connectMs, maxResponseBytes: options.maxResponseBytes ?? 64 << 20 });
    this.metricsSink = new ProxyMetrics(this.pools);
    this.health = new HealthMonitor(this.pools, upstream, { ...DEFAULT_HEALTH, ...options.health }, (i, from, to, reason) => {
      this.metricsSink.stateChanges.inc({ role: i.role, to });
      this.log(`${i.role} instance ${i.url}: ${from} -> ${to}`, { reason });
    });
    this.ctx = {
      pools: this.pools,
      upstream,
      locator: options.locator ?? new MemoryEmbeddingLocator(),
      rendezvous: new Rendezvous(),
      health: this.health,
      metrics: this.metricsSink,
      timeouts,
      maxRetries: options.maxRetries ?? 2,
      maxResponseBytes: options.maxResponseBytes ?? 64 << 20,
      metaserverUrl: '',
      encoding: new Map(),
    };
    this.server = createServer({ keepAliveTimeout: 65_000 }, (req, res) => this.route(req, res));
  }

  /** Validates options, listens, and checks every configured instance once before resolving. */
  static async start(options: ProxyOptions = {}): Promise<EpdProxy> {
    const host = options.host ?? '127.0.0.1';
    if (isWildcard(host) && !options.advertiseUrl) {
      throw new TransferError(`host ${JSON.stringify(host)} is a wildcard address that decode instances cannot call back; set advertiseUrl`, 'ERR_BAD_ARGUMENT');
    }
    const proxy = new EpdProxy(options);
    for (const role of ROLES) for (const url of options.instances?.[role] ?? []) proxy.pools.get(role)!.add(url);
    try {
      await new Promise<void>((resolve, reject) => {
        proxy.server.once('error', reject);
        proxy.server.listen(options.port ?? 8000, host, () => {
          proxy.server.off('error', reject);
          resolve();
        });
      });
    } catch (err) {
      await proxy.ctx.upstream.close();
      throw err;
    }
    const { port } = proxy.server.address() as AddressInfo;
    proxy.baseUrl = `http://${host.includes(':') ? `[${host}]` : host}:${port}`;
    const advertised = (options.advertiseUrl ?? proxy.baseUrl).replace(/\/+$/, '');
    proxy.ctx.metaserverUrl = `${advertised}/v1/metaserver`;
    await proxy.health.start();
    if (options.cluster) {
      try {
        proxy.clusterMember = await ProxyCluster.join(
          {
            pools: proxy.pools,
            url: advertised,
            secret: options.secret,
            metrics: proxy.metricsSink,
            forwardTimeoutMs: proxy.ctx.timeouts.prefillMs + proxy.ctx.timeouts.connectMs,
            addInstance: (role, url) => proxy.addInstance(role, url),
            removeInstance: (url, role) => proxy.removeInstance(url, role),
            log: (message, fields) => proxy.log(message, fields),
          },
          options.cluster,
        );
      } catch (err) {
        await proxy.close();
        throw err;
      }
      // D may call any proxy (e.g. through a load balancer): the URL names the one that holds the request.
      proxy.ctx.metaserverUrl += `?owner=${encodeURIComponent(proxy.clusterMember.id)}`;
    }
    return proxy;
  }

  /** `http://host:port` of this proxy. */
  get url(): string {
    return this.baseUrl;
  }

  /** The URL decode instances call back. */
  get metaserverUrl(): string {
    return this.ctx.metaserverUrl;
  }

  /** Cluster membership (with `cluster` options), else undefined. */
  get cluster(): ProxyCluster | undefined {
    return this.clusterMember;
  }

  /** Prometheus registry (GET /metrics serves it). */
  get metrics(): ProxyMetrics {
    return this.metricsSink;
  }

  /** Every instance and its load. */
  instances(): InstanceInfo[] {
    return [...this.pools.values()].flatMap((p) => p.list().map((i) => i.info()));
  }

  /**
   * Adds an instance (or revives a draining one) and checks it once; it takes
   * traffic as soon as a check passes. Resolves with its state after that check.
   */
  async addInstance(role: Role, url: string): Promise<InstanceInfo> {
    const pool = this.pools.get(role);
    if (!pool) throw new TransferError(`Expected one of ${ROLES.join(', ')} for role but received ${JSON.stringify(role)}`, 'ERR_BAD_ARGUMENT');
    const { instance, added } = pool.add(url);
    if (added) this.log(`${role} instance ${instance.url} added`);
    await this.health.check(instance);
    return instance.info();
  }

  /**
   * Stops routing to an instance. Requests already on it finish (draining); it is
   * forgotten when the last one ends. Returns its state, or undefined when unknown.
   */
  removeInstance(url: string, role?: Role): InstanceInfo | undefined {
    const canonical = normalizeInstanceUrl(url);
    for (const pool of this.pools.values()) {
      if (role && pool.role !== role) continue;
      const instance = pool.get(canonical);
      if (!instance) continue;
      const info = instance.info();
      pool.remove(canonical);
      this.log(`${pool.role} instance ${canonical} removed`, { draining: info.activeRequests });
      return { ...info, state: 'draining' };
    }
    return undefined;
  }

  /**
   * Stops accepting requests, lets in-flight ones finish for `closeGraceMs`, then
   * cuts the rest and closes every upstream connection.
   */
  close(): Promise<void> {
    this.closing ??= (async () => {
      this.health.stop();
      const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
      this.server.closeIdleConnections();
      const grace = this.options.closeGraceMs ?? 5_000;
      if (this.active.size > 0) {
        await new Promise<void>((resolve) => {
          const started = Date.now();
          const poll = setInterval(() => {
            if (this.active.size === 0 || Date.now() - started >= grace) {
              clearInterval(poll);
              resolve();
            }
          }, 20);
        });
        for (const c of this.active) c.abort(new ProxyError('the proxy is shutting down', 'ERR_CLOSED', { status: 503 }));
      }
      this.server.closeAllConnections();
      await closed;
      // Leave the cluster last: other proxies forward metaserver calls for our requests until they ended.
      await this.clusterMember?.close();
      await this.ctx.upstream.close();
    })();
    return this.closing;
  }

  private log(message: string, fields?: Record<string, unknown>): void {
    this.options.log?.(message, fields);
  }

  private forgotten(role: Role, url: string): void {
    if (role === 'encode') this.ctx.locator.forgetInstance(url);
    this.log(`${role} instance ${url} drained and forgotten`);
  }

  // ------------------------------------------------------------ routing

  private route(req: IncomingMessage, res: ServerResponse): void {
    const q = req.url?.indexOf('?') ?? -1;
    const path = q < 0 ? (req.url ?? '/') : req.url!.slice(0, q);
    const method = req.method ?? 'GET';
    const handler = ROUTES[path];
    if (!handler) {
      sendJson(res, 404, new ProxyError(`no route ${path}`, 'ERR_NO_HANDLER', { status: 404 }).toJSON());
      return;
    }
    const run = handler[method];
    if (!run) {
      res.setHeader('allow', Object.keys(handler).join(', '));
      sendJson(res, 405, new ProxyError(`${method} is not allowed on ${path}`, 'ERR_BAD_ARGUMENT', { status: 405 }).toJSON());
      return;
    }
    run(this, req, res).catch((err) => sendError(res, asProxyError(err)));
  }

  /** @internal A client request through the pipeline. */
  async serveGeneration(endpoint: Endpoint, req: IncomingMessage, res: ServerResponse): Promise<void> {
    const header = req.headers['x-request-id'];
    const requestId = typeof header === 'string' && REQUEST_ID.test(header) ? header : randomUUID();
    res.setHeader('x-request-id', requestId);
    const started = performance.now();
    const client = new AbortController();
    const onClose = () => {
      if (!res.writableFinished) client.abort(clientGone());
    };
    res.once('close', onClose);
    this.active.add(client);
    const trace: RequestTrace = { id: requestId, endpoint, stream: false, route: 'text', start: now(), end: 0, status: 0, retries: 0 };
    const writer = new StreamWriter(res, this.ctx.timeouts.idleMs);
    try {
      const body = parseJson(await readRequestBody(req, this.options.maxBodyBytes ?? 64 << 20, client.signal));
      const plan = planRequest(endpoint, body, {
        estimates: { ...DEFAULT_ESTIMATES, ...this.options.estimates },
        defaultMaxTokens: this.options.defaultMaxTokens ?? 256,
      });
      trace.stream = plan.stream;
      trace.route = plan.items.length > 0 ? 'multimodal' : 'text';
      // Decide the path first: no encoder time is spent on a request nothing can finish.
      trace.path = choosePath(this.ctx, plan);
      if (plan.items.length > 0 && this.pools.get('encode')!.size > 0) await encodeItems(this.ctx, plan, requestId, client.signal, trace);
      if (trace.path === 'p-d') await decodeFirst(this.ctx, plan, requestId, client.signal, res, writer, trace);
      else await forwardPd(this.ctx, plan, requestId, client.signal, res, writer, trace);
      trace.status = res.statusCode;
    } catch (e) {
      const err = client.signal.aborted ? asProxyError(client.signal.reason) : asProxyError(e);
      // A failure after the first byte still counts as that failure (the client saw 200 and then an error).
      trace.status = client.signal.aborted ? 499 : err.status;
      trace.error = { code: err.code, message: err.message };
      sendError(res, err, writer.atEventBoundary);
    } finally {
      res.off('close', onClose);
      this.active.delete(client);
      trace.end = now();
      const seconds = (performance.now() - started) / 1000;
      const stream = String(trace.stream);
      this.metricsSink.requests.inc({ endpoint, route: trace.route, path: trace.path ?? 'none', status: String(trace.status) });
      this.metricsSink.duration.observe({ endpoint, stream }, seconds);
      if (trace.decode?.firstByte) this.metricsSink.firstByte.observe({ endpoint, stream }, (trace.decode.firstByte - trace.start) / 1000);
      this.options.onRequest?.(trace);
    }
  }

  /** @internal POST /v1/metaserver. */
  async serveMetaserver(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const scope = new AbortController();
    this.active.add(scope);
    try {
      const raw = await readRequestBody(req, METASERVER_BODY_LIMIT, scope.signal);
      this.authorize(req, raw);
      const params = parseJson(raw);
      if (typeof params !== 'object' || params === null || Array.isArray(params)) throw badRequest('the metaserver body must be a JSON object');
      const requestId = (params as Record<string, unknown>).request_id;
      if (typeof requestId !== 'string' || requestId.length === 0) throw badRequest("the metaserver body needs a string 'request_id'");
      res.setHeader('x-request-id', requestId);
      let result;
      try {
        result = await this.ctx.rendezvous.arrive(requestId, params as Record<string, unknown>);
      } catch (e) {
        // Not ours: in a cluster the request may be held by another proxy (D reached us through a load balancer).
        const forwarded = await this.forwardMetaserver(e, req, raw, requestId, scope.signal);
        if (!forwarded) throw e;
        this.metricsSink.metaserver.inc({ outcome: `forwarded_${forwarded.status}` });
        res.writeHead(forwarded.status, { 'content-type': 'application/json', 'content-length': forwarded.body.length });
        res.end(forwarded.body);
        return;
      }
      this.metricsSink.metaserver.inc({ outcome: 'ok' });
      sendJson(res, 200, { status: 'ok', request_id: requestId, prefill: result.prefill });
    } catch (e) {
      let err = asProxyError(e);
      // The client left, or the attempt ended, while the prefill ran: D's request is gone too.
      if (err.status === 499) err = new ProxyError('the request was cancelled', 'ERR_ABORTED', { status: 410, type: 'cancelled' });
      this.metricsSink.metaserver.inc({ outcome: String(err.status) });
      sendError(res, err);
    } finally {
      this.active.delete(scope);
    }
  }

  /** Offers a metaserver call that is not ours to the owning proxy (cluster mode, never a call that was itself forwarded). */
  private async forwardMetaserver(err: unknown, req: IncomingMessage, raw: Buffer, requestId: string, signal: AbortSignal) {
    if (!this.clusterMember || asProxyError(err).status !== 404 || req.headers[FORWARDED_HEADER] !== undefined) return undefined;
    const owner = new URL(req.url ?? '/', 'http://proxy').searchParams.get('owner') ?? undefined;
    return this.clusterMember.forwardMetaserver(raw, owner, requestId, signal);
  }

  /** Throws 401 unless the request proves the shared secret (when one is set). */
  private authorize(req: IncomingMessage, raw: Buffer): void {
    const secret = this.options.secret;
    if (!secret) return;
    const why = checkSecret(secret, req.headers, raw, req.socket.remoteAddress);
    if (why) throw new ProxyError(why, 'ERR_AUTH', { status: 401 });
  }

  /** @internal GET /v1/models: the first healthy instance's list (D/PD preferred). */
  async serveModels(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const header = req.headers['x-request-id'];
    const requestId = typeof header === 'string' && REQUEST_ID.test(header) ? header : randomUUID();
    const scope = new AbortController();
    const onClose = () => scope.abort(clientGone());
    res.once('close', onClose);
    let last: ProxyError | undefined;
    try {
      for (const role of ['decode', 'pd', 'prefill', 'encode'] as const) {
        for (const instance of this.pools.get(role)!.list()) {
          if (!instance.routable) continue;
          try {
            const answer = await this.ctx.upstream.get(instance, '/v1/models', { timeoutMs: this.ctx.timeouts.connectMs, signal: scope.signal, requestId });
            if (answer.status >= 200 && answer.status < 300) {
              res.writeHead(200, { 'content-type': answer.contentType || 'application/json', 'content-length': answer.raw.length, 'x-request-id': requestId });
              res.end(answer.raw);
              return;
            }
            last = new ProxyError(`${role} instance ${instance.url} answered ${answer.status} to /v1/models`, 'ERR_REMOTE', { status: 502 });
          } catch (err) {
            if (scope.signal.aborted) return;
            last = asProxyError(err);
          }
        }
      }
      throw last ?? new ProxyError('no instance is available', 'ERR_BACKEND_UNAVAILABLE', { status: 503, type: 'service_unavailable' });
    } finally {
      res.off('close', onClose);
    }
  }

  /** @internal GET /healthcheck. */
  serveHealth(res: ServerResponse): void {
    const roles: Record<string, { healthy: number; total: number }> = {};
    for (const [role, pool] of this.pools) roles[role] = { healthy: pool.routableCount, total: pool.size };
    const text = roles.prefill.healthy > 0 && roles.decode.healthy > 0;
    const ok = text || roles.pd.healthy > 0;
    // Multimodal requests also need an encoder when encoders are configured.
    const multimodal = ok && (roles.encode.total === 0 || roles.encode.healthy > 0);
    sendJson(res, ok ? 200 : 503, { status: ok ? (multimodal ? 'ok' : 'degraded') : 'unavailable', instances: roles, rendezvousPending: this.ctx.rendezvous.size });
  }

  /** @internal Admin endpoints. */
  async serveAdmin(action: 'list' | 'add' | 'remove', req: IncomingMessage, res: ServerResponse): Promise<void> {
    const raw = action === 'list' ? Buffer.alloc(0) : await readRequestBody(req, ADMIN_BODY_LIMIT, new AbortController().signal);
    this.authorize(req, raw);
    if (action === 'list') {
      sendJson(res, 200, { instances: this.instances() });
      return;
    }
    const body = parseJson(raw) as Record<string, unknown>;
    if (typeof body !== 'object' || body === null || Array.isArray(body)) throw badRequest('the body must be a JSON object');
    // `type`/`instances` is the shape of vLLM-ascend's proxy admin API; `role`/`url(s)` ours.
    const role = body.role ?? body.type;
    const list = body.urls ?? body.instances ?? (body.url === undefined ? undefined : [body.url]);
    if (!Array.isArray(list) || list.length === 0 || !list.every((u) => typeof u === 'string')) throw badRequest("give 'url' or a non-empty array 'urls'");
    if (role !== undefined && !(ROLES as readonly unknown[]).includes(role)) throw badRequest(`'role' must be one of ${ROLES.join(', ')}`);
    for (const u of list) {
      try {
        normalizeInstanceUrl(u as string);
      } catch (err) {
        throw badRequest((err as Error).message);
      }
    }
    if (action === 'add') {
      if (role === undefined) throw badRequest(`'role' must be one of ${ROLES.join(', ')}`);
      const infos = await Promise.all(list.map((u) => this.addInstance(role as Role, u as string)));
      sendJson(res, 200, { instances: infos });
      return;
    }
    // All or nothing: a typo in one URL must not half-apply the change.
    const known = (u: string) => [...this.pools.values()].some((p) => (role === undefined || p.role === role) && p.get(normalizeInstanceUrl(u)));
    const unknown = (list as string[]).filter((u) => !known(u));
    if (unknown.length > 0) throw new ProxyError(`unknown instance(s): ${unknown.join(', ')}`, 'ERR_BAD_ARGUMENT', { status: 404 });
    sendJson(res, 200, { instances: (list as string[]).map((u) => this.removeInstance(u, role as Role | undefined)) });
  }

  /** @internal GET /metrics. */
  async serveMetrics(res: ServerResponse): Promise<void> {
    const text = await this.metricsSink.registry.metrics();
    res.writeHead(200, { 'content-type': this.metricsSink.registry.contentType });
    res.end(text);
  }

}

type Handler = (proxy: EpdProxy, req: IncomingMessage, res: ServerResponse) => Promise<void>;

const ROUTES: Record<string, Record<string, Handler>> = {
  '/v1/chat/completions': { POST: (p, req, res) => p.serveGeneration('chat', req, res) },
  '/v1/completions': { POST: (p, req, res) => p.serveGeneration('completions', req, res) },
  '/v1/models': { GET: (p, req, res) => p.serveModels(req, res) },
  '/v1/metaserver': { POST: (p, req, res) => p.serveMetaserver(req, res) },
  '/healthcheck': { GET: async (p, _req, res) => p.serveHealth(res) },
  '/health': { GET: async (p, _req, res) => p.serveHealth(res) },
  '/metrics': { GET: (p, _req, res) => p.serveMetrics(res) },
  '/instances': { GET: (p, req, res) => p.serveAdmin('list', req, res) },
  '/instances/add': { POST: (p, req, res) => p.serveAdmin('add', req, res) },
  '/instances/remove': { POST: (p, req, res) => p.serveAdmin('remove', req, res) },
};
