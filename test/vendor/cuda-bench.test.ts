// A smoke test of the GPU check's moving parts (bench/device/dtod_peak.c and
// bench/device/cuda-bench.mjs) on the CUDA-driver fake: they build, run, verify the
// bytes they copy and print their result. The figures mean nothing here; on a real
// GPU run-cuda.sh prints them (docs/BENCHMARKS.md).
import { execFileSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { lastJson, root, runNode } from '../helpers.js';
import { buildFakes, FakeControl, reclaimFakeShm } from './fakes.js';

describe('bench/device (GPU check) on the CUDA fake', () => {
  it('measures the driver reference, d2d and cross-process ipc copies and checks the bytes', async () => {
    const fakes = buildFakes();
    const control = new FakeControl();
    const peak = path.join(mkdtempSync(path.join(os.tmpdir(), 'epd-dtod-')), 'dtod_peak');
    execFileSync('gcc', ['-O2', '-o', peak, path.join(root, 'bench', 'device', 'dtod_peak.c'), '-ldl']);
    try {
      const out = await runNode(
        [path.join(root, 'bench', 'device', 'cuda-bench.mjs'), '--peak', peak, '--bytes', String(2 << 20), '--copies', '4', '--runs', '3', '--json'],
        { env: { ...control.env(), EPD_TRANSFER_CUDA_LIB: fakes.cuda }, timeoutMs: 60_000 },
      );
      expect(out.code, out.stderr).toBe(0);
      const r = lastJson<Record<string, number | object>>(out.stdout);
      expect(r).toMatchObject({ bench: 'device-cuda', bytesPerCopy: 2 << 20, copiesPerRun: 4, runs: 3 });
      for (const k of ['referenceGbps', 'd2dGbps', 'ipcGbps', 'd2dRatio', 'ipcRatio']) expect(r[k]).toBeGreaterThan(0);
    } finally {
      control.dispose();
      reclaimFakeShm();
    }
  });
});
