// The shortest path through the addon: allocate, connect to itself, write, read back, close.
// Cheap enough to run everywhere, and the ASan/UBSan run (scripts/asan.mjs) includes it.
import { afterEach, describe, expect, it } from 'vitest';
import { TransferEngine } from '../../lib/index.js';

const SIZE = 3 << 20; // spans several chunks, so more than one worker thread copies

describe('native smoke', () => {
  let engine: TransferEngine | undefined;
  afterEach(async () => {
    await engine?.close();
    engine = undefined;
  });

  it('writes into its own region through a self-connection and reads it back', async () => {
    engine = await TransferEngine.open({ threads: 2, chunkBytes: 1 << 20 });
    const src = engine.allocate(SIZE);
    const dst = engine.allocate(SIZE);
    const back = engine.allocate(SIZE);
    for (let i = 0; i < SIZE; i++) src.buffer![i] = (i * 31) & 0xff;
    const self = await engine.connect(engine.address!);

    const written = await engine.write(self, [{ localRegion: src, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: SIZE }]);
    expect(written).toEqual({ bytes: SIZE, descriptors: 1 });
    expect(dst.buffer!.equals(src.buffer!)).toBe(true);

    const read = await engine.read(self, [
      { localRegion: back, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: SIZE / 2 },
      { localRegion: back, localOffset: SIZE / 2, remoteRegion: dst.id, remoteOffset: SIZE / 2, length: SIZE / 2 },
    ]);
    expect(read).toEqual({ bytes: SIZE, descriptors: 2 });
    expect(back.buffer!.equals(src.buffer!)).toBe(true);
  });

  it('frees a region, then fails every call once closed', async () => {
    engine = await TransferEngine.open({ listen: false });
    const region = engine.allocate(4096);
    await region.free();
    await engine.close();
    expect(() => engine!.allocate(4096)).toThrow(expect.objectContaining({ code: 'ERR_CLOSED' }));
  });
});
