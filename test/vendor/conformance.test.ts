// One conformance suite, run over every device backend: `host` (the CPU), `acl` on the
// ACL fake (full and minimal: no optional symbols), and `cuda` on the CUDA-driver fake.
// Every backend is held to the same behaviour: memory, FIFO streams, events and
// cross-stream waits, deadlines, cross-process IPC. The fakes run the vendor code
// paths on this machine; they check call sequences and error handling, not hardware.
// With EPD_TEST_REAL_CUDA=1 the suite also runs on the host's real GPU through its
// own libcuda.so.1 (bench/device/run-cuda.sh does that).
import { fork, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TransferEngine, type DeviceEvent, type DeviceStream } from '../../lib/index.js';
import { expectCode, root } from '../helpers.js';
import { pattern, sha256 } from '../fixtures/pattern.mjs';
import { buildFakes, FakeControl, reclaimFakeShm, type FakeLibraries } from './fakes.js';

interface Backend {
  name: string;
  /** A real device: work is held back by queueing long copies, not by a fake's switch. */
  real?: boolean;
  device: 'host' | 'acl' | 'cuda';
  /** Vendor library overrides for this process and its children. */
  env(f: FakeLibraries): Record<string, string>;
  /** The fake's control prefix (vendor backends). */
  lib?: 'acl' | 'cuda';
  ipc: boolean;
  /** Whether the runtime makes importers ask the exporter first (ACL's pid whitelist). */
  whitelist: boolean;
}

const BACKENDS: Backend[] = [
  { name: 'host', device: 'host', env: () => ({}), ipc: true, whitelist: false },
  { name: 'acl (fake)', device: 'acl', env: (f) => ({ EPD_TRANSFER_ACL_LIB: f.acl }), lib: 'acl', ipc: true, whitelist: true },
  {
    name: 'acl (fake without optional symbols)',
    device: 'acl',
    env: (f) => ({ EPD_TRANSFER_ACL_LIB: f.aclMinimal }),
    lib: 'acl',
    ipc: false,
    whitelist: false,
  },
  { name: 'cuda (fake)', device: 'cuda', env: (f) => ({ EPD_TRANSFER_CUDA_LIB: f.cuda }), lib: 'cuda', ipc: true, whitelist: false },
];
if (process.env.EPD_TEST_REAL_CUDA === '1') {
  // The driver the loader finds by default (or EPD_TRANSFER_CUDA_LIB, as set for the run).
  const lib = process.env.EPD_TRANSFER_CUDA_LIB ?? '';
  BACKENDS.push({ name: 'cuda (real GPU)', device: 'cuda', env: () => ({ EPD_TRANSFER_CUDA_LIB: lib }), real: true, ipc: true, whitelist: false });
}

let fakes: FakeLibraries;
const control = new FakeControl();

beforeAll(() => {
  fakes = buildFakes();
  Object.assign(process.env, control.env());
});

afterAll(() => {
  control.dispose();
  reclaimFakeShm();
});

/** A child process with an engine on the same device, driven over IPC. */
class Child {
  private next = 1;
  private readonly pending = new Map<number, { resolve(v: unknown): void; reject(e: Error): void }>();
  private constructor(readonly proc: ChildProcess) {
    proc.on('message', (m: { id?: number; result?: unknown; error?: { code?: string; message: string } }) => {
      const p = m.id === undefined ? undefined : this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id!);
      if (m.error) p.reject(Object.assign(new Error(m.error.message), { code: m.error.code }));
      else p.resolve(m.result);
    });
  }

  static async start(device: string, env: Record<string, string>): Promise<Child> {
    const proc = fork(path.join(root, 'test', 'vendor', 'fixtures', 'device-child.mjs'), [device], {
      env: { ...process.env, ...env },
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    });
    await new Promise<void>((resolve, reject) => {
      proc.once('message', () => resolve());
      proc.once('exit', (code) => reject(new Error(`device child exited with ${code}`)));
    });
    return new Child(proc);
  }

  call<T>(op: string, args?: Record<string, unknown>): Promise<T> {
    const id = this.next++;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.proc.send({ id, op, args });
    });
  }

  async stop(): Promise<void> {
    const exited = new Promise((resolve) => this.proc.once('exit', resolve));
    this.proc.disconnect();
    await exited;
  }
}

