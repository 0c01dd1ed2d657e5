/**
 * Workers across "hosts" (what the demo at scale starts): engines published in a
 * real etcd, registered in the instance registry under their lease, and an encoder
 * cache that is not shared — the encoder serves its own store and announces it in
 * the etcd index, and a PD worker with a store of its own pulls the embedding over
 * the transfer engine (tcp). Skipped without an etcd binary.
 */
import { describe, expect, it } from 'vitest';
import { pngDataUrl } from '../../lib/demo/images.js';
import { EtcdSession } from '../../lib/meta/etcd.js';
import { listInstances } from '../../lib/meta/registry.js';
import { noEtcd, uniquePrefix, useEtcd } from '../meta/etcd-helpers.js';
import { post, startWorker, storeName } from './helpers.js';

const etcd = useEtcd();

describe.skipIf(noEtcd)('simulated workers with etcd metadata', { timeout: 60_000 }, () => {
  it('register themselves, and a PD pulls the embedding from the encoder\'s own store over tcp', async () => {
    const metadata = `${etcd.url}/${uniquePrefix().slice(0, -1)}`;
    const common = ['--metadata', metadata, '--metadata-ttl', '5', '--register', '--remote-ec', '--transport', 'tcp'];
    const [e, pd] = await Promise.all([
      startWorker('encode', [...common, '--engine-name', 'enc-a', '--ec-store', storeName()]),
      startWorker('pd', [...common, '--engine-name', 'pd-b', '--ec-store', storeName()]),
    ]);
    const session = await EtcdSession.connect(metadata);
    try {
      const registered = await listInstances(session);
      expect(registered.map((r) => [r.role, r.url, r.engine]).sort()).toEqual(
        [
          ['encode', e.url, 'enc-a'],
          ['pd', pd.url, 'pd-b'],
        ].sort(),
      );

      const image = pngDataUrl(448, 448, 31);
      const chat = { model: 'qwen2.5-vl-7b', messages: [{ role: 'user', content: [{ type: 'text', text: 'describe' }, { type: 'image_url', image_url: { url: image } }] }], max_tokens: 2 };
      expect((await post(`${e.url}/v1/chat/completions`, { ...chat, max_tokens: 1 })).status).toBe(200);
      expect((await post(`${pd.url}/v1/chat/completions`, chat)).status).toBe(200);
      const stats = await pd.stats();
      // Not in its own store: found in the etcd index, pulled from the encoder, checked byte for byte.
      expect(stats.ec).toMatchObject({ loaded: 1, pulled: 1, missed: 0 });
      expect(stats.ec.pulledBytes).toBe(stats.ec.loadedBytes);
      expect(stats.ec.verifiedBytes).toBe(stats.ec.loadedBytes);

      // A worker that stops leaves the registry at once, not at its lease's end.
      e.child.process.send({ type: 'shutdown', graceMs: 0 });
      await e.child.exited;
      expect((await listInstances(session)).map((r) => r.role)).toEqual(['pd']);
    } finally {
      await session.close();
    }
  });
});
