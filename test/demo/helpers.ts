/**
 * Helpers of the demo tests: the `epd-transfer demo` command as a child process,
 * the processes it started (from /proc), and what they left in /dev/shm.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import type { DemoSummary } from '../../lib/demo/summary.js';
import { root, shmObjectsOf } from '../helpers.js';

/** A running `epd-transfer demo`. */
export interface DemoProcess {
  child: ChildProcess;
  stdout(): string;
  stderr(): string;
  /** Resolves once `text` appeared on stderr (or rejects when the demo exits first). */
  waitForStderr(text: string | RegExp): Promise<void>;
  exited: Promise<number | null>;
}

/**
 * Starts `node bin/epd-transfer.js demo …args`. With `processGroup`, the demo leads
 * a process group of its own (as a shell job does), so a test can signal the
 * whole group the way Ctrl-C in a terminal does.
 */
export function startDemo(args: string[], options: { processGroup?: boolean } = {}): DemoProcess {
  const child = spawn(process.execPath, [path.join(root, 'bin', 'epd-transfer.js'), 'demo', ...args], { stdio: ['ignore', 'pipe', 'pipe'], detached: options.processGroup === true });
  let out = '';
  let err = '';
  const waiters: Array<() => void> = [];
  child.stdout!.setEncoding('utf8').on('data', (t: string) => (out += t));
  child.stderr!.setEncoding('utf8').on('data', (t: string) => {
    err += t;
    for (const w of waiters.splice(0)) w();
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return {
    child,
    stdout: () => out,
    stderr: () => err,
    async waitForStderr(text) {
      const seen = () => (typeof text === 'string' ? err.includes(text) : text.test(err));
      let done = false;
      void exited.then(() => (done = true));
      while (!seen()) {
        if (done) throw new Error(`the demo exited before printing ${String(text)}:\n${err}`);
        await Promise.race([new Promise<void>((r) => waiters.push(r)), exited]);
      }
    },
    exited,
  };
}

/** Runs the demo to the end; returns its exit code, output and (with --json) summary. */
export async function runDemo(args: string[]): Promise<{ pid: number; code: number | null; stdout: string; stderr: string; summary: DemoSummary | undefined }> {
  const demo = startDemo(args);
  const code = await demo.exited;
  const stdout = demo.stdout();
  let summary: DemoSummary | undefined;
  if (args.includes('--json') && stdout.trim().startsWith('{')) summary = JSON.parse(stdout) as DemoSummary;
  return { pid: demo.child.pid!, code, stdout, stderr: demo.stderr(), summary };
}

/** Pids of the live children of `pid`. */
export function childrenOf(pid: number): number[] {
  const out: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      // Field 4 (ppid) comes after the command name in parentheses, which may contain spaces.
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (Number(fields[1]) === pid) out.push(Number(entry));
    } catch {
      // the process went away while we looked
    }
  }
  return out;
}

/** True while a process exists (and is not a zombie). */
export function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2)[0] !== 'Z';
  } catch {
    return false;
  }
}

/** Waits (bounded) until none of `pids` is alive; returns those still alive. */
export async function waitGone(pids: readonly number[], timeoutMs = 20_000): Promise<number[]> {
  const deadline = Date.now() + timeoutMs;
  let left = pids.filter(alive);
  while (left.length > 0 && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
    left = left.filter(alive);
  }
  return left;
}

/** Everything in /dev/shm that the demo `pid` or its children created. */
export function leftovers(demoPid: number, children: readonly number[]): string[] {
  const store = `epdec-epd-demo-${demoPid.toString(36)}`;
  let names: string[] = [];
  try {
    names = readdirSync('/dev/shm').filter((n) => n.startsWith(store));
  } catch {
    // no /dev/shm
  }
  return [...names, ...[demoPid, ...children].flatMap((p) => shmObjectsOf(p))];
}
