/**
 * Test images for the demo load: real PNG files (valid headers, deflated pixel
 * data), generated from a seed so the same seed gives byte-identical images — and
 * so the same encoder-cache key, which is what a repeated image must hit.
 */
import zlib from 'node:zlib';

function chunk(type: string, data: Buffer): Buffer {
  const head = Buffer.alloc(8);
  head.writeUInt32BE(data.length, 0);
  head.write(type, 4, 'latin1');
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(zlib.crc32(Buffer.concat([head.subarray(4), data])), 0);
  return Buffer.concat([head, data, crc]);
}

/**
 * A `width` × `height` RGB PNG: a gradient with a few seeded bands (cheap to
 * deflate, distinct per seed).
 */
export function makePng(width: number, height: number, seed: number): Buffer {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // colour type: RGB
  const stride = width * 3 + 1;
  const raw = Buffer.alloc(stride * height);
  const a = (seed * 97) & 0xff;
  const b = (seed * 57 + 31) & 0xff;
  for (let y = 0; y < height; y++) {
    const row = y * stride;
    raw[row] = 0; // filter: none
    const band = ((y >> 5) * 73 + seed * 11) & 0xff;
    for (let x = 0; x < width; x++) {
      const o = row + 1 + x * 3;
      raw[o] = (x + a) & 0xff;
      raw[o + 1] = (y + b) & 0xff;
      raw[o + 2] = band;
    }
  }
  const idat = zlib.deflateSync(raw, { level: 6 });
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), chunk('IHDR', ihdr), chunk('IDAT', idat), chunk('IEND', Buffer.alloc(0))]);
}

/** The PNG as a data URL (what an OpenAI client sends inline). */
export function pngDataUrl(width: number, height: number, seed: number): string {
  return `data:image/png;base64,${makePng(width, height, seed).toString('base64')}`;
}
