/**
 * bench proxy: what the EPD proxy adds to a request. Two processes answer
 * instantly — a worker, and the proxy in front of it — and a third (this one)
 * sends the same open-loop load (a fixed rate, not "as fast as possible") straight
 * to the worker and through the proxy, alternating every 250 ms, so both see the
 * same machine while each gets exactly the offered rate. The figures are the differences of
 * the latency percentiles (the load generator's own cost cancels out), and the
 * proxy's capacity measured closed-loop next to the worker's.
 *
 *   epd-transfer bench proxy [--rate 500] [--duration 3s] [--runs 3] [--stream] [--concurrency 32] [--json]
 *
 * The request is a small text chat completion on the PD path (client → proxy → PD
 * worker): the hop every request pays. The decode-first path adds one metaserver
 * call and one prefill call on top, which depend on the workers, not the proxy.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { Pool } from 'undici';
import { TransferError } from '../lib/errors.js';
import { environment, printTable, round, spread } from './common.js';

export interface ProxyBenchOptions {
  /** Requests per second offered to each target. */
  rate: number;
  /** Length of one measured phase (ms). */
  durationMs: number;
  /** Measured runs; each has one phase per target. The median over runs is reported. */
  runs: number;
  /** Ask for SSE streams instead of JSON answers. */
  stream: boolean;
  /** Requests in flight in the closed-loop capacity phase. */
  concurrency: number;
}

export interface LatencyFigures {
  p50Ms: number;
  p99Ms: number;
  requests: number;
}

export interface ProxyBenchResult {
  bench: 'proxy';
  rate: number;
  stream: boolean;
  durationMs: number;
  runs: number;
  /** Straight to the worker (the reference), median over runs. */
  direct: LatencyFigures;
  /** Through the proxy, median over runs. */
  proxied: LatencyFigures;
  /** Median over runs of (proxied − direct) p50 and p99. */
  addedP50Ms: number;
  addedP99Ms: number;
  /** Spread of the per-run added p99. */
  addedP99MinMs: number;
  addedP99MaxMs: number;
  /** Rate actually sent through the proxy in the open-loop phases. */
  achievedRate: number;
  /** Closed-loop capacity through the proxy (requests/s with `concurrency` in flight). */
  requestsPerSec: number;
  /** The same, straight to the worker. */
  directRequestsPerSec: number;
  concurrency: number;
  errors: number;
  environment: Record<string, unknown>;
}

const CHILD_FLAG = '--bench-proxy-child';

const BODY = (stream: boolean) => JSON.stringify({ model: 'bench', messages: [{ role: 'user', content: 'Say hello in one word.' }], max_tokens: 8, stream });

/** Nearest-rank percentile of sorted values. */
function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))];
}

