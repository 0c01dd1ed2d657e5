/**
 * The cache key of an embedding. Every process that encodes or loads a media item
 * must derive the same key from the same inputs, or every lookup misses and the
 * item is quietly encoded again (the most common EPD misconfiguration). The key is
 * a SHA-256 over a versioned, length-prefixed encoding of the model id, the
 * modality, the processor options in canonical JSON (keys sorted, so their order
 * does not matter) and the media bytes; it depends on nothing else — not the
 * process, the platform or the Node version.
 */
import { createHash } from 'node:crypto';
import { badArgument, expectString } from '../validate.js';

/** A JSON value (what processor options may contain). */
export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };

/** What an item's key is computed from. */
export interface MmHashInput {
  /** The model id exactly as the serving engine is configured (a local path and a hub id differ). */
  model: string;
  /** The media item's bytes; several parts are hashed in order (e.g. video frames). */
  media: ArrayBufferView | ArrayBuffer | ReadonlyArray<ArrayBufferView | ArrayBuffer>;
  /** `image` (default), `video`, `audio`, …: the same bytes in two modalities are two items. */
  modality?: string;
  /** Processor options that change the embedding (resize bounds, fps, …). Default `{}`. */
  processorOptions?: { [key: string]: JsonValue };
  /** A LoRA adapter that changes the encoder output; the key becomes `<loraName>:<digest>`, as vLLM's `identifier`. */
  loraName?: string;
}

const DOMAIN = 'epd-transfer/mm-hash/v1';

function canonical(value: unknown, path: string): string {
  if (value === null || typeof value === 'boolean' || typeof value === 'string') return JSON.stringify(value);
  if (typeof value === 'number') {
    if (!Number.isFinite(value)) badArgument(path, 'a finite number', value);
    return JSON.stringify(value);
  }
  if (Array.isArray(value)) return `[${value.map((v, i) => canonical(v, `${path}[${i}]`)).join(',')}]`;
  if (typeof value === 'object' && Object.getPrototypeOf(value) === Object.prototype) {
    const obj = value as Record<string, unknown>;
    const keys = Object.keys(obj).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(obj[k], `${path}.${k}`)}`).join(',')}}`;
  }
  return badArgument(path, 'a JSON value (null, boolean, finite number, string, array or plain object)', value);
}

function bytesOf(value: unknown, name: string): Uint8Array {
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  return badArgument(name, 'a Buffer, TypedArray, DataView or ArrayBuffer', value);
}

/**
 * Computes the `mmHash` of one media item: 64 hex digits, or `<loraName>:<64 hex>`.
 *
 * ```ts
 * const key = mmHash({ model: 'Qwen/Qwen2.5-VL-7B-Instruct', media: jpegBytes, processorOptions: { max_pixels: 1003520 } });
 * ```
 */
export function mmHash(input: MmHashInput): string {
  if (typeof input !== 'object' || input === null) badArgument('input', 'an object { model, media, … }', input);
  const model = expectString(input.model, 'input.model');
  const modality = input.modality === undefined ? 'image' : expectString(input.modality, 'input.modality');
  const opts: unknown = input.processorOptions ?? {};
  if (typeof opts !== 'object' || opts === null || Array.isArray(opts)) badArgument('input.processorOptions', 'a plain object', opts);
  const options = canonical(opts, 'input.processorOptions');
  const parts = Array.isArray(input.media)
    ? input.media.map((m, i) => bytesOf(m, `input.media[${i}]`))
    : [bytesOf(input.media, 'input.media')];
  if (parts.length === 0) badArgument('input.media', 'at least one part', input.media);

  const h = createHash('sha256');
  const field = (bytes: Uint8Array) => {
    const len = Buffer.alloc(8);
    len.writeBigUInt64BE(BigInt(bytes.byteLength));
    h.update(len);
    h.update(bytes);
  };
  field(Buffer.from(DOMAIN));
  field(Buffer.from(model));
  field(Buffer.from(modality));
  field(Buffer.from(options));
  field(Buffer.from(String(parts.length)));
  for (const p of parts) field(p);
  const digest = h.digest('hex');
  if (input.loraName === undefined) return digest;
  return `${expectString(input.loraName, 'input.loraName')}:${digest}`;
}
