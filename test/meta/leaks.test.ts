// Nothing of the etcd layer keeps a process alive or leaks: a script that opens
// engines, an encoder-cache index and a cluster proxy on etcd, uses them and closes
// them must exit on its own (no process.exit), leaving no etcd key behind.
import { describe, expect, it } from 'vitest';
import { EtcdSession } from '../../lib/meta/etcd.js';
import { runNode } from '../helpers.js';
import { noEtcd, uniquePrefix, useEtcd } from './etcd-helpers.js';

const etcd = useEtcd();

const script = (url: string, prefix: string) => `
  const { TransferEngine, EtcdEncoderCacheIndex, EpdProxy, registerInstance } = await import('./dist/lib/index.js');
  const o = { metadata: ${JSON.stringify(url)}, metadataOptions: { prefix: ${JSON.stringify(prefix)}, ttlSeconds: 30 } };
  const a = await TransferEngine.open({ ...o, name: 'leak-a' });
  const dst = a.allocate(1 << 16);
  const b = await TransferEngine.open({ ...o, name: 'leak-b' });
  const src = b.allocate(1 << 16);
  const peer = await b.connect('leak-a');
  await b.write(peer, [{ localRegion: src, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: 1 << 16 }]);
  const index = EtcdEncoderCacheIndex.forEngine(a);
  await index.announce(a.address, ['k1']);
  const reg = await registerInstance(o.metadata, { role: 'pd', url: 'http://127.0.0.1:9' }, { prefix: o.metadataOptions.prefix });
  const proxy = await EpdProxy.start({ port: 0, closeGraceMs: 100, cluster: { metadata: o.metadata, prefix: o.metadataOptions.prefix, ttlSeconds: 30 } });
  await reg.close();
  await proxy.close();
  await b.close();
  await a.close();
  console.log(JSON.stringify({ done: true }));`;

describe.skipIf(noEtcd)('etcd resources', () => {
  it('a script using engines, the index, a registration and a cluster proxy exits on its own and leaves no key', async () => {
    const prefix = uniquePrefix();
    const run = await runNode(['--input-type=module', '-e', script(etcd.url, prefix)], { timeoutMs: 30_000 });
    expect(run.signal, `the script did not exit by itself: ${run.stderr}`).toBeNull();
    expect(run.code, run.stderr).toBe(0);
    expect(run.stdout).toContain('"done":true');
    const s = await EtcdSession.connect(etcd.url, { prefix });
    try {
      expect((await s.list('')).entries.map((e) => e.key)).toEqual([]);
    } finally {
      await s.close();
    }
  });
});
