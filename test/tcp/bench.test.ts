// `bench transfer --transport tcp` runs end to end (two processes, the raw socket
// pump as reference, hash verification) and reports the shm fields plus
// `connections`. No timing is asserted: speed lives in the bench.
import { describe, expect, it } from 'vitest';
import { lastJson, runNode } from '../helpers.js';

describe('epd-transfer bench transfer --transport tcp', () => {
  it.each(['write', 'read'])('%s: prints the JSON fields with the socket-pump reference and verifies every byte', async (op) => {
    const run = await runNode(
      ['bin/epd-transfer.js', 'bench', 'transfer', '--transport', 'tcp', '--connections', '3', '--op', op, '--block', '64KiB', '--batch', '16', '--region', '8MiB', '--runs', '1', '--run-ms', '50', '--json'],
      { timeoutMs: 120_000 },
    );
    expect(run.code, run.stderr).toBe(0);
    const r = lastJson(run.stdout);
    expect(r).toMatchObject({ transport: 'tcp', connections: 3, op, blockBytes: 65536, batch: 16, verified: true });
    expect(r.reference).toMatch(/raw loopback TCP socket pump between the same two processes, 3 connection/);
    for (const field of ['gbps', 'gbpsMin', 'gbpsMax', 'referenceGbps', 'ratio', 'descriptorsPerSec']) {
      expect(r[field], field).toBeGreaterThan(0);
    }
  });

  it('probe reports tcp available and a loopback figure', async () => {
    const run = await runNode(['bin/epd-transfer.js', 'probe', '--json'], { timeoutMs: 60_000 });
    expect(run.code, run.stderr).toBe(0);
    const r = lastJson(run.stdout) as { transports: { tcp: { available: boolean } }; tcpLoopbackGbps: number };
    expect(r.transports.tcp.available).toBe(true);
    expect(r.tcpLoopbackGbps).toBeGreaterThan(0);
  });

  it('refuses an unknown transport and bad connection counts', async () => {
    const bad = await runNode(['bin/epd-transfer.js', 'bench', 'transfer', '--transport', 'udp'], { timeoutMs: 60_000 });
    expect(bad.code).toBe(1);
    expect(bad.stderr).toContain('ERR_BACKEND_UNAVAILABLE');
    const zero = await runNode(['bin/epd-transfer.js', 'bench', 'transfer', '--transport', 'tcp', '--connections', '0'], { timeoutMs: 60_000 });
    expect(zero.code).toBe(1);
    expect(zero.stderr).toContain('ERR_BAD_ARGUMENT');
  });
});
