// The run-time loader of vendor libraries: which file is opened, what happens when it
// is missing, incomplete or a stub, and what probe / capabilities() report. All of
// it runs against the conformance fakes (test/fakes), never a vendor SDK.
import { copyFileSync, mkdtempSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { TransferEngine } from '../../lib/index.js';
import { vendorBackends } from '../../lib/probe.js';
import { closeEngines, expectCode, lastJson, openEngine, root, runNode } from '../helpers.js';
import { buildFakes, FakeControl, reclaimFakeShm, type FakeLibraries } from './fakes.js';

const ENV_KEYS = ['EPD_TRANSFER_ACL_LIB', 'EPD_TRANSFER_CUDA_LIB', 'EPD_TRANSFER_HCCL_LIB', 'EPD_TRANSFER_MOONCAKE_LIB'];

let fakes: FakeLibraries;
let control: FakeControl;
const saved: Record<string, string | undefined> = {};

beforeAll(() => {
  fakes = buildFakes();
  control = new FakeControl();
  Object.assign(process.env, control.env());
  for (const k of ENV_KEYS) saved[k] = process.env[k];
});

afterEach(async () => {
  await closeEngines();
  for (const k of ENV_KEYS) {
    if (saved[k] === undefined) delete process.env[k];
    else process.env[k] = saved[k];
  }
  control.clear();
});

afterAll(() => {
  control.dispose();
  reclaimFakeShm();
});

/** A copy of a fake at a fresh path: the loader caches per path, so a copy loads anew. */
function freshCopy(file: string): string {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'epd-fake-copy-'));
  const out = path.join(dir, path.basename(file));
  copyFileSync(file, out);
  return out;
}

describe('vendor loader', () => {
  it('reports a missing library with the override that named it', () => {
    process.env.EPD_TRANSFER_ACL_LIB = '/nonexistent/libascendcl.so';
    const acl = vendorBackends().acl;
    expect(acl).toMatchObject({ available: false, status: 'missing-library', library: '/nonexistent/libascendcl.so' });
    expect(acl.reason).toMatch(/EPD_TRANSFER_ACL_LIB names a library that cannot be loaded/);
  });

  it('searches the default names when no override is set (none exists on this host)', () => {
    delete process.env.EPD_TRANSFER_CUDA_LIB;
    const cuda = vendorBackends().cuda;
    expect(cuda.available).toBe(false);
    expect(cuda.reason).toMatch(/libcuda\.so\.1/);
  });

  it('refuses a library that lacks a required symbol, naming it', () => {
    process.env.EPD_TRANSFER_ACL_LIB = fakes.aclNoSymbol;
    process.env.EPD_TRANSFER_CUDA_LIB = fakes.cudaNoSymbol;
    process.env.EPD_TRANSFER_HCCL_LIB = fakes.hcclNoSymbol;
    const v = vendorBackends();
    expect(v.acl).toMatchObject({ available: false, status: 'missing-symbol' });
    expect(v.acl.reason).toMatch(/aclrtMemcpyAsync/);
    expect(v.cuda).toMatchObject({ available: false, status: 'missing-symbol' });
    expect(v.cuda.reason).toMatch(/cuMemcpyDtoDAsync_v2/);
    // HCCL needs a working ACL first.
    expect(v.hccl).toMatchObject({ available: false, status: 'needs-other-backend' });
  });

  it('detects vendor stub libraries by their fixed error code', () => {
    process.env.EPD_TRANSFER_ACL_LIB = fakes.aclStub;
    process.env.EPD_TRANSFER_CUDA_LIB = fakes.cudaStub;
    const v = vendorBackends();
    expect(v.acl).toMatchObject({ available: false, status: 'stub-library' });
    expect(v.acl.reason).toMatch(/100039/);
    expect(v.cuda).toMatchObject({ available: false, status: 'stub-library' });
    expect(v.cuda.reason).toMatch(/CUDA_ERROR_STUB_LIBRARY/);
  });

  it('reports a runtime that sees no device', () => {
    control.set({ 'acl.devices': 0, 'cuda.devices': 0 });
    process.env.EPD_TRANSFER_ACL_LIB = freshCopy(fakes.acl);
    process.env.EPD_TRANSFER_CUDA_LIB = freshCopy(fakes.cuda);
    const v = vendorBackends();
    expect(v.acl).toMatchObject({ available: false, status: 'no-device' });
    expect(v.cuda).toMatchObject({ available: false, status: 'no-device' });
  });

  it('loads working libraries and reports what they offer', () => {
    process.env.EPD_TRANSFER_ACL_LIB = fakes.acl;
    process.env.EPD_TRANSFER_CUDA_LIB = fakes.cuda;
    process.env.EPD_TRANSFER_HCCL_LIB = fakes.hccl;
    process.env.EPD_TRANSFER_MOONCAKE_LIB = fakes.mooncake;
    const v = vendorBackends();
    expect(v.acl).toMatchObject({ available: true, status: 'available', library: fakes.acl, devices: 1, version: 'fake-9.1.0', ipc: true });
    expect(v.cuda).toMatchObject({ available: true, library: fakes.cuda, devices: 1, driverVersion: 12040, ipc: true });
    expect(v.hccl).toMatchObject({ available: true, library: fakes.hccl, batchSendRecv: true });
    expect(v.mooncake).toMatchObject({ available: true, library: fakes.mooncake });
    // Loading twice is the same result (cached per library path).
    expect(vendorBackends()).toEqual(v);
  });

  it('initialises each runtime once (aclInit, cuInit) however often it is asked', () => {
    process.env.EPD_TRANSFER_ACL_LIB = freshCopy(fakes.acl);
    control.resetTrace();
    vendorBackends();
    vendorBackends();
    const inits = control.trace().filter((t) => t.fn === 'aclInit' && t.pid === process.pid);
    expect(inits).toHaveLength(1);
    expect(inits[0].rc).toBe(0);
  });

  it('reports optional symbols a runtime lacks instead of failing', () => {
    process.env.EPD_TRANSFER_ACL_LIB = fakes.aclMinimal;
    expect(vendorBackends().acl).toMatchObject({ available: true, ipc: false });
  });
});

