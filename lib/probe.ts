/**
 * What this host offers: device backends, transports, and the memcpy and loopback
 * TCP bandwidths every transfer figure should be read against.
 *
 * Vendor backends (acl, cuda, hccl, mooncake) are looked up here for real: their
 * libraries are opened with dlopen (EPD_TRANSFER_<X>_LIB overrides the file) and
 * device runtimes initialised without creating a context. docs/VENDOR.md lists the
 * reasons a backend reports.
 */
import { native, type NativeVendorStatus } from './native.js';

/** Whether a backend can be used here, and why not. */
export interface BackendStatus {
  available: boolean;
  reason?: string;
  /**
   * Vendor backends: 'available', 'missing-library', 'missing-symbol',
   * 'stub-library', 'no-device', 'init-failed' or 'needs-other-backend'.
   */
  status?: string;
  /** Vendor backends: the library file that was loaded (or the override that failed). */
  library?: string;
  /** Device backends: how many devices the runtime sees. */
  devices?: number;
  /** acl: the CANN runtime version (aclsysGetVersionStr). */
  version?: string;
  /** cuda: the driver's CUDA version, e.g. 12040. */
  driverVersion?: number;
  /** Device backends: whether the runtime exports the IPC functions. */
  ipc?: boolean;
  /** hccl: whether HcclBatchSendRecv is available. */
  batchSendRecv?: boolean;
}

export interface ProbeResult {
  devices: { host: BackendStatus; acl: BackendStatus; cuda: BackendStatus };
  transports: { shm: BackendStatus; tcp: BackendStatus; mooncake: BackendStatus; hccl: BackendStatus };
  /** Single-thread memcpy over a DRAM-sized working set, GB/s (1e9 B/s). */
  memcpyGbps: number;
  /** Raw loopback TCP, one connection, 1 MiB sends, GB/s: the ceiling of the tcp transport here. */
  tcpLoopbackGbps: number;
}

function fromNative(s: NativeVendorStatus): BackendStatus {
  // The native object already has exactly this shape; copy it so callers own it.
  return { ...s };
}

/** Vendor backends only (no memcpy measurement): cheap after the first call. */
export function vendorBackends(): { acl: BackendStatus; cuda: BackendStatus; hccl: BackendStatus; mooncake: BackendStatus } {
  const v = native.vendorBackends();
  return { acl: fromNative(v.acl), cuda: fromNative(v.cuda), hccl: fromNative(v.hccl), mooncake: fromNative(v.mooncake) };
}

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
  const vendor = vendorBackends();
  return {
    devices: { host: { available: true }, acl: vendor.acl, cuda: vendor.cuda },
    transports: {
      shm: { available: true },
      tcp: { available: true },
      mooncake: vendor.mooncake,
      hccl: vendor.hccl,
    },
    memcpyGbps: measureMemcpyGbps(options.memcpyBytes, 1 << 20, options.millis),
    tcpLoopbackGbps: measureTcpLoopbackGbps(1, options.millis),
  };
}
