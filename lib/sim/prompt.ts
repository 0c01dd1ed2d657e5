/**
 * What a simulated worker reads from an OpenAI request: the prompt's length in
 * tokens (no tokenizer: about four UTF-8 bytes per token, the proxy's estimate),
 * its images (size from the image header, embedding from the model profile, key =
 * the part's `uuid` as vLLM uses it, else the content hash of lib/ec), and the
 * generation settings. Every role derives the same numbers from the same body, so
 * decode allocates exactly the blocks prefill fills.
 */
import { mmHash } from '../ec/hash.js';
import { imageSize, inspectDataUrl, textTokens } from '../proxy/estimate.js';
import { badRequest } from './http.js';
import { imageEmbedding, type ImageEmbedding, type ModelProfile } from './profiles.js';

/** The OpenAI endpoint of a request. */
export type SimEndpoint = 'chat' | 'completions';

/** One image of a prompt. */
export interface SimImage {
  /** Position among the prompt's images. */
  index: number;
  /** The embedding's cache key (vLLM's mm_hash). */
  mmHash: string;
  width: number;
  height: number;
  embedding: ImageEmbedding;
}

/** A parsed request. */
export interface SimPrompt {
  endpoint: SimEndpoint;
  /** Prompt tokens, image tokens included. */
  tokens: number;
  images: SimImage[];
  /** Tokens to generate. */
  maxTokens: number;
  stream: boolean;
  /** `stream_options.include_usage`. */
  includeUsage: boolean;
  /** The `model` field as sent (echoed in answers). */
  model: string | undefined;
  /** The request's `kv_transfer_params`, if any. */
  kvTransferParams: Record<string, unknown> | undefined;
}

/** Tokens generated when a request sets no limit. */
export const DEFAULT_MAX_TOKENS = 64;
/** Largest generation the simulation accepts. */
export const MAX_GENERATED_TOKENS = 8192;

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function count(body: Record<string, unknown>, name: string): number | undefined {
  const v = body[name];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1 || v > MAX_GENERATED_TOKENS) {
    throw badRequest(`'${name}' must be an integer from 1 to ${MAX_GENERATED_TOKENS}`);
  }
  return v;
}

/** Parses an OpenAI chat or completions body for `profile`. Throws an HttpError (400) for what it cannot simulate. */
export function parsePrompt(endpoint: SimEndpoint, value: unknown, profile: ModelProfile): SimPrompt {
  if (!isObject(value)) throw badRequest('the request body must be a JSON object');
  const body = value;
  if (body.stream !== undefined && body.stream !== null && typeof body.stream !== 'boolean') throw badRequest("'stream' must be a boolean");
  if (body.model !== undefined && typeof body.model !== 'string') throw badRequest("'model' must be a string");
  if (body.n !== undefined && body.n !== null && body.n !== 1) throw badRequest("the simulation generates one choice: 'n' must be 1");
  const kv = body.kv_transfer_params;
  if (kv !== undefined && kv !== null && !isObject(kv)) throw badRequest("'kv_transfer_params' must be an object");
  const prompt: SimPrompt = {
    endpoint,
    tokens: 0,
    images: [],
    maxTokens: count(body, 'max_completion_tokens') ?? count(body, 'max_tokens') ?? DEFAULT_MAX_TOKENS,
    stream: body.stream === true,
    includeUsage: isObject(body.stream_options) && body.stream_options.include_usage === true,
    model: body.model as string | undefined,
    kvTransferParams: isObject(kv) ? kv : undefined,
  };
  if (endpoint === 'chat') parseChat(prompt, body, profile);
  else parseCompletion(prompt, body);
  if (prompt.tokens < 1) throw badRequest('the prompt is empty');
  return prompt;
}

