/**
 * The shared instance registry: E/P/D/PD serving instances register themselves in
 * etcd (role, model, base URL, optionally their engine's name) under their lease;
 * every proxy started with `--metadata etcd://…` discovers them from there and
 * follows additions and removals without a restart. An instance that dies leaves
 * the registry within its lease TTL; one that closes its registration leaves at
 * once (proxies drain it).
 *
 * Key layout: `<prefix>instances/<role>/<url>` → {@link InstanceRecord}.
 */
import { badArgument, expectString } from '../validate.js';
import { EtcdSession, keyOf, keyParts, type EtcdOptions, type EtcdWatch } from './etcd.js';

/** Roles an instance registers with (a `pd` instance does prefill and decode). */
export const INSTANCE_ROLES = ['encode', 'prefill', 'decode', 'pd'] as const;
export type InstanceRole = (typeof INSTANCE_ROLES)[number];

/** What a serving instance publishes about itself. */
export interface InstanceRecord {
  role: InstanceRole;
  /** Base URL of its OpenAI-compatible HTTP API (http://host:port[/prefix]). */
  url: string;
  /** The model it serves (proxies started with a model only use matching instances). */
  model?: string;
  /** Its transfer engine's name, when it has one (for encoder-cache holders and tooling). */
  engine?: string;
}

/** Options of {@link registerInstance}. */
export interface RegisterOptions extends EtcdOptions {
  /** An etcd session to publish under (its lease); default: a new one closed by `close()`. */
  session?: EtcdSession;
}

/** A registration; `close()` removes it at once. */
export interface InstanceRegistration {
  readonly record: InstanceRecord;
  readonly session: EtcdSession;
  close(): Promise<void>;
}

function expectRecord(value: InstanceRecord): InstanceRecord {
  if (typeof value !== 'object' || value === null) badArgument('record', 'an object', value);
  if (!(INSTANCE_ROLES as readonly string[]).includes(value.role)) badArgument('record.role', INSTANCE_ROLES.join(', '), value.role);
  const url = expectString(value.url, 'record.url');
  if (!/^https?:\/\/[^/\s]+/.test(url)) badArgument('record.url', 'an http(s) base URL', url);
  if (value.model !== undefined) expectString(value.model, 'record.model');
  if (value.engine !== undefined) expectString(value.engine, 'record.engine');
  return { role: value.role, url: url.replace(/\/+$/, ''), ...(value.model ? { model: value.model } : {}), ...(value.engine ? { engine: value.engine } : {}) };
}

/** The key of an instance record. */
export function instanceKey(role: InstanceRole, url: string): string {
  return keyOf('instances', role, url);
}

/** Publishes an instance record in etcd under a lease, until `close()` or process death. */
export async function registerInstance(metadata: string, record: InstanceRecord, options: RegisterOptions = {}): Promise<InstanceRegistration> {
  const r = expectRecord(record);
  const owns = options.session === undefined;
  const session = options.session ?? (await EtcdSession.connect(metadata, options));
  const key = instanceKey(r.role, r.url);
  try {
    await session.put(key, r);
  } catch (err) {
    if (owns) await session.close();
    throw err;
  }
  let closed = false;
  return {
    record: r,
    session,
    async close() {
      if (closed) return;
      closed = true;
      if (owns) await session.close();
      else await session.delete(key);
    },
  };
}

/** Follows every instance record: the current ones first, then each change. */
export async function watchInstances(
  session: EtcdSession,
  handlers: { added(record: InstanceRecord): void; removed(role: InstanceRole, url: string): void },
): Promise<EtcdWatch> {
  const { entries, revision } = await session.list<InstanceRecord>('instances/');
  const valid = (r: InstanceRecord) => {
    try {
      return expectRecord(r);
    } catch {
      return null; // someone else's malformed record: ignored, never fatal
    }
  };
  for (const e of entries) {
    const r = valid(e.value);
    if (r) handlers.added(r);
  }
  return session.watchPrefix<InstanceRecord>(
    'instances/',
    {
      put: (e) => {
        const r = valid(e.value);
        if (r) handlers.added(r);
      },
      delete: (key) => {
        const [, role, url] = keyParts(key);
        if ((INSTANCE_ROLES as readonly string[]).includes(role) && url) handlers.removed(role as InstanceRole, url);
      },
    },
    { startRevision: revision + 1 },
  );
}

/** Lists the registered instances (tooling). */
export async function listInstances(session: EtcdSession): Promise<InstanceRecord[]> {
  const { entries } = await session.list<InstanceRecord>('instances/');
  return entries.map((e) => e.value);
}