describe('opening vendor devices', () => {
  it('fails open() with ERR_BACKEND_UNAVAILABLE and the reason when the runtime cannot run', async () => {
    process.env.EPD_TRANSFER_ACL_LIB = fakes.aclStub;
    const err = await expectCode(() => TransferEngine.open({ device: 'acl', listen: false }), 'ERR_BACKEND_UNAVAILABLE');
    expect(err.message).toMatch(/stub library/);
    process.env.EPD_TRANSFER_CUDA_LIB = '/nonexistent/libcuda.so.1';
    await expectCode(() => TransferEngine.open({ device: 'cuda', listen: false }), 'ERR_BACKEND_UNAVAILABLE');
  });

  it('rejects a deviceId the runtime does not have', async () => {
    process.env.EPD_TRANSFER_ACL_LIB = fakes.acl;
    const err = await expectCode(() => TransferEngine.open({ device: 'acl', deviceId: 3, listen: false }), 'ERR_BAD_ARGUMENT');
    expect(err.message).toMatch(/sees 1 NPU/);
    await expectCode(() => TransferEngine.open({ device: 'acl', deviceId: -1, listen: false }), 'ERR_BAD_ARGUMENT');
    await expectCode(() => TransferEngine.open({ device: 'tpu' as never, listen: false }), 'ERR_BAD_ARGUMENT');
  });

  it('opens acl and cuda engines on the fakes', async () => {
    process.env.EPD_TRANSFER_ACL_LIB = fakes.acl;
    process.env.EPD_TRANSFER_CUDA_LIB = fakes.cuda;
    const acl = await openEngine({ device: 'acl', listen: false });
    const cuda = await openEngine({ device: 'cuda', listen: false });
    expect(acl.device.kind).toBe('acl');
    expect(cuda.device.kind).toBe('cuda');
    expect(acl.capabilities()).toMatchObject({ device: 'acl', deviceId: 0 });
  });
});

describe('epd-transfer probe --json', () => {
  it('shows every vendor backend with its status, on a host with no vendor library', async () => {
    const env: NodeJS.ProcessEnv = { ...control.env() };
    for (const k of ENV_KEYS) env[k] = '';
    const out = await runNode([path.join(root, 'bin', 'epd-transfer.js'), 'probe', '--json'], { env });
    expect(out.code, out.stderr).toBe(0);
    const r = lastJson<{ devices: Record<string, { available: boolean; status?: string }>; transports: Record<string, { available: boolean; status?: string }> }>(out.stdout);
    expect(r.devices.host.available).toBe(true);
    expect(r.devices.acl).toMatchObject({ available: false, status: 'missing-library' });
    expect(r.devices.cuda).toMatchObject({ available: false, status: 'missing-library' });
    expect(r.transports.mooncake).toMatchObject({ available: false, status: 'missing-library' });
    expect(r.transports.hccl).toMatchObject({ available: false, status: 'needs-other-backend' });
  });

  it('shows the fakes as available when the overrides name them', async () => {
    const env = {
      ...control.env(),
      EPD_TRANSFER_ACL_LIB: fakes.acl,
      EPD_TRANSFER_CUDA_LIB: fakes.cuda,
      EPD_TRANSFER_HCCL_LIB: fakes.hccl,
      EPD_TRANSFER_MOONCAKE_LIB: fakes.mooncake,
    };
    const out = await runNode([path.join(root, 'bin', 'epd-transfer.js'), 'probe', '--json'], { env });
    expect(out.code, out.stderr).toBe(0);
    const r = lastJson<{ devices: Record<string, { available: boolean; library?: string }>; transports: Record<string, { available: boolean }> }>(out.stdout);
    expect(r.devices.acl).toMatchObject({ available: true, library: fakes.acl });
    expect(r.devices.cuda).toMatchObject({ available: true, library: fakes.cuda });
    expect(r.transports.hccl.available).toBe(true);
    expect(r.transports.mooncake.available).toBe(true);
  });
});
