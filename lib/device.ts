/**
 * The device an engine runs on: memory, FIFO streams, events and IPC, with the
 * same shape for every backend. `host` (the CPU) is always available; its streams
 * are worker threads and its events real fences, so code written against it
 * behaves the same on ACL or CUDA devices. `acl` (Ascend NPU) and `cuda` (NVIDIA GPU)
 * load their vendor runtime at run time (docs/VENDOR.md); their streams and events
 * are the same DeviceStream / DeviceEvent classes.
 */
import { TransferError } from './errors.js';
import type { NativeEngine, NativeEvent, NativeStream } from './native.js';
import { badArgument, expectInteger, expectTimeout } from './validate.js';

const DEFAULT_WAIT_MS = 30_000;

function expectPointer(value: unknown, name: string): bigint {
  if (typeof value !== 'bigint' || value <= 0n) badArgument(name, 'a bigint device pointer', value);
  return value;
}

function expectBytes(value: unknown, name: string): ArrayBufferView {
  if (!ArrayBuffer.isView(value)) badArgument(name, 'a Buffer, TypedArray or DataView', value);
  return value;
}

/** A FIFO queue of device work. Operations run in the order they were enqueued. */
export class DeviceStream {
  /** @internal */
  constructor(readonly native: NativeStream) {}

  /** Enqueues a device-to-device copy of `bytes` from `src` to `dst`. */
  copy(dst: bigint, src: bigint, bytes: number): void {
    this.native.copy(expectPointer(dst, 'dst'), expectPointer(src, 'src'), expectInteger(bytes, 'bytes', 1));
  }

  /** Everything enqueued after this waits until `event` has completed. */
  waitEvent(event: DeviceEvent): void {
    if (!(event instanceof DeviceEvent)) badArgument('event', 'a DeviceEvent', event);
    this.native.waitEvent(event.native);
  }

  /** Simulated compute (host device only): occupies the stream for `micros`. */
  sleep(micros: number): void {
    this.native.sleep(expectInteger(micros, 'micros'));
  }

  /** Resolves when everything enqueued so far has run; ERR_TIMEOUT after `timeoutMs`. */
  synchronize(timeoutMs = DEFAULT_WAIT_MS): Promise<void> {
    return this.native.synchronize(expectTimeout(timeoutMs, 'timeoutMs'));
  }

  /** Destroys the stream after the work already queued on it. */
  destroy(): void {
    this.native.destroy();
  }
}

/** A fence in a stream: complete when the work recorded before it has run. */
export class DeviceEvent {
  /** @internal */
  constructor(readonly native: NativeEvent) {}

  /** Captures the work enqueued on `stream` so far. */
  record(stream: DeviceStream): void {
    if (!(stream instanceof DeviceStream)) badArgument('stream', 'a DeviceStream', stream);
    this.native.record(stream.native);
  }

  /**
   * The vendor runtime's handle of this event (an `aclrtEvent` on `acl`, a `CUevent`
   * on `cuda`), for code outside epd-transfer; undefined on `host`. It stays valid
   * until the event is destroyed.
   */
  get handle(): bigint | undefined {
    const h = this.native.handle();
    return h === 0n ? undefined : h;
  }

  /** True when the recorded work has run (or nothing was recorded). Never blocks. */
  query(): boolean {
    return this.native.query();
  }

  /** Resolves when the recorded work has run; ERR_TIMEOUT after `timeoutMs`. */
  synchronize(timeoutMs = DEFAULT_WAIT_MS): Promise<void> {
    return this.native.synchronize(expectTimeout(timeoutMs, 'timeoutMs'));
  }

  destroy(): void {
    this.native.destroy();
  }
}

/** Device memory returned by {@link Device.alloc}. */
export interface DeviceAllocation {
  ptr: bigint;
  length: number;
}

/** The device of an engine. */
export class Device {
  /** @internal */
  constructor(
    private readonly engine: NativeEngine,
    /** "host", "acl" or "cuda". */
    readonly kind: 'host' | 'acl' | 'cuda',
  ) {}

  /** Allocates device memory (host: shared memory another process can import). */
  alloc(bytes: number): DeviceAllocation {
    const length = expectInteger(bytes, 'bytes', 1);
    return { ptr: this.engine.deviceAlloc(length), length };
  }

  free(ptr: bigint): void {
    this.engine.deviceFree(expectPointer(ptr, 'ptr'));
  }

  /** Synchronous host-to-device copy of `bytes` into `ptr`. */
  write(ptr: bigint, bytes: ArrayBufferView): void {
    this.engine.deviceWrite(expectPointer(ptr, 'ptr'), expectBytes(bytes, 'bytes'));
  }

  /** Synchronous device-to-host copy filling `target` from `ptr`. */
  read(target: ArrayBufferView, ptr: bigint): void {
    this.engine.deviceRead(expectBytes(target, 'target'), expectPointer(ptr, 'ptr'));
  }

  /**
   * A key another process on this host can import with {@link Device.ipcImport}.
   * On `acl` the importer must also be allowed: see {@link Device.ipcAllow}.
   */
  ipcExport(ptr: bigint, length: number): string {
    return this.engine.deviceIpcExport(expectPointer(ptr, 'ptr'), expectInteger(length, 'length', 1));
  }

  /**
   * The id of this process that an exporter passes to {@link Device.ipcAllow} before
   * this process imports its keys. On `acl` it is the host-physical pid
   * (aclrtDeviceGetBareTgid), which differs from `process.pid` inside containers.
   */
  ipcProcessId(): number {
    return this.engine.deviceIpcProcessId();
  }

  /**
   * Lets process `pid` (its {@link Device.ipcProcessId}) import `key`, or, with
   * `key` omitted, every key this device has exported and will export. Required on
   * `acl`, whose IPC keys carry a pid whitelist; a no-op on `host` and `cuda`.
   */
  ipcAllow(pid: number, key?: string): void {
    const id = expectInteger(pid, 'pid', 1, 0x7fffffff);
    if (key !== undefined && (typeof key !== 'string' || key.length === 0)) badArgument('key', 'an IPC key string', key);
    this.engine.deviceIpcAllow(key ?? '', id);
  }

  ipcImport(key: string): DeviceAllocation {
    if (typeof key !== 'string' || key.length === 0) badArgument('key', 'an IPC key string', key);
    return this.engine.deviceIpcImport(key);
  }

  ipcClose(ptr: bigint): void {
    this.engine.deviceIpcClose(expectPointer(ptr, 'ptr'));
  }

  createStream(): DeviceStream {
    return new DeviceStream(this.engine.createStream());
  }

  createEvent(): DeviceEvent {
    return new DeviceEvent(this.engine.createEvent());
  }

  /**
   * Wraps an event recorded by other code on this device — an `aclrtEvent` on `acl`,
   * a `CUevent` on `cuda`, as a bigint handle — so it can serve where a DeviceEvent
   * is expected (a layer-ready signal, `stream.waitEvent`). `query()` and
   * `synchronize()` work on it; `destroy()` drops the wrapper, never the handle.
   * With torch_npu, hand over an event only after torch's own `event.synchronize()` or
   * `query()` said it was recorded: its task queue may still hold the record
   * (docs/VENDOR.md).
   */
  importEvent(handle: bigint): DeviceEvent {
    return new DeviceEvent(this.engine.wrapEvent(expectPointer(handle, 'handle')));
  }
}

/** Thrown for backends this build cannot run. */
export function backendUnavailable(kind: string, reason: string): TransferError {
  return new TransferError(`device backend '${kind}' is unavailable: ${reason}`, 'ERR_BACKEND_UNAVAILABLE');
}
