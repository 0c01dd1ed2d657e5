/**
 * The encoder-cache directory: which hosts hold which `mmHash`. Within a host the
 * shared store answers by itself; across hosts a consumer asks the directory for
 * holders and then pulls from one ({@link EncoderCacheRemote}).
 *
 * The directory is a hint, never the truth: a holder may have evicted an entry
 * since it announced it, so a pull verifies and a stale answer is withdrawn.
 *
 * Implementations: {@link MemoryDirectory} (one process), {@link EmbeddedDirectory}
 * (a client of a directory that one engine serves over its control connection with
 * {@link serveDirectory}; nothing to install). A cluster backend (etcd, with leases
 * so a dead host's keys disappear) implements the same interface.
 */
import type { TransferEngine, Peer } from '../engine.js';
import { TransferError } from '../errors.js';
import { badArgument, expectObject, expectOptionalObject, expectString, expectTimeout } from '../validate.js';

/** Which holders (engine control addresses, "host:port") have which keys. */
export interface EncoderCacheDirectory {
  /** Records that `holder` has these keys. */
  announce(holder: string, mmHashes: readonly string[]): Promise<void>;
  /** Records that `holder` no longer has these keys. */
  withdraw(holder: string, mmHashes: readonly string[]): Promise<void>;
  /** Drops everything `holder` announced (it went away). */
  forget(holder: string): Promise<void>;
  /** Holders of `mmHash`, most recently announced first; empty when none. */
  locate(mmHash: string): Promise<string[]>;
}

/** Control-request topic of the embedded directory. */
export const DIRECTORY_TOPIC = 'epd.ec.directory';

/** Most keys per control message (a frame carries at most 1 MiB of JSON). */
const BATCH = 4096;

function expectKeys(value: unknown, name: string): string[] {
  if (!Array.isArray(value)) badArgument(name, 'an array of mmHash strings', value);
  value.forEach((k, i) => {
    if (typeof k !== 'string' || k.length === 0 || k.length > 255) badArgument(`${name}[${i}]`, 'a non-empty string of at most 255 bytes', k);
  });
  return value as string[];
}

/** A directory in this process's memory. Also the state behind {@link serveDirectory}. */
export class MemoryDirectory implements EncoderCacheDirectory {
  private readonly holders = new Map<string, Map<string, number>>(); // key -> holder -> announce sequence
  private readonly byHolder = new Map<string, Set<string>>();
  private seq = 0;

  async announce(holder: string, mmHashes: readonly string[]): Promise<void> {
    expectString(holder, 'holder');
    const keys = expectKeys(mmHashes, 'mmHashes');
    let mine = this.byHolder.get(holder);
    if (!mine) this.byHolder.set(holder, (mine = new Set()));
    for (const k of keys) {
      let h = this.holders.get(k);
      if (!h) this.holders.set(k, (h = new Map()));
      h.set(holder, ++this.seq);
      mine.add(k);
    }
  }

  async withdraw(holder: string, mmHashes: readonly string[]): Promise<void> {
    expectString(holder, 'holder');
    for (const k of expectKeys(mmHashes, 'mmHashes')) this.drop(holder, k);
  }

  async forget(holder: string): Promise<void> {
    expectString(holder, 'holder');
    for (const k of [...(this.byHolder.get(holder) ?? [])]) this.drop(holder, k);
    this.byHolder.delete(holder);
  }

  async locate(mmHash: string): Promise<string[]> {
    expectString(mmHash, 'mmHash');
    const h = this.holders.get(mmHash);
    return h ? [...h.entries()].sort((a, b) => b[1] - a[1]).map(([holder]) => holder) : [];
  }

  /** Number of keys with at least one holder. */
  get size(): number {
    return this.holders.size;
  }

  private drop(holder: string, key: string): void {
    const h = this.holders.get(key);
    if (h?.delete(holder) && h.size === 0) this.holders.delete(key);
    this.byHolder.get(holder)?.delete(key);
  }
}

type DirectoryRequest =
  | { op: 'announce' | 'withdraw'; holder: string; mmHashes: string[] }
  | { op: 'forget'; holder: string }
  | { op: 'locate'; mmHash: string };

/**
 * Serves `directory` (default: a new {@link MemoryDirectory}) to peers of `engine`
 * on {@link DIRECTORY_TOPIC}. Returns a function that stops serving.
 */
export function serveDirectory(engine: TransferEngine, directory: EncoderCacheDirectory = new MemoryDirectory()): () => void {
  return engine.handle(DIRECTORY_TOPIC, async (body) => {
    const req = expectObject(body, 'request') as DirectoryRequest;
    switch (req.op) {
      case 'announce':
        await directory.announce(expectString(req.holder, 'holder'), expectKeys(req.mmHashes, 'mmHashes'));
        return null;
      case 'withdraw':
        await directory.withdraw(expectString(req.holder, 'holder'), expectKeys(req.mmHashes, 'mmHashes'));
        return null;
      case 'forget':
        await directory.forget(expectString(req.holder, 'holder'));
        return null;
      case 'locate':
        return directory.locate(expectString(req.mmHash, 'mmHash'));
      default:
        return badArgument('op', '"announce", "withdraw", "forget" or "locate"', (req as { op?: unknown }).op);
    }
  });
}

/** A client of the directory an engine serves with {@link serveDirectory}. */
export class EmbeddedDirectory implements EncoderCacheDirectory {
  private constructor(
    private readonly engine: TransferEngine,
    private readonly address: string,
    private peer: Peer,
    private readonly timeoutMs: number,
  ) {}

  /** Connects `engine` to the directory served at `address` ("host:port"). */
  static async connect(engine: TransferEngine, address: string, options?: { timeoutMs?: number }): Promise<EmbeddedDirectory> {
    expectString(address, 'address');
    const o = expectOptionalObject(options, 'options');
    const timeoutMs = o.timeoutMs === undefined ? 5_000 : expectTimeout(o.timeoutMs, 'options.timeoutMs');
    const peer = await engine.connect(address, { timeoutMs });
    return new EmbeddedDirectory(engine, address, peer, timeoutMs);
  }

  async announce(holder: string, mmHashes: readonly string[]): Promise<void> {
    expectString(holder, 'holder');
    const keys = expectKeys(mmHashes, 'mmHashes');
    for (let i = 0; i < keys.length; i += BATCH) await this.call({ op: 'announce', holder, mmHashes: keys.slice(i, i + BATCH) });
  }

  async withdraw(holder: string, mmHashes: readonly string[]): Promise<void> {
    expectString(holder, 'holder');
    const keys = expectKeys(mmHashes, 'mmHashes');
    for (let i = 0; i < keys.length; i += BATCH) await this.call({ op: 'withdraw', holder, mmHashes: keys.slice(i, i + BATCH) });
  }

  async forget(holder: string): Promise<void> {
    await this.call({ op: 'forget', holder: expectString(holder, 'holder') });
  }

  async locate(mmHash: string): Promise<string[]> {
    const holders = await this.call({ op: 'locate', mmHash: expectString(mmHash, 'mmHash') });
    if (!Array.isArray(holders) || !holders.every((h) => typeof h === 'string')) {
      throw new TransferError(`directory at ${this.address} answered locate with something other than a list of addresses`, 'ERR_PROTOCOL');
    }
    return holders;
  }

  private async call(req: DirectoryRequest): Promise<unknown> {
    // Reconnect once if the directory's engine restarted since.
    if (this.peer.lost) this.peer = await this.engine.connect(this.address, { timeoutMs: this.timeoutMs });
    return this.peer.request(DIRECTORY_TOPIC, req, { timeoutMs: this.timeoutMs });
  }
}