function parseChat(prompt: SimPrompt, body: Record<string, unknown>, profile: ModelProfile): void {
  const messages = body.messages;
  if (!Array.isArray(messages) || messages.length === 0) throw badRequest("'messages' must be a non-empty array");
  messages.forEach((message, m) => {
    if (!isObject(message) || typeof message.role !== 'string') throw badRequest(`messages[${m}] must be an object with a string 'role'`);
    prompt.tokens += 4; // role and separators, as the proxy counts them
    const content = message.content;
    if (typeof content === 'string') {
      prompt.tokens += textTokens(content);
      return;
    }
    if (content === undefined || content === null) return;
    if (!Array.isArray(content)) throw badRequest(`messages[${m}].content must be a string or an array of parts`);
    content.forEach((part, p) => {
      const where = `messages[${m}].content[${p}]`;
      if (!isObject(part) || typeof part.type !== 'string') throw badRequest(`${where} must be an object with a string 'type'`);
      if (part.type === 'text') {
        if (typeof part.text !== 'string') throw badRequest(`${where}.text must be a string`);
        prompt.tokens += textTokens(part.text);
      } else if (part.type === 'image_url') {
        const image = parseImage(part, where, prompt.images.length, body, profile);
        prompt.tokens += image.embedding.tokens;
        prompt.images.push(image);
      } else {
        throw badRequest(`${where}: the simulation takes text and image_url parts, not '${part.type}'`);
      }
    });
  });
}

function parseImage(part: Record<string, unknown>, where: string, index: number, body: Record<string, unknown>, profile: ModelProfile): SimImage {
  if (!profile.vision) throw badRequest(`model profile '${profile.id}' has no vision encoder; send text only or use a vision profile (qwen2.5-vl-7b)`);
  const payload = part.image_url;
  const url = typeof payload === 'string' ? payload : isObject(payload) ? payload.url : undefined;
  if (typeof url !== 'string' || url.length === 0) throw badRequest(`${where}.image_url.url must be a non-empty string`);
  const data = inspectDataUrl(url);
  // No network here: only inline images can be measured.
  if (!data) throw badRequest(`${where}: the simulation reads inline images only (data:image/...;base64,...)`);
  const size = imageSize(data.head);
  if (!size) throw badRequest(`${where}: cannot read the image size (PNG, JPEG, GIF, WebP or BMP expected)`);
  let key: string;
  if (typeof part.uuid === 'string' && part.uuid.length > 0) {
    key = part.uuid;
  } else {
    const options = isObject(body.mm_processor_kwargs) ? (body.mm_processor_kwargs as Parameters<typeof mmHash>[0]['processorOptions']) : {};
    const bytes = Buffer.from(url.slice(url.indexOf(',') + 1), 'base64');
    key = mmHash({ model: typeof body.model === 'string' ? body.model : profile.id, media: bytes, modality: 'image', processorOptions: options });
  }
  return { index, mmHash: key, width: size.width, height: size.height, embedding: imageEmbedding(profile, size.width, size.height) };
}

function parseCompletion(prompt: SimPrompt, body: Record<string, unknown>): void {
  const p = body.prompt;
  if (typeof p === 'string') {
    prompt.tokens = textTokens(p);
    return;
  }
  if (Array.isArray(p) && p.length > 0 && p.every((t) => Number.isSafeInteger(t))) {
    prompt.tokens = p.length;
    return;
  }
  throw badRequest("'prompt' must be a string or an array of token ids (one prompt per request)");
}

const WORDS = [
  'the', 'cache', 'layer', 'moves', 'while', 'next', 'block', 'decode', 'streams', 'tokens', 'from', 'prefill',
  'encoder', 'embedding', 'shared', 'memory', 'one', 'sided', 'write', 'overlap', 'hides', 'transfer', 'behind', 'compute',
];

/** Text of generated token `i` (deterministic per request); the first says it is simulated. */
export function simulatedToken(requestId: string, i: number): string {
  if (i === 0) return '[simulated]';
  let h = 2166136261;
  for (let k = 0; k < requestId.length; k++) h = Math.imul(h ^ requestId.charCodeAt(k), 16777619);
  h = Math.imul(h ^ i, 16777619);
  return ` ${WORDS[(h >>> 0) % WORDS.length]}`;
}
