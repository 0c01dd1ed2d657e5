/**
 * A simulated E, P, D or PD instance: an HTTP server speaking the API the EPD
 * proxy uses for vLLM instances, over the real library (TransferEngine, the shared
 * encoder cache and ECConnector, LayerwiseSender / LayerwiseReceiver). Compute is
 * simulated — device-stream sleeps of the model profile's times — and every answer
 * says so; every byte it moves is real and checked.
 *
 *   GET  /health                      200 when serving, 503 while starting or stopping
 *   GET  /v1/models                   the served model
 *   POST /v1/chat/completions         role-specific (see lib/sim/roles.ts), streamed or not
 *   POST /v1/completions              text prompts (prefill, decode, pd)
 *   GET  /sim/stats[?records=1]       counters; with records=1 also the per-request records (drained)
 *
 * ```ts
 * const worker = await SimWorker.start({ role: 'decode', model: 'qwen2.5-vl-7b', port: 8300 });
 * console.log(worker.url);
 * await worker.close();
 * ```
 */
import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { performance } from 'node:perf_hooks';
import { ECConnector } from '../ec/connector.js';
import { EncoderCacheHost, EncoderCacheRemote } from '../ec/remote.js';
import { EncoderCacheStore } from '../ec/store.js';
import { TransferEngine, type TransportChoice } from '../engine.js';
import { TransferError } from '../errors.js';
import { EtcdEncoderCacheIndex } from '../meta/ec-index.js';
import { registerInstance } from '../meta/registry.js';
import { EtcdMetadataStore } from '../meta/store.js';
import { LayerwiseReceiver } from '../kv/receiver.js';
import { LayerwiseSender } from '../kv/sender.js';
import { badArgument, expectInteger, expectString } from '../validate.js';
import { HttpError, errorBody, readBody, sendError, sendJson } from './http.js';
import { SimKvCache, kvGeometry } from './kv-cache.js';
import { parsePrompt, type SimEndpoint } from './prompt.js';
import { REFERENCE_ACCELERATOR, getProfile, type ModelProfile } from './profiles.js';
import { serveDecode, serveEncode, servePd, servePrefill, type Call, type RoleContext } from './roles.js';
import { ModelRunner } from './runner.js';
import { RecordLog, emptyEc, emptyKv, type SimRequestRecord, type SimRole, type WorkerStats } from './stats.js';
import { RequestTraces } from './trace.js';

/** Options of {@link SimWorker.start}. */
export interface SimWorkerOptions {
  role: SimRole;
  /** Model profile id (lib/sim/profiles.ts). */
  model: string;
  /** Model name served in /v1/models and echoed in answers. Default: the profile id. */
  servedModelName?: string;
  /** Listen address (HTTP, and decode's transfer engine). Default 127.0.0.1. */
  host?: string;
  /** HTTP port; 0 picks a free one. Default 0. */
  port?: number;
  /** Name of the shared encoder-cache store (every process on the host that uses the same name shares it). Default 'epd-sim'. */
  ecStore?: string;
  /** Capacity of the store when this worker creates it (bytes). Default 2 GiB. */
  ecCapacity?: number;
  /** Bytes of simulated KV cache (prefill, decode, pd). Default 512 MiB. */
  kvMemory?: number;
  /** Prompt tokens one prefill step batches at most. Default 8192. */
  maxBatchedTokens?: number;
  /** Decode: deadline of a request's KV (and of its metaserver call), ms. Default 120 000. */
  kvTimeoutMs?: number;
  /** Longest wait for free KV blocks before answering 503, ms. Default 30 000. */
  blockWaitMs?: number;
  /**
   * Decode: after a failed request, how long its blocks stay held when no sender
   * confirms it stopped writing (LayerwiseReceiver `quiesceMs`), ms. Default 30 000.
   */
  kvQuiesceMs?: number;
  /** Decode: secret to sign /v1/metaserver calls with. Default: the EPD_PROXY_SECRET environment variable. */
  proxySecret?: string;
  /** Transfer-engine secret (handshake and tcp data). Default: EPD_TRANSFER_SECRET. */
  transferSecret?: string;
  /** Fault injection (prefill): corrupt one byte of the KV of the requests with these ids. */
  corruptKv?: readonly string[];
  /**
   * Metadata of the transfer engine: `etcd://host:port[/prefix]` publishes it in etcd
   * (docs/METADATA.md). Default: the embedded handshake.
   */
  metadata?: string;
  /** etcd lease TTL (s): how long a killed worker stays registered. Default 10. */
  metadataTtlSeconds?: number;
  /** The transfer engine's name (peers and the registry see it). Default `sim-<role>-<pid>`. */
  engineName?: string;
  /** How the engine reaches peers (`tcp` forces the network even on one host). Default `auto`. */
  transport?: TransportChoice;
  /** With etcd metadata: register in the instance registry (lib/meta/registry.ts) so cluster proxies find it. */
  register?: boolean;
  /**
   * With etcd metadata: the encoder cache spans hosts. An encoder serves its store to
   * other hosts and announces its keys in the etcd index; prefill/PD pull embeddings
   * they lack from the holders (lib/ec/remote.ts) instead of sharing one store.
   */
  remoteEmbeddings?: boolean;
  /** Operational messages. */
  log?: (message: string) => void;
}

