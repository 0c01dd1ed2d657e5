/**
 * An {@link EmbeddingLocator} over the cluster's encoder-cache index in etcd
 * (lib/meta/ec-index.ts): every proxy sees every embedding any encoder host
 * announced, not only those its own requests produced. Holders in the index are
 * engines (control addresses or names); the cluster maps them to the encoder
 * instance URLs they serve (instances register with their `engine`).
 *
 * A miss in the index falls back to the proxy's own locator; a slow or failing index
 * is a miss (the flow bounds every lookup, docs/PROXY.md "Deadlines").
 */
import type { EncoderCacheDirectory } from '../ec/directory.js';
import type { EmbeddingLocation, EmbeddingLocator, EncodedReport } from './locator.js';

/** Options of {@link IndexedEmbeddingLocator}. */
export interface IndexedEmbeddingLocatorOptions {
  /**
   * Whether P/PD instances load an embedding from any holder (their ECConnector pulls
   * across hosts from the same index): then an indexed item skips the encoders.
   * When false, an indexed item only goes back to an encoder that holds it. Default true.
   */
  loadable?: boolean;
}

/** Index first, then the proxy's own locator. */
export class IndexedEmbeddingLocator implements EmbeddingLocator {
  private readonly loadable: boolean;

  constructor(
    private readonly index: EncoderCacheDirectory,
    /** The encoder instance URL that serves a holder (engine address or name), if any. */
    private readonly encoderOf: (holder: string) => string | undefined,
    private readonly fallback: EmbeddingLocator,
    options: IndexedEmbeddingLocatorOptions = {},
  ) {
    this.loadable = options.loadable ?? true;
  }

  async locate(itemKey: string): Promise<EmbeddingLocation | undefined> {
    const own = await this.fallback.locate(itemKey);
    if (own?.loadable) return own;
    const holders = await this.index.locate(itemKey);
    if (holders.length === 0) return own;
    const encoders = new Set(own?.encoders ?? []);
    for (const h of holders) {
      const url = this.encoderOf(h);
      if (url) encoders.add(url);
    }
    return { loadable: this.loadable, encoders: [...encoders] };
  }

  recordEncoded(report: EncodedReport): void {
    // Encoder hosts announce what they hold themselves; the proxy's own memory still learns.
    this.fallback.recordEncoded(report);
  }

  forgetInstance(encoderUrl: string): void {
    this.fallback.forgetInstance(encoderUrl);
  }
}
