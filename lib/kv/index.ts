/** Layerwise KV push from prefill to decode: layouts, block plans, sender, receiver, tracing. */
export { KvLayout, gqaTensors, mlaTensors, checkRemoteLayout } from './layout.js';
export type { KvTensor, KvTensorShape, KvLayoutSpec, PackedLayoutOptions, KvLayoutDescription, RemoteKvLayout } from './layout.js';
export {
  DESCRIPTOR_STRIDE,
  chunkBlockRange,
  expandBlockIds,
  blockRuns,
  appendRunDescriptors,
  planLayer,
  splitPlan,
} from './plan.js';
export type { TensorPlacement, BlockRun, ChunkState, ChunkRange, LayerPlanInput, PeerLayerPlan, PlanSlice } from './plan.js';
export { LayerwiseSender } from './sender.js';
export type { KvSendRequest, KvChunkProgress, KvSendResult, KvSendHandle, LayerwiseSenderOptions, LayerwiseSenderStats } from './sender.js';
export { LayerwiseReceiver } from './receiver.js';
export type { LayerwiseReceiverOptions, KvExpectOptions, KvReceiveResult, KvLayerEvent, LayerwiseReceiverStats } from './receiver.js';
export { KvRequestError } from './protocol.js';
export { KvTracer, layersOf, mergeChromeTraces } from './trace.js';
export type { KvTraceEvent, KvTracePhase, ChromeTraceEvent, KvLayerSummary } from './trace.js';
export { CHECKSUM_ALGORITHM } from './checksum.js';
