/** Shared pieces of the bench programs: stats, environment record, output, test data, child processes. */
import { execFileSync, type ChildProcess } from 'node:child_process';
import os from 'node:os';
import { TransferError } from '../lib/errors.js';
import { addonPath, packageRoot } from '../lib/native.js';

export interface Spread {
  median: number;
  min: number;
  max: number;
}

export function spread(values: number[]): Spread {
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  const median = s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
  return { median, min: s[0], max: s[s.length - 1] };
}

/** The machine, commit and build a figure was measured on. */
export function environment(): Record<string, unknown> {
  let commit = 'unknown';
  try {
    commit = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: packageRoot(), stdio: ['ignore', 'pipe', 'ignore'] })
      .toString()
      .trim();
  } catch {
    /* not a git checkout */
  }
  return {
    cpus: os.cpus().length,
    cpuModel: os.cpus()[0]?.model ?? 'unknown',
    memoryGiB: Math.round(os.totalmem() / 2 ** 30),
    node: process.version,
    commit,
    addon: addonPath.includes('prebuilds') ? 'prebuild' : addonPath.includes('Debug') || addonPath.includes('asan') ? 'debug' : 'release',
  };
}

export function round(n: number, digits = 2): number {
  const f = 10 ** digits;
  return Math.round(n * f) / f;
}

/** Deterministic, position-dependent content (xorshift words), so a misplaced block changes the hash. */
export function fillPattern(buf: Buffer, seed: number): void {
  const words = new Uint32Array(buf.buffer, buf.byteOffset, buf.length >>> 2);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x + i;
  }
}

/**
 * The next message a bench child process sends, after sending it `msg` when one is given.
 * Rejects with ERR_PEER_LOST, naming the child (`name`), when it exits first.
 */
export function nextMessage<T>(child: ChildProcess, name: string, msg?: object): Promise<T> {
  return new Promise((resolve, reject) => {
    const onExit = (code: number | null) => reject(new TransferError(`${name} exited (${code})`, 'ERR_PEER_LOST'));
    child.once('exit', onExit);
    child.once('message', (m) => {
      child.off('exit', onExit);
      resolve(m as T);
    });
    if (msg !== undefined) child.send(msg);
  });
}

/** Prints rows as an aligned two-column table. */
export function printTable(title: string, rows: Array<[string, string | number]>): void {
  const width = Math.max(...rows.map(([k]) => k.length));
  console.log(title);
  for (const [k, v] of rows) console.log(`  ${k.padEnd(width)}  ${v}`);
}