function startChild(role: 'worker' | 'proxy', arg: string): Promise<{ child: ChildProcess; url: string }> {
  const child = fork(fileURLToPath(import.meta.url), [CHILD_FLAG, role, arg], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  return new Promise((resolve, reject) => {
    child.once('exit', (code) => reject(new TransferError(`bench ${role} exited early (${code})`, 'ERR_SYSTEM')));
    child.once('message', (m: { url: string }) => resolve({ child, url: m.url }));
  });
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  await exited;
}

class Target {
  readonly pool: Pool;
  errors = 0;

  constructor(
    readonly url: string,
    private readonly body: string,
  ) {
    this.pool = new Pool(url, { connections: 256, keepAliveTimeout: 30_000 });
  }

  /** One request; resolves with its latency in ms (NaN on failure). */
  async once(): Promise<number> {
    const t0 = performance.now();
    try {
      const res = await this.pool.request({ path: '/v1/chat/completions', method: 'POST', headers: { 'content-type': 'application/json' }, body: this.body });
      await res.body.arrayBuffer();
      if (res.statusCode !== 200) throw new Error(`status ${res.statusCode}`);
      return performance.now() - t0;
    } catch {
      this.errors++;
      return NaN;
    }
  }

  /** Closed loop: `concurrency` requests always in flight for `durationMs`; resolves with requests/s. */
  async closedLoop(concurrency: number, durationMs: number): Promise<number> {
    const end = performance.now() + durationMs;
    let done = 0;
    const start = performance.now();
    await Promise.all(
      Array.from({ length: concurrency }, async () => {
        while (performance.now() < end) {
          if (!Number.isNaN(await this.once())) done++;
        }
      }),
    );
    return done / ((performance.now() - start) / 1000);
  }

  close(): Promise<void> {
    return this.pool.close();
  }
}

/** Open loop: `rate` requests/s for `durationMs` to one target, each sent at its scheduled time whatever the others do. */
async function openLoop(target: Target, rate: number, durationMs: number, latencies: number[]): Promise<{ sent: number; seconds: number }> {
  const period = 1000 / rate;
  const total = Math.max(1, Math.round((durationMs / 1000) * rate));
  const pending: Promise<void>[] = [];
  const start = performance.now();
  let sent = 0;
  while (sent < total) {
    const now = performance.now();
    // Send everything that is due (the timer may fire late), then sleep until the next one.
    while (sent < total && start + sent * period <= now) {
      pending.push(target.once().then((ms) => void (Number.isNaN(ms) || latencies.push(ms))));
      sent++;
    }
    if (sent < total) await sleep(Math.max(0, start + sent * period - performance.now()));
  }
  const seconds = (performance.now() - start) / 1000;
  await Promise.all(pending);
  return { sent, seconds };
}

/** Length of one slice of the alternation between the targets (ms). */
const SLICE_MS = 250;

/**
 * One measured run: `durationMs` of load per target, sent in alternating slices
 * of SLICE_MS (direct, proxied, direct, …), so that a busy moment of the machine —
 * a GC, another process — falls on both sides alike while each side still gets
 * exactly `rate` requests/s.
 */
async function alternate(targets: Target[], rate: number, durationMs: number): Promise<Array<{ latencies: number[]; rate: number }>> {
  const out = targets.map(() => ({ latencies: [] as number[], sent: 0, seconds: 0 }));
  for (let done = 0; done < durationMs; done += SLICE_MS) {
    const slice = Math.min(SLICE_MS, durationMs - done);
    for (const [i, t] of targets.entries()) {
      const r = await openLoop(t, rate, slice, out[i].latencies);
      out[i].sent += r.sent;
      out[i].seconds += r.seconds;
    }
  }
  return out.map((o) => ({ latencies: o.latencies.sort((a, b) => a - b), rate: o.sent / o.seconds }));
}

export async function runProxyBench(options: ProxyBenchOptions): Promise<ProxyBenchResult> {
  const worker = await startChild('worker', '');
  let proxy: { child: ChildProcess; url: string } | undefined;
  const targets: Target[] = [];
  try {
    proxy = await startChild('proxy', worker.url);
    const direct = new Target(worker.url, BODY(options.stream));
    const proxied = new Target(proxy.url, BODY(options.stream));
    targets.push(direct, proxied);

    // Warm up both paths at the measured rate until connections are open and the JIT has
    // settled: the figure is the proxy's steady state, not its first second.
    await alternate([direct, proxied], options.rate, Math.min(2000, 2 * options.durationMs));
    direct.errors = 0;
    proxied.errors = 0;

    const runs: Array<{ direct: LatencyFigures; proxied: LatencyFigures; rate: number }> = [];
    for (let r = 0; r < options.runs; r++) {
      // Alternate which target leads.
      const order = r % 2 === 0 ? [direct, proxied] : [proxied, direct];
      const results = await alternate(order, options.rate, options.durationMs);
      const of = (t: Target) => results[order.indexOf(t)];
      const figures = (t: Target): LatencyFigures => {
        const l = of(t).latencies;
        return { p50Ms: percentile(l, 50), p99Ms: percentile(l, 99), requests: l.length };
      };
      runs.push({ direct: figures(direct), proxied: figures(proxied), rate: of(proxied).rate });
    }

    const directRps = await direct.closedLoop(options.concurrency, options.durationMs);
    const proxiedRps = await proxied.closedLoop(options.concurrency, options.durationMs);

    const med = (f: (x: (typeof runs)[number]) => number) => spread(runs.map(f)).median;
    const addedP99 = spread(runs.map((x) => x.proxied.p99Ms - x.direct.p99Ms));
    return {
      bench: 'proxy',
      rate: options.rate,
      stream: options.stream,
      durationMs: options.durationMs,
      runs: options.runs,
      direct: { p50Ms: round(med((x) => x.direct.p50Ms), 3), p99Ms: round(med((x) => x.direct.p99Ms), 3), requests: med((x) => x.direct.requests) },
      proxied: { p50Ms: round(med((x) => x.proxied.p50Ms), 3), p99Ms: round(med((x) => x.proxied.p99Ms), 3), requests: med((x) => x.proxied.requests) },
      addedP50Ms: round(med((x) => x.proxied.p50Ms - x.direct.p50Ms), 3),
      addedP99Ms: round(addedP99.median, 3),
      addedP99MinMs: round(addedP99.min, 3),
      addedP99MaxMs: round(addedP99.max, 3),
      achievedRate: round(med((x) => x.rate), 1),
      requestsPerSec: Math.round(proxiedRps),
      directRequestsPerSec: Math.round(directRps),
      concurrency: options.concurrency,
      errors: direct.errors + proxied.errors,
      environment: environment(),
    };
  } finally {
    await Promise.all(targets.map((t) => t.close()));
    if (proxy) await stopChild(proxy.child);
    await stopChild(worker.child);
  }
}

export function printProxyResult(r: ProxyBenchResult): void {
  printTable(`bench proxy: ${r.rate} req/s open loop, direct and proxied alternating every ${SLICE_MS} ms, ${r.runs} runs x ${r.durationMs} ms, ${r.stream ? 'SSE stream' : 'JSON'} answers (median over runs)`, [
    ['straight to worker p50 / p99', `${r.direct.p50Ms} / ${r.direct.p99Ms} ms`],
    ['through the proxy  p50 / p99', `${r.proxied.p50Ms} / ${r.proxied.p99Ms} ms`],
    ['added p50', `${r.addedP50Ms} ms`],
    ['added p99', `${r.addedP99Ms} ms (runs: ${r.addedP99MinMs} .. ${r.addedP99MaxMs})`],
    ['achieved rate', `${r.achievedRate} req/s`],
    [`capacity (${r.concurrency} in flight)`, `${r.requestsPerSec} req/s through the proxy, ${r.directRequestsPerSec} req/s straight`],
    ['errors', r.errors],
    ['machine', `${r.environment.cpus} x ${r.environment.cpuModel}, node ${r.environment.node}, commit ${r.environment.commit}`],
  ]);
}

// ------------------------------------------------------------------ child processes

/** A worker that answers every generation request at once (PD role). */
async function instantWorker(): Promise<string> {
  const json = Buffer.from(
    JSON.stringify({
      id: 'chatcmpl-bench',
      object: 'chat.completion',
      created: 0,
      model: 'bench',
      choices: [{ index: 0, message: { role: 'assistant', content: 'Hello' }, finish_reason: 'stop' }],
      usage: { prompt_tokens: 12, completion_tokens: 1, total_tokens: 13 },
    }),
  );
  const chunk = (delta: object, finish: string | null) =>
    `data: ${JSON.stringify({ id: 'chatcmpl-bench', object: 'chat.completion.chunk', created: 0, model: 'bench', choices: [{ index: 0, delta, finish_reason: finish }] })}\n\n`;
  const sse = Buffer.from(chunk({ role: 'assistant', content: 'Hello' }, null) + chunk({}, 'stop') + 'data: [DONE]\n\n');
  const server = createServer({ keepAliveTimeout: 60_000 }, (req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      if (req.method === 'GET') {
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': 2 });
        res.end('{}');
        return;
      }
      const stream = (JSON.parse(Buffer.concat(chunks).toString('utf8')) as { stream?: boolean }).stream === true;
      if (stream) {
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        res.end(sse);
      } else {
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': json.length });
        res.end(json);
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

async function proxyChild(workerUrl: string): Promise<string> {
  const { EpdProxy } = await import('../lib/proxy/index.js');
  const proxy = await EpdProxy.start({ port: 0, instances: { pd: [workerUrl] } });
  process.once('SIGTERM', () => void proxy.close().then(() => process.exit(0)));
  return proxy.url;
}

if (process.argv[2] === CHILD_FLAG) {
  const role = process.argv[3];
  const url = role === 'worker' ? await instantWorker() : await proxyChild(process.argv[4]);
  if (role === 'worker') process.once('SIGTERM', () => process.exit(0));
  process.send?.({ url });
  process.on('disconnect', () => process.exit(0));
}
