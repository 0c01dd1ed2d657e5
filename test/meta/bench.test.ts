// `epd-transfer bench metadata` runs end to end against a private etcd and reports
// every field docs/BENCHMARKS.md quotes. No timing is asserted: speed lives in the bench.
import { describe, expect, it } from 'vitest';
import { lastJson, runNode } from '../helpers.js';
import { noEtcd } from './etcd-helpers.js';

describe.skipIf(noEtcd)('epd-transfer bench metadata', () => {
  it('times a kill -9 against the lease and the shared-load staleness, and prints them as JSON', async () => {
    const run = await runNode(['bin/epd-transfer.js', 'bench', 'metadata', '--ttl', '2', '--runs', '1', '--sync', '20', '--changes', '30', '--json'], { timeoutMs: 120_000 });
    expect(run.code, run.stderr).toBe(0);
    const r = lastJson<{
      putRoundTripMs: { median: number };
      leaseExpiry: Array<{ ttlSeconds: number; runs: number; detectMs: { median: number } }>;
      staleness: Array<{ loadSyncMs: number; samples: number; p50: number; p99: number; max: number }>;
      environment: { commit: string };
    }>(run.stdout);
    expect(typeof r.putRoundTripMs.median).toBe('number');
    expect(r.leaseExpiry).toEqual([expect.objectContaining({ ttlSeconds: 2, runs: 1 })]);
    expect(r.leaseExpiry[0].detectMs.median).toBeGreaterThan(0);
    expect(r.staleness).toEqual([expect.objectContaining({ loadSyncMs: 20 })]);
    expect(r.staleness[0].samples).toBeGreaterThan(0);
    expect(typeof r.environment.commit).toBe('string');
  });
});
