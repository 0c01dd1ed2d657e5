/**
 * The demo's proxy process: an EpdProxy in front of the demo's workers, whose
 * embedding locator reads the demo's shared encoder cache, and whose per-request
 * timelines go back to the demo over IPC. Forked by lib/demo/processes.ts with
 * its configuration as JSON in argv[2]; the shared secret comes in the
 * environment (EPD_PROXY_SECRET), never on the command line.
 *
 * IPC: sends `{ type: 'ready', url, pid }`; answers `{ type: 'traces' }` with
 * `{ type: 'traces', traces }` (and forgets them); stops on `{ type: 'shutdown' }`
 * or when the channel closes (the demo died). SIGINT and SIGHUP are the demo's to handle.
 */
import { EncoderCacheStore } from '../ec/store.js';
import { EpdProxy } from '../proxy/server.js';
import type { RequestTrace } from '../proxy/flow.js';
import type { Role } from '../proxy/instances.js';
import { SharedStoreLocator } from '../sim/locator.js';

/** What the demo passes in argv[2]. */
export interface ProxyProcessConfig {
  instances: Partial<Record<Role, string[]>>;
  /** Name of the demo's encoder-cache store (it exists before the proxy starts). */
  ecStore: string;
  host: string;
}

const TRACE_LIMIT = 20_000;

async function main(): Promise<void> {
  const config = JSON.parse(process.argv[2] ?? '{}') as ProxyProcessConfig;
  const store = await EncoderCacheStore.open({ name: config.ecStore });
  const traces: RequestTrace[] = [];
  let proxy: EpdProxy;
  try {
    proxy = await EpdProxy.start({
      host: config.host,
      port: 0,
      instances: config.instances,
      secret: process.env.EPD_PROXY_SECRET || undefined,
      locator: new SharedStoreLocator(store),
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
    await store.close();
    throw err;
  }
  let stopping: Promise<void> | undefined;
  const stop = () => {
    stopping ??= (async () => {
      await proxy.close();
      await store.close();
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
    else if (m?.type === 'shutdown') void stop();
  });
  process.send?.({ type: 'ready', url: proxy.url, pid: process.pid });
}

main().catch((err) => {
  process.stderr.write(`epd-proxy (demo) failed to start: ${(err as Error)?.stack ?? err}\n`);
  process.exit(1);
});
