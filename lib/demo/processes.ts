/**
 * The demo's child processes (proxy and workers) and how they die with it.
 *
 * Every child is forked with an IPC channel and reports `{ type: 'ready' }` on
 * it. Three things make sure none outlives the demo:
 * 1. an orderly stop: `{ type: 'shutdown' }`, then SIGTERM, then SIGKILL, each
 *    with a deadline;
 * 2. the channel: when the demo dies for any reason (even SIGKILL) the kernel
 *    closes it, and a child stops on 'disconnect';
 * 3. a process 'exit' hook in the demo that SIGKILLs whatever is still running.
 * Ctrl-C reaches the whole foreground process group; children ignore SIGINT and
 * let the demo order the shutdown.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { TransferError } from '../errors.js';

/** The package's root directory (where bin/ and dist/ are), from this module's location. */
export function packageRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pkg = path.join(dir, 'package.json');
    if (existsSync(pkg) && (JSON.parse(readFileSync(pkg, 'utf8')) as { name?: string }).name === 'epd-transfer') return dir;
    const up = path.dirname(dir);
    if (up === dir) throw new TransferError('cannot find the epd-transfer package root', 'ERR_SYSTEM');
    dir = up;
  }
}

/** What a child reported when it was ready. */
export interface ReadyMessage {
  type: 'ready';
  url: string;
  pid: number;
  engine?: string | null;
  engineName?: string;
  role?: string;
}

/** A child to start. */
export interface ChildSpec {
  /** Label in messages ("prefill-0"). */
  name: string;
  /** Module to fork. */
  module: string;
  args: string[];
  env?: Record<string, string>;
  /** Deadline for the ready message (ms). */
  readyTimeoutMs: number;
  /**
   * Network namespace to run it in (`ip netns exec <ns> node …`; ip execs node in
   * place, so the pid, the IPC channel and the signals are node's own).
   */
  netns?: string;
}

/** A running child. */
export interface Child {
  name: string;
  process: ChildProcess;
  ready: ReadyMessage;
  /** Last lines the child wrote to stderr. */
  log: string[];
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const LOG_LINES = 40;

/** Starts, talks to and stops the demo's children. */
export class Supervisor {
  /** Every child not yet exited, with its name. */
  private readonly children = new Map<ChildProcess, string>();
  private readonly running: Child[] = [];
  private readonly exitHook = () => this.killAll();
  private stopping = false;

  /** @param onLost called when a ready child exits before {@link stopAll} (it crashed or was killed). */
  constructor(private readonly onLost?: (name: string, how: string) => void) {
    process.on('exit', this.exitHook);
  }

  /** Children started and ready. */
  get list(): readonly Child[] {
    return this.running;
  }

