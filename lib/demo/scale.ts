/**
 * The demo at scale (`demo --metadata etcd://… --proxies N`): what it sets up
 * around the processes, and takes down again on every exit path.
 *
 * - etcd: checked first (2 s); every key of the run lives under its own prefix
 *   (`<your prefix>demo-<run id>/`), so concurrent demos and tests never see each
 *   other, and whatever is left there at the end (keys of a process killed by the
 *   fault injection, whose lease has not expired yet) is deleted.
 * - the network (lib/demo/netns.ts): where the host allows it, one network
 *   namespace per worker on a bridge; the workers reach etcd through a relay on
 *   the bridge address (lib/demo/relay.ts), because etcd's 127.0.0.1 is not theirs.
 *   Otherwise everything stays on 127.0.0.1 and the summary says why.
 */
import { TransferError, isTransferError } from '../errors.js';
import { EtcdSession, parseEtcdUrl } from '../meta/etcd.js';
import { createNetwork, netnsSupport, reclaimStaleNetworks, type DemoNetwork } from './netns.js';
import { startTcpRelay, type TcpRelay } from './relay.js';

/** `auto`: namespaces when the host allows them; `on`: fail when it does not; `off`: loopback. */
export type NetnsMode = 'auto' | 'on' | 'off';

/** What the run set up. */
export interface ScaleSetup {
  /** etcd URL with the run's prefix, as the proxies (root namespace) use it. */
  readonly metadata: string;
  /** The same store as the workers reach it (through the relay in namespaces). */
  readonly workerMetadata: string;
  /** The run's key prefix. */
  readonly prefix: string;
  /** The namespaces, or null on loopback. */
  readonly network: DemoNetwork | null;
  /** Why the workers run on loopback (null when they run in namespaces). */
  readonly loopbackReason: string | null;
  /** Where proxies listen (the bridge address, or 127.0.0.1). */
  readonly proxyHost: string;
  /** Deletes the run's keys, stops the relay, removes the network. Returns the keys still there after that (0 expected). */
  close(): Promise<{ etcdKeysLeft: number | null }>;
}

/** The error a demo gives when etcd does not answer, with how to start one. */
export function etcdUnavailable(url: string, cause: unknown): TransferError {
  const endpoint = parseEtcdUrl(url).hosts[0].slice('http://'.length);
  const standard = endpoint === '127.0.0.1:2379' || endpoint === 'localhost:2379';
  const command = standard
    ? 'etcd --data-dir /tmp/epd-etcd &'
    : `etcd --data-dir /tmp/epd-etcd --listen-client-urls http://${endpoint} --advertise-client-urls http://${endpoint} &`;
  return new TransferError(
    `${(cause as Error)?.message ?? String(cause)}\n` +
      `The demo at scale needs a running etcd. Start one, then run the demo again:\n  ${command}\n` +
      'No etcd binary? apt-get install etcd-server (Debian/Ubuntu; it installs /usr/bin/etcd). Afterwards: kill %1; rm -rf /tmp/epd-etcd',
    'ERR_METADATA_UNAVAILABLE',
    { cause },
  );
}

/** `etcd://hosts/<prefix>` with the run's own prefix below the one given. */
function runUrl(url: string, runId: string): { url: string; prefix: string; hosts: string[] } {
  const { hosts, prefix } = parseEtcdUrl(url);
  const runPrefix = `${prefix ?? 'epd-transfer/'}demo-${runId}`;
  const bare = hosts.map((h) => h.slice('http://'.length));
  return { url: `etcd://${bare.join(',')}/${runPrefix}`, prefix: `${runPrefix}/`, hosts: bare };
}

/**
 * Checks etcd, and builds the network for `workers` (names) when asked and
 * possible. Nothing is left behind when it fails.
 */
export async function setUpScale(o: { metadata: string; netns: NetnsMode; runId: string; workers: readonly string[]; log: (line: string) => void }): Promise<ScaleSetup> {
  const run = runUrl(o.metadata, o.runId);
  let session: EtcdSession;
  try {
    session = await EtcdSession.connect(run.url, { timeoutMs: 2_000 });
  } catch (err) {
    if (isTransferError(err, 'ERR_METADATA_UNAVAILABLE')) throw etcdUnavailable(o.metadata, err);
    throw err;
  }
  let network: DemoNetwork | null = null;
  const relays: TcpRelay[] = [];
  let loopbackReason: string | null = o.netns === 'off' ? 'turned off (--netns off)' : netnsSupport();
  const undo = async () => {
    await Promise.all(relays.map((r) => r.close()));
    network?.close();
    process.off('exit', exitHook);
  };
  // A forced exit (second Ctrl-C) skips the finally blocks; the namespaces must still go.
  const exitHook = () => network?.close();
  process.on('exit', exitHook);
  try {
    if (loopbackReason !== null && o.netns === 'on') throw new TransferError(`--netns on: ${loopbackReason}`, 'ERR_BACKEND_UNAVAILABLE');
    if (loopbackReason === null) {
      const stale = reclaimStaleNetworks();
      if (stale.length > 0) o.log(`removed what a crashed demo left: ${stale.join(', ')}`);
      network = createNetwork(o.workers);
      for (const endpoint of run.hosts) relays.push(await startTcpRelay(network.hostAddress, endpoint));
    }
  } catch (err) {
    await undo();
    relays.length = 0;
    network = null;
    if (o.netns === 'on') {
      await session.close();
      throw err;
    }
    loopbackReason = `the network could not be built: ${(err as Error).message}`;
  }
  const workerMetadata = network ? `etcd://${relays.map((r) => r.endpoint).join(',')}/${run.prefix.slice(0, -1)}` : run.url;
  let closed: Promise<{ etcdKeysLeft: number | null }> | undefined;
  return {
    metadata: run.url,
    workerMetadata,
    prefix: run.prefix,
    network,
    loopbackReason,
    proxyHost: network?.hostAddress ?? '127.0.0.1',
    close: () =>
      (closed ??= (async () => {
        await undo();
        let etcdKeysLeft: number | null = null;
        try {
          const { entries } = await session.list('');
          await session.deleteKeys(entries.map((e) => e.key));
          etcdKeysLeft = (await session.list('')).entries.length;
        } catch (err) {
          o.log(`cannot clean the run's etcd prefix ${run.prefix}: ${(err as Error).message}`);
        }
        await session.close();
        return { etcdKeysLeft };
      })()),
  };
}
