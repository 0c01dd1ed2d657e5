// Opening and closing vendor engines over and over leaves nothing behind: threads
// (stream workers of the fake, our pollers), file descriptors, device memory (the
// fakes' shared-memory objects). On the fakes; the same teardown runs on hardware.
import { readdirSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TransferEngine } from '../../lib/index.js';
import { openFds } from '../helpers.js';
import { buildFakes, FakeControl, reclaimFakeShm } from './fakes.js';

const control = new FakeControl();
const threads = () => readdirSync('/proc/self/task').length;
const fakeShm = () => readdirSync('/dev/shm').filter((n) => n.startsWith(`epdfake-acl-${process.pid}-`)).length;

beforeAll(() => {
  const f = buildFakes();
  Object.assign(process.env, control.env(), { EPD_TRANSFER_ACL_LIB: f.acl, EPD_TRANSFER_HCCL_LIB: f.hccl, EPD_TRANSFER_MOONCAKE_LIB: f.mooncake });
});

afterAll(() => {
  control.dispose();
  reclaimFakeShm();
});

describe('vendor engine lifecycle', () => {
  it('releases threads, descriptors and device memory on close, every time', async () => {
    const cycle = async () => {
      const e = await TransferEngine.open({ device: 'acl', mooncake: { protocol: 'tcp' }, hccl: true });
      const a = e.device.alloc(1 << 20);
      e.register({ devicePtr: a.ptr, length: 1 << 20 });
      e.allocate(1 << 16);
      const s = e.device.createStream();
      const ev = e.device.createEvent();
      s.copy(a.ptr, a.ptr, 4096);
      ev.record(s);
      await ev.synchronize(5_000);
      s.destroy();
      ev.destroy();
      await e.close();
    };
    await cycle(); // first use loads the libraries and starts their threads once
    const base = { fds: openFds(), threads: threads(), shm: fakeShm() };
    for (let i = 0; i < 15; i++) await cycle();
    expect(fakeShm()).toBe(base.shm);
    expect(openFds()).toBeLessThanOrEqual(base.fds + 2);
    expect(threads()).toBeLessThanOrEqual(base.threads + 2);
  });
});