const ROLES: readonly SimRole[] = ['encode', 'prefill', 'decode', 'pd'];
const REQUEST_ID = /^[\w.:-]{1,128}$/;
const BODY_LIMIT = 64 << 20;

/** The label every output of a simulated worker carries. */
export function simulationLabel(role: SimRole, profile: ModelProfile): string {
  return (
    `SIMULATION: ${role} instance of ${profile.name} — compute times derived from the model profile for a ${REFERENCE_ACCELERATOR.name}; ` +
    'embeddings and KV are real bytes, moved (shared memory or tcp) and checked by epd-transfer'
  );
}

/** A simulated instance. See the module comment. */
export class SimWorker {
  private readonly server: Server;
  private readonly records = new RecordLog();
  private readonly scopes = new Set<AbortController>();
  private readonly counts = { total: 0, ok: 0, failed: 0 };
  private state: 'starting' | 'serving' | 'closing' = 'starting';
  private closing: Promise<void> | undefined;
  private baseUrl = '';
  private registration: { close(): Promise<void> } | undefined;
  private ecHost: EncoderCacheHost | undefined;

  private constructor(
    readonly role: SimRole,
    readonly profile: ModelProfile,
    private readonly ctx: RoleContext,
    private readonly log: (message: string) => void,
  ) {
    this.server = createServer({ keepAliveTimeout: 65_000 }, (req, res) => this.route(req, res));
  }

