/**
 * The demo's load: a seeded mix of text requests, requests with a new image and
 * requests repeating an earlier image, sent through the proxy with the official
 * `openai` client (streamed, so time to first token and the gaps between tokens
 * are measured where a user would see them), a fixed number in flight.
 *
 * With several proxies the client does what an HTTP load balancer in front of
 * them does ({@link ProxyBalancer}): round robin, and a request whose connection
 * is refused (it never reached that proxy) goes to the next one, while the
 * refusing proxy is left out from then on. A request a proxy accepted is never
 * sent twice: if that proxy dies, the request fails.
 */
import OpenAI from 'openai';
import { performance } from 'node:perf_hooks';
import { Agent, fetch as undiciFetch } from 'undici';
import { pngDataUrl } from './images.js';

/** What kind of request it is. */
export type RequestKind = 'text' | 'image' | 'image-repeat';

/** One request of the load. */
export interface LoadRequest {
  index: number;
  /** Sent as X-Request-Id: every hop (and every worker record) carries it. */
  id: string;
  kind: RequestKind;
  messages: OpenAI.Chat.ChatCompletionMessageParam[];
  maxTokens: number;
  /** The image (for image kinds): size and the seed that made it. */
  image?: { width: number; height: number; seed: number };
}

/** What the client saw (times are epoch ms). */
export interface ClientResult {
  index: number;
  id: string;
  kind: RequestKind;
  start: number;
  end: number;
  ok: boolean;
  error?: string;
  /** Cut short by the demo's interruption (not counted as an error). */
  cancelled?: boolean;
  /** The proxy that accepted it (or the last one tried). */
  proxy?: string;
  /** Proxies that refused its connection before one accepted it. */
  failovers?: number;
  /** First content token. */
  firstToken?: number;
  ttftMs?: number;
  /** Gaps between consecutive content tokens (ms). */
  itlMs: number[];
  tokens: number;
}

const SENTENCES = [
  'Disaggregated serving splits a model into encoder, prefill and decode instances.',
  'The encoder turns every image into an embedding that prefill consumes.',
  'Prefill computes the key-value cache of the whole prompt, one layer after another.',
  'Each layer is pushed to decode while the next one is still being computed.',
  'Decode then generates the answer one token at a time from that cache.',
  'A repeated image should never be encoded twice: its embedding is already cached.',
  'Summarise the trade-offs of moving the cache instead of recomputing it.',
  'Explain why only the last layer of the transfer stays on the critical path.',
  'List what a proxy must track to balance load across instances.',
  'Describe what happens when a decode instance dies in the middle of a request.',
];

/** Image sizes of the load (Qwen2.5-VL: 256, 384, 768 and 972 embedding tokens). */
const IMAGE_SIZES: ReadonlyArray<[number, number]> = [
  [448, 448],
  [672, 448],
  [896, 672],
  [1008, 756],
];

