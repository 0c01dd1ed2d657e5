import { defineConfig } from 'vitest/config';

// Each test file runs in its own child process ('forks'), so a native crash fails one file,
// not the run, and environment such as LD_PRELOAD (scripts/asan.mjs) reaches the addon.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    pool: 'forks',
    maxWorkers: 2,
    testTimeout: 30_000,
    hookTimeout: 60_000,
    teardownTimeout: 30_000,
  },
});
