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
 * A `width` × `height` RGB PNG: a gradient with a few seeded bands, distinct per
 * seed. Rows use PNG's "Sub" filter, under which a gradient deflates to a few
 * kilobytes: the demo measures the system, not the base64 shuffling of large
 * inline uploads through four processes.
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
    raw[row] = 1; // filter: Sub (each byte minus the same channel of the pixel to its left)
    const band = ((y >> 5) * 73 + seed * 11) & 0xff;
    const pixel = (x: number, c: number) => (c === 0 ? (x + a) & 0xff : c === 1 ? (y + b) & 0xff : band);
    for (let x = 0; x < width; x++) {
      for (let c = 0; c < 3; c++) raw[row + 1 + x * 3 + c] = (pixel(x, c) - (x > 0 ? pixel(x - 1, c) : 0)) & 0xff;
    }
  }
  const idat = zlib.deflateSync(raw, { level: 6 });
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), chunk('IHDR', ihdr), chunk('IDAT', idat), chunk('IEND', Buffer.alloc(0))]);
}

/** The PNG as a data URL (what an OpenAI client sends inline). */
export function pngDataUrl(width: number, height: number, seed: number): string {
  return `data:image/png;base64,${makePng(width, height, seed).toString('base64')}`;
}
