/**
 * The demo's private network: one network namespace per worker, each joined by a
 * veth pair to a Linux bridge in the root namespace, so the KV and embedding bytes
 * the workers exchange leave one network stack and enter another, as they would
 * between hosts. The proxies, the load and the etcd relay stay in the root
 * namespace and use the bridge's address.
 *
 *   root namespace    bridge epdb<tag>  10.X.Y.1/24 ── proxies, etcd relay, load
 *                       ├── veth ── ns epd-demo-<pid>-encode-0   10.X.Y.10
 *                       ├── veth ── ns epd-demo-<pid>-prefill-0  10.X.Y.11
 *                       └── …
 *
 * Needs root and a working `ip netns` ({@link netnsSupport} says why not otherwise).
 * Every name carries the owning demo's pid, so {@link reclaimStaleNetworks} can
 * remove what a demo killed with SIGKILL left behind; {@link DemoNetwork.close}
 * removes everything else on every exit path (it is synchronous, so it also runs
 * in a process 'exit' hook).
 */
import { execFileSync } from 'node:child_process';
import { TransferError } from '../errors.js';

/** Prefix of the namespaces a demo creates: `epd-demo-<pid>-<worker>`. */
export const NETNS_PREFIX = 'epd-demo-';
const NS_NAME = /^epd-demo-(\d+)-[\w-]+$/;
/**
 * Interface names (at most 15 characters): bridge `epdb<pid36>`, veth host side
 * `epdv<pid36>h<i>` (its worker side `epdv<pid36>n<i>` lives in the namespace and goes with it).
 */
const LINK_NAMES = [/^epdb([0-9a-z]+)$/, /^epdv([0-9a-z]+)h\d+$/];

function ip(args: string[]): string {
  try {
    return execFileSync('ip', args, { stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8', timeout: 10_000 });
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new TransferError(`ip ${args.join(' ')} failed: ${(e.stderr || e.message).trim()}`, 'ERR_SYSTEM', { cause: err });
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Whether this process can build the demo's network: null when it can, else why not. */
export function netnsSupport(): string | null {
  if (process.platform !== 'linux') return 'network namespaces are a Linux feature';
  if (process.getuid?.() !== 0) return 'creating network namespaces needs root';
  const probe = `${NETNS_PREFIX}${process.pid}-probe`;
  try {
    ip(['netns', 'add', probe]);
  } catch (err) {
    return `ip netns does not work here (${(err as Error).message})`;
  }
  try {
    ip(['netns', 'del', probe]);
  } catch {
    // it was created, so it can be deleted; a failure here would show in the next step
  }
  return null;
}

/** Namespaces and links whose owning demo is no longer running; removes them. Returns their names. */
export function reclaimStaleNetworks(): string[] {
  const removed: string[] = [];
  let namespaces: string[] = [];
  try {
    namespaces = ip(['netns', 'list']).split('\n').map((l) => l.split(' ')[0]).filter(Boolean);
  } catch {
    return removed; // no ip netns: nothing of ours can exist
  }
  for (const ns of namespaces) {
    const m = NS_NAME.exec(ns);
    if (!m || Number(m[1]) === process.pid || alive(Number(m[1]))) continue;
    try {
      ip(['netns', 'del', ns]);
      removed.push(ns);
    } catch {
      // another demo reclaimed it first
    }
  }
  for (const line of ip(['-o', 'link', 'show']).split('\n')) {
    const name = /^\d+:\s+([^:@\s]+)/.exec(line)?.[1];
    const m = name ? LINK_NAMES.map((r) => r.exec(name)).find(Boolean) : null;
    if (!m || !name) continue;
    const pid = parseInt(m[1], 36);
    if (pid === process.pid || alive(pid)) continue;
    try {
      ip(['link', 'del', name]);
      removed.push(name);
    } catch {
      // gone with its pair meanwhile
    }
  }
  return removed;
}

/** Where a worker lives on the demo's network. */
export interface WorkerPlace {
  /** Namespace name (for `ip netns exec`). */
  ns: string;
  /** Its address on the bridge. */
  address: string;
}

/** The demo's network; see the module comment. */
export interface DemoNetwork {
  /** The bridge's address in the root namespace: proxies and the etcd relay listen here. */
  readonly hostAddress: string;
  /** `10.X.Y.0/24`. */
  readonly subnet: string;
  readonly bridge: string;
  /** Per worker name. */
  readonly places: ReadonlyMap<string, WorkerPlace>;
  /** Deletes the namespaces, their veths and the bridge. Synchronous and idempotent. */
  close(): void;
}

/** A /24 in 10.0.0.0/8 not used by any address on this host, picked from the pid so concurrent demos differ. */
function freeSubnet(): string {
  const used = new Set<string>();
  for (const m of ip(['-o', '-4', 'addr', 'show']).matchAll(/inet (\d+\.\d+\.\d+)\.\d+\//g)) used.add(m[1]);
  for (const m of ip(['-4', 'route', 'show']).matchAll(/^(\d+\.\d+\.\d+)\.\d+\/\d+/gm)) used.add(m[1]);
  // 10.200.0.0 – 10.249.255.0: away from the ranges the tests use (10.150–10.199).
  const start = process.pid % (50 * 256);
  for (let i = 0; i < 50 * 256; i++) {
    const n = (start + i) % (50 * 256);
    const net = `10.${200 + Math.floor(n / 256)}.${n % 256}`;
    if (!used.has(net)) return net;
  }
  throw new TransferError('no free 10.x.y.0/24 for the demo network', 'ERR_SYSTEM');
}

/**
 * Creates a bridge and one namespace per worker name. On failure everything
 * created so far is removed and the error (ERR_SYSTEM) says which step failed.
 */
export function createNetwork(workers: readonly string[]): DemoNetwork {
  const tag = process.pid.toString(36);
  const bridge = `epdb${tag}`;
  const net = freeSubnet();
  const hostAddress = `${net}.1`;
  const places = new Map<string, WorkerPlace>();
  const created: Array<() => void> = [];
  let closed = false;
  const close = () => {
    if (closed) return;
    closed = true;
    for (const undo of created.reverse()) {
      try {
        undo();
      } catch {
        // already gone (e.g. a veth removed with its namespace)
      }
    }
  };
  try {
    ip(['link', 'add', bridge, 'type', 'bridge']);
    created.push(() => ip(['link', 'del', bridge]));
    ip(['addr', 'add', `${hostAddress}/24`, 'dev', bridge]);
    ip(['link', 'set', bridge, 'up']);
    workers.forEach((name, i) => {
      const ns = `${NETNS_PREFIX}${process.pid}-${name}`;
      const address = `${net}.${10 + i}`;
      const host = `epdv${tag}h${i}`;
      const inner = `epdv${tag}n${i}`;
      ip(['netns', 'add', ns]);
      created.push(() => ip(['netns', 'del', ns]));
      ip(['link', 'add', host, 'type', 'veth', 'peer', 'name', inner]);
      created.push(() => ip(['link', 'del', host]));
      ip(['link', 'set', inner, 'netns', ns]);
      ip(['link', 'set', host, 'master', bridge]);
      ip(['link', 'set', host, 'up']);
      ip(['-n', ns, 'addr', 'add', `${address}/24`, 'dev', inner]);
      ip(['-n', ns, 'link', 'set', inner, 'up']);
      ip(['-n', ns, 'link', 'set', 'lo', 'up']);
      places.set(name, { ns, address });
    });
  } catch (err) {
    close();
    throw err;
  }
  return { hostAddress, subnet: `${net}.0/24`, bridge, places, close };
}
