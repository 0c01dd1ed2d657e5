/**
 * The one seam to the C++ addon: loads it (node-gyp-build: a prebuild when one
 * matches, else the local source build) and declares its surface with types.
 * Nothing else in lib/ loads native code.
 *
 * Environment:
 * - `EPD_TRANSFER_ADDON=/path/to/addon.node` loads that exact file (sanitizer or
 *   cmake-js builds).
 * - `PREBUILDS_ONLY=1` (node-gyp-build) refuses the local build and loads only from
 *   `prebuilds/`.
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { TransferError } from './errors.js';
import type { NativeLinkSpec } from './link.js';

/** A region of a peer as its segment descriptor lists it. */
export interface NativeRegionSpec {
  id: number;
  length: number;
  kind?: string;
  /** POSIX shm object that holds the region (host regions). */
  shm?: string;
  /** Offset of the region inside `shm`. */
  offset?: number;
  /** Device IPC key (device regions). */
  ipcKey?: string;
  /** The region's address in the peer, hex (engines opened with mooncake). */
  addr?: string;
}

/** How the engine reaches one peer (lib/engine.ts builds it). */
export interface NativePeerOptions {
  transport: 'shm' | 'tcp' | 'mooncake' | 'hccl';
  /** mooncake: the peer's segment name. */
  mooncake?: { segment: string };
  /** hccl: the joined communicator, and whether this side initiates (holds batches until released). */
  hccl?: { link: number; initiator: boolean };
  link?: NativeLinkSpec;
  tcp?: { addresses: string[]; grant: Buffer; key: Buffer; connections: number; connectTimeoutMs: number };
}

export interface NativeStream {
  copy(dst: bigint, src: bigint, bytes: number): void;
  waitEvent(event: NativeEvent): void;
  sleep(micros: number): void;
  synchronize(timeoutMs: number): Promise<void>;
  destroy(): void;
}

export interface NativeEvent {
  record(stream: NativeStream): void;
  query(): boolean;
  synchronize(timeoutMs: number): Promise<void>;
  /** The runtime's event handle (aclrtEvent / CUevent); 0n on the host device. */
  handle(): bigint;
  destroy(): void;
}

export interface NativeEngine {
  allocate(bytes: number, prefault: boolean): { id: number; buffer: Buffer; shm: string };
  register(bytes: ArrayBufferView | ArrayBuffer): number;
  registerDevice(ptr: bigint, length: number): number;
  free(id: number, failInFlight: boolean): Promise<void>;
  segment(): NativeRegionSpec[];
  addPeer(name: string, pid: number, regions: NativeRegionSpec[], options?: NativePeerOptions): number;
  updatePeer(id: number, regions: NativeRegionSpec[]): void;
  dropPeer(id: number, code: string, remove: boolean): void;
  /** op 0 = write, 1 = read. Returns [batchId, promise of bytes moved]. */
  submit(op: 0 | 1, peer: number, descriptors: Float64Array, count: number): [number, Promise<number>];
  abort(batchId: number, code: string): void;
  /** Opens the tcp data listener; returns its "host:port". */
  tcpListen(host: string, port: number): string;
  /** Creates or replaces a grant (16 bytes) whose connections prove `key` (32 bytes) and may touch `regions`. */
  tcpGrant(grant: Buffer, key: Buffer, regions: number[]): void;
  /** Removes a grant and closes its data connections. */
  tcpRevoke(grant: Buffer): void;
  tcpStats(): { listening: boolean; serverConnections: number; clientConnections: number };
  /** Opens and authenticates a tcp peer's data connections (off the JS thread). */
  connectPeer(id: number): Promise<void>;
  counters(): BigUint64Array;
  inFlight(): number;
  close(): void;
  deviceAlloc(bytes: number): bigint;
  deviceFree(ptr: bigint): void;
  deviceWrite(ptr: bigint, bytes: ArrayBufferView): void;
  deviceRead(target: ArrayBufferView, ptr: bigint): void;
  deviceIpcExport(ptr: bigint, length: number): string;
  deviceIpcImport(key: string): { ptr: bigint; length: number };
  deviceIpcClose(ptr: bigint): void;
  createStream(): NativeStream;
  createEvent(): NativeEvent;
  /** Wraps a foreign aclrtEvent / CUevent handle; the wrapper never destroys it. */
  wrapEvent(handle: bigint): NativeEvent;
  deviceInfo(): { kind: 'host' | 'acl' | 'cuda'; ordinal: number };
  /** The id an exporter passes to deviceIpcAllow for this process (ACL: the bare tgid). */
  deviceIpcProcessId(): number;
  /** Lets process `pid` import `key` ('' = every key this device exported or will export). */
  deviceIpcAllow(key: string, pid: number): void;
  /** Creates this engine's Mooncake engine; returns its segment name. */
  mooncakeStart(options: { metadata: string; hostname: string; rpcPort: number; protocol: string; nicPriorityMatrix: string }): string;
  /** Creates the hccl transport now (fails where HCCL cannot run). */
  hcclEnable(): void;
  /** HcclGetRootInfo: the 4108-byte blob the other rank joins with. */
  hcclRootInfo(): Buffer;
  /** Joins a two-rank communicator off the JS thread; resolves with a link id for addPeer. */
  hcclJoin(rootInfo: Uint8Array, rank: 0 | 1): Promise<number>;
  /** Posts a batch held for an initiating hccl peer. */
  hcclRelease(batchId: number): void;
  /** Drops a joined link no peer took. */
  hcclDiscard(link: number): void;
}

