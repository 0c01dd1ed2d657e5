/** epd-transfer: move KV-cache layers and encoder embeddings between E/P/D processes. */
export { TransferEngine, Region, Peer, DescriptorBatch } from './engine.js';
export type { EngineOptions, ConnectOptions, TransportChoice, MooncakeOptions, TransferOptions, TransferResult, RemoteRegion, Descriptor, EngineCounters, PeerLostEvent } from './engine.js';
export { Device, DeviceStream, DeviceEvent } from './device.js';
export type { DeviceAllocation } from './device.js';
export { TransferError, isTransferError } from './errors.js';
export type { ErrorCode } from './errors.js';
export { probe, vendorBackends } from './probe.js';
export type { ProbeResult, BackendStatus } from './probe.js';
export { WIRE_VERSION } from './meta/wire.js';
export type { RequestHandler, RequestContext, ControlSession } from './meta/handshake.js';
export { parseBytes, formatBytes } from './validate.js';
export { linkSchedule, parseBandwidth, parseMicros } from './link.js';
export type { LinkOptions, LinkFaults } from './link.js';
export {
  KvLayout,
  gqaTensors,
  mlaTensors,
  checkRemoteLayout,
  chunkBlockRange,
  expandBlockIds,
  blockRuns,
  appendRunDescriptors,
  planLayer,
  splitPlan,
  DESCRIPTOR_STRIDE,
  LayerwiseSender,
  LayerwiseReceiver,
  KvRequestError,
  KvTracer,
  layersOf,
  mergeChromeTraces,
  CHECKSUM_ALGORITHM,
} from './kv/index.js';
export type {
  KvTensor,
  KvTensorShape,
  KvLayoutSpec,
  PackedLayoutOptions,
  KvLayoutDescription,
  RemoteKvLayout,
  TensorPlacement,
  BlockRun,
  ChunkState,
  ChunkRange,
  LayerPlanInput,
  PeerLayerPlan,
  PlanSlice,
  KvSendRequest,
  KvChunkProgress,
  KvSendResult,
  KvSendHandle,
  LayerwiseSenderOptions,
  LayerwiseSenderStats,
  LayerwiseReceiverOptions,
  KvExpectOptions,
  KvReceiveResult,
  KvLayerEvent,
  LayerwiseReceiverStats,
  KvTraceEvent,
  KvTracePhase,
  ChromeTraceEvent,
  KvLayerSummary,
} from './kv/index.js';
export { PROFILES, REFERENCE_ACCELERATOR, getProfile, kvTensors, kvBytesPerToken, layerPrefillUs, decodeStepUs, decodeWeightBytes, imageEmbedding } from './sim/profiles.js';
export type { ModelProfile, GqaAttention, MlaAttention, FeedForward, VisionEncoder, ImageEmbedding } from './sim/profiles.js';
export { SimWorker, simulationLabel, SharedStoreLocator } from './sim/index.js';
export type { SimWorkerOptions, SimRole, WorkerStats as SimWorkerStats, SimRequestRecord } from './sim/index.js';
export { EpdProxy, MemoryEmbeddingLocator, ProxyError, ProxyCluster, signBody as signProxyBody, SIGNATURE_HEADER as PROXY_SIGNATURE_HEADER } from './proxy/index.js';
export type {
  ProxyOptions,
  ProxyTimeouts,
  RequestTrace as ProxyRequestTrace,
  HealthOptions as ProxyHealthOptions,
  Role as ProxyRole,
  InstanceInfo as ProxyInstanceInfo,
  InstanceState as ProxyInstanceState,
  EmbeddingLocator,
  EmbeddingLocation,
  EncodedReport,
  MemoryEmbeddingLocatorOptions,
  EstimateOptions as ProxyEstimateOptions,
  ClusterOptions as ProxyClusterOptions,
  StalenessStats as ProxyStalenessStats,
} from './proxy/index.js';
export { EmbeddedMetadataStore, EtcdMetadataStore, openMetadataStore } from './meta/store.js';
export type { MetadataStore, MetadataStoreOptions, MetadataState, MetadataStatus, SegmentRecord, SegmentWatch, ResolveOptions } from './meta/store.js';
export { EtcdSession, parseEtcdUrl } from './meta/etcd.js';
export type { EtcdOptions, EtcdSessionState, EtcdSessionStatus, EtcdEntry, EtcdWatch, WatchHandlers } from './meta/etcd.js';
export { EtcdEncoderCacheIndex } from './meta/ec-index.js';
export type { EncoderCacheIndex } from './meta/ec-index.js';
export { registerInstance, watchInstances, listInstances, INSTANCE_ROLES } from './meta/registry.js';
export type { InstanceRecord, InstanceRole, InstanceRegistration, RegisterOptions } from './meta/registry.js';
export { startEtcdServer, findEtcdBinary } from './meta/etcd-server.js';
export type { EtcdServer, EtcdServerOptions } from './meta/etcd-server.js';
export * from './ec/index.js';
