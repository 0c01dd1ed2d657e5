/**
 * Load estimates. The proxy balances on tokens without a tokenizer: text is about
 * four UTF-8 bytes per token; an image costs one token per `pixelsPerToken`²
 * patch of its real size, read from the image header when the image is inline;
 * audio is charged by its byte length. These are estimates for ranking instances,
 * not bills: they only need to grow with the work.
 */

/** Knobs of the estimates. */
export interface EstimateOptions {
  /** Side of the square of pixels that becomes one token (Qwen2.5-VL: 14 px patches merged 2×2 = 28). */
  pixelsPerToken: number;
  /** Tokens charged for an image whose size cannot be read (a remote URL). */
  defaultImageTokens: number;
  /** Tokens charged for a video (frames are unknown until the encoder decodes it). */
  defaultVideoTokens: number;
  /** Tokens charged for an audio clip given by URL. */
  defaultAudioTokens: number;
  /** Upper bound of any one item's estimate. */
  maxItemTokens: number;
}

/** The estimates used unless `ProxyOptions.estimates` overrides them. */
export const DEFAULT_ESTIMATES: EstimateOptions = {
  pixelsPerToken: 28,
  defaultImageTokens: 1024,
  defaultVideoTokens: 4096,
  defaultAudioTokens: 750,
  maxItemTokens: 32_768,
};

/** Tokens of a piece of text (≈ 4 UTF-8 bytes per token). */
export function textTokens(text: string): number {
  return Math.ceil(Buffer.byteLength(text) / 4);
}

/** Width and height of an image, read from its header. */
export interface ImageSize {
  width: number;
  height: number;
}

/** Header bytes enough for PNG, GIF, BMP and WebP, and for JPEG unless a large EXIF block precedes the frame header. */
const HEADER_BYTES = 64 * 1024;

/** Parses `data:<mime>;base64,<payload>`; returns the payload's decoded length and its first bytes. */
export function inspectDataUrl(url: string): { mime: string; bytes: number; head: Buffer } | undefined {
  if (!url.startsWith('data:')) return undefined;
  const comma = url.indexOf(',');
  if (comma < 0) return undefined;
  const meta = url.slice(5, comma);
  if (!/;base64$/i.test(meta)) return undefined;
  const payloadChars = url.length - comma - 1;
  const padding = url.endsWith('==') ? 2 : url.endsWith('=') ? 1 : 0;
  const bytes = Math.max(0, Math.floor((payloadChars * 3) / 4) - padding);
  // Decode only a prefix (a multiple of 4 characters): a 20 MiB image costs microseconds, not a full decode.
  const prefixChars = Math.min(payloadChars, (HEADER_BYTES / 3) * 4);
  const head = Buffer.from(url.slice(comma + 1, comma + 1 + prefixChars), 'base64');
  return { mime: meta.slice(0, -';base64'.length).toLowerCase(), bytes, head };
}

/** Reads an image's size from a PNG, JPEG, GIF, BMP or WebP header; undefined when unknown. */
export function imageSize(b: Buffer): ImageSize | undefined {
  if (b.length >= 24 && b.readUInt32BE(0) === 0x89504e47 && b.toString('latin1', 12, 16) === 'IHDR') {
    return sane(b.readUInt32BE(16), b.readUInt32BE(20));
  }
  if (b.length >= 10 && b.toString('latin1', 0, 4) === 'GIF8') return sane(b.readUInt16LE(6), b.readUInt16LE(8));
  if (b.length >= 26 && b.toString('latin1', 0, 2) === 'BM') return sane(b.readInt32LE(18), Math.abs(b.readInt32LE(22)));
  if (b.length >= 30 && b.toString('latin1', 0, 4) === 'RIFF' && b.toString('latin1', 8, 12) === 'WEBP') return webpSize(b);
  if (b.length >= 4 && b[0] === 0xff && b[1] === 0xd8) return jpegSize(b);
  return undefined;
}

function sane(width: number, height: number): ImageSize | undefined {
  return width > 0 && height > 0 && width <= 1 << 16 && height <= 1 << 16 ? { width, height } : undefined;
}

function webpSize(b: Buffer): ImageSize | undefined {
  const chunk = b.toString('latin1', 12, 16);
  if (chunk === 'VP8 ' && b.length >= 30) return sane(b.readUInt16LE(26) & 0x3fff, b.readUInt16LE(28) & 0x3fff);
  if (chunk === 'VP8L' && b.length >= 25) {
    const bits = b.readUInt32LE(21);
    return sane((bits & 0x3fff) + 1, ((bits >>> 14) & 0x3fff) + 1);
  }
  if (chunk === 'VP8X' && b.length >= 30) return sane(b.readUIntLE(24, 3) + 1, b.readUIntLE(27, 3) + 1);
  return undefined;
}

function jpegSize(b: Buffer): ImageSize | undefined {
  let i = 2;
  while (i + 9 < b.length) {
    if (b[i] !== 0xff) return undefined;
    const marker = b[i + 1];
    if (marker === 0xff) {
      i++; // fill byte
      continue;
    }
    // SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
    if (marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc) {
      return sane(b.readUInt16BE(i + 7), b.readUInt16BE(i + 5));
    }
    if (marker === 0xd8 || (marker >= 0xd0 && marker <= 0xd7) || marker === 0x01) {
      i += 2;
      continue;
    }
    i += 2 + b.readUInt16BE(i + 2);
  }
  return undefined;
}

/** Encoder tokens of an image of this size. */
export function imageTokens(size: ImageSize, options: EstimateOptions): number {
  const px = options.pixelsPerToken;
  return clamp(Math.ceil(size.width / px) * Math.ceil(size.height / px), options);
}

/** Encoder tokens of a media item, from what the request carries. */
export function mediaTokens(modality: 'image' | 'audio' | 'video', source: string, options: EstimateOptions): number {
  const data = inspectDataUrl(source);
  if (modality === 'image') {
    const size = data && imageSize(data.head);
    return size ? imageTokens(size, options) : options.defaultImageTokens;
  }
  if (modality === 'audio') {
    // ≈ 25 tokens per second of 16 kHz 16-bit audio; compressed formats are charged a little high.
    return data ? clamp(Math.ceil(data.bytes / 1280), options) : options.defaultAudioTokens;
  }
  return options.defaultVideoTokens;
}

/** Audio given inline as base64 (`input_audio.data`): tokens by decoded length. */
export function base64AudioTokens(base64: string, options: EstimateOptions): number {
  return clamp(Math.ceil((base64.length * 3) / 4 / 1280), options);
}

function clamp(tokens: number, options: EstimateOptions): number {
  return Math.min(options.maxItemTokens, Math.max(1, tokens));
}
