// A real partition: the peer lives in its own network namespace ("host A"), etcd and
// the initiator in another ("host E"), joined by a veth pair. Taking the link down
// makes host A vanish without a FIN or RST: the initiator's tcp connections stay
// open, only A's lease can tell. The write in flight to A must fail with
// ERR_PEER_LOST when the lease expires, long before its deadline. Needs root,
// `ip netns` and etcd; skipped (with the reason) otherwise.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTcpPeer, stopTcpPeers, type TcpPeer } from '../tcp/util.js';
import { noEtcd } from './etcd-helpers.js';

const MiB = 1 << 20;
const tag = `${process.pid % 100000}`;
const nsE = `epdm-e-${tag}`;
const nsA = `epdm-a-${tag}`;
const net = `10.${150 + (process.pid % 50)}.${(process.pid >> 6) % 250}`;
const ipE = `${net}.1`;
const ipA = `${net}.2`;
const devE = `epme${tag}`;
const devA = `epma${tag}`;

function ip(...args: string[]): void {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

function whyNot(): string | null {
  if (noEtcd) return 'no etcd binary';
  if (process.getuid?.() !== 0) return 'needs root to create network namespaces';
  try {
    ip('netns', 'add', `epdm-probe-${tag}`);
    ip('netns', 'del', `epdm-probe-${tag}`);
    return null;
  } catch (err) {
    return `ip netns is not permitted here: ${String((err as { stderr?: Buffer }).stderr ?? err).trim()}`;
  }
}

const skip = whyNot();
if (skip) console.warn(`[metadata netns] skipped: ${skip}`);

describe.skipIf(skip !== null)('etcd metadata across a network partition', () => {
  let etcd: ChildProcess;
  let url: string;
  let initiator: TcpPeer;
  let far: TcpPeer;

  beforeAll(async () => {
    ip('netns', 'add', nsE);
    ip('netns', 'add', nsA);
    ip('link', 'add', devE, 'type', 'veth', 'peer', 'name', devA);
    ip('link', 'set', devE, 'netns', nsE);
    ip('link', 'set', devA, 'netns', nsA);
    for (const [ns, dev, addr] of [[nsE, devE, ipE], [nsA, devA, ipA]]) {
      ip('-n', ns, 'addr', 'add', `${addr}/24`, 'dev', dev);
      ip('-n', ns, 'link', 'set', dev, 'up');
      ip('-n', ns, 'link', 'set', 'lo', 'up');
    }
    const script = fileURLToPath(new URL('./fixtures/etcd-server.mjs', import.meta.url));
    etcd = spawn('ip', ['netns', 'exec', nsE, process.execPath, script, JSON.stringify({ host: ipE })], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    url = await new Promise<string>((resolve, reject) => {
      etcd.once('message', (m: { url: string }) => resolve(m.url));
      etcd.once('exit', (code) => reject(new Error(`etcd fixture exited (${code})`)));
    });
    const metadata = { metadata: url, metadataOptions: { ttlSeconds: 2, timeoutMs: 2_000 } };
    far = await startTcpPeer({ engine: { ...metadata, name: 'far-peer', host: ipA }, regions: [64 * MiB] }, nsA);
    initiator = await startTcpPeer({ engine: { ...metadata, name: 'near', host: ipE }, regions: [64 * MiB], seed: 5 }, nsE);
  }, 60_000);

  afterAll(async () => {
    await stopTcpPeers();
    if (etcd && etcd.exitCode === null) {
      const exited = new Promise((resolve) => etcd.once('exit', resolve));
      etcd.disconnect();
      await exited;
    }
    for (const ns of [nsE, nsA]) {
      try {
        ip('netns', 'del', ns);
      } catch {
        /* never created */
      }
    }
  }, 30_000);

  it('a host cut off the network: the write in flight to it fails with ERR_PEER_LOST when its lease expires', async () => {
    const info = await initiator.call<{ name: string; transport: string }>('connect', { address: 'far-peer', options: { transport: 'tcp' } });
    expect(info).toMatchObject({ name: 'far-peer', transport: 'tcp' });
    const descriptors = [{ localRegion: initiator.regions[0], localOffset: 0, remoteRegion: far.regions[0], remoteOffset: 0, length: 64 * MiB }];
    // Reachable first: the same write lands.
    expect(await initiator.call('transfer', { address: 'far-peer', op: 'write', descriptors, timeoutMs: 30_000 })).toBe(64 * MiB);

    ip('-n', nsA, 'link', 'set', devA, 'down'); // no FIN, no RST: packets to A just vanish
    const cutAt = Date.now();
    const deadlineMs = 60_000;
    const outcome = await initiator.call('transfer', { address: 'far-peer', op: 'write', descriptors, timeoutMs: deadlineMs }).then(
      () => 'completed',
      (err: { code?: string }) => err.code,
    );
    const failedMs = Date.now() - cutAt;
    console.info(`[partition] write to a host cut off the network failed with ${outcome} after ${failedMs} ms (lease TTL 2 s, batch deadline ${deadlineMs} ms)`);
    expect(outcome).toBe('ERR_PEER_LOST');
  }, 60_000);
});
