// Our CUDA driver declarations (native/vendor/cuda.h, written without the SDK) checked
// against NVIDIA's cuda.h where a toolkit is installed: arity and ABI of every entry
// point we bind, plus the constants. Skipped on hosts without a toolkit.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { root } from '../helpers.js';

const include = [process.env.CUDA_HOME, process.env.CUDA_PATH, '/usr/local/cuda']
  .filter((d): d is string => typeof d === 'string' && d.length > 0)
  .map((d) => path.join(d, 'include'))
  .find((d) => existsSync(path.join(d, 'cuda.h')));

describe('CUDA driver declarations', () => {
  it.runIf(include !== undefined)('match the toolkit\'s cuda.h', () => {
    const run = () =>
      execFileSync('g++', ['-std=c++17', '-fsyntax-only', '-I', path.join(root, 'native'), '-I', include!, path.join(root, 'test', 'vendor', 'cuda_header_check.cc')], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
    expect(run).not.toThrow();
  });
});
