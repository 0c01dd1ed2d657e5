// engine.onPeerLost: a peer that connected to this engine (its control connection
// came in here) goes away — killed, disconnected, or this engine closes meanwhile.
import net from 'node:net';
import { afterEach, expect, test } from 'vitest';
import { TransferError, type PeerLostEvent, type TransferEngine } from '../../lib/index.js';
import { closeEngines, expectCode, killPeer, openEngine, startPeer, stopPeers, waitFor, type PeerProcess } from '../helpers.js';

afterEach(async () => {
  await stopPeers();
  await closeEngines();
});

interface Who {
  session: string;
  address: string;
  peer: string;
}

/** An engine that records lost peers and tells each caller how it sees them. */
async function listeningEngine(): Promise<{ engine: TransferEngine; lost: PeerLostEvent[] }> {
  const engine = await openEngine();
  engine.handle('whoami', (_body, ctx) => ({ session: ctx.session!.id, address: ctx.session!.address, peer: ctx.peer }));
  const lost: PeerLostEvent[] = [];
  engine.onPeerLost((e) => lost.push(e));
  return { engine, lost };
}

/** Starts a peer process named `name`, connects it to `engine` and returns it with its session there. */
async function connectedPeer(engine: TransferEngine, name: string, options?: Record<string, unknown>): Promise<{ child: PeerProcess; who: Who }> {
  const child = await startPeer({ engine: { name } });
  expect(await child.call('connect', { address: engine.address, options })).toBe(name);
  const who = await child.call<Who>('request', { address: engine.address, topic: 'whoami' });
  return { child, who };
}

/** Connects a fresh peer, disconnects it and waits for its event: every event before it has been delivered. */
async function barrier(engine: TransferEngine, lost: PeerLostEvent[]): Promise<void> {
  const { child, who } = await connectedPeer(engine, 'barrier');
  await child.call('disconnect', { address: engine.address });
  await waitFor(() => lost.some((e) => e.session === who.session), 'the barrier peer to be reported');
}

test('a connected peer SIGKILLed: reported once, with its name, session and address', async () => {
  const { engine, lost } = await listeningEngine();
  const { child, who } = await connectedPeer(engine, 'prefill-a');
  expect(who.address).toMatch(/^127\.0\.0\.1:\d+$/);
  expect(lost).toEqual([]);

  await killPeer(child);
  await waitFor(() => lost.length > 0, 'the killed peer to be reported');
  const [event] = lost;
  expect(event).toMatchObject({ name: 'prefill-a', session: who.session, address: who.address });
  expect(event.error).toBeInstanceOf(TransferError);
  expect(event.error.code).toBe('ERR_PEER_LOST');
  expect(event.error.message).toContain("'prefill-a'");

  await barrier(engine, lost);
  expect(lost.filter((e) => e.session === who.session)).toHaveLength(1);
});

test('a restarted peer under the same name is another session: the old one is reported, the new one keeps working', async () => {
  const { engine, lost } = await listeningEngine();
  const old = await connectedPeer(engine, 'prefill-a');
  const restarted = await connectedPeer(engine, 'prefill-a');
  expect(restarted.who.session).not.toBe(old.who.session);

  await killPeer(old.child);
  await waitFor(() => lost.length > 0, 'the old process to be reported');
  expect(lost.map((e) => e.session)).toEqual([old.who.session]);
  // The new connection is untouched.
  expect(await restarted.child.call<Who>('request', { address: engine.address, topic: 'whoami' })).toEqual(restarted.who);

  // A clean disconnect is reported too, as closed rather than broken.
  await restarted.child.call('disconnect', { address: engine.address });
  await waitFor(() => lost.length > 1, 'the restarted process to be reported');
  expect(lost[1]).toMatchObject({ name: 'prefill-a', session: restarted.who.session });
  expect(lost[1].error.message).toMatch(/closed$/);
});

test('a tcp peer killed: reported, and the engine still serves tcp peers', async () => {
  const { engine, lost } = await listeningEngine();
  const victim = await connectedPeer(engine, 'tcp-victim', { transport: 'tcp' });
  await killPeer(victim.child);
  await waitFor(() => lost.length > 0, 'the tcp peer to be reported');
  expect(lost[0]).toMatchObject({ name: 'tcp-victim', session: victim.who.session });

  // The lost connection's grant is revoked; a new tcp peer gets its own and opens its data connections.
  const next = await connectedPeer(engine, 'tcp-next', { transport: 'tcp' });
  expect(next.who.session).not.toBe(victim.who.session);
  await barrier(engine, lost);
  expect(lost.filter((e) => e.session === victim.who.session)).toHaveLength(1);
});

test('a connection that never completed the handshake is not reported', async () => {
  const { engine, lost } = await listeningEngine();
  const { port } = new URL(`tcp://${engine.address}`);
  const socket = net.connect({ host: '127.0.0.1', port: Number(port) });
  await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
  await new Promise<void>((resolve) => socket.end(resolve));
  socket.destroy();
  await barrier(engine, lost);
  expect(lost.map((e) => e.name)).toEqual(['barrier']);
});

test('listeners: each registration is called and removed on its own; bad input and a closed engine throw', async () => {
  const { engine } = await listeningEngine();
  const calls: string[] = [];
  const listener = (e: PeerLostEvent) => calls.push(e.name);
  const removeFirst = engine.onPeerLost(listener);
  engine.onPeerLost(listener);
  removeFirst();
  removeFirst(); // idempotent
  const { child } = await connectedPeer(engine, 'p1');
  await killPeer(child);
  await waitFor(() => calls.length > 0, 'the listener to be called');
  expect(calls).toEqual(['p1']);

  await expectCode(() => engine.onPeerLost('nope' as never), 'ERR_BAD_ARGUMENT');
  await engine.close();
  await expectCode(() => engine.onPeerLost(() => {}), 'ERR_CLOSED');
});

test('the engine closes while peers are connected and one is dying: nothing is reported after close, nothing crashes', async () => {
  const { engine, lost } = await listeningEngine();
  const dying = await connectedPeer(engine, 'dying', { transport: 'tcp' });
  const staying = await connectedPeer(engine, 'staying', { transport: 'tcp' });
  // The kill and close race: the dying peer's close event may come before or after close().
  dying.child.child.kill('SIGKILL');
  await engine.close();
  const atClose = lost.length;
  expect(lost.every((e) => e.session === dying.who.session)).toBe(true);
  expect(atClose).toBeLessThanOrEqual(1);

  // The close ended the staying peer's connection: it sees the loss; this engine reports nothing more.
  await expect(staying.child.call('request', { address: engine.address, topic: 'whoami' })).rejects.toMatchObject({ code: 'ERR_PEER_LOST' });
  await killPeer(staying.child);
  await killPeer(dying.child);
  await new Promise((resolve) => setTimeout(resolve, 50));
  expect(lost.length).toBe(atClose);
});
