/** epd-transfer: move KV-cache layers and encoder embeddings between E/P/D processes. */
export { TransferEngine, Region, Peer, DescriptorBatch } from './engine.js';
export type { EngineOptions, TransferOptions, TransferResult, RemoteRegion, Descriptor, EngineCounters } from './engine.js';
export { Device, DeviceStream, DeviceEvent } from './device.js';
export type { DeviceAllocation } from './device.js';
export { TransferError, isTransferError } from './errors.js';
export type { ErrorCode } from './errors.js';
export { probe } from './probe.js';
export type { ProbeResult } from './probe.js';
export { WIRE_VERSION } from './meta/wire.js';
export { parseBytes, formatBytes } from './validate.js';
export * from './ec/index.js';
