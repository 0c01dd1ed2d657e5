/**
 * Helpers of the proxy tests: fake workers (in-process, or child processes that can
 * be killed), proxies closed after each test, the official OpenAI client pointed at
 * a proxy, and bounded polling.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import OpenAI from 'openai';
import { afterEach, expect } from 'vitest';
import { EpdProxy, type ProxyOptions } from '../../lib/proxy/index.js';
import { startFakeWorker, type FakeBehaviour, type FakeLogEntry, type FakeWorker, type FakeWorkerOptions } from '../fixtures/proxy-worker.mjs';

export type { FakeWorker, FakeLogEntry };

// The proxy needs no native addon: these helpers do not load test/helpers.ts (which does).
const WORKER_SCRIPT = fileURLToPath(new URL('../fixtures/proxy-worker.mjs', import.meta.url));

const cleanup: Array<() => Promise<void>> = [];

afterEach(async () => {
  while (cleanup.length > 0) await cleanup.pop()!().catch(() => {});
});

/** An in-process fake worker, closed after the test. */
export async function worker(options: FakeWorkerOptions = {}): Promise<FakeWorker> {
  const w = await startFakeWorker(options);
  cleanup.push(() => w.close());
  return w;
}

/** A fake worker in its own process (so a test can SIGKILL it). */
export interface ChildWorker {
  url: string;
  child: ChildProcess;
  behave(patch: Partial<FakeBehaviour>): Promise<void>;
  log(): Promise<FakeLogEntry[]>;
  kill(): Promise<void>;
}

export async function childWorker(options: FakeWorkerOptions = {}): Promise<ChildWorker> {
  const child = fork(WORKER_SCRIPT, [JSON.stringify(options)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const url = await new Promise<string>((resolve, reject) => {
    child.once('message', (m: { url: string }) => resolve(m.url));
    child.once('exit', (code) => reject(new Error(`fake worker exited early (${code})`)));
  });
  const kill = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
  };
  cleanup.push(kill);
  return {
    url,
    child,
    async behave(patch) {
      await fetch(`${url}/__fake/behave`, { method: 'POST', body: JSON.stringify(patch) });
    },
    async log() {
      return (await (await fetch(`${url}/__fake/log`)).json()) as FakeLogEntry[];
    },
    kill,
  };
}

/** A proxy on a free loopback port with fast health checks, closed after the test. */
export async function proxy(options: ProxyOptions = {}): Promise<EpdProxy> {
  const p = await EpdProxy.start({
    port: 0,
    closeGraceMs: 100,
    ...options,
    health: { intervalMs: 100, timeoutMs: 500, unhealthyAfter: 2, healthyAfter: 1, ...options.health },
  });
  cleanup.push(() => p.close());
  return p;
}

/** The official OpenAI client, talking to the proxy, with its own retries off. */
export function client(p: EpdProxy, options: { timeout?: number } = {}): OpenAI {
  return new OpenAI({ baseURL: `${p.url}/v1`, apiKey: 'test-key', maxRetries: 0, timeout: options.timeout ?? 15_000 });
}

/** Polls `check` until it returns true; fails after `timeoutMs` (a bound, not a timing assertion). */
export async function waitFor(check: () => boolean | Promise<boolean>, what: string, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

/** Every instance of the proxy is back to zero load. */
export async function expectNoLoad(p: EpdProxy): Promise<void> {
  await waitFor(() => p.instances().every((i) => i.activeRequests === 0 && i.activeTokens === 0), 'loads to be released');
  for (const i of p.instances()) expect({ url: i.url, tokens: i.activeTokens, requests: i.activeRequests }).toEqual({ url: i.url, tokens: 0, requests: 0 });
}

/** Generation requests a fake worker received (health and model calls excluded). */
export function generations(w: FakeWorker): FakeLogEntry[] {
  return w.log;
}

/** A PNG data URL whose header says `width`×`height` (the pixels are not real: only the header is read). */
export function pngDataUrl(width: number, height: number, salt = 0): string {
  const b = Buffer.alloc(64);
  Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]).copy(b, 0);
  b.writeUInt32BE(13, 8);
  b.write('IHDR', 12, 'latin1');
  b.writeUInt32BE(width, 16);
  b.writeUInt32BE(height, 20);
  b.writeUInt32BE(salt, 40);
  return `data:image/png;base64,${b.toString('base64')}`;
}

/** A chat message with text and images. */
export function imageMessage(text: string, ...urls: string[]): OpenAI.Chat.ChatCompletionMessageParam {
  return {
    role: 'user',
    content: [{ type: 'text', text }, ...urls.map((url) => ({ type: 'image_url' as const, image_url: { url } }))],
  };
}

/** Concatenated content of a streamed chat completion. */
export async function collectChat(stream: AsyncIterable<OpenAI.Chat.ChatCompletionChunk>): Promise<string> {
  let text = '';
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '';
  return text;
}

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

/** A running `epd-transfer …` command (the compiled CLI, as users run it). */
export interface CliProcess {
  child: ChildProcess;
  stdout(): string;
  stderr(): string;
  /** Resolves with the exit code (or signal) once the process is gone. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

export function cli(args: string[], env: NodeJS.ProcessEnv = {}): CliProcess {
  const child = fork(`${ROOT}bin/epd-transfer.js`, args, { cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe', 'ipc'] });
  let out = '';
  let err = '';
  child.stdout!.on('data', (d) => (out += d));
  child.stderr!.on('data', (d) => (err += d));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.once('close', (code, signal) => resolve({ code, signal }))); // 'close': after its output is read to the end
  cleanup.push(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
  });
  return { child, stdout: () => out, stderr: () => err, exited };
}
