// The layerwise bench runs end to end (two processes, real bytes, verification) and
// reports every field the docs promise. No timing is asserted: speed lives in the bench.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { lastJson, runNode } from '../helpers.js';

const dir = mkdtempSync(path.join(os.tmpdir(), 'epd-bench-layerwise-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('epd-transfer bench layerwise', () => {
  it('prints the JSON fields, verifies the bytes and writes a Chrome trace (emulated link)', async () => {
    const trace = path.join(dir, 'trace.json');
    const run = await runNode(
      ['bin/epd-transfer.js', 'bench', 'layerwise', '--model', 'qwen2.5-7b', '--tokens', '300', '--link', '4GB/s', '--runs', '1', '--integrity', '--trace', trace, '--json'],
      { timeoutMs: 120_000 },
    );
    expect(run.code, run.stderr).toBe(0);
    const r = lastJson(run.stdout);
    for (const field of ['ttftLayerwiseMs', 'ttftBulkMs', 'exposedTailMs', 'lastLayerTransferMs', 'tailRatio', 'bytes', 'gbps', 'batches', 'batchesPerLayer']) {
      expect(typeof r[field], field).toBe('number');
    }
    expect(r).toMatchObject({ model: 'qwen2.5-7b', tokens: 300, layers: 28, link: '4GB/s', linkGBps: 4, verified: true, integrity: true, fuseLayers: true });
    expect(r.bytes).toBe(300 * 57_344);
    const events = JSON.parse(readFileSync(trace, 'utf8')).traceEvents as Array<{ name: string; args?: { name?: string } }>;
    // Every layer went out, alone ("send L5") or in a batch of several ("send L6–9").
    const sent = events.filter((e) => e.name.startsWith('send L')).flatMap((e) => {
      const [first, last = first] = e.name.slice('send L'.length).split('–').map(Number);
      return Array.from({ length: last - first + 1 }, (_, i) => first + i);
    });
    expect(new Set(sent).size).toBe(28);
    expect(events.some((e) => e.name.startsWith('arrived L27'))).toBe(true);
    expect(events.filter((e) => e.name === 'process_name').map((e) => e.args?.name)).toEqual(['prefill (bench)', 'decode (bench)']);
  });

  it('refuses an unknown model with the list of profiles', async () => {
    const run = await runNode(['bin/epd-transfer.js', 'bench', 'layerwise', '--model', 'nope', '--tokens', '16'], { timeoutMs: 60_000 });
    expect(run.code).toBe(1);
    expect(run.stderr).toContain('ERR_BAD_ARGUMENT');
    expect(run.stderr).toContain('llama3-8b');
  });
});
