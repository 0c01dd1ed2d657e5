/**
 * The combined (PD) role, and a worker's life: how it stops (SIGTERM, its parent
 * going away) and what it leaves behind (nothing in /dev/shm).
 */
import { fork, spawn } from 'node:child_process';
import { once } from 'node:events';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { pngDataUrl } from '../../lib/demo/images.js';
import { root, shmObjectsOf } from '../helpers.js';
import { post, sseEvents, startWorker, storeName, type WorkerProcess } from './helpers.js';

const BIN = path.join(root, 'bin', 'epd-transfer.js');
const store = storeName();
let e: WorkerProcess;
let pd: WorkerProcess;

beforeAll(async () => {
  [e, pd] = await Promise.all([startWorker('encode', ['--ec-store', store]), startWorker('pd', ['--ec-store', store])]);
});

function chat(image: string, extra: Record<string, unknown> = {}) {
  return { model: 'qwen2.5-vl-7b', messages: [{ role: 'user', content: [{ type: 'text', text: 'describe' }, { type: 'image_url', image_url: { url: image } }] }], max_tokens: 4, ...extra };
}

describe('combined prefill + decode (PD)', () => {
  it('loads an embedding the encoder saved, and encodes one that is not in the cache itself', async () => {
    const cached = pngDataUrl(448, 448, 21);
    const encoded = await post(`${e.url}/v1/chat/completions`, { ...chat(cached), max_tokens: 1, stream: false });
    expect(encoded.status).toBe(200);
    const streamed = await post(`${pd.url}/v1/chat/completions`, chat(cached, { stream: true }));
    expect(streamed.status).toBe(200);
    const events = sseEvents(streamed.text);
    expect(events.at(-1)).toBe('[DONE]');
    expect(events.filter((ev) => typeof ev === 'object')).toHaveLength(4);

    const whole = await post(`${pd.url}/v1/chat/completions`, chat(pngDataUrl(448, 448, 22)));
    expect(whole.status).toBe(200);
    const body = JSON.parse(whole.text);
    expect(body.choices[0].message.content).toMatch(/^\[simulated\]( \w+){3}$/);
    expect(body.usage.completion_tokens).toBe(4);
    expect(body.usage.prompt_tokens).toBeGreaterThan(16 * 16);

    const stats = await pd.stats();
    expect(stats.ec).toMatchObject({ loaded: 1, missed: 1 });
    expect(stats.ec.verifiedBytes).toBe(stats.ec.loadedBytes);
    expect(stats.kv.pushed).toBe(0);
    expect(stats.cache.free).toBe(stats.cache.blocks);
  });

  it('serves /v1/completions, and refuses kv_transfer_params', async () => {
    const res = await post(`${pd.url}/v1/completions`, { prompt: 'The layerwise push', max_tokens: 3 });
    expect(res.status).toBe(200);
    expect(JSON.parse(res.text)).toMatchObject({ object: 'text_completion', choices: [{ finish_reason: 'length' }], usage: { prompt_tokens: 5, completion_tokens: 3 } });
    const refused = await post(`${pd.url}/v1/chat/completions`, { messages: [{ role: 'user', content: 'hi' }], kv_transfer_params: { do_remote_prefill: true } });
    expect(refused.status).toBe(400);
  });
});

describe('a worker process', () => {

  it('stops on SIGTERM and removes its shared memory', async () => {
    const child = spawn(process.execPath, [BIN, 'worker', '--role', 'decode', '--kv-memory', '64MiB'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const exited = once(child, 'exit');
    let out = '';
    child.stdout!.setEncoding('utf8');
    await new Promise<void>((resolve, reject) => {
      child.stdout!.on('data', (t: string) => {
        out += t;
        if (out.includes('listening on')) resolve();
      });
      child.once('exit', (code) => reject(new Error(`worker exited (${code}) before listening`)));
    });
    expect(out).toMatch(/^SIMULATION: decode instance/);
    expect(shmObjectsOf(child.pid!).length).toBeGreaterThan(0);
    child.kill('SIGTERM');
    const [code] = await exited;
    expect(code).toBe(0);
    expect(shmObjectsOf(child.pid!)).toEqual([]);
  });

  it('stops when its parent goes away (the IPC channel closes)', async () => {
    const child = fork(BIN, ['worker', '--role', 'prefill', '--kv-memory', '64MiB', '--ec-store', storeName(), '--ec-capacity', '64MiB'], { stdio: ['ignore', 'ignore', 'ignore', 'ipc'] });
    const exited = once(child, 'exit');
    const [ready] = (await once(child, 'message')) as [{ type: string; pid: number; url: string }];
    expect(ready.type).toBe('ready');
    // A Ctrl-C to the process group is the parent's to handle: the worker ignores it.
    child.kill('SIGINT');
    expect((await fetch(`${ready.url}/health`)).status).toBe(200);
    child.disconnect();
    const [code] = await exited;
    expect(code).toBe(0);
    expect(shmObjectsOf(ready.pid)).toEqual([]);
  });

  it('refuses bad arguments with a message', async () => {
    for (const [args, message] of [
      [['worker', '--role', 'cook'], /Expected --role encode, prefill, decode or pd/],
      [['worker', '--role', 'decode', '--model', 'gpt-9'], /unknown model profile 'gpt-9'; known: llama3-8b/],
      [['worker', '--role', 'decode', '--kv-memory', '1KiB'], /holds no qwen2.5-vl-7b block/],
    ] as const) {
      const child = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
      let err = '';
      child.stderr!.setEncoding('utf8').on('data', (t: string) => (err += t));
      const [code] = await once(child, 'exit');
      expect(code).toBe(1);
      expect(err).toMatch(message);
    }
  });
});