  /** Opens the engine, store and cache of the role, then listens. */
  static async start(options: SimWorkerOptions): Promise<SimWorker> {
    if (typeof options !== 'object' || options === null) badArgument('options', 'an object', options);
    const role = options.role;
    if (!ROLES.includes(role)) badArgument('options.role', ROLES.map((r) => `"${r}"`).join(', '), role);
    const profile = getProfile(expectString(options.model, 'options.model'));
    const host = options.host ?? '127.0.0.1';
    const port = options.port === undefined ? 0 : expectInteger(options.port, 'options.port', 0, 65535);
    const log = options.log ?? (() => {});
    const opened: Array<() => Promise<void> | void> = [];
    const undo = async () => {
      for (const close of opened.reverse()) await Promise.resolve(close()).catch(() => {});
    };
    const etcd = options.metadata !== undefined && /^etcd:\/\//.test(options.metadata);
    if ((options.register || options.remoteEmbeddings) && !etcd) {
      badArgument('options.metadata', 'an etcd:// URL (register and remoteEmbeddings need etcd)', options.metadata);
    }
    const remoteEmbeddings = options.remoteEmbeddings === true && role !== 'decode';
    try {
      const engine = await TransferEngine.open({
        name: options.engineName ?? `sim-${role}-${process.pid}`,
        host,
        // A remote pull is written by the holder into the puller: both ends listen.
        listen: role === 'decode' || remoteEmbeddings,
        secret: options.transferSecret,
        transport: options.transport,
        metadata: options.metadata,
        metadataOptions: options.metadataTtlSeconds === undefined ? undefined : { ttlSeconds: options.metadataTtlSeconds },
      });
      opened.push(() => engine.close());
      let store: EncoderCacheStore | undefined;
      let ecHost: EncoderCacheHost | undefined;
      let ecRemote: EncoderCacheRemote | undefined;
      if (role !== 'decode') {
        store = await EncoderCacheStore.open({ name: options.ecStore ?? 'epd-sim', capacity: options.ecCapacity ?? 2 * 1024 ** 3 });
        opened.push(() => store!.close());
        if (remoteEmbeddings) {
          const index = EtcdEncoderCacheIndex.forEngine(engine);
          if (role === 'encode') {
            ecHost = await EncoderCacheHost.serve(engine, store, { directory: index });
            opened.push(() => ecHost!.close());
          } else {
            ecRemote = new EncoderCacheRemote(engine, index);
          }
        }
      }
      let cache: SimKvCache | undefined;
      if (role !== 'encode') {
        const geometry = kvGeometry(profile, options.kvMemory ?? 512 << 20);
        cache = role === 'decode' ? SimKvCache.host(engine, geometry) : SimKvCache.device(engine, geometry);
        opened.push(() => cache!.close());
      }
      const traces = role === 'prefill' ? new RequestTraces() : undefined;
      const sender = role === 'prefill' ? new LayerwiseSender(engine, cache!.layout, { trace: traces, ackTimeoutMs: 10_000 }) : undefined;
      if (sender) opened.push(() => sender.close());
      const receiver = role === 'decode' ? new LayerwiseReceiver(engine, cache!.layout, { quiesceMs: options.kvQuiesceMs }) : undefined;
      if (receiver) opened.push(() => receiver.close());
      const runner = new ModelRunner(engine, profile, cache, {
        maxBatchedTokens: options.maxBatchedTokens,
        hooks: sender && {
          beginStep: (jobs) => sender.step(jobs.map((j) => ({ requestId: j.requestId, computedTokens: j.tokens }))),
          layerReady: (layer, ready) => sender.layerReady(layer, ready),
        },
      });
      opened.push(() => runner.close());
      let arena = Buffer.alloc(0);
      const ctx: RoleContext = {
        role,
        profile,
        model: options.servedModelName ?? profile.id,
        engine,
        runner,
        cache,
        store,
        ecScheduler: role === 'prefill' || role === 'pd' ? new ECConnector({ role: 'scheduler', store: store!, transferRole: 'consumer', remote: ecRemote }) : undefined,
        ecWorker: store && new ECConnector({ role: 'worker', store, transferRole: role === 'encode' ? 'producer' : 'consumer', remote: ecRemote, host: ecHost }),
        sender,
        traces,
        receiver,
        settings: {
          kvTimeoutMs: options.kvTimeoutMs ?? 120_000,
          blockWaitMs: options.blockWaitMs ?? 30_000,
          proxySecret: options.proxySecret ?? (process.env.EPD_PROXY_SECRET || undefined),
          corruptKv: new Set(options.corruptKv ?? []),
        },
        ec: emptyEc(),
        kv: emptyKv(),
        encoding: new Map(),
        ecTurn: Promise.resolve(),
        pending: new Set(),
        embeddingArena: (bytes) => {
          if (arena.length < bytes) arena = Buffer.alloc(bytes);
          return arena;
        },
      };
      const worker = new SimWorker(role, profile, ctx, log);
      await new Promise<void>((resolve, reject) => {
        worker.server.once('error', reject);
        worker.server.listen(port, host, () => {
          worker.server.off('error', reject);
          resolve();
        });
      });
      opened.push(() => new Promise<void>((resolve) => worker.server.close(() => resolve())));
      const { port: bound } = worker.server.address() as AddressInfo;
      worker.baseUrl = `http://${host.includes(':') ? `[${host}]` : host}:${bound}`;
      worker.ecHost = ecHost;
      if (options.register) {
        // Under the engine's lease: the registration dies with the engine (or the process).
        const session = (engine.metadata as EtcdMetadataStore).session;
        worker.registration = await registerInstance(options.metadata!, { role, url: worker.baseUrl, model: ctx.model, engine: engine.name }, { session });
      }
      worker.state = 'serving';
      return worker;
    } catch (err) {
      await undo();
      throw err;
    }
  }

