/**
 * `epd-transfer worker --role encode|prefill|decode|pd --model <profile>`: one
 * simulated instance in the foreground. Stops on SIGINT / SIGTERM (in-flight
 * requests get a grace period). Started by another process with an IPC channel
 * (the demo), it reports `{ type: 'ready', url, pid, engine }` over it, leaves
 * SIGINT and SIGHUP to its parent (a Ctrl-C or a closed terminal reaches the
 * whole process group; the parent decides the order of shutdown), stops on a `{ type: 'shutdown', graceMs? }` message, and
 * stops by itself when the channel closes — the parent died, so must it.
 */
import { parseArgs } from 'node:util';
import { parseDuration } from '../proxy/cli.js';
import { TransferError } from '../errors.js';
import { expectInteger, parseBytes } from '../validate.js';
import { getProfile } from './profiles.js';
import type { SimRole } from './stats.js';
import { SimWorker, simulationLabel } from './worker.js';


function log(message: string): void {
  console.error(`${new Date().toISOString()} epd-sim ${message}`);
}

/** Runs the `worker` command until it is told to stop. Returns the exit code. */
export async function runWorkerCommand(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      role: { type: 'string' },
      model: { type: 'string', default: 'qwen2.5-vl-7b' },
      'served-model-name': { type: 'string' },
      host: { type: 'string', default: '127.0.0.1' },
      port: { type: 'string', default: '0' },
      'ec-store': { type: 'string', default: 'epd-sim' },
      'ec-capacity': { type: 'string', default: '2GiB' },
      'kv-memory': { type: 'string', default: '512MiB' },
      'max-batched-tokens': { type: 'string', default: '8192' },
      'kv-timeout': { type: 'string', default: '120s' },
      'block-wait': { type: 'string', default: '30s' },
      'kv-quiesce': { type: 'string', default: '30s' },
      'corrupt-kv': { type: 'string' },
      metadata: { type: 'string' },
      'metadata-ttl': { type: 'string' },
      'engine-name': { type: 'string' },
      transport: { type: 'string', default: 'auto' },
      register: { type: 'boolean', default: false },
      'remote-ec': { type: 'boolean', default: false },
    },
  });
  const role = values.role as SimRole;
  if (!['encode', 'prefill', 'decode', 'pd'].includes(role)) {
    throw new TransferError(`Expected --role encode, prefill, decode or pd but received ${JSON.stringify(values.role ?? null)}`, 'ERR_BAD_ARGUMENT');
  }
  const profile = getProfile(values.model);
  const transport = values.transport as 'auto' | 'shm' | 'tcp';
  if (!['auto', 'shm', 'tcp'].includes(transport)) {
    throw new TransferError(`Expected --transport auto, shm or tcp but received ${JSON.stringify(values.transport)}`, 'ERR_BAD_ARGUMENT');
  }
  const corruptKv = values['corrupt-kv']?.split(',').map((v) => v.trim()).filter(Boolean);
  const worker = await SimWorker.start({
    role,
    model: profile.id,
    servedModelName: values['served-model-name'],
    host: values.host,
    port: expectInteger(Number(values.port), '--port', 0, 65535),
    ecStore: values['ec-store'],
    ecCapacity: parseBytes(values['ec-capacity'], '--ec-capacity'),
    kvMemory: parseBytes(values['kv-memory'], '--kv-memory'),
    maxBatchedTokens: expectInteger(Number(values['max-batched-tokens']), '--max-batched-tokens', 1),
    kvTimeoutMs: parseDuration(values['kv-timeout'], '--kv-timeout'),
    blockWaitMs: parseDuration(values['block-wait'], '--block-wait'),
    kvQuiesceMs: parseDuration(values['kv-quiesce'], '--kv-quiesce'),
    corruptKv,
    metadata: values.metadata,
    metadataTtlSeconds: values['metadata-ttl'] === undefined ? undefined : expectInteger(Number(values['metadata-ttl']), '--metadata-ttl', 2, 3600),
    engineName: values['engine-name'],
    transport,
    register: values.register,
    remoteEmbeddings: values['remote-ec'],
    log,
  });
  const supervised = typeof process.send === 'function';
  let stopping: Promise<void> | undefined;
  const stop = (why: string, graceMs?: number) => {
    if (!stopping) {
      log(`${role} worker stopping (${why})`);
      stopping = worker.close(graceMs);
    }
    return stopping;
  };
  const done = new Promise<void>((resolve) => {
    const finish = (why: string, graceMs?: number) => void stop(why, graceMs).then(resolve, resolve);
    process.on('SIGTERM', () => finish('SIGTERM'));
    // A parent that died by SIGKILL leaves a closed pipe: logging must not crash the shutdown.
    process.stderr.on('error', () => {});
    if (supervised) {
      // The parent orders the shutdown on Ctrl-C or a closed terminal; a dead parent closes the channel.
      process.on('SIGINT', () => {});
      process.on('SIGHUP', () => {});
      // Nobody is left to answer: in-flight requests get no grace.
      process.on('disconnect', () => finish('parent gone', 0));
      process.on('message', (m: { type?: string; graceMs?: number }) => {
        if (m?.type === 'shutdown') finish('asked by the parent', typeof m.graceMs === 'number' ? m.graceMs : undefined);
      });
    } else {
      process.on('SIGINT', () => finish('SIGINT'));
      process.on('SIGHUP', () => finish('SIGHUP'));
    }
  });
  const banner = `${simulationLabel(role, profile)}\n${role} worker listening on ${worker.url}${worker.engineAddress ? ` (transfer engine ${worker.engineAddress})` : ''}${values.register ? ', registered in etcd' : ''}`;
  if (supervised) {
    process.send!({ type: 'ready', url: worker.url, pid: process.pid, engine: worker.engineAddress ?? null, engineName: worker.engineName, role });
  } else {
    console.log(banner);
  }
  await done;
  if (supervised && process.connected) process.disconnect();
  // Everything is closed; should a stray keep-alive socket hold the loop, do not linger.
  setTimeout(() => process.exit(0), 1_000).unref();
  return 0;
}
