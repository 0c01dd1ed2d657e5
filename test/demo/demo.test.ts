/**
 * `epd-transfer demo` end to end, as a user runs it: proxy and simulated workers as
 * separate processes, the openai client as the load, a JSON summary, the report —
 * and nothing left running or in /dev/shm afterwards.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { alive, leftovers, runDemo } from './helpers.js';

const dir = mkdtempSync(path.join(os.tmpdir(), 'epd-demo-test-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('epd-transfer demo', { timeout: 120_000 }, () => {
  it('1e1p1d: every request succeeds, every KV byte pushed is checked by decode, a repeated image is not encoded again', async () => {
    const report = path.join(dir, 'report.html');
    const { pid, code, summary, stderr } = await runDemo(['--requests', '10', '--json', '--report', report]);
    expect(code, stderr).toBe(0);
    const s = summary!;
    expect(s).toMatchObject({ topology: '1e1p1d', model: 'qwen2.5-vl-7b', requests: 10, errors: 0, interrupted: false, kvVerifyFailures: 0 });
    expect(s.simulation).toMatch(/simulated/);
    for (const k of ['ttftP50Ms', 'ttftP99Ms', 'itlP50Ms', 'itlP99Ms', 'exposedTailP50Ms', 'kvGBps'] as const) expect(typeof s[k], k).toBe('number');
    // 4 text, 3 new images, 3 repeats in every ten requests.
    expect(s.byKind).toMatchObject({ text: { requests: 4 }, image: { requests: 3 }, 'image-repeat': { requests: 3 } });
    expect(s.media.items).toBe(6);
    expect(s.ecHitRate).toBeGreaterThan(0);
    expect(s.media.proxyCacheHits + s.media.coalesced + s.media.encoderHits).toBeGreaterThanOrEqual(3);
    expect(s.media.encodedLocally).toBe(0);
    // Bytes really moved, and checked byte for byte where they landed.
    expect(s.bytes.kv).toBeGreaterThan(0);
    expect(s.verifiedBytes.kv).toBe(s.bytes.kv);
    expect(s.bytes.ec).toBeGreaterThan(0);
    expect(s.verifiedBytes.ec).toBe(s.bytes.ec);
    expect(s.report).toBe(report);

    const html = readFileSync(report, 'utf8');
    expect(html).toMatch(/^<!doctype html>/);
    expect(html).toContain('<b>Simulation.</b>');
    expect(html.match(/<svg /g)!.length).toBeGreaterThanOrEqual(4);
    for (let i = 0; i < 10; i++) expect(html).toContain(`>#${i} `);
    expect(html).not.toMatch(/<script|https?:\/\/(?!127\.0\.0\.1)/); // self-contained: nothing to fetch

    // Everything it started is gone, with its shared memory.
    const pids = s.processes.map((p) => p.pid);
    expect(pids).toHaveLength(4);
    expect(pids.filter(alive)).toEqual([]);
    expect(leftovers(pid, pids)).toEqual([]);
  });

  it('a corrupted KV transfer fails its request, and only that one', async () => {
    const { code, summary } = await runDemo(['--requests', '6', '--json', '--report', '-', '--corrupt-kv', '2']);
    expect(code).toBe(1);
    const s = summary!;
    expect(s.requests).toBe(6);
    expect(s.errors).toBe(1);
    expect(s.kvVerifyFailures).toBe(1);
    expect(s.errorSamples).toHaveLength(1);
    expect(s.errorSamples[0]).toMatch(/KV verification failed: layer \d+, tensor \w+, prompt block 0/);
    expect(s.report).toBeNull();
  });

  it('1e1pd: encoder and one combined instance, no KV crosses processes', async () => {
    const { code, summary, stderr } = await runDemo(['--topology', '1e1pd', '--requests', '6', '--json', '--report', '-']);
    expect(code, stderr).toBe(0);
    expect(summary).toMatchObject({ topology: '1e1pd', requests: 6, errors: 0, bytes: { kv: 0 }, exposedTailP50Ms: null });
    expect(summary!.bytes.ec).toBeGreaterThan(0);
    expect(summary!.processes.map((p) => p.name)).toEqual(['proxy', 'encode-0', 'pd-0']);
  });

  it('2e2p2d: two of each role behind the proxy', async () => {
    const { code, summary, stderr } = await runDemo(['--topology', '2e2p2d', '--requests', '8', '--concurrency', '4', '--json', '--report', '-']);
    expect(code, stderr).toBe(0);
    expect(summary).toMatchObject({ topology: '2e2p2d', requests: 8, errors: 0, kvVerifyFailures: 0 });
    expect(summary!.verifiedBytes.kv).toBe(summary!.bytes.kv);
    expect(summary!.processes).toHaveLength(7);
  });

  it('a text-only profile gets a text-only load', async () => {
    const { code, summary, stderr } = await runDemo(['--model', 'llama3-8b', '--requests', '4', '--json', '--report', '-', '--kv-memory', '256MiB']);
    expect(code, stderr).toBe(0);
    expect(summary).toMatchObject({ model: 'llama3-8b', requests: 4, errors: 0, ecHitRate: null, byKind: { text: { requests: 4 } } });
  });

  it('refuses a bad topology or model before starting anything', async () => {
    const topology = await runDemo(['--topology', '3e3p', '--json']);
    expect(topology.code).toBe(1);
    expect(topology.stderr).toMatch(/Expected --topology 1e1pd, 1e1p1d, 2e2p2d/);
    const model = await runDemo(['--model', 'nope']);
    expect(model.code).toBe(1);
    expect(model.stderr).toMatch(/unknown model profile 'nope'/);
  });
});
