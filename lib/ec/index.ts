/** The encoder cache: a host-wide embedding store, its cross-host pull path, and vLLM's ECConnector contract. */
export { mmHash } from './hash.js';
export type { MmHashInput, JsonValue } from './hash.js';
export { EncoderCacheStore, EncoderCacheEntry, EncoderCacheWriter } from './store.js';
export type { EncoderCacheStoreOptions, EncoderCacheStats, EntryMeta, LoadResult, LoadTarget, SaveOptions, SaveResult } from './store.js';
export { MemoryDirectory, EmbeddedDirectory, serveDirectory, DIRECTORY_TOPIC } from './directory.js';
export type { EncoderCacheDirectory } from './directory.js';
export { EncoderCacheHost, EncoderCacheRemote, FETCH_TOPIC, STAT_TOPIC } from './remote.js';
export type { EncoderCacheHostOptions, PullResult } from './remote.js';
export { ECConnector } from './connector.js';
export type { ECConnectorOptions, ECConnectorRole, ECConnectorMetadata, ECFeature, ECFinished, ECLoadItem, ECRequest, ECTransferRole } from './connector.js';