  /** Forks a child and waits for its ready message. */
  async start(spec: ChildSpec): Promise<Child> {
    const child = fork(spec.module, spec.args, {
      env: { ...process.env, ...spec.env },
      stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
      serialization: 'json',
      ...(spec.netns ? { execPath: 'ip', execArgv: ['netns', 'exec', spec.netns, process.execPath, ...process.execArgv] } : {}),
    });
    this.children.set(child, spec.name);
    const log: string[] = [];
    let partial = '';
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (text: string) => {
      const lines = (partial + text).split('\n');
      partial = lines.pop()!;
      log.push(...lines.filter((l) => l.length > 0));
      if (log.length > LOG_LINES) log.splice(0, log.length - LOG_LINES);
    });
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
      child.once('exit', (code, signal) => {
        this.children.delete(child);
        resolve({ code, signal });
      });
    });
    const ready = await new Promise<ReadyMessage>((resolve, reject) => {
      const timer = setTimeout(() => fail(new TransferError(`${spec.name} was not ready within ${spec.readyTimeoutMs} ms`, 'ERR_TIMEOUT')), spec.readyTimeoutMs);
      const onMessage = (m: unknown) => {
        if ((m as ReadyMessage)?.type !== 'ready') return;
        cleanup();
        resolve(m as ReadyMessage);
      };
      const onExit = (code: number | null, signal: NodeJS.Signals | null) => {
        const why = log.slice(-5).join('\n  ');
        fail(new TransferError(`${spec.name} exited before it was ready (${signal ?? `code ${code}`})${why ? `:\n  ${why}` : ''}`, 'ERR_PEER_LOST'));
      };
      const cleanup = () => {
        clearTimeout(timer);
        child.off('message', onMessage);
        child.off('exit', onExit);
      };
      const fail = (err: Error) => {
        cleanup();
        child.kill('SIGKILL');
        reject(err);
      };
      child.on('message', onMessage);
      child.once('exit', onExit);
    });
    const started: Child = { name: spec.name, process: child, ready, log, exited };
    this.running.push(started);
    void exited.then(({ code, signal }) => {
      if (!this.stopping) this.onLost?.(spec.name, signal ?? `exit code ${code}`);
    });
    return started;
  }

  /** Fault injection: SIGKILLs a ready child and resolves once it exited (it is then reported lost). */
  async kill(child: Child): Promise<void> {
    child.process.kill('SIGKILL');
    if (!(await settlesWithin(child.exited, 10_000))) throw new TransferError(`${child.name} did not die within 10 s of SIGKILL`, 'ERR_TIMEOUT');
  }

  /** Sends `message` to a child and waits for its answer of type `answer` (or the deadline). */
  ask<T>(child: Child, message: { type: string }, answer: string, timeoutMs: number): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => done(new TransferError(`${child.name} did not answer '${message.type}' within ${timeoutMs} ms`, 'ERR_TIMEOUT')), timeoutMs);
      const onMessage = (m: unknown) => {
        if ((m as { type?: string })?.type === answer) done(undefined, m as T);
      };
      const onExit = () => done(new TransferError(`${child.name} exited`, 'ERR_PEER_LOST'));
      const done = (err?: Error, value?: T) => {
        clearTimeout(timer);
        child.process.off('message', onMessage);
        child.process.off('exit', onExit);
        if (err) reject(err);
        else resolve(value as T);
      };
      child.process.on('message', onMessage);
      child.process.once('exit', onExit);
      if (!child.process.connected) return done(new TransferError(`${child.name} is not running`, 'ERR_PEER_LOST'));
      child.process.send(message);
    });
  }

  /**
   * Stops every child: asks them to shut down, giving requests in flight
   * `requestGraceMs` to finish before they are cancelled (the children then free
   * their shared memory); SIGTERM if a child is still running `deadlineMs` later,
   * SIGKILL 2 s after that. Resolves when all have exited; returns the names of
   * those that had to be killed.
   */
  async stopAll(requestGraceMs = 5_000, deadlineMs = requestGraceMs + 5_000): Promise<string[]> {
    this.stopping = true;
    const live = [...this.running];
    for (const c of live) if (c.process.connected) c.process.send({ type: 'shutdown', graceMs: requestGraceMs });
    const killed: string[] = [];
    await Promise.all(
      live.map(async (c) => {
        if (await settlesWithin(c.exited, deadlineMs)) return;
        c.process.kill('SIGTERM');
        if (await settlesWithin(c.exited, 2_000)) return;
        killed.push(c.name);
        c.process.kill('SIGKILL');
        await c.exited;
      }),
    );
    // Children that never became ready.
    const stragglers = [...this.children];
    for (const [p, name] of stragglers) {
      killed.push(name);
      p.kill('SIGKILL');
    }
    await Promise.all(stragglers.map(([p]) => (p.exitCode !== null || p.signalCode !== null ? undefined : new Promise((r) => p.once('exit', r)))));
    this.running.length = 0;
    process.off('exit', this.exitHook);
    return killed;
  }

  /** Last resort (also on process exit): SIGKILL every child still running. Synchronous. */
  killAll(): void {
    for (const p of this.children.keys()) {
      try {
        p.kill('SIGKILL');
      } catch {
        // already gone
      }
    }
  }
}

async function settlesWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((resolve) => (timer = setTimeout(resolve, ms, false)));
  const r = await Promise.race([p.then(() => true as const), timeout]);
  clearTimeout(timer);
  return r;
}
