/**
 * `epd-transfer register …` (an instance's registration in etcd, run beside a serving
 * process that cannot register itself, e.g. a vLLM server) and `epd-transfer metadata
 * list …` (what etcd holds: engines, instances, proxies). lib/cli.ts dispatches here.
 */
import { parseArgs } from 'node:util';
import { TransferError } from '../errors.js';
import { expectInteger } from '../validate.js';
import { EtcdSession } from './etcd.js';
import { INSTANCE_ROLES, listInstances, registerInstance, type InstanceRole } from './registry.js';
import type { SegmentRecord } from './store.js';

export const META_USAGE = `  register [options]             keep an E/P/D/PD instance registered in etcd until SIGINT/SIGTERM
      --metadata <etcd://h:p>    etcd endpoints (or EPD_TRANSFER_METADATA)
      --role <role>              encode, prefill, decode or pd
      --url <url>                the instance's base URL (http://host:port)
      --model <name>             the model it serves
      --engine <name>            its transfer engine's name
      --lease-ttl <s>            lease TTL: how long a dead registrant's record outlives it (10)
  metadata list --metadata <etcd://h:p>
                                 engines, instances and proxies registered in etcd (JSON)
`;

function metadataUrl(value: string | undefined): string {
  const url = value ?? process.env.EPD_TRANSFER_METADATA;
  if (!url?.startsWith('etcd://')) {
    throw new TransferError(`Expected an etcd URL like etcd://127.0.0.1:2379 for --metadata but received ${JSON.stringify(url ?? '')}`, 'ERR_BAD_ARGUMENT');
  }
  return url;
}

/** `epd-transfer register …`. */
export async function registerCommand(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      metadata: { type: 'string' },
      role: { type: 'string' },
      url: { type: 'string' },
      model: { type: 'string' },
      engine: { type: 'string' },
      'lease-ttl': { type: 'string', default: '10' },
    },
  });
  if (!(INSTANCE_ROLES as readonly (string | undefined)[]).includes(values.role)) {
    throw new TransferError(`Expected one of ${INSTANCE_ROLES.join(', ')} for --role but received ${JSON.stringify(values.role ?? '')}`, 'ERR_BAD_ARGUMENT');
  }
  if (!values.url) throw new TransferError('--url is required (the instance base URL)', 'ERR_BAD_ARGUMENT');
  // Signals are caught from the start: a SIGTERM during registration still deregisters.
  let stop!: (signal: string) => void;
  const stopped = new Promise<string>((resolve) => (stop = resolve));
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
  const log = (m: string) => console.error(`${new Date().toISOString()} epd-register ${m}`);
  try {
    const registration = await registerInstance(
      metadataUrl(values.metadata),
      { role: values.role as InstanceRole, url: values.url, model: values.model, engine: values.engine },
      { ttlSeconds: expectInteger(Number(values['lease-ttl']), '--lease-ttl', 2, 3600) },
    );
    log(`registered ${registration.record.role} ${registration.record.url} on ${registration.session.endpoints}`);
    registration.session.onStatus((s) => log(`etcd session ${s.state}${s.error ? `: ${s.error.message}` : ''}`));
    log(`${await stopped}: deregistering`);
    await registration.close();
  } finally {
    process.off('SIGINT', stop);
    process.off('SIGTERM', stop);
  }
  return 0;
}

/** `epd-transfer metadata list …`. */
export async function metadataCommand(args: string[]): Promise<number> {
  const [action, ...rest] = args;
  if (action !== 'list') throw new TransferError(`Expected 'list' after 'metadata' but received ${JSON.stringify(action ?? '')}`, 'ERR_BAD_ARGUMENT');
  const { values } = parseArgs({ args: rest, options: { metadata: { type: 'string' } } });
  const session = await EtcdSession.connect(metadataUrl(values.metadata));
  try {
    const engines = (await session.list<SegmentRecord>('segments/')).entries.map((e) => e.value);
    const proxies = (await session.list<{ id: string; url: string }>('proxies/')).entries.map((e) => e.value);
    console.log(JSON.stringify({ endpoints: session.endpoints, prefix: session.prefix, engines, instances: await listInstances(session), proxies }, null, 2));
  } finally {
    await session.close();
  }
  return 0;
}
