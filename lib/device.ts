/**
 * The device an engine runs on: memory, FIFO streams, events and IPC, with the
 * same shape for every backend. `host` (the CPU) is always available; its streams
 * are worker threads and its events real fences, so code written against it
 * behaves the same on ACL or CUDA devices.
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

  /** A key another process on this host can import with {@link Device.ipcImport}. */
  ipcExport(ptr: bigint, length: number): string {
    return this.engine.deviceIpcExport(expectPointer(ptr, 'ptr'), expectInteger(length, 'length', 1));
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
}

/** Thrown for backends this build cannot run. */
export function backendUnavailable(kind: string, reason: string): TransferError {
  return new TransferError(`device backend '${kind}' is unavailable: ${reason}`, 'ERR_BACKEND_UNAVAILABLE');
}
