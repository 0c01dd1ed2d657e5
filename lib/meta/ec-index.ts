/**
 * The encoder-cache index in etcd: which holder (an engine's control address or
 * name) has which `mmHash`, across hosts.
 *
 * Key layout: `<prefix>ec/<mmHash>/<holder>` → `{ holder, at }`, attached to the
 * announcing process's lease. So an entry goes when its holder withdraws it (the
 * encoder cache withdraws evicted and deleted keys on its next sync), when the holder
 * closes (lease revoked), and when the holder dies or loses etcd for longer than the
 * TTL (lease expired) — a crashed host's embeddings stop being offered within the TTL.
 *
 * It implements lib/ec's `EncoderCacheDirectory` (announce / withdraw / forget /
 * locate), so `EncoderCacheHost.serve(engine, store, { directory:
 * EtcdEncoderCacheIndex.forEngine(engine) })` keeps etcd told and `EncoderCacheRemote`
 * finds holders through it. The index is a hint: consumers verify by pulling, and
 * withdraw stale answers.
 */
import type { EncoderCacheDirectory } from '../ec/directory.js';
import { TransferError } from '../errors.js';
import { badArgument, expectString } from '../validate.js';
import { EtcdSession, keyOf, keyParts, type EtcdOptions } from './etcd.js';
import { EtcdMetadataStore, type MetadataStore } from './store.js';

/** Which holders have which keys: lib/ec's directory contract, which this index implements in etcd. */
export type EncoderCacheIndex = EncoderCacheDirectory;

function expectKeys(value: unknown, name: string): readonly string[] {
  if (!Array.isArray(value)) badArgument(name, 'an array of mmHash strings', value);
  value.forEach((k, i) => {
    if (typeof k !== 'string' || k.length === 0 || Buffer.byteLength(k) > 255) badArgument(`${name}[${i}]`, 'a non-empty string of at most 255 bytes', k);
  });
  return value as string[];
}

/** The encoder-cache index kept in etcd. See the module comment. */
export class EtcdEncoderCacheIndex implements EncoderCacheDirectory {
  private constructor(
    private readonly session: EtcdSession,
    private readonly ownsSession: boolean,
  ) {}

  /** Connects its own session (own lease). Close it with {@link close}. */
  static async connect(url: string, options?: EtcdOptions): Promise<EtcdEncoderCacheIndex> {
    return new EtcdEncoderCacheIndex(await EtcdSession.connect(url, options), true);
  }

  /**
   * Shares the session (and lease) of an engine opened with etcd metadata, so its
   * announcements live and die with the engine's segment record.
   */
  static forEngine(engine: { metadata: MetadataStore }): EtcdEncoderCacheIndex {
    const store = engine.metadata;
    if (!(store instanceof EtcdMetadataStore)) {
      throw new TransferError('the engine does not use etcd metadata (open it with metadata: "etcd://…")', 'ERR_BAD_ARGUMENT');
    }
    return new EtcdEncoderCacheIndex(store.session, false);
  }

  async announce(holder: string, mmHashes: readonly string[]): Promise<void> {
    expectString(holder, 'holder');
    const keys = expectKeys(mmHashes, 'mmHashes');
    const at = Date.now();
    await this.session.putMany(keys.map((k) => [keyOf('ec', k, holder), { holder, at }] as const));
  }

  async withdraw(holder: string, mmHashes: readonly string[]): Promise<void> {
    expectString(holder, 'holder');
    const keys = expectKeys(mmHashes, 'mmHashes');
    await this.session.deleteKeys(keys.map((k) => keyOf('ec', k, holder)));
  }

  /** Deletes every entry of `holder` (a scan of the index: meant for the rare case of an unreachable holder). */
  async forget(holder: string): Promise<void> {
    expectString(holder, 'holder');
    const { entries } = await this.session.list<{ holder: string }>('ec/');
    await this.session.deleteKeys(entries.filter((e) => e.value.holder === holder).map((e) => e.key));
  }

  async locate(mmHash: string): Promise<string[]> {
    expectString(mmHash, 'mmHash');
    const { entries } = await this.session.list<{ holder: string }>(`${keyOf('ec', mmHash)}/`);
    return entries
      .filter((e) => keyParts(e.key)[1] === mmHash)
      .sort((a, b) => b.modRevision - a.modRevision)
      .map((e) => e.value.holder);
  }

  /** Closes the session when the index owns it (revoking its lease: every entry it announced goes). */
  async close(): Promise<void> {
    if (this.ownsSession) await this.session.close();
  }
}
