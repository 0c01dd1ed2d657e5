/**
 * The `epd-transfer proxy …` and `epd-transfer bench proxy …` commands (lib/cli.ts
 * dispatches here).
 */
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { TransferError } from '../errors.js';
import { expectInteger } from '../validate.js';
import { signBody } from './auth.js';
import { ROLES, type Role } from './instances.js';
import { EpdProxy } from './server.js';

/** Usage text of the `proxy` command (part of `epd-transfer help`). */
export const PROXY_USAGE = `  proxy [options]                EPD load-balancing proxy (OpenAI API) in front of E/P/D instances
      --host <addr>              listen address (127.0.0.1)
      --port <n>                 port (8000)
      --encode <url>             encoder instance (repeat, or comma-separate)
      --prefill <url>            prefill instance (decode-first, with --decode)
      --decode <url>             decode instance
      --pd <url>                 combined prefill+decode instance
      --advertise <url>          base URL instances use to call the proxy back (http://host:port)
      --secret-file <path>       shared secret for /v1/metaserver and the admin API
                                 (or the EPD_PROXY_SECRET environment variable)
      --max-retries <n>          other instances tried per hop before the first byte (2)
      --metaserver-timeout <t>   D must call /v1/metaserver within this (30s)
      --prefill-timeout <t>      deadline of the prefill request (300s)
      --encode-timeout <t>       deadline of one encoder sub-request (120s)
      --response-timeout <t>     until D/PD sends response headers (600s)
      --idle-timeout <t>         longest silence inside a D/PD response (300s)
      --health-interval <t>      time between health checks (2s)
      --health-timeout <t>       deadline of one health check (1s)
      --metadata <etcd://h:p>    cluster mode: discover instances registered in etcd, share load
                                 and the metaserver with every proxy on it (or EPD_TRANSFER_METADATA)
      --proxy-id <id>            this proxy's id in the cluster (<hostname>-<pid>-<random>)
      --model <name>             cluster mode: use only instances registered with this model
      --load-sync <t>            cluster mode: longest wait before load changes are shared (50ms)
      --lease-ttl <s>            cluster mode: etcd lease TTL in seconds (10)
  proxy instances list|add|remove --proxy <url> [--role <role>] [url...]
                                 admin client: list, add, or remove (draining) instances
`;

/** Usage text of `bench proxy`. */
export const BENCH_PROXY_USAGE = `  bench proxy [options]          latency the proxy adds, next to the same load sent straight to a worker
      --rate <req/s>             open-loop request rate per phase (500)
      --duration <t>             length of one measured phase (3s)
      --runs <n>                 measured runs (direct and proxied alternating), median reported (3)
      --stream                   SSE answers instead of JSON
      --concurrency <n>          requests in flight for the capacity figure (32)
      --json                     one JSON object instead of the table
`;

/** Parses "250ms", "30s", "2m" or a plain number of milliseconds. */
export function parseDuration(value: string, name: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$/.exec(value);
  const ms = m ? Number(m[1]) * (m[2] === 's' ? 1000 : m[2] === 'm' ? 60_000 : 1) : NaN;
  if (!Number.isFinite(ms) || ms <= 0 || ms > 2 ** 31 - 1) {
    throw new TransferError(`Expected a duration like 500ms, 30s or 2m for ${name} but received ${JSON.stringify(value)}`, 'ERR_BAD_ARGUMENT');
  }
  return Math.round(ms);
}

function urls(values: string[] | undefined): string[] {
  return (values ?? []).flatMap((v) => v.split(',')).map((v) => v.trim()).filter(Boolean);
}

function readSecret(file: string | undefined): string | undefined {
  const secret = file ? readFileSync(file, 'utf8').trim() : process.env.EPD_PROXY_SECRET;
  if (secret !== undefined && secret.length < 16) {
    throw new TransferError('the shared secret must be at least 16 characters', 'ERR_BAD_ARGUMENT');
  }
  return secret || undefined;
}

