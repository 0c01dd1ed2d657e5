// Vendor-specific behaviour of the acl and cuda devices, on the conformance fakes:
// how runtime errors map to our codes (with the runtime's own message), the
// per-thread context binding, ACL's IPC pid whitelist and release order on close.
import { fork } from 'node:child_process';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { TransferEngine } from '../../lib/index.js';
import { closeEngines, expectCode, openEngine, root, startPeer, stopPeers } from '../helpers.js';
import { pattern, sha256 } from '../fixtures/pattern.mjs';
import { buildFakes, FakeControl, reclaimFakeShm, type FakeLibraries } from './fakes.js';

let fakes: FakeLibraries;
const control = new FakeControl();

beforeAll(() => {
  fakes = buildFakes();
  Object.assign(process.env, control.env(), { EPD_TRANSFER_ACL_LIB: fakes.acl, EPD_TRANSFER_CUDA_LIB: fakes.cuda });
});

afterEach(async () => {
  control.clear();
  await closeEngines();
  await stopPeers();
});

afterAll(() => {
  control.dispose();
  reclaimFakeShm();
});

describe('acl error mapping', () => {
  let engine: TransferEngine;
  beforeAll(async () => {
    engine = await TransferEngine.open({ device: 'acl', listen: false });
  });
  afterAll(() => engine.close());

  it('maps allocation failures to ERR_SYSTEM/ENOMEM with ACL\'s name and recent message', async () => {
    control.set({ 'acl.fail': 'aclrtMalloc:207001' });
    const err = await expectCode(() => engine.device.alloc(4096), 'ERR_SYSTEM');
    expect(err.errno).toBe(12);
    expect(err.message).toMatch(/aclrtMalloc\(2097152 bytes\) failed: ACL error 207001 ACL_ERROR_RT_MEMORY_ALLOCATION: EZ9999/);
  });

  it('maps parameter, device, timeout and internal errors', async () => {
    const a = engine.device.alloc(4096);
    control.set({ 'acl.fail': 'aclrtMemcpy:100000' });
    await expectCode(() => engine.device.write(a.ptr, Buffer.alloc(16)), 'ERR_BAD_ARGUMENT');
    control.set({ 'acl.fail': 'aclrtCreateStream:107001' });
    await expectCode(() => engine.device.createStream(), 'ERR_BACKEND_UNAVAILABLE');
    control.clear();
    const s = engine.device.createStream();
    const e = engine.device.createEvent();
    e.record(s);
    control.set({ 'acl.fail': 'aclrtSynchronizeEventWithTimeout:507047' });
    await expectCode(() => e.synchronize(1000), 'ERR_TIMEOUT');
    control.set({ 'acl.fail': 'aclrtMemcpyAsync:507899' });
    const err = await expectCode(() => s.copy(a.ptr, a.ptr, 16), 'ERR_SYSTEM');
    expect(err.errno).toBe(5);
    expect(err.message).toMatch(/ACL_ERROR_RT_DRV_INTERNAL_ERROR/);
    control.clear();
    s.destroy();
    e.destroy();
    engine.device.free(a.ptr);
  });

  it('creates events that other streams may wait on (ACL_EVENT_SYNC)', () => {
    control.resetTrace();
    engine.device.createEvent().destroy();
    const created = control.trace().find((t) => t.fn === 'aclrtCreateEventWithFlag');
    expect(created?.details).toBe('flag=1');
  });
});