  /** `http://host:port` of the worker. */
  get url(): string {
    return this.baseUrl;
  }

  /** Decode: the transfer engine's control address prefill connects to. */
  get engineAddress(): string | undefined {
    return this.ctx.engine.address;
  }

  /** The transfer engine's name. */
  get engineName(): string {
    return this.ctx.engine.name;
  }

  /** Counters; with `drain`, also the per-request records since the last drain. */
  stats(drain = false): WorkerStats {
    const { ctx } = this;
    const busy = ctx.runner.busyUs;
    const stats: WorkerStats = {
      simulation: simulationLabel(this.role, this.profile),
      role: this.role,
      model: ctx.model,
      pid: process.pid,
      requests: { ...this.counts, active: this.scopes.size },
      ec: { ...ctx.ec },
      kv: { ...ctx.kv },
      device: {
        busyMs: { prefill: busy.prefill / 1000, decode: busy.decode / 1000, encode: busy.encode / 1000 },
        steps: { ...ctx.runner.steps },
        queued: ctx.runner.queued,
        decoding: ctx.runner.decoding,
      },
      cache: ctx.cache
        ? { blocks: ctx.cache.geometry.numBlocks, free: ctx.cache.blocks.free, waiting: ctx.cache.blocks.waiting, bytes: ctx.cache.bytes }
        : { blocks: 0, free: 0, waiting: 0, bytes: 0 },
      recordsDropped: this.records.droppedRecords,
    };
    if (drain) stats.records = this.records.drain();
    return stats;
  }