/** A small seeded generator (mulberry32). */
function random(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * Kinds in every ten requests: 4 text, 3 with a new image, 3 repeating an
 * earlier image, interleaved so that any prefix of the load is a fair mix.
 */
const MIX: readonly RequestKind[] = ['image', 'text', 'image-repeat', 'text', 'image', 'text', 'image-repeat', 'image', 'text', 'image-repeat'];

/**
 * The requests of a run, in {@link MIX} proportions; the seed picks the texts,
 * image sizes, which earlier image a repeat sends, and output lengths. Without
 * `vision`, text only. The same seed gives the same requests, byte for byte.
 */
export function planLoad(count: number, options: { seed: number; vision: boolean; runId: string }): LoadRequest[] {
  const rnd = random(options.seed);
  const images: Array<{ width: number; height: number; seed: number }> = [];
  const urls = new Map<number, string>();
  const out: LoadRequest[] = [];
  for (let index = 0; index < count; index++) {
    let kind: RequestKind = options.vision ? MIX[index % MIX.length] : 'text';
    if (kind === 'image-repeat' && images.length === 0) kind = 'image';
    const sentences = 1 + Math.floor(rnd() * 6);
    const text = Array.from({ length: sentences }, () => SENTENCES[Math.floor(rnd() * SENTENCES.length)]).join(' ');
    const maxTokens = 16 + Math.floor(rnd() * 33);
    let image: LoadRequest['image'];
    if (kind === 'image') {
      const [width, height] = IMAGE_SIZES[Math.floor(rnd() * IMAGE_SIZES.length)];
      image = { width, height, seed: options.seed * 1000 + images.length + 1 };
      images.push(image);
    } else if (kind === 'image-repeat') {
      image = images[Math.floor(rnd() * images.length)];
    }
    if (!image) kind = 'text';
    const user: OpenAI.Chat.ChatCompletionMessageParam = image
      ? { role: 'user', content: [{ type: 'text', text }, { type: 'image_url', image_url: { url: urlOf(urls, image) } }] }
      : { role: 'user', content: text };
    out.push({
      index,
      id: `demo-${options.runId}-${String(index).padStart(4, '0')}`,
      kind,
      messages: [{ role: 'system', content: 'You are a helpful assistant. (Answers come from simulated workers.)' }, user],
      maxTokens,
      image,
    });
  }
  return out;
}

function urlOf(cache: Map<number, string>, image: { width: number; height: number; seed: number }): string {
  let url = cache.get(image.seed);
  if (url === undefined) cache.set(image.seed, (url = pngDataUrl(image.width, image.height, image.seed)));
  return url;
}

function epochMs(): number {
  return performance.timeOrigin + performance.now();
}

/** A proxy the load can send to. */
export interface ProxyTarget {
  name: string;
  url: string;
}

/** Errors that mean the connection was never accepted: the request did not reach that proxy. */
const NOT_CONNECTED = new Set(['ECONNREFUSED', 'EHOSTUNREACH', 'ENETUNREACH', 'UND_ERR_CONNECT_TIMEOUT']);

/** True when `err` (or one of its causes) says the connection was never established. */
export function neverConnected(err: unknown): boolean {
  for (let e = err as { code?: string; cause?: unknown } | undefined, depth = 0; e && depth < 8; e = e.cause as typeof e, depth++) {
    if (typeof e.code === 'string' && NOT_CONNECTED.has(e.code)) return true;
  }
  return false;
}

/**
 * The client side of a load balancer over the proxies: round robin over those
 * that have not refused a connection. Each request opens its own connection (no
 * keep-alive), so a refused connection is unambiguous: the proxy never saw the
 * request and it is safe to send it to the next one.
 */
export class ProxyBalancer {
  private readonly live: Array<ProxyTarget & { client: OpenAI }>;
  private readonly agent = new Agent({ pipelining: 0, connect: { timeout: 5_000 } });
  private turn = 0;
  /** Proxies left out after they refused a connection, in order. */
  readonly refused: string[] = [];

  constructor(targets: readonly ProxyTarget[], timeoutMs: number) {
    const fetch = ((url: string, init: Record<string, unknown>) => undiciFetch(url, { ...init, dispatcher: this.agent } as never)) as unknown as typeof globalThis.fetch;
    this.live = targets.map((t) => ({
      ...t,
      // No retries: an error is counted, not hidden.
      client: new OpenAI({ baseURL: `${t.url}/v1`, apiKey: 'epd-demo-simulated-workers-need-no-key', maxRetries: 0, timeout: timeoutMs, fetch }),
    }));
  }

  /** The next proxy in turn, or undefined when every one refused. */
  next(): (ProxyTarget & { client: OpenAI }) | undefined {
    if (this.live.length === 0) return undefined;
    return this.live[this.turn++ % this.live.length];
  }

  /** Leaves `name` out from now on. */
  markRefused(name: string): void {
    const i = this.live.findIndex((t) => t.name === name);
    if (i < 0) return;
    this.live.splice(i, 1);
    this.refused.push(name);
  }

  /** Closes the connections. */
  close(): Promise<void> {
    return this.agent.close();
  }
}

/** Options of {@link runLoad}. */
export interface LoadOptions {
  /** The proxies ({@link ProxyBalancer}). */
  balancer: ProxyBalancer;
  model: string;
  concurrency: number;
  /** Stops sending; requests in flight are cancelled. */
  signal: AbortSignal;
  /** Called after each request. A promise it returns holds back further sends until it settles (fault injection). */
  onResult?: (result: ClientResult) => void | Promise<void>;
}

/** Sends every request through the proxy, `concurrency` at a time; resolves with what the client saw. */
export async function runLoad(requests: readonly LoadRequest[], options: LoadOptions): Promise<ClientResult[]> {
  const results: ClientResult[] = [];
  let next = 0;
  let hold: Promise<void> | undefined;
  const lane = async () => {
    for (;;) {
      await hold;
      if (options.signal.aborted || next >= requests.length) return;
      const result = await send(requests[next++], options);
      results.push(result);
      const pending = options.onResult?.(result);
      if (pending) {
        const settled = pending.then(
          () => undefined,
          () => undefined,
        );
        hold = hold ? Promise.all([hold, settled]).then(() => undefined) : settled;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, options.concurrency) }, lane));
  return results.sort((a, b) => a.index - b.index);
}

