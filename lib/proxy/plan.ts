/**
 * What the proxy needs to know about a client request before routing it:
 * which endpoint, whether it streams, its media items (each one an encoder
 * sub-request), and token estimates for load accounting. Also builds the bodies
 * of every hop (encoder, decode, prefill, combined PD).
 */
import { createHash } from 'node:crypto';
import { badRequest } from './errors.js';
import { base64AudioTokens, mediaTokens, textTokens, type EstimateOptions } from './estimate.js';

/** The two generation endpoints. */
export type Endpoint = 'chat' | 'completions';

/** URL path of each endpoint (the same on the proxy and on every instance). */
export const ENDPOINT_PATHS: Record<Endpoint, string> = {
  chat: '/v1/chat/completions',
  completions: '/v1/completions',
};

/** One media item of a chat request; becomes one encoder sub-request. */
export interface MediaItem {
  /** Position among the request's media items (0-based). */
  index: number;
  modality: 'image' | 'audio' | 'video';
  /** The content part itself (the object inside `messages[m].content`); the proxy sets its `uuid`. */
  part: Record<string, unknown>;
  /** Identity of the media: the client's `uuid`, or a content hash the proxy computed. */
  key: string;
  /** Encoder tokens (estimate). */
  tokens: number;
}

/** A parsed, validated client request with its media items and load estimates. */
export interface RequestPlan {
  endpoint: Endpoint;
  /** The parsed body; media parts carry their `uuid`. Never mutated after planning. */
  body: Record<string, unknown>;
  stream: boolean;
  model: string | undefined;
  items: MediaItem[];
  /** Prompt tokens, media included (estimate). */
  promptTokens: number;
  /** Tokens the decode side will generate at most (estimate). */
  maxTokens: number;
  /** A completions request with several prompts (one PD instance can serve it; the decode-first path cannot). */
  batched: boolean;
}

/** Settings of {@link planRequest}. */
export interface PlanOptions {
  estimates: EstimateOptions;
  /** Assumed output length when the request sets no max_tokens. */
  defaultMaxTokens: number;
}

/** Media content-part types and the field that holds their payload. */
const MEDIA_PARTS: Record<string, { modality: MediaItem['modality']; field: string }> = {
  image_url: { modality: 'image', field: 'image_url' },
  audio_url: { modality: 'audio', field: 'audio_url' },
  input_audio: { modality: 'audio', field: 'input_audio' },
  video_url: { modality: 'video', field: 'video_url' },
};

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function optionalCount(body: Record<string, unknown>, name: string): number | undefined {
  const v = body[name];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw badRequest(`'${name}' must be a non-negative integer`);
  return v;
}

/** Validates what routing relies on and extracts media items. Everything else is the workers' business. */
export function planRequest(endpoint: Endpoint, value: unknown, options: PlanOptions): RequestPlan {
  if (!isObject(value)) throw badRequest('the request body must be a JSON object');
  const body = value;
  if (body.stream !== undefined && body.stream !== null && typeof body.stream !== 'boolean') throw badRequest("'stream' must be a boolean");
  if (body.model !== undefined && typeof body.model !== 'string') throw badRequest("'model' must be a string");
  const model = body.model as string | undefined;
  const maxTokens = optionalCount(body, 'max_completion_tokens') ?? optionalCount(body, 'max_tokens') ?? options.defaultMaxTokens;
  const plan: RequestPlan = {
    endpoint,
    body,
    stream: body.stream === true,
    model,
    items: [],
    promptTokens: 0,
    maxTokens,
    batched: false,
  };
  if (endpoint === 'chat') planChat(plan, options);
  else planCompletion(plan);
  return plan;
}

function planChat(plan: RequestPlan, options: PlanOptions): void {
  const messages = plan.body.messages;
  if (!Array.isArray(messages) || messages.length === 0) throw badRequest("'messages' must be a non-empty array");
  const processorKwargs = canonicalJson(plan.body.mm_processor_kwargs ?? null);
  let tokens = 0;
  messages.forEach((message, m) => {
    if (!isObject(message) || typeof message.role !== 'string') throw badRequest(`messages[${m}] must be an object with a string 'role'`);
    tokens += 4; // role and separators
    const content = message.content;
    if (typeof content === 'string') {
      tokens += textTokens(content);
      return;
    }
    if (content === undefined || content === null) return;
    if (!Array.isArray(content)) throw badRequest(`messages[${m}].content must be a string or an array of content parts`);
    content.forEach((part, p) => {
      if (!isObject(part) || typeof part.type !== 'string') throw badRequest(`messages[${m}].content[${p}] must be an object with a string 'type'`);
      if (part.type === 'text') {
        if (typeof part.text !== 'string') throw badRequest(`messages[${m}].content[${p}].text must be a string`);
        tokens += textTokens(part.text);
        return;
      }
      const media = MEDIA_PARTS[part.type];
      if (!media) return; // other part types (e.g. image_embeds) need no encoder
      const item = mediaItem(plan, part, media, `messages[${m}].content[${p}]`, processorKwargs, options);
      tokens += item.tokens;
      plan.items.push(item);
    });
  });
  plan.promptTokens = tokens;
}