  /**
   * Stops accepting requests, gives those in flight `graceMs` (default 5 s) to
   * finish, cancels the rest, then closes the sender/receiver, cache, store and
   * engine (their shared memory is removed). Idempotent.
   */
  close(graceMs = 5_000): Promise<void> {
    this.closing ??= (async () => {
      this.state = 'closing';
      // Leave the registry first: proxies stop routing here while in-flight requests finish.
      await this.registration?.close().catch(() => {});
      const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
      this.server.closeIdleConnections();
      const started = Date.now();
      while (this.scopes.size > 0 && Date.now() - started < graceMs) await new Promise((r) => setTimeout(r, 20));
      for (const scope of this.scopes) scope.abort(new TransferError('the worker is shutting down', 'ERR_CLOSED'));
      // Let handlers see the abort and answer before the sockets go.
      const deadline = Date.now() + 2_000;
      while (this.scopes.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      this.server.closeAllConnections();
      await closed;
      const { ctx } = this;
      ctx.receiver?.close();
      await ctx.sender?.close();
      await Promise.allSettled([...ctx.pending]);
      await ctx.runner.close();
      await ctx.cache?.close();
      await this.ecHost?.close();
      await ctx.store?.close();
      await ctx.engine.close();
      this.log(`${this.role} worker stopped`);
    })();
    return this.closing;
  }

  // ---------------------------------------------------------------- HTTP

  private route(req: IncomingMessage, res: ServerResponse): void {
    const q = req.url?.indexOf('?') ?? -1;
    const path = q < 0 ? (req.url ?? '/') : req.url!.slice(0, q);
    const query = q < 0 ? '' : req.url!.slice(q + 1);
    const method = req.method ?? 'GET';
    if (path === '/health' && method === 'GET') {
      if (this.state === 'serving') sendJson(res, 200, { status: 'ok', role: this.role, model: this.ctx.model, simulated: true });
      else sendJson(res, 503, { error: { message: `the worker is ${this.state}`, type: 'service_unavailable', code: 'ERR_CLOSED' } });
      return;
    }
    if (path === '/v1/models' && method === 'GET') {
      sendJson(res, 200, {
        object: 'list',
        data: [{ id: this.ctx.model, object: 'model', created: 0, owned_by: 'epd-transfer-simulation', root: this.profile.id, max_model_len: this.maxModelLen() }],
      });
      return;
    }
    if (path === '/sim/stats' && method === 'GET') {
      sendJson(res, 200, this.stats(/(^|&)records=1(&|$)/.test(query)));
      return;
    }
    const endpoint: SimEndpoint | undefined = path === '/v1/chat/completions' ? 'chat' : path === '/v1/completions' ? 'completions' : undefined;
    if (endpoint && method === 'POST') {
      void this.generation(endpoint, req, res);
      return;
    }
    const known = ['/health', '/v1/models', '/sim/stats', '/v1/chat/completions', '/v1/completions'].includes(path);
    sendJson(res, known ? 405 : 404, { error: { message: known ? `${method} is not allowed on ${path}` : `no route ${path}`, type: 'invalid_request_error', code: 'ERR_NO_HANDLER' } });
  }

  private maxModelLen(): number {
    const c = this.ctx.cache;
    return c ? c.geometry.numBlocks * c.geometry.blockSize : 0;
  }

  private async generation(endpoint: SimEndpoint, req: IncomingMessage, res: ServerResponse): Promise<void> {
    const header = req.headers['x-request-id'];
    const requestId = typeof header === 'string' && REQUEST_ID.test(header) ? header : `sim-${randomUUID()}`;
    const record: SimRequestRecord = { id: requestId, role: this.role, start: performance.timeOrigin + performance.now(), end: 0, ok: false };
    if (this.state !== 'serving') {
      // Refused without starting: the proxy may send it elsewhere.
      sendError(res, new HttpError(`the worker is ${this.state}`, 'ERR_CLOSED', 503, 'service_unavailable'));
      return;
    }
    const scope = new AbortController();
    this.scopes.add(scope);
    this.counts.total++;
    res.on('close', () => {
      if (!res.writableFinished) scope.abort(new TransferError('the client went away', 'ERR_ABORTED'));
    });
    try {
      let body: unknown;
      try {
        body = JSON.parse((await readBody(req, BODY_LIMIT)).toString('utf8'));
      } catch (err) {
        throw err instanceof HttpError ? err : new HttpError('the request body is not JSON', 'ERR_BAD_ARGUMENT', 400);
      }
      const prompt = parsePrompt(endpoint, body, this.profile);
      record.tokens = prompt.tokens;
      if (this.role !== 'encode' && prompt.tokens > this.maxModelLen()) {
        throw new HttpError(`the prompt has ${prompt.tokens} tokens; this instance's KV cache holds ${this.maxModelLen()}`, 'ERR_CAPACITY', 400);
      }
      const call: Call = { requestId, prompt, res, signal: scope.signal, record };
      if (this.role === 'encode') await serveEncode(this.ctx, call);
      else if (this.role === 'prefill') await servePrefill(this.ctx, call);
      else if (this.role === 'decode') await serveDecode(this.ctx, call);
      else await servePd(this.ctx, call);
      record.ok = true;
      this.counts.ok++;
    } catch (err) {
      this.counts.failed++;
      const { body } = errorBody(err);
      record.error = { code: body.error.code, message: body.error.message };
      if (!scope.signal.aborted) this.log(`${this.role} request ${requestId} failed: ${body.error.code}: ${body.error.message}`);
      sendError(res, err);
    } finally {
      record.end = performance.timeOrigin + performance.now();
      this.records.push(record);
      this.scopes.delete(scope);
    }
  }
}
