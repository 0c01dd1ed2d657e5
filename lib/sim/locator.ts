/**
 * The proxy's view of the encoder cache on one host. The proxy opens the same
 * shared store as the workers and answers "loadable" from the store itself — so it
 * sees evictions, which a locator fed only by encoder answers cannot — and keeps
 * which encoders produced each item, to send an item that is not loadable back to
 * the encoder that holds it.
 */
import type { EncoderCacheStore } from '../ec/store.js';
import { MemoryEmbeddingLocator, type EmbeddingLocation, type EmbeddingLocator, type EncodedReport } from '../proxy/locator.js';

/** An {@link EmbeddingLocator} over a host-wide {@link EncoderCacheStore}. */
export class SharedStoreLocator implements EmbeddingLocator {
  private readonly holders = new MemoryEmbeddingLocator({ sharedStore: false });

  /** @param store the store every encoder and prefill process of this host opens. */
  constructor(private readonly store: EncoderCacheStore) {}

  locate(itemKey: string): EmbeddingLocation | undefined {
    const hint = this.holders.locate(itemKey);
    if (this.store.has(itemKey)) return { loadable: true, encoders: hint?.encoders ?? [] };
    return hint;
  }

  recordEncoded(report: EncodedReport): void {
    this.holders.recordEncoded(report);
  }

  forgetInstance(encoderUrl: string): void {
    this.holders.forgetInstance(encoderUrl);
  }
}
