// `epd-transfer bench ec` runs end to end: a saver and loader processes, byte
// verification, every field of the JSON. Figures are not asserted (timings live in
// docs/BENCHMARKS.md, not in tests).
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { storeObjects } from './helpers.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

function run(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [path.join(root, 'bin', 'epd-transfer.js'), ...args], { cwd: root });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

describe('bench ec', () => {
  it('saves in one process, loads in two others, verifies, and prints JSON', async () => {
    const r = await run(['bench', 'ec', '--bytes', '1MiB', '--processes', '2', '--runs', '1', '--run-ms', '20', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const result = JSON.parse(r.stdout.trim().split('\n').pop()!);
    expect(result).toMatchObject({ bytes: 1 << 20, processes: 2, runs: 1, verified: true });
    for (const field of ['loadMs', 'loadGbps', 'referenceGbps', 'ratio', 'saveMs', 'hitLookupsPerSec', 'missLookupsPerSec', 'acquireReleasePerSec']) {
      expect(result[field], field).toBeGreaterThan(0);
    }
    expect(result.loaders).toHaveLength(2);
    expect(result.environment).toHaveProperty('commit');
    expect(storeObjects('bench-ec-')).toEqual([]); // nothing left behind
  }, 120_000); // three processes; slow under the sanitizers on a loaded 2-core machine

  it('rejects a bad size with a usage error', async () => {
    const r = await run(['bench', 'ec', '--bytes', 'lots']);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('ERR_BAD_ARGUMENT');
  });
});
