// The layerwise KV push on the vendor path, on the fakes: prefill and decode engines
// on the acl device with their caches in (fake) NPU memory, layers pushed over the
// mooncake transport, each layer released by an ACL event — our own, or a foreign
// aclrtEvent handle wrapped with device.importEvent, as a framework would hand over.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { LayerwiseReceiver } from '../../lib/kv/receiver.js';
import { LayerwiseSender } from '../../lib/kv/sender.js';
import { KvTracer } from '../../lib/kv/trace.js';
import type { DeviceEvent } from '../../lib/index.js';
import { closeEngines, openEngine } from '../helpers.js';
import { cache, mismatches, SMALL, type Geometry } from '../kv/kv-helpers.js';
import { buildFakes, FakeControl, reclaimFakeShm } from './fakes.js';

const control = new FakeControl();

beforeAll(() => {
  const fakes = buildFakes();
  Object.assign(process.env, control.env(), { EPD_TRANSFER_ACL_LIB: fakes.acl, EPD_TRANSFER_MOONCAKE_LIB: fakes.mooncake });
});

afterEach(async () => {
  control.clear();
  await closeEngines();
});

afterAll(() => {
  control.dispose();
  reclaimFakeShm();
});

const range = (from: number, n: number) => Array.from({ length: n }, (_, i) => from + i);

describe.each([
  ['our ACL events', false],
  ['foreign aclrtEvent handles', true],
])('layerwise push over mooncake between acl engines, released by %s', (_name, foreign) => {
  it('sends each layer only after its event completed, and every block lands', async () => {
    const options = { device: 'acl', mooncake: { protocol: 'tcp' }, transport: 'mooncake' } as const;
    const P = await openEngine({ ...options, listen: false });
    const D = await openEngine(options);
    const g: Geometry = { ...SMALL, device: true };
    const p = cache(P, g, g.prefillBlockSize, g.prefillBlocks, 17);
    const d = cache(D, g, g.decodeBlockSize, g.decodeBlocks);
    const trace = new KvTracer();
    const sender = new LayerwiseSender(P, p.layout, { trace });
    const receiver = new LayerwiseReceiver(D, d.layout);
    try {
      const received = receiver.expect('npu', { blocks: [5, 6], deadlineMs: 10_000 });
      const h = sender.add({ requestId: 'npu', peer: D.address!, localBlocks: [1, 2], remoteBlocks: [5, 6], tokens: 16 });

      // The "compute" of every layer is a device copy held by the fake's hang switch;
      // each layer's event is recorded after it.
      const stream = P.device.createStream();
      const scratch = P.device.alloc(4096);
      control.set({ 'acl.hang': 1 });
      const events: DeviceEvent[] = [];
      for (let l = 0; l < g.layers; l++) {
        stream.copy(scratch.ptr, scratch.ptr, 4096);
        const ev = P.device.createEvent();
        ev.record(stream);
        events.push(ev);
        sender.layerReady(l, foreign ? P.device.importEvent(ev.handle!) : ev);
      }
      await new Promise((r) => setTimeout(r, 100));
      expect(trace.events.filter((e) => e.phase === 'sendStart')).toEqual([]);
      control.clear();

      await h.result;
      await received;
      expect(mismatches(p, d, [1, 2], [5, 6], 0, 2)).toEqual([]);
      const ready = trace.events.filter((e) => e.phase === 'ready').map((e) => e.layer);
      expect(ready).toEqual(range(0, g.layers));
      for (const ev of events) expect(ev.query()).toBe(true);
      stream.destroy();
    } finally {
      control.clear();
      await sender.close();
      await receiver.close();
    }
  });
});
