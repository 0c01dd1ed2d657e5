// Two network namespaces joined by a veth pair stand for two hosts: an engine in
// each, tcp between them, all traffic on this machine. Needs root and `ip netns`;
// skipped (with the reason) where either is missing.
import { execFileSync } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTcpPeer, stopTcpPeers, type TcpPeer } from './util.js';

const MiB = 1 << 20;
const tag = `${process.pid % 100000}`;
const nsA = `epdx-a-${tag}`;
const nsB = `epdx-b-${tag}`;
// A /24 chosen from the pid, so parallel runs do not collide.
const net = `10.${200 + (process.pid % 50)}.${(process.pid >> 6) % 250}`;
const ipA = `${net}.1`;
const ipB = `${net}.2`;

function ip(...args: string[]): void {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

function whyNot(): string | null {
  if (process.getuid?.() !== 0) return 'needs root to create network namespaces';
  try {
    ip('netns', 'add', `epdx-probe-${tag}`);
    ip('netns', 'del', `epdx-probe-${tag}`);
    return null;
  } catch (err) {
    return `ip netns is not permitted here: ${String((err as { stderr?: Buffer }).stderr ?? err).trim()}`;
  }
}

const skip = whyNot();
if (skip) console.warn(`[tcp netns] skipped: ${skip}`);

describe.skipIf(skip !== null)('tcp between two network namespaces', () => {
  let target: TcpPeer;
  let initiator: TcpPeer;

  beforeAll(async () => {
    ip('netns', 'add', nsA);
    ip('netns', 'add', nsB);
    ip('link', 'add', `epxa${tag}`, 'type', 'veth', 'peer', 'name', `epxb${tag}`);
    ip('link', 'set', `epxa${tag}`, 'netns', nsA);
    ip('link', 'set', `epxb${tag}`, 'netns', nsB);
    for (const [ns, dev, addr] of [[nsA, `epxa${tag}`, ipA], [nsB, `epxb${tag}`, ipB]]) {
      ip('-n', ns, 'addr', 'add', `${addr}/24`, 'dev', dev);
      ip('-n', ns, 'link', 'set', dev, 'up');
      ip('-n', ns, 'link', 'set', 'lo', 'up');
    }
    target = await startTcpPeer({ engine: { host: ipB }, regions: [48 * MiB] }, nsB);
    initiator = await startTcpPeer({ engine: { listen: false, connections: 2 }, regions: [48 * MiB], seed: 21 }, nsA);
  }, 60_000);

  afterAll(async () => {
    await stopTcpPeers();
    for (const ns of [nsA, nsB]) {
      try {
        ip('netns', 'del', ns); // takes its end of the veth pair with it
      } catch {
        /* never created */
      }
    }
  });

  it('listens on the namespace address and moves bytes exactly, both ways', async () => {
    expect(target.address).toBe(`${ipB}:${target.address.split(':')[1]}`);
    expect(target.tcpAddress.startsWith(`${ipB}:`)).toBe(true);
    const info = await initiator.call<{ transport: string }>('connect', { address: target.address, options: { transport: 'tcp' } });
    expect(info.transport).toBe('tcp');
    const [local] = initiator.regions;
    const [remote] = target.regions;
    const length = 48 * MiB - 4099;
    const moved = await initiator.call('transfer', {
      address: target.address,
      op: 'write',
      descriptors: [{ localRegion: local, localOffset: 4099, remoteRegion: remote, remoteOffset: 0, length }],
    });
    expect(moved).toBe(length);
    const sent = await initiator.call<string>('hash', { region: local, offset: 4099, length });
    expect(await target.call('hash', { region: remote, offset: 0, length })).toBe(sent);

    // Pull it back into another place, in 64 KiB descriptors (coalesced into frames).
    await initiator.call('fill', { region: local, seed: 99 });
    const descriptors = Array.from({ length: 256 }, (_, i) => ({ localRegion: local, localOffset: 16 * MiB + i * 65536, remoteRegion: remote, remoteOffset: i * 65536, length: 65536 }));
    expect(await initiator.call('transfer', { address: target.address, op: 'read', descriptors })).toBe(16 * MiB);
    expect(await initiator.call('hash', { region: local, offset: 16 * MiB, length: 16 * MiB })).toBe(await target.call('hash', { region: remote, offset: 0, length: 16 * MiB }));
  });

  it('is reachable only through the namespaces: the target is not on this namespace network', async () => {
    // A sanity check that the namespaces really separate the engines: the address
    // the target listens on is not one of ours.
    const ours = execFileSync('ip', ['-o', 'addr'], { encoding: 'utf8' });
    expect(ours.includes(ipB)).toBe(false);
  });
});
