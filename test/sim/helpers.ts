/**
 * Helpers of the simulated-worker tests: workers as real child processes
 * (`epd-transfer worker`, built into dist/), a stand-in for the proxy's
 * /v1/metaserver that runs the prefill hop the way the proxy does, SSE parsing,
 * and a store name per test file.
 */
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { afterAll } from 'vitest';
import { Supervisor, type Child } from '../../lib/demo/processes.js';
import type { WorkerStats } from '../../lib/sim/stats.js';
import { root } from '../helpers.js';

const supervisor = new Supervisor();
afterAll(async () => {
  await supervisor.stopAll(1_000);
});

let stores = 0;
/** A fresh encoder-cache store name for this test process. */
export function storeName(): string {
  return `t-sim-${process.pid}-${stores++}`;
}

/** A worker process. */
export interface WorkerProcess {
  url: string;
  pid: number;
  child: Child;
  stats(records?: boolean): Promise<WorkerStats>;
}

/** Starts `epd-transfer worker --role <role> …` as a child process with an IPC channel. */
export async function startWorker(role: string, args: string[] = [], env: Record<string, string> = {}): Promise<WorkerProcess> {
  const child = await supervisor.start({
    name: role,
    module: path.join(root, 'bin', 'epd-transfer.js'),
    args: ['worker', '--role', role, '--kv-memory', '128MiB', '--ec-capacity', '256MiB', ...args],
    env,
    readyTimeoutMs: 60_000,
  });
  return {
    url: child.ready.url,
    pid: child.ready.pid,
    child,
    async stats(records = false) {
      return (await (await fetch(`${child.ready.url}/sim/stats${records ? '?records=1' : ''}`)).json()) as WorkerStats;
    },
  };
}

/** One call the stand-in metaserver received. */
export interface MetaserverCall {
  body: Record<string, unknown>;
  raw: string;
  headers: IncomingHttpHeaders;
}

/** A stand-in for the proxy's POST /v1/metaserver. */
export interface Metaserver {
  url: string;
  calls: MetaserverCall[];
  close(): Promise<void>;
}

/**
 * Serves /v1/metaserver with `answer(call)`: the status and JSON body to send
 * back (or a promise that never settles, to play a metaserver that hangs).
 */
export async function startMetaserver(answer: (call: MetaserverCall) => Promise<{ status: number; body: unknown }>): Promise<Metaserver> {
  const calls: MetaserverCall[] = [];
  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const raw = Buffer.concat(chunks).toString('utf8');
      const call = { body: JSON.parse(raw) as Record<string, unknown>, raw, headers: req.headers };
      calls.push(call);
      answer(call).then(
        ({ status, body }) => {
          if (res.destroyed) return;
          res.writeHead(status, { 'content-type': 'application/json' });
          res.end(JSON.stringify(body));
        },
        (err: Error) => {
          if (res.destroyed) return;
          res.writeHead(502, { 'content-type': 'application/json' });
          res.end(JSON.stringify({ error: { message: err.message } }));
        },
      );
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1/metaserver`,
    calls,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/** The body the proxy sends P: the client's request as a one-token prefill carrying D's parameters. */
export function prefillBody(client: Record<string, unknown>, decodeParams: Record<string, unknown>): Record<string, unknown> {
  const body: Record<string, unknown> = { ...client, kv_transfer_params: { ...decodeParams, do_remote_decode: true, do_remote_prefill: false }, stream: false, max_tokens: 1, min_tokens: 1 };
  delete body.stream_options;
  return body;
}

/** A metaserver answer that runs the prefill on `prefillUrl`, as the proxy does. */
export function runPrefillOn(prefillUrl: string, client: () => Record<string, unknown>, path = '/v1/chat/completions') {
  return async (call: MetaserverCall) => {
    const res = await fetch(`${prefillUrl}${path}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-request-id': String(call.body.request_id) },
      body: JSON.stringify(prefillBody(client(), call.body)),
    });
    const text = await res.text();
    if (!res.ok) return { status: 502, body: { error: { message: `prefill answered ${res.status}: ${text}` } } };
    return { status: 200, body: { status: 'ok', request_id: call.body.request_id, prefill: prefillUrl } };
  };
}

/** The `data:` events of an SSE body, parsed (the final `[DONE]` as the string). */
export function sseEvents(text: string): unknown[] {
  return text
    .split('\n\n')
    .map((e) => e.trim())
    .filter((e) => e.startsWith('data: '))
    .map((e) => {
      const data = e.slice('data: '.length);
      return data === '[DONE]' ? data : JSON.parse(data);
    });
}

/** POSTs JSON and returns status, headers and body text. */
export async function post(url: string, body: unknown, headers: Record<string, string> = {}, signal?: AbortSignal) {
  const res = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: typeof body === 'string' ? body : JSON.stringify(body), signal });
  return { status: res.status, headers: res.headers, text: await res.text() };
}
