// Control requests over the control connection: engine.handle(topic) answers,
// peer.request(topic) asks; errors keep their codes; bad input is refused.
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { TransferError, type Peer, type TransferEngine } from '../../lib/index.js';
import { closeEngines, expectCode, openEngine, startPeer, stopPeers } from '../helpers.js';

let server: TransferEngine;
let client: TransferEngine;
let peer: Peer;

beforeAll(async () => {
  server = await openEngine({ name: 'server-engine' });
  client = await openEngine({ name: 'client-engine' });
  peer = await client.connect(server.address!);
});

afterAll(async () => {
  await closeEngines();
  await stopPeers();
});

test('a request reaches the handler of its topic with its body and the caller name, and resolves with the answer', async () => {
  const seen: unknown[] = [];
  const off = server.handle('echo', (body, ctx) => {
    seen.push([body, ctx.peer]);
    return { got: body };
  });
  expect(await peer.request('echo', { n: 1, s: 'x' })).toEqual({ got: { n: 1, s: 'x' } });
  expect(seen).toEqual([[{ n: 1, s: 'x' }, 'client-engine']]);
  off();
});

test('async handlers, and concurrent requests each get their own answer', async () => {
  const off = server.handle('slow-double', async (body) => {
    const n = body as number;
    await new Promise((r) => setTimeout(r, (10 - n) * 3));
    return n * 2;
  });
  const answers = await Promise.all(Array.from({ length: 10 }, (_, i) => peer.request('slow-double', i)));
  expect(answers).toEqual(Array.from({ length: 10 }, (_, i) => i * 2));
  off();
});

test('a handler returning nothing answers null', async () => {
  const off = server.handle('void', () => undefined);
  expect(await peer.request('void', null)).toBeNull();
  off();
});

test("a handler's TransferError code reaches the caller", async () => {
  const off = server.handle('refuse', () => {
    throw new TransferError('no such block', 'ERR_OUT_OF_RANGE');
  });
  const err = await expectCode(() => peer.request('refuse', {}), 'ERR_OUT_OF_RANGE');
  expect(err.message).toContain('no such block');
  off();
});

test.each(['ERR_CAPACITY', 'ERR_NOT_FOUND', 'ERR_INTEGRITY', 'ERR_REGION_FREED', 'ERR_METADATA_UNAVAILABLE', 'ERR_NAME_IN_USE', 'ERR_LEASE_LOST'] as const)(
  'a handler failing with %s keeps that code across the wire',
  async (code) => {
    const off = server.handle('coded', () => {
      throw new TransferError('refused', code);
    });
    await expectCode(() => peer.request('coded', {}), code);
    off();
  },
);

test('any other handler failure is ERR_REMOTE', async () => {
  const off = server.handle('boom', async () => {
    throw new Error('kaput');
  });
  const err = await expectCode(() => peer.request('boom', {}), 'ERR_REMOTE');
  expect(err.message).toContain('kaput');
  off();
});

test('a topic nobody handles is ERR_NO_HANDLER; so is one whose handler was removed', async () => {
  await expectCode(() => peer.request('nobody', {}), 'ERR_NO_HANDLER');
  const off = server.handle('temp', () => 1);
  expect(await peer.request('temp', {})).toBe(1);
  off();
  await expectCode(() => peer.request('temp', {}), 'ERR_NO_HANDLER');
});

test('a handler that never answers makes the request time out; the connection stays usable', async () => {
  const off = server.handle('never', () => new Promise(() => {}));
  await expectCode(() => peer.request('never', {}, { timeoutMs: 50 }), 'ERR_TIMEOUT');
  expect(peer.lost).toBeNull();
  const off2 = server.handle('ping', () => 'pong');
  expect(await peer.request('ping', {})).toBe('pong');
  off();
  off2();
});

test('an answer too large for a frame fails the request instead of the answering process', async () => {
  const off = server.handle('huge', () => 'x'.repeat(2 << 20));
  await expectCode(() => peer.request('huge', {}, { timeoutMs: 2_000 }), 'ERR_REMOTE');
  off();
});

test('an answer that cannot be encoded (a BigInt) fails the request instead of the answering process', async () => {
  const off = server.handle('bigint', () => ({ n: 1n }));
  await expectCode(() => peer.request('bigint', {}, { timeoutMs: 2_000 }), 'ERR_REMOTE');
  off();
});

test('a request body that cannot be encoded is ERR_BAD_ARGUMENT', async () => {
  const off = server.handle('echo2', (b) => b);
  await expectCode(() => peer.request('echo2', { n: 1n }), 'ERR_BAD_ARGUMENT');
  const circular: Record<string, unknown> = {};
  circular.self = circular;
  await expectCode(() => peer.request('echo2', circular), 'ERR_BAD_ARGUMENT');
  expect(await peer.request('echo2', 'still fine')).toBe('still fine');
  off();
});

test('a request in flight when the peer dies rejects ERR_PEER_LOST', async () => {
  const child = await startPeer();
  const p = await client.connect(child.address);
  const pending = p.request('anything', {}, { timeoutMs: 10_000 }).catch((e) => e);
  child.child.kill('SIGKILL');
  // Either it was answered (ERR_NO_HANDLER) before the kill landed, or it is lost.
  const err = (await pending) as TransferError;
  expect(['ERR_NO_HANDLER', 'ERR_PEER_LOST']).toContain(err.code);
  await child.exited;
  await expectCode(async () => {
    for (let i = 0; i < 500 && !p.lost; i++) await new Promise((r) => setTimeout(r, 10));
    await p.request('anything', {});
  }, 'ERR_PEER_LOST');
});

describe('bad input', () => {
  test.each([
    ['empty topic', () => server.handle('', () => 1)],
    ['topic not a string', () => server.handle(5 as never, () => 1)],
    ['handler not a function', () => server.handle('t', 'nope' as never)],
    ['a second handler for a topic', () => {
      server.handle('dup', () => 1);
      return server.handle('dup', () => 2);
    }],
    ['request with an empty topic', () => peer.request('', {})],
    ['request options not an object', () => peer.request('t', {}, 3 as never)],
    ['request timeoutMs 0', () => peer.request('t', {}, { timeoutMs: 0 })],
  ])('%s is ERR_BAD_ARGUMENT', async (_, fn) => {
    await expectCode(fn, 'ERR_BAD_ARGUMENT');
  });
});