/** What one vendor backend found on this host (see docs/VENDOR.md). */
export interface NativeVendorStatus {
  available: boolean;
  /** 'available' | 'missing-library' | 'missing-symbol' | 'stub-library' | 'no-device' | 'init-failed' | 'needs-other-backend' */
  status: string;
  reason?: string;
  /** The library file that was opened (or the override that could not be). */
  library?: string;
  devices?: number;
  version?: string;
  driverVersion?: number;
  ipc?: boolean;
  batchSendRecv?: boolean;
}

/** Options of `new NativeEcStore(name, options)`; a capacity creates the store when it does not exist. */
export interface NativeEcStoreOptions {
  capacity?: number;
  maxEntries?: number;
  alignment?: number;
  maxProcesses?: number;
  maxPinsPerProcess?: number;
  lockTimeoutMs?: number;
  prefault?: boolean;
}

/** One attached handle on a shared encoder-cache store (native/ec_binding.cc). */
export interface NativeEcStore {
  /** Window k of the arena: bytes [k GiB, k GiB + 4 GiB), clipped at its end. */
  arena(window: number): ArrayBuffer;
  has(key: string): boolean;
  stat(key: string): { size: number; meta: string } | null;
  reserve(key: string, size: number, meta: string): { ticket: number; offset: number } | 'exists' | 'busy';
  write(ticket: number, offset: number, source: ArrayBufferView | ArrayBuffer): Promise<void>;
  commit(ticket: number): void;
  abort(ticket: number): void;
  acquire(key: string): { ticket: number; offset: number; size: number; meta: string } | null;
  release(ticket: number): void;
  load(key: string, target: ArrayBufferView | ArrayBuffer, targetOffset: number): Promise<{ size: number; meta: string }> | null;
  delete(key: string): boolean;
  keys(): string[];
  stats(): NativeEcStats;
  info(): NativeEcInfo;
  recover(): number;
  close(): void;
  /** Test hook (only with EPD_TRANSFER_EC_TEST_HOOKS=1): takes the index lock, prints "LOCKED", never returns. */
  holdLockForTest?(): never;
}

