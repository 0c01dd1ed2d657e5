/**
 * Starts a real, throw-away etcd server (Debian's `etcd-server` package, or any
 * `etcd` binary) on a free loopback port with a temporary data directory: what the
 * tests, `bench metadata` and demos use. Production runs its own etcd cluster
 * (docs/DEPLOYMENT.md); nothing here stands in for one.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { accessSync, constants, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { TransferError } from '../errors.js';

/** Options of {@link startEtcdServer}. */
export interface EtcdServerOptions {
  /** The etcd binary. Default: `EPD_ETCD_BIN`, else `etcd` on PATH (Debian: /usr/bin/etcd). */
  binary?: string;
  /** Address to listen on. Default 127.0.0.1. */
  host?: string;
  /** Client port. Default: a free one. */
  port?: number;
  /** How long etcd may take to answer its health endpoint (ms). Default 15 000. */
  startTimeoutMs?: number;
}

/** A running etcd child process. */
export interface EtcdServer {
  /** `etcd://host:port`, what `metadata` options take. */
  readonly url: string;
  /** `host:port` of the client endpoint. */
  readonly endpoint: string;
  readonly pid: number;
  /**
   * Freezes the server (SIGSTOP): it keeps its sockets but answers nothing, like an
   * unreachable host. Resolves once the kernel reports every thread stopped.
   */
  pause(): Promise<void>;
  /** Undoes {@link pause} (SIGCONT). */
  resume(): void;
  /** Stops the server (SIGTERM, SIGKILL after 5 s) and removes its data directory. Idempotent. */
  stop(): Promise<void>;
}

/** The binary {@link startEtcdServer} would run, or null when there is none (callers skip with a message). */
export function findEtcdBinary(binary = process.env.EPD_ETCD_BIN): string | null {
  const candidates = binary ? [binary] : [...(process.env.PATH ?? '').split(path.delimiter).map((d) => path.join(d, 'etcd')), '/usr/bin/etcd'];
  for (const c of candidates) {
    try {
      accessSync(c, constants.X_OK);
      return c;
    } catch {
      // next
    }
  }
  return null;
}

/** True when every thread of `pid` is stopped (state T in /proc). */
function allStopped(pid: number): boolean {
  try {
    return readdirSync(`/proc/${pid}/task`).every((tid) => {
      const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
      return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) === 'T';
    });
  } catch {
    return false;
  }
}

const running = new Set<ChildProcess>();
let exitHook = false;

function freePort(host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, host, () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

async function healthy(endpoint: string, signal: AbortSignal): Promise<boolean> {
  try {
    const res = await fetch(`http://${endpoint}/health`, { signal });
    return res.ok && ((await res.json()) as { health?: string }).health === 'true';
  } catch {
    return false;
  }
}

/** Starts etcd; resolves once it reports healthy. ERR_BACKEND_UNAVAILABLE when there is no binary, ERR_TIMEOUT when it does not come up. */
export async function startEtcdServer(options: EtcdServerOptions = {}): Promise<EtcdServer> {
  const binary = findEtcdBinary(options.binary);
  if (!binary) {
    throw new TransferError('no etcd binary: install it (Debian: apt-get install etcd-server) or set EPD_ETCD_BIN', 'ERR_BACKEND_UNAVAILABLE');
  }
  const host = options.host ?? '127.0.0.1';
  const h = host.includes(':') ? `[${host}]` : host;
  const clientPort = options.port ?? (await freePort(host));
  const peerPort = await freePort(host);
  const dataDir = mkdtempSync(path.join(os.tmpdir(), 'epd-etcd-'));
  const name = `epd-test-${process.pid}`;
  const child = spawn(
    binary,
    [
      '--name', name,
      '--data-dir', dataDir,
      '--listen-client-urls', `http://${h}:${clientPort}`,
      '--advertise-client-urls', `http://${h}:${clientPort}`,
      '--listen-peer-urls', `http://${h}:${peerPort}`,
      '--initial-advertise-peer-urls', `http://${h}:${peerPort}`,
      '--initial-cluster', `${name}=http://${h}:${peerPort}`,
      '--logger', 'zap',
      '--log-level', 'error',
    ],
    // A sanitizer runtime preloaded for our addon has no business inside etcd.
    { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, LD_PRELOAD: '' } },
  );
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => {
    stderr = (stderr + d.toString()).slice(-4000);
  });
  running.add(child);
  if (!exitHook) {
    exitHook = true;
    process.on('exit', () => {
      for (const c of running) c.kill('SIGKILL');
    });
  }
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  void exited.then(() => running.delete(child));
  const endpoint = `${h}:${clientPort}`;
  let stopped: Promise<void> | undefined;
  const stop = () =>
    (stopped ??= (async () => {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGCONT');
        child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
        await exited;
        clearTimeout(timer);
      }
      rmSync(dataDir, { recursive: true, force: true });
    })());

  const deadline = Date.now() + (options.startTimeoutMs ?? 15_000);
  const probe = new AbortController();
  try {
    for (;;) {
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new TransferError(`etcd exited during start (${child.exitCode ?? child.signalCode}): ${stderr.trim()}`, 'ERR_SYSTEM');
      }
      if (await healthy(endpoint, AbortSignal.any([probe.signal, AbortSignal.timeout(1_000)]))) break;
      if (Date.now() > deadline) throw new TransferError(`etcd did not become healthy within ${options.startTimeoutMs ?? 15_000} ms: ${stderr.trim()}`, 'ERR_TIMEOUT');
      await sleep(50);
    }
  } catch (err) {
    await stop();
    throw err;
  }
  return {
    url: `etcd://${endpoint}`,
    endpoint,
    pid: child.pid!,
    pause: async () => {
      child.kill('SIGSTOP');
      // The signal is asynchronous: a request sent right after kill() could still be answered.
      const until = Date.now() + 5_000;
      while (!allStopped(child.pid!)) {
        if (Date.now() > until) throw new TransferError(`etcd (pid ${child.pid}) did not stop within 5 s`, 'ERR_TIMEOUT');
        await sleep(5);
      }
    },
    resume: () => child.kill('SIGCONT'),
    stop,
  };
}