function mediaItem(
  plan: RequestPlan,
  part: Record<string, unknown>,
  media: { modality: MediaItem['modality']; field: string },
  where: string,
  processorKwargs: string,
  options: PlanOptions,
): MediaItem {
  const payload = part[media.field];
  let source: string;
  let tokens: number;
  if (media.field === 'input_audio') {
    if (!isObject(payload) || typeof payload.data !== 'string') throw badRequest(`${where}.input_audio.data must be a base64 string`);
    source = `${String(payload.format ?? '')}:${payload.data}`;
    tokens = base64AudioTokens(payload.data, options.estimates);
  } else {
    // OpenAI shape is { url }; vLLM also accepts the bare string.
    const url = typeof payload === 'string' ? payload : isObject(payload) ? payload.url : undefined;
    if (typeof url !== 'string' || url.length === 0) throw badRequest(`${where}.${media.field}.url must be a non-empty string`);
    source = url;
    tokens = mediaTokens(media.modality, url, options.estimates);
  }
  if (part.uuid !== undefined && part.uuid !== null && (typeof part.uuid !== 'string' || part.uuid.length === 0 || part.uuid.length > 256)) {
    throw badRequest(`${where}.uuid must be a string of 1 to 256 characters`);
  }
  const key = typeof part.uuid === 'string' ? part.uuid : itemKey(plan.model ?? '', media.modality, processorKwargs, source);
  // vLLM uses a content part's `uuid` as the item's mm_hash, so E and P/PD key the embedding alike.
  part.uuid = key;
  return { index: plan.items.length, modality: media.modality, part, key, tokens };
}

/**
 * The identity of a media item: SHA-256 over the model, modality, processor
 * options and the media reference (the bytes themselves for a data URL).
 */
export function itemKey(model: string, modality: string, processorKwargs: string, source: string): string {
  return createHash('sha256').update(`epd-proxy/item/v1\0${model}\0${modality}\0${processorKwargs}\0`).update(source).digest('hex');
}

function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (isObject(value)) {
    return `{${Object.keys(value)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${canonicalJson(value[k])}`)
      .join(',')}}`;
  }
  return JSON.stringify(value) ?? 'null';
}

function planCompletion(plan: RequestPlan): void {
  const prompt = plan.body.prompt;
  if (typeof prompt === 'string') {
    plan.promptTokens = textTokens(prompt);
    return;
  }
  if (Array.isArray(prompt) && prompt.length > 0) {
    if (prompt.every((t) => typeof t === 'number')) {
      plan.promptTokens = prompt.length;
      return;
    }
    if (prompt.every((p) => typeof p === 'string')) {
      plan.promptTokens = prompt.reduce((n: number, p: string) => n + textTokens(p), 0);
      plan.batched = prompt.length > 1;
      return;
    }
    if (prompt.every((p) => Array.isArray(p) && p.every((t) => typeof t === 'number'))) {
      plan.promptTokens = prompt.reduce((n: number, p: number[]) => n + p.length, 0);
      plan.batched = prompt.length > 1;
      return;
    }
  }
  throw badRequest("'prompt' must be a string, an array of strings, an array of token ids or an array of token-id arrays");
}

/** The body an encoder gets for one item: that item alone, one token, not streamed. */
export function encoderBody(plan: RequestPlan, item: MediaItem): string {
  const body: Record<string, unknown> = {
    messages: [{ role: 'user', content: [item.part] }],
    max_tokens: 1,
    stream: false,
  };
  if (plan.model !== undefined) body.model = plan.model;
  // Processor options change the embedding (and its hash): the encoder must see the same ones as P/PD.
  if (plan.body.mm_processor_kwargs !== undefined) body.mm_processor_kwargs = plan.body.mm_processor_kwargs;
  return JSON.stringify(body);
}

/** The client's body with the proxy's transfer parameters in place of any the client sent. */
function withParams(plan: RequestPlan, params: Record<string, unknown> | undefined): Record<string, unknown> {
  const body = { ...plan.body };
  delete body.kv_transfer_params;
  if (params) body.kv_transfer_params = params;
  return body;
}

/** The body a combined PD instance gets. */
export function pdBody(plan: RequestPlan): string {
  return JSON.stringify(withParams(plan, undefined));
}

/** The body D gets in the decode-first flow: allocate, then call the metaserver. */
export function decodeBody(plan: RequestPlan, metaserverUrl: string): string {
  return JSON.stringify(withParams(plan, { do_remote_decode: false, do_remote_prefill: true, metaserver: metaserverUrl }));
}

/** The body P gets: the prompt as a one-token, non-streaming request carrying D's parameters. */
export function prefillBody(plan: RequestPlan, decodeParams: Record<string, unknown>): string {
  const body = withParams(plan, { ...decodeParams, do_remote_decode: true, do_remote_prefill: false });
  body.stream = false;
  delete body.stream_options;
  body.max_tokens = 1;
  body.min_tokens = 1;
  if (body.max_completion_tokens !== undefined) body.max_completion_tokens = 1;
  if (body.n !== undefined) body.n = 1; // one prefill, whatever D samples afterwards
  return JSON.stringify(body);
}