function log(message: string, fields?: Record<string, unknown>): void {
  const extra = fields && Object.keys(fields).length > 0 ? ` ${JSON.stringify(fields)}` : '';
  console.error(`${new Date().toISOString()} epd-proxy ${message}${extra}`);
}

/** `epd-transfer proxy …`: runs until SIGINT/SIGTERM. */
export async function runProxyCommand(args: string[]): Promise<number> {
  if (args[0] === 'instances') return adminCommand(args.slice(1));
  const { values } = parseArgs({
    args,
    options: {
      host: { type: 'string', default: '127.0.0.1' },
      port: { type: 'string', default: '8000' },
      encode: { type: 'string', multiple: true },
      prefill: { type: 'string', multiple: true },
      decode: { type: 'string', multiple: true },
      pd: { type: 'string', multiple: true },
      advertise: { type: 'string' },
      'secret-file': { type: 'string' },
      'max-retries': { type: 'string', default: '2' },
      'metaserver-timeout': { type: 'string', default: '30s' },
      'prefill-timeout': { type: 'string', default: '300s' },
      'encode-timeout': { type: 'string', default: '120s' },
      'response-timeout': { type: 'string', default: '600s' },
      'idle-timeout': { type: 'string', default: '300s' },
      'health-interval': { type: 'string', default: '2s' },
      'health-timeout': { type: 'string', default: '1s' },
      metadata: { type: 'string' },
      'proxy-id': { type: 'string' },
      model: { type: 'string' },
      'load-sync': { type: 'string', default: '50ms' },
      'lease-ttl': { type: 'string', default: '10' },
    },
  });
  const metadata = values.metadata ?? (process.env.EPD_TRANSFER_METADATA?.startsWith('etcd://') ? process.env.EPD_TRANSFER_METADATA : undefined);
  if (metadata !== undefined && !metadata.startsWith('etcd://')) {
    throw new TransferError(`Expected an etcd URL like etcd://127.0.0.1:2379 for --metadata but received ${JSON.stringify(metadata)}`, 'ERR_BAD_ARGUMENT');
  }
  const instances = { encode: urls(values.encode), prefill: urls(values.prefill), decode: urls(values.decode), pd: urls(values.pd) };
  if (instances.prefill.length > 0 !== instances.decode.length > 0) {
    throw new TransferError('--prefill and --decode go together (decode-first needs both)', 'ERR_BAD_ARGUMENT');
  }
  if (instances.pd.length === 0 && instances.decode.length === 0 && metadata === undefined) {
    throw new TransferError('give --prefill and --decode, or --pd (or --metadata to discover instances from etcd): nothing could serve a request', 'ERR_BAD_ARGUMENT');
  }
  const secret = readSecret(values['secret-file']);
  const proxy = await EpdProxy.start({
    host: values.host,
    port: expectInteger(Number(values.port), '--port', 0, 65535),
    advertiseUrl: values.advertise,
    instances,
    secret,
    maxRetries: expectInteger(Number(values['max-retries']), '--max-retries', 0, 16),
    timeouts: {
      metaserverMs: parseDuration(values['metaserver-timeout'], '--metaserver-timeout'),
      prefillMs: parseDuration(values['prefill-timeout'], '--prefill-timeout'),
      encodeMs: parseDuration(values['encode-timeout'], '--encode-timeout'),
      responseMs: parseDuration(values['response-timeout'], '--response-timeout'),
      idleMs: parseDuration(values['idle-timeout'], '--idle-timeout'),
    },
    health: {
      intervalMs: parseDuration(values['health-interval'], '--health-interval'),
      timeoutMs: parseDuration(values['health-timeout'], '--health-timeout'),
    },
    ...(metadata
      ? {
          cluster: {
            metadata,
            id: values['proxy-id'],
            model: values.model,
            loadSyncMs: parseDuration(values['load-sync'], '--load-sync'),
            ttlSeconds: expectInteger(Number(values['lease-ttl']), '--lease-ttl', 2, 3600),
          },
        }
      : {}),
    log,
  });
  if (proxy.cluster) log(`cluster member '${proxy.cluster.id}' on ${metadata}`, { proxies: proxy.cluster.peers().size + 1 });
  log(`listening on ${proxy.url} (metaserver ${proxy.metaserverUrl})`, { secret: secret ? 'set' : 'none' });
  if (!secret && values.host !== '127.0.0.1' && values.host !== '::1' && values.host !== 'localhost') {
    log('warning: no shared secret while listening beyond loopback: anyone who reaches the port can change instances and call /v1/metaserver');
  }
  for (const i of proxy.instances()) log(`${i.role} instance ${i.url}: ${i.state}${i.lastError ? ` (${i.lastError})` : ''}`);
  await new Promise<void>((resolve) => {
    const stop = (signal: string) => {
      log(`${signal}: closing (in-flight requests get a grace period)`);
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      void proxy.close().then(resolve);
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
  return 0;
}

/** `epd-transfer proxy instances list|add|remove --proxy <url> [--role r] [url...]`. */
async function adminCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: { proxy: { type: 'string', default: 'http://127.0.0.1:8000' }, role: { type: 'string' }, 'secret-file': { type: 'string' } },
  });
  const [action, ...targets] = positionals;
  if (action !== 'list' && action !== 'add' && action !== 'remove') {
    throw new TransferError(`Expected list, add or remove after 'proxy instances' but received ${JSON.stringify(action ?? '')}`, 'ERR_BAD_ARGUMENT');
  }
  if (values.role !== undefined && !(ROLES as readonly string[]).includes(values.role)) {
    throw new TransferError(`Expected one of ${ROLES.join(', ')} for --role but received ${JSON.stringify(values.role)}`, 'ERR_BAD_ARGUMENT');
  }
  if (action !== 'list' && targets.length === 0) throw new TransferError(`'proxy instances ${action}' needs at least one instance URL`, 'ERR_BAD_ARGUMENT');
  const secret = readSecret(values['secret-file']);
  const body = action === 'list' ? '' : JSON.stringify({ role: values.role as Role | undefined, urls: targets });
  const headers: Record<string, string> = { 'content-type': 'application/json' };
  if (secret) headers['x-epd-signature'] = signBody(secret, body);
  const base = values.proxy.replace(/\/+$/, '');
  const res = await fetch(action === 'list' ? `${base}/instances` : `${base}/instances/${action}`, {
    method: action === 'list' ? 'GET' : 'POST',
    headers,
    body: action === 'list' ? undefined : body,
    signal: AbortSignal.timeout(30_000),
  });
  const answer = (await res.json().catch(() => ({}))) as { instances?: Array<Record<string, unknown>>; error?: { message?: string } };
  if (!res.ok) throw new TransferError(`the proxy answered ${res.status}: ${answer.error?.message ?? ''}`, 'ERR_REMOTE');
  for (const i of answer.instances ?? []) {
    console.log(`${String(i.role).padEnd(8)} ${String(i.url).padEnd(28)} ${String(i.state).padEnd(10)} tokens=${i.activeTokens} requests=${i.activeRequests}${i.lastError ? `  (${i.lastError})` : ''}`);
  }
  return 0;
}

/** `epd-transfer bench proxy …`. */
export async function benchProxyCommand(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      rate: { type: 'string', default: '500' },
      duration: { type: 'string', default: '3s' },
      runs: { type: 'string', default: '3' },
      stream: { type: 'boolean', default: false },
      concurrency: { type: 'string', default: '32' },
      json: { type: 'boolean', default: false },
    },
  });
  const { runProxyBench, printProxyResult } = await import('../../bench/proxy.js');
  const result = await runProxyBench({
    rate: expectInteger(Number(values.rate), '--rate', 1, 100_000),
    durationMs: parseDuration(values.duration, '--duration'),
    runs: expectInteger(Number(values.runs), '--runs', 1, 100),
    stream: values.stream,
    concurrency: expectInteger(Number(values.concurrency), '--concurrency', 1, 1024),
  });
  if (values.json) console.log(JSON.stringify(result));
  else printProxyResult(result);
  return result.errors === 0 ? 0 : 1;
}
