/**
 * The demo never leaves anything behind: Ctrl-C shuts it down in order, and even
 * a SIGKILL of the demo takes its children down (they stop when their IPC channel
 * closes) with their shared memory.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { childrenOf, leftovers, startDemo, waitGone } from './helpers.js';

describe('stopping the demo', { timeout: 120_000 }, () => {
  it('Ctrl-C stops the load, stops every process and removes every shared-memory object', async () => {
    const demo = startDemo(['--requests', '400', '--report', '-'], { processGroup: true });
    await demo.waitForStderr(/progress: \d+\/400/);
    const children = childrenOf(demo.child.pid!);
    expect(children.length).toBe(4); // proxy, encoder, prefill, decode
    // A terminal's Ctrl-C: SIGINT to every process of the foreground group, children included.
    process.kill(-demo.child.pid!, 'SIGINT');
    expect(await demo.exited).toBe(130);
    expect(demo.stderr()).toContain('SIGINT: stopping the load');
    // The summary covers what ran before the interruption.
    expect(demo.stdout()).toMatch(/requests\s+\d+, 0 errors \(interrupted; \d+ cancelled\)/);
    expect(await waitGone(children, 1_000)).toEqual([]);
    expect(leftovers(demo.child.pid!, children)).toEqual([]);
  });

  it('a SIGKILLed demo takes its children down, and they take their shared memory with them', async () => {
    const demo = startDemo(['--requests', '400', '--report', '-']);
    await demo.waitForStderr(/progress: \d+\/400/);
    const children = childrenOf(demo.child.pid!);
    expect(children.length).toBe(4);
    demo.child.kill('SIGKILL');
    await demo.exited;
    expect(await waitGone(children)).toEqual([]);
    // The demo held the encoder cache too; the last child to close it found the demo dead and removed it.
    expect(leftovers(demo.child.pid!, children)).toEqual([]);
  });
});

describe('a worker dying during the run', { timeout: 120_000 }, () => {
  it('fails the requests routed to it, is reported, and leaves nothing behind', async () => {
    const demo = startDemo(['--requests', '200', '--report', '-']);
    await demo.waitForStderr(/progress: \d+\/200/);
    const children = childrenOf(demo.child.pid!);
    const decode = children.find((pid) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').join(' ').includes('--role decode'))!;
    expect(decode).toBeDefined();
    process.kill(decode, 'SIGKILL');
    expect(await demo.exited).toBe(1);
    expect(demo.stderr()).toMatch(/decode-0 exited during the run \(SIGKILL\)/);
    expect(demo.stdout()).toMatch(/requests\s+200, [1-9]\d* errors/);
    expect(demo.stdout()).toMatch(/lost\s+decode-0/);
    expect(await waitGone(children, 1_000)).toEqual([]);
    // Even the killed worker's shared memory is gone: the demo reclaimed it.
    expect(leftovers(demo.child.pid!, children)).toEqual([]);
  });
});