export interface NativeEcStats {
  usedBytes: number;
  entries: number;
  writing: number;
  pinned: number;
  processes: number;
  hits: number;
  misses: number;
  saves: number;
  dedups: number;
  evictions: number;
  evictedBytes: number;
  capacityErrors: number;
  recoveries: number;
  reapedProcesses: number;
  reapedWrites: number;
}

export interface NativeEcInfo {
  name: string;
  object: string;
  capacity: number;
  alignment: number;
  maxEntries: number;
  maxProcesses: number;
  maxPinsPerProcess: number;
  totalBytes: number;
}

export interface NativeBinding {
  NativeEcStore: new (name: string, options: NativeEcStoreOptions) => NativeEcStore;
  reclaimStaleEcStores(): number;
  NativeEngine: new (options: { threads: number; chunkBytes: number; device?: string; deviceId?: number }) => NativeEngine;
  /** Loads (on first use) and reports each vendor backend. */
  vendorBackends(): { acl: NativeVendorStatus; cuda: NativeVendorStatus; hccl: NativeVendorStatus; mooncake: NativeVendorStatus };
  setErrorClass(ctor: typeof TransferError): void;
  reclaimStaleShm(): number;
  memcpyBandwidth(dst: ArrayBufferView, src: ArrayBufferView, blockBytes: number, minMillis: number): number;
  /** Arrival (µs) of each message of `sizes` bytes offered at once to an emulated link. */
  linkSchedule(spec: NativeLinkSpec, sizes: number[]): Float64Array;
  /** HMAC-SHA256 as the data connections compute it (checked against node:crypto by the tests). */
  hmacSha256(key: ArrayBufferView, message: ArrayBufferView): Buffer;
  /** Receiving end of a two-process loopback pump: drains `connections` connections into `dst`. */
  tcpPumpReceiver(connections: number, blockBytes: number, dst: ArrayBufferView): { port: number; handle: object };
  tcpPumpReceiverClose(handle: object): void;
  /** Sending end: GB/s sent over `connections` connections to the receiver on `port`, `blockBytes` per send, from `src`. */
  tcpPumpSend(port: number, connections: number, blockBytes: number, src: ArrayBufferView, millis: number): number;
  /** Raw loopback socket pump in this process: GB/s over `connections` connections moving `blockBytes` pieces from `src` into `dst`. */
  tcpPump(connections: number, blockBytes: number, src: ArrayBufferView, dst: ArrayBufferView, millis: number): number;
  wireVersion: number;
  napiVersion: number;
}

/** Order of the counters in `NativeEngine.counters()`. */
export const COUNTER_NAMES = [
  'bytesWritten',
  'bytesRead',
  'batchesSubmitted',
  'batchesCompleted',
  'batchesFailed',
  'batchesInFlight',
  'bytesInFlight',
  'descriptors',
] as const;

/** The package root (where package.json and binding.gyp live), from src or dist. */
export function packageRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pkg = path.join(dir, 'package.json');
    if (existsSync(pkg) && JSON.parse(readFileSync(pkg, 'utf8')).name === 'epd-transfer') return dir;
    const up = path.dirname(dir);
    if (up === dir) throw new Error('epd-transfer: cannot find the package root');
    dir = up;
  }
}

function load(): { binding: NativeBinding; file: string } {
  const require = createRequire(import.meta.url);
  const explicit = process.env.EPD_TRANSFER_ADDON;
  if (explicit) return { binding: require(path.resolve(explicit)) as NativeBinding, file: path.resolve(explicit) };
  const gypBuild = require('node-gyp-build') as ((dir: string) => NativeBinding) & { resolve(dir: string): string };
  const root = packageRoot();
  return { binding: gypBuild(root), file: gypBuild.resolve(root) };
}

const loaded = load();

/** The loaded addon. */
export const native: NativeBinding = loaded.binding;
/** Path of the addon file that was loaded (prebuild, local build or EPD_TRANSFER_ADDON). */
export const addonPath: string = loaded.file;

native.setErrorClass(TransferError);