/** Opens the request's stream on the next proxy that accepts the connection. */
async function open(request: LoadRequest, options: LoadOptions, result: ClientResult, signal: AbortSignal) {
  for (;;) {
    const target = options.balancer.next();
    if (!target) throw new Error(`no proxy accepts connections (refused: ${options.balancer.refused.join(', ')})`);
    result.proxy = target.name;
    try {
      return await target.client.chat.completions.create(
        {
          model: options.model,
          messages: request.messages,
          max_tokens: request.maxTokens,
          stream: true,
          stream_options: { include_usage: true },
        },
        { headers: { 'x-request-id': request.id }, signal },
      );
    } catch (err) {
      if (signal.aborted || !neverConnected(err)) throw err;
      // It never reached this proxy: the next one gets it, and this one no more requests.
      options.balancer.markRefused(target.name);
      result.failovers = (result.failovers ?? 0) + 1;
    }
  }
}

async function send(request: LoadRequest, options: LoadOptions): Promise<ClientResult> {
  const result: ClientResult = { index: request.index, id: request.id, kind: request.kind, start: epochMs(), end: 0, ok: false, itlMs: [], tokens: 0 };
  let last: number | undefined;
  // One controller per request: the client adds listeners to the signal it is given.
  const cancel = new AbortController();
  const onAbort = () => cancel.abort();
  options.signal.addEventListener('abort', onAbort, { once: true });
  try {
    const stream = await open(request, options, result, cancel.signal);
    for await (const chunk of stream) {
      const text = chunk.choices[0]?.delta?.content;
      if (!text) continue;
      const t = epochMs();
      if (last === undefined) {
        result.firstToken = t;
        result.ttftMs = t - result.start;
      } else {
        result.itlMs.push(t - last);
      }
      last = t;
      result.tokens++;
    }
    if (result.tokens === 0) throw new Error('the stream ended without a token');
    result.ok = true;
  } catch (err) {
    if (options.signal.aborted) {
      result.cancelled = true;
      result.error = 'cancelled: the demo was interrupted';
    } else {
      result.error = describe(err);
    }
  } finally {
    options.signal.removeEventListener('abort', onAbort);
  }
  result.end = epochMs();
  return result;
}

function describe(err: unknown): string {
  if (err instanceof OpenAI.APIError && err.status !== undefined) return `${err.status}: ${err.message}`;
  // A connection cut mid-stream says only "terminated": name the cause too.
  const parts: string[] = [];
  for (let e = err as { message?: string; code?: string; cause?: unknown } | undefined, depth = 0; e && depth < 4; e = e.cause as typeof e, depth++) {
    const text = e.message ?? String(e);
    if (!parts.includes(text)) parts.push(e.code && !text.includes(e.code) ? `${text} (${e.code})` : text);
  }
  return parts.join(': ') || String(err);
}
