/** The EPD load-balancing proxy. See docs/PROXY.md. */
export { EpdProxy, DEFAULT_TIMEOUTS, DEFAULT_HEALTH } from './server.js';
export type { ProxyOptions } from './server.js';
export type { ProxyTimeouts, RequestTrace } from './flow.js';
export type { HealthOptions } from './health.js';
export { ROLES, normalizeInstanceUrl } from './instances.js';
export type { Role, InstanceState, InstanceInfo } from './instances.js';
export { MemoryEmbeddingLocator } from './locator.js';
export type { EmbeddingLocator, EmbeddingLocation, EncodedReport, MemoryEmbeddingLocatorOptions } from './locator.js';
export { signBody, checkSecret, SIGNATURE_HEADER } from './auth.js';
export { ProxyError } from './errors.js';
export type { RetryClass } from './errors.js';
export { DEFAULT_ESTIMATES, imageSize, textTokens } from './estimate.js';
export type { EstimateOptions, ImageSize } from './estimate.js';
export { ProxyCluster, FORWARDED_HEADER } from './cluster.js';
export type { ClusterOptions, ProxyRecord, StalenessStats } from './cluster.js';