describe('cuda error mapping', () => {
  let engine: TransferEngine;
  beforeAll(async () => {
    engine = await TransferEngine.open({ device: 'cuda', listen: false });
  });
  afterAll(() => engine.close());

  it('maps driver errors with cuGetErrorName / cuGetErrorString', async () => {
    control.set({ 'cuda.fail': 'cuMemAlloc_v2:2' });
    const oom = await expectCode(() => engine.device.alloc(4096), 'ERR_SYSTEM');
    expect(oom.errno).toBe(12);
    expect(oom.message).toMatch(/cuMemAlloc\(4096 bytes\) failed: CUDA error 2 CUDA_ERROR_OUT_OF_MEMORY: out of memory/);
    control.clear();
    const a = engine.device.alloc(4096);
    control.set({ 'cuda.fail': 'cuMemcpyHtoD_v2:1' });
    await expectCode(() => engine.device.write(a.ptr, Buffer.alloc(16)), 'ERR_BAD_ARGUMENT');
    control.clear();
    const s = engine.device.createStream();
    const e = engine.device.createEvent();
    e.record(s);
    control.set({ 'cuda.fail': 'cuEventQuery:700' });
    const err = await expectCode(() => e.query(), 'ERR_SYSTEM');
    expect(err.message).toMatch(/CUDA_ERROR_ILLEGAL_ADDRESS/);
    control.clear();
    s.destroy();
    e.destroy();
    engine.device.free(a.ptr);
  });

  it('binds the versioned driver entry points, never the legacy ones', () => {
    control.resetTrace();
    const a = engine.device.alloc(4096);
    engine.device.free(a.ptr);
    const fns = control.trace().map((t) => t.fn);
    expect(fns).toContain('cuMemAlloc_v2');
    expect(fns).not.toContain('cuMemAlloc');
  });
});

describe('per-thread context', () => {
  it.each(['acl', 'cuda'] as const)('%s: binds its context on every thread that calls the runtime', async (device) => {
    const engine = await openEngine({ device, listen: false });
    control.resetTrace();
    const s = engine.device.createStream();
    const e = engine.device.createEvent();
    const a = engine.device.alloc(1 << 20);
    s.copy(a.ptr, a.ptr, 16);
    e.record(s);
    // Waits run on libuv pool threads: the runtime there needs the context too. The
    // fakes fail any call made on a thread without one.
    await e.synchronize(5_000);
    await s.synchronize(5_000);
    const binds = control.trace().filter((t) => t.fn === (device === 'acl' ? 'aclrtSetCurrentContext' : 'cuCtxSetCurrent'));
    expect(binds.some((t) => t.tid !== process.pid)).toBe(true);
    const refused = control.trace().filter((t) => t.rc === (device === 'acl' ? 107002 : 201));
    expect(refused).toEqual([]);
    s.destroy();
    e.destroy();
    engine.device.free(a.ptr);
  });

  it.each(['acl', 'cuda'] as const)('%s: works from a worker thread with an engine of its own', async (device) => {
    const main = await openEngine({ device, listen: false });
    const worker = new Worker(
      `
      const { parentPort } = require('node:worker_threads');
      import(${JSON.stringify(path.join(root, 'dist', 'lib', 'index.js'))}).then(async ({ TransferEngine }) => {
        const engine = await TransferEngine.open({ device: ${JSON.stringify(device)}, listen: false });
        const a = engine.device.alloc(4096);
        engine.device.write(a.ptr, Buffer.from('from a worker'));
        const s = engine.device.createStream();
        const b = engine.device.alloc(4096);
        s.copy(b.ptr, a.ptr, 13);
        await s.synchronize(5000);
        const out = Buffer.alloc(13);
        engine.device.read(out, b.ptr);
        s.destroy();
        await engine.close();
        parentPort.postMessage(out.toString());
      }).catch((err) => parentPort.postMessage('error: ' + err.message));
      `,
      { eval: true },
    );
    const message = await new Promise((resolve) => worker.once('message', resolve));
    await worker.terminate();
    expect(message).toBe('from a worker');
    // The main thread's engine is unaffected.
    const a = main.device.alloc(4096);
    main.device.write(a.ptr, Buffer.from('main'));
    main.device.free(a.ptr);
  });
});