describe.each(BACKENDS)('device conformance: $name', (backend) => {
  let engine: TransferEngine;

  let ballast: { a: bigint; b: bigint; bytes: number; copies: number } | undefined;

  beforeAll(async () => {
    Object.assign(process.env, backend.env(fakes));
    engine = await TransferEngine.open({ device: backend.device, listen: false });
    if (backend.real) {
      // Calibrate the work that holds a real stream back: about 1.5 s of copies.
      const bytes = 256 << 20;
      const b = { a: engine.device.alloc(bytes).ptr, b: engine.device.alloc(bytes).ptr, bytes, copies: 0 };
      const s = engine.device.createStream();
      s.copy(b.b, b.a, bytes);
      await s.synchronize(30_000);
      const t0 = performance.now();
      for (let i = 0; i < 16; i++) s.copy(b.b, b.a, bytes);
      await s.synchronize(30_000);
      const perCopyMs = (performance.now() - t0) / 16;
      b.copies = Math.min(50_000, Math.max(8, Math.ceil(1_500 / perCopyMs)));
      s.destroy();
      ballast = b;
    }
  });

  afterAll(async () => {
    control.clear();
    if (ballast) {
      engine.device.free(ballast.a);
      engine.device.free(ballast.b);
    }
    await engine?.close();
  });

  /**
   * Holds everything queued on `stream` after this call until release(): on host a
   * long sleep on the stream, on the fakes their hang switch, on a real GPU about 1.5 s
   * of device-to-device copies queued ahead (release() cannot shorten them).
   */
  function block(stream: DeviceStream): { release(): void } {
    if (backend.device === 'host') {
      stream.sleep(300_000);
      return { release() {} };
    }
    if (backend.real) {
      for (let i = 0; i < ballast!.copies; i++) stream.copy(ballast!.b, ballast!.a, ballast!.bytes);
      return { release() {} };
    }
    control.set({ [`${backend.lib}.hang`]: 1 });
    return { release: () => control.clear() };
  }

  it('allocates, writes and reads back device memory', () => {
    const d = engine.device;
    const a = d.alloc(1 << 20);
    const data = pattern(1, a.length);
    d.write(a.ptr, data);
    const back = Buffer.alloc(a.length);
    d.read(back, a.ptr);
    expect(sha256(back)).toBe(sha256(data));
    // A sub-range, at an offset.
    const part = Buffer.alloc(4096);
    d.read(part, a.ptr + 8192n);
    expect(part.equals(data.subarray(8192, 8192 + 4096))).toBe(true);
    d.free(a.ptr);
  });

  it('refuses ranges outside its memory and unknown frees', async () => {
    const d = engine.device;
    const a = d.alloc(4096);
    await expectCode(() => d.read(Buffer.alloc(4097), a.ptr), 'ERR_OUT_OF_RANGE');
    await expectCode(() => d.write(a.ptr + 4000n, Buffer.alloc(200)), 'ERR_OUT_OF_RANGE');
    await expectCode(() => d.free(a.ptr + 16n), 'ERR_BAD_ARGUMENT');
    d.free(a.ptr);
    await expectCode(() => d.free(a.ptr), 'ERR_BAD_ARGUMENT');
    await expectCode(() => d.read(Buffer.alloc(16), a.ptr), 'ERR_OUT_OF_RANGE');
    const s = d.createStream();
    await expectCode(() => s.copy(a.ptr, a.ptr, 16), 'ERR_OUT_OF_RANGE');
    s.destroy();
  });

  it('runs a stream in order: a copy sees the copy queued before it', async () => {
    const d = engine.device;
    const n = 256 << 10;
    const [x, y, z] = [d.alloc(n), d.alloc(n), d.alloc(n)];
    d.write(x.ptr, pattern(2, n));
    const s = d.createStream();
    s.copy(y.ptr, x.ptr, n);
    s.copy(z.ptr, y.ptr, n);
    await s.synchronize(10_000);
    const back = Buffer.alloc(n);
    d.read(back, z.ptr);
    expect(sha256(back)).toBe(sha256(pattern(2, n)));
    s.destroy();
    for (const a of [x, y, z]) d.free(a.ptr);
  });

  it('completes events in order and treats a never-recorded event as complete', async () => {
    const d = engine.device;
    const fresh = d.createEvent();
    expect(fresh.query()).toBe(true);
    await fresh.synchronize(1_000);

    const s = d.createStream();
    const e = d.createEvent();
    const gate = block(s);
    e.record(s);
    expect(e.query()).toBe(false);
    gate.release();
    await e.synchronize(10_000);
    expect(e.query()).toBe(true);
    s.destroy();
    e.destroy();
    fresh.destroy();
  });

  it('makes a stream wait for an event recorded on another stream', async () => {
    const d = engine.device;
    const n = 128 << 10;
    const [x, y, z] = [d.alloc(n), d.alloc(n), d.alloc(n)];
    d.write(x.ptr, pattern(3, n));
    d.write(y.ptr, Buffer.alloc(n));
    const producer = d.createStream();
    const consumer = d.createStream();
    const ready = d.createEvent();
    const done = d.createEvent();

    const gate = block(producer);
    producer.copy(y.ptr, x.ptr, n);
    ready.record(producer);
    consumer.waitEvent(ready);
    consumer.copy(z.ptr, y.ptr, n);
    done.record(consumer);
    expect(done.query()).toBe(false);
    gate.release();
    await done.synchronize(10_000);

    const back = Buffer.alloc(n);
    d.read(back, z.ptr);
    expect(sha256(back)).toBe(sha256(pattern(3, n)));
    for (const o of [producer, consumer, ready, done]) o.destroy();
    for (const a of [x, y, z]) d.free(a.ptr);
  });

  it('gives every wait a deadline', async () => {
    const d = engine.device;
    const s = d.createStream();
    const e = d.createEvent();
    const gate = block(s);
    e.record(s);
    await expectCode(() => e.synchronize(50), 'ERR_TIMEOUT');
    await expectCode(() => s.synchronize(50), 'ERR_TIMEOUT');
    gate.release();
    await e.synchronize(10_000);
    await s.synchronize(10_000);
    s.destroy();
    e.destroy();
  });

  it('fails calls on destroyed streams and events with ERR_CLOSED', async () => {
    const d = engine.device;
    const s = d.createStream();
    const e = d.createEvent();
    s.destroy();
    e.destroy();
    await expectCode(() => s.synchronize(100), 'ERR_CLOSED');
    await expectCode(() => e.query(), 'ERR_CLOSED');
  });

  it.runIf(backend.device !== 'host')('surfaces its events as DeviceEvents and wraps foreign handles', async () => {
    const d = engine.device;
    const s = d.createStream();
    const e: DeviceEvent = d.createEvent();
    const gate = block(s);
    e.record(s);
    const handle = e.handle;
    expect(typeof handle).toBe('bigint');
    // The same event, seen through a wrapper as code outside epd-transfer would hand it over.
    const foreign = d.importEvent(handle!);
    expect(foreign.query()).toBe(false);
    await expectCode(() => foreign.synchronize(30), 'ERR_TIMEOUT');
    gate.release();
    await foreign.synchronize(10_000);
    expect(foreign.query()).toBe(true);
    foreign.destroy(); // drops the wrapper only
    expect(e.query()).toBe(true);
    const waiter = d.createStream();
    const again = d.importEvent(handle!);
    waiter.waitEvent(again);
    await waiter.synchronize(10_000);
    for (const o of [s, waiter, again, e]) o.destroy();
  });

  it.runIf(backend.device === 'host')('has no foreign event handles', async () => {
    expect(engine.device.createEvent().handle).toBeUndefined();
    await expectCode(() => engine.device.importEvent(1n), 'ERR_BACKEND_UNAVAILABLE');
  });

  it.runIf(backend.ipc)('shares memory with another process through IPC keys', async () => {
    const d = engine.device;
    const n = 2 << 20;
    const a = d.alloc(n);
    d.write(a.ptr, pattern(4, n));
    // A sub-range: the key carries its offset.
    const key = d.ipcExport(a.ptr + 4096n, n - 8192);
    const child = await Child.start(backend.device, backend.env(fakes));
    try {
      const pid = await child.call<number>('pid');
      if (backend.whitelist) {
        // Not on the key's pid whitelist yet: the runtime refuses (EACCES).
        await expect(child.call('import', { key })).rejects.toMatchObject({ code: 'ERR_SYSTEM', message: expect.stringMatching(/ipcAllow/) });
      }
      d.ipcAllow(pid, key);
      control.resetTrace();
      const imp = await child.call<{ id: number; length: number }>('import', { key });
      expect(imp.length).toBe(n - 8192);
      const seen = await child.call<string>('roundTrip', { id: imp.id, seed: 5 });
      expect(seen).toBe(sha256(pattern(4, n).subarray(4096, n - 4096)));
      await child.call('close', { id: imp.id });
      const back = Buffer.alloc(n - 8192);
      d.read(back, a.ptr + 4096n);
      expect(sha256(back)).toBe(sha256(pattern(5, n - 8192)));
    } finally {
      await child.stop();
    }
    d.free(a.ptr);
    if (backend.device === 'acl') {
      // Importer closed, then the exporter closed its key, then freed: the order ACL requires.
      const ipc = control
        .trace()
        .filter((t) => t.rc === 0 && (/^aclrtIpcMem(ImportByKey|Close)$/.test(t.fn) || (t.fn === 'aclrtFree' && t.pid === process.pid)));
      const order = ipc.map((t) => `${t.pid === process.pid ? 'exporter' : 'importer'}:${t.fn}${/role=(\w+)/.exec(t.details)?.[1] ?? ''}`);
      expect(order).toEqual([
        'importer:aclrtIpcMemImportByKey',
        'importer:aclrtIpcMemCloseimporter',
        'exporter:aclrtIpcMemCloseexporter',
        'exporter:aclrtFree',
      ]);
      expect(ipc.find((t) => /role=exporter/.test(t.details))?.details).toMatch(/open_importers=0/);
    }
  });

  it.runIf(!backend.ipc && backend.device !== 'host')('reports IPC as unavailable when the runtime lacks it', async () => {
    const a = engine.device.alloc(4096);
    const err = await expectCode(() => engine.device.ipcExport(a.ptr, 4096), 'ERR_BACKEND_UNAVAILABLE');
    expect(err.message).toMatch(/aclrtIpcMem/);
    engine.device.free(a.ptr);
  });

  it('refuses malformed IPC keys', async () => {
    await expectCode(() => engine.device.ipcImport('not-a-key'), backend.ipc || backend.device === 'host' ? 'ERR_BAD_ARGUMENT' : 'ERR_BACKEND_UNAVAILABLE');
  });
});
