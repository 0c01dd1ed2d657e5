/**
 * What this host offers: device backends, transports, and the memcpy and loopback
 * TCP bandwidths every transfer figure should be read against.
 */
import { native } from './native.js';

/** Whether a backend can be used here, and why not. */
export interface BackendStatus {
  available: boolean;
  reason?: string;
}

export interface ProbeResult {
  devices: { host: BackendStatus; acl: BackendStatus; cuda: BackendStatus };
  transports: { shm: BackendStatus; tcp: BackendStatus; mooncake: BackendStatus; hccl: BackendStatus };
  /** Single-thread memcpy over a DRAM-sized working set, GB/s (1e9 B/s). */
  memcpyGbps: number;
  /** Raw loopback TCP, one connection, 1 MiB sends, GB/s: the ceiling of the tcp transport here. */
  tcpLoopbackGbps: number;
}

const NOT_BUILT = 'not built into this version of epd-transfer yet';

/** Single-thread memcpy bandwidth over `workingSetBytes` (default 256 MiB), GB/s. */
export function measureMemcpyGbps(workingSetBytes = 256 << 20, blockBytes = 1 << 20, millis = 300): number {
  const src = Buffer.allocUnsafeSlow(workingSetBytes).fill(1);
  const dst = Buffer.allocUnsafeSlow(workingSetBytes).fill(2);
  return native.memcpyBandwidth(dst, src, blockBytes, millis);
}

/** Raw loopback TCP over `connections` connections moving 1 MiB pieces through 64 MiB buffers, GB/s. */
export function measureTcpLoopbackGbps(connections = 1, millis = 300): number {
  const src = Buffer.allocUnsafeSlow(64 << 20).fill(1);
  const dst = Buffer.allocUnsafeSlow(64 << 20).fill(2);
  return native.tcpPump(connections, 1 << 20, src, dst, millis);
}

/** Probes this host. Takes about a second (the memcpy and loopback measurements). */
export function probe(options: { memcpyBytes?: number; millis?: number } = {}): ProbeResult {
  return {
    devices: {
      host: { available: true },
      acl: { available: false, reason: `Ascend ACL device backend is ${NOT_BUILT}` },
      cuda: { available: false, reason: `CUDA device backend is ${NOT_BUILT}` },
    },
    transports: {
      shm: { available: true },
      tcp: { available: true },
      mooncake: { available: false, reason: `Mooncake transport is ${NOT_BUILT}` },
      hccl: { available: false, reason: `HCCL transport is ${NOT_BUILT}` },
    },
    memcpyGbps: measureMemcpyGbps(options.memcpyBytes, 1 << 20, options.millis),
    tcpLoopbackGbps: measureTcpLoopbackGbps(1, options.millis),
  };
}
