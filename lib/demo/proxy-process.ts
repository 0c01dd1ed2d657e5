/**
 * The demo's proxy process: an EpdProxy in front of the demo's workers (listed
 * statically, or discovered from etcd in cluster mode), whose embedding locator
 * reads the demo's shared encoder cache (or the etcd encoder-cache index when
 * encoders serve their own stores), and whose per-request
 * timelines go back to the demo over IPC. Forked by lib/demo/processes.ts with
 * its configuration as JSON in argv[2]; the shared secret comes in the
 * environment (EPD_PROXY_SECRET), never on the command line.
 *
 * IPC: sends `{ type: 'ready', url, pid }`; answers `{ type: 'traces' }` with
 * `{ type: 'traces', traces }` (and forgets them) and `{ type: 'cluster' }` with the
 * instances it routes to and, in cluster mode, its shared-load staleness; stops on `{ type: 'shutdown' }`
 * or when the channel closes (the demo died). SIGINT and SIGHUP are the demo's to handle.
 */
import { EncoderCacheStore } from '../ec/store.js';
import { EpdProxy } from '../proxy/server.js';
import type { RequestTrace } from '../proxy/flow.js';
import type { StalenessStats } from '../proxy/cluster.js';
import type { InstanceInfo, Role } from '../proxy/instances.js';
import { SharedStoreLocator } from '../sim/locator.js';

/** What the demo passes in argv[2]. */
export interface ProxyProcessConfig {
  /** Static instances (none in cluster mode: they come from etcd). */
  instances?: Partial<Record<Role, string[]>>;
  /** Name of the demo's shared encoder-cache store (it exists before the proxy starts); none when encoders serve their own. */
  ecStore?: string;
  host: string;
  /** Cluster mode: instances, load and the metaserver rendezvous shared through etcd. */
  cluster?: {
    metadata: string;
    id: string;
    /** Consult the etcd encoder-cache index (encoders serve their stores; P pulls). */
    sharedEmbeddings: boolean;
    ttlSeconds: number;
  };
}

/** The answer to `{ type: 'cluster' }`. */
export interface ProxyClusterView {
  type: 'cluster';
  id: string | null;
  instances: InstanceInfo[];
  staleness: StalenessStats | null;
}

const TRACE_LIMIT = 20_000;

async function main(): Promise<void> {
  const config = JSON.parse(process.argv[2] ?? '{}') as ProxyProcessConfig;
  const store = config.ecStore === undefined ? undefined : await EncoderCacheStore.open({ name: config.ecStore });
  const traces: RequestTrace[] = [];
  let proxy: EpdProxy;
  try {
    proxy = await EpdProxy.start({
      host: config.host,
      port: 0,
      instances: config.instances,
      secret: process.env.EPD_PROXY_SECRET || undefined,
      locator: store && new SharedStoreLocator(store),
      cluster: config.cluster && {
        metadata: config.cluster.metadata,
        id: config.cluster.id,
        ttlSeconds: config.cluster.ttlSeconds,
        sharedEmbeddings: config.cluster.sharedEmbeddings ? {} : undefined,
      },
      onRequest: (trace) => {
        // Bounded like the workers' records: the newest timelines are kept.
        if (traces.length >= TRACE_LIMIT) traces.shift();
        traces.push(trace);
      },
      // Checks every second, but patient ones: ten processes share two cores here.
      health: { intervalMs: 1_000, timeoutMs: 3_000, unhealthyAfter: 3 },
      // The demo stops the proxy after its load (or on Ctrl-C): nothing worth waiting for.
      closeGraceMs: 500,
      log: (message) => process.stderr.write(`${new Date().toISOString()} epd-proxy ${message}\n`),
    });
  } catch (err) {
    await store?.close();
    throw err;
  }
  let stopping: Promise<void> | undefined;
  const stop = () => {
    stopping ??= (async () => {
      await proxy.close();
      await store?.close();
      if (process.connected) process.disconnect();
    })();
    return stopping;
  };
  process.on('SIGINT', () => {});
  process.on('SIGHUP', () => {});
  process.stderr.on('error', () => {}); // a parent killed by SIGKILL leaves a closed pipe
  process.on('SIGTERM', () => void stop());
  process.on('disconnect', () => void stop());
  process.on('message', (m: { type?: string }) => {
    if (m?.type === 'traces') process.send?.({ type: 'traces', traces: traces.splice(0) });
    else if (m?.type === 'cluster') {
      const view: ProxyClusterView = { type: 'cluster', id: proxy.cluster?.id ?? null, instances: proxy.instances(), staleness: proxy.cluster?.stalenessStats() ?? null };
      process.send?.(view);
    }
    else if (m?.type === 'shutdown') void stop();
  });
  process.send?.({ type: 'ready', url: proxy.url, pid: process.pid });
}

main().catch((err) => {
  process.stderr.write(`epd-proxy (demo) failed to start: ${(err as Error)?.stack ?? err}\n`);
  process.exit(1);
});