describe('acl IPC whitelist', () => {
  async function child(): Promise<{ call<T>(op: string, args?: object): Promise<T>; stop(): Promise<void> }> {
    const proc = fork(path.join(root, 'test', 'vendor', 'fixtures', 'device-child.mjs'), ['acl'], {
      env: { ...process.env },
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    });
    await new Promise((resolve) => proc.once('message', resolve));
    let next = 1;
    return {
      call<T>(op: string, args?: object) {
        const id = next++;
        return new Promise<T>((resolve, reject) => {
          const on = (m: { id: number; result?: T; error?: { code: string; message: string } }) => {
            if (m.id !== id) return;
            proc.off('message', on);
            if (m.error) reject(Object.assign(new Error(m.error.message), { code: m.error.code }));
            else resolve(m.result as T);
          };
          proc.on('message', on);
          proc.send({ id, op, args });
        });
      },
      async stop() {
        const exited = new Promise((resolve) => proc.once('exit', resolve));
        proc.disconnect();
        await exited;
      },
    };
  }

  it('whitelists the importer by its bare tgid (which differs from its pid in a container)', async () => {
    control.set({ 'acl.tgid_offset': 100000 });
    const engine = await openEngine({ device: 'acl', listen: false });
    const a = engine.device.alloc(4096);
    const key = engine.device.ipcExport(a.ptr, 4096);
    const c = await child();
    try {
      const tgid = await c.call<number>('pid');
      // The OS pid is not what ACL checks.
      engine.device.ipcAllow(tgid - 100000, key);
      await expect(c.call('import', { key })).rejects.toMatchObject({ code: 'ERR_SYSTEM' });
      engine.device.ipcAllow(tgid, key);
      const imp = await c.call<{ id: number }>('import', { key });
      await c.call('close', { id: imp.id });
    } finally {
      await c.stop();
    }
    engine.device.free(a.ptr);
  });

  it('applies an allow-all to keys exported before and after it', async () => {
    const engine = await openEngine({ device: 'acl', listen: false });
    const before = engine.device.alloc(4096);
    const keyBefore = engine.device.ipcExport(before.ptr, 4096);
    const c = await child();
    try {
      engine.device.ipcAllow(await c.call<number>('pid'));
      const after = engine.device.alloc(4096);
      const keyAfter = engine.device.ipcExport(after.ptr, 4096);
      for (const key of [keyBefore, keyAfter]) {
        const imp = await c.call<{ id: number }>('import', { key });
        await c.call('close', { id: imp.id });
      }
    } finally {
      await c.stop();
    }
  });

  it('closes imports and export keys before freeing memory when the engine closes', async () => {
    const engine = await openEngine({ device: 'acl', listen: false });
    control.resetTrace();
    const kept = [engine.device.alloc(4096), engine.device.alloc(1 << 20)];
    engine.device.ipcExport(kept[0].ptr, 4096);
    await engine.close();
    const mine = control.trace().filter((t) => t.pid === process.pid && t.rc === 0);
    const mallocs = mine.filter((t) => t.fn === 'aclrtMalloc').length;
    const frees = mine.filter((t) => t.fn === 'aclrtFree').length;
    expect(frees).toBe(mallocs);
    // The exported allocation: its key is closed before it is freed.
    const closeAt = mine.findIndex((t) => t.fn === 'aclrtIpcMemClose');
    const freeAt = mine.findIndex((t) => t.fn === 'aclrtFree' && t.details === `ptr=0x${kept[0].ptr.toString(16)}`);
    expect(closeAt).toBeGreaterThanOrEqual(0);
    expect(freeAt).toBeGreaterThan(closeAt);
  });
});

describe('engines on vendor devices over shm', () => {
  it('reach an acl peer\'s host regions; its NPU regions fail per descriptor, not the connect', async () => {
    const peer = await startPeer({ regions: [8192], engine: { device: 'acl' } as never });
    const ptr = await peer.call<bigint>('deviceAlloc', { bytes: 4096 });
    const npuRegion = await peer.call<number>('deviceRegister', { ptr, length: 4096 });
    const engine = await openEngine({ listen: false });
    const p = await engine.connect(peer.address);
    expect(p.transport).toBe('shm');
    const src = engine.allocate(8192);
    src.buffer!.set(pattern(70, 8192));
    await engine.write(p, [{ localRegion: src, localOffset: 0, remoteRegion: peer.regions[0], remoteOffset: 0, length: 8192 }]);
    expect(await peer.call('hash', { region: peer.regions[0] })).toBe(sha256(pattern(70, 8192)));
    const err = await expectCode(
      () => engine.write(p, [{ localRegion: src, localOffset: 0, remoteRegion: npuRegion, remoteOffset: 0, length: 4096 }]),
      'ERR_NOT_SHAREABLE',
    );
    expect(err.message).toMatch(/cannot be reached over shm/);
  });
});
