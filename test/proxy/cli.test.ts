/** The `epd-transfer proxy` and `bench proxy` commands, run as users run them (compiled CLI). */
import { describe, expect, it } from 'vitest';
import { cli, client, waitFor, worker } from './helpers.js';

const SECRET = 'a-long-enough-shared-secret';

describe('epd-transfer proxy', () => {
  it('serves, lists and removes instances with the admin client, and stops cleanly on SIGTERM', async () => {
    const pd = await worker({ role: 'pd' });
    const proxyCmd = cli(['proxy', '--port', '0', '--pd', pd.url, '--health-interval', '200ms'], { EPD_PROXY_SECRET: SECRET });
    await waitFor(() => /listening on (http:\/\/\S+)/.test(proxyCmd.stderr()), 'the proxy to listen');
    const url = /listening on (http:\/\/\S+)/.exec(proxyCmd.stderr())![1];
    // The instance listing is written right after the 'listening' line, possibly in a later chunk.
    await waitFor(() => proxyCmd.stderr().includes(`pd instance ${pd.url}: healthy`), 'the instance listing');

    const px = { url } as Parameters<typeof client>[0];
    const answer = await client(px).chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'hi' }] });
    expect(answer.choices[0].message.content).toMatch(/^tok0/);

    // Without the secret the admin API refuses; the CLI client signs with it.
    expect((await fetch(`${url}/instances`)).status).toBe(401);
    const list = cli(['proxy', 'instances', 'list', '--proxy', url], { EPD_PROXY_SECRET: SECRET });
    expect((await list.exited).code).toBe(0);
    expect(list.stdout()).toMatch(new RegExp(`pd\\s+${pd.url.replace(/[.]/g, '\\.')}\\s+healthy`));
    const remove = cli(['proxy', 'instances', 'remove', '--proxy', url, pd.url], { EPD_PROXY_SECRET: SECRET });
    expect((await remove.exited).code).toBe(0);
    expect(remove.stdout()).toContain('draining');
    const unsigned = cli(['proxy', 'instances', 'list', '--proxy', url]);
    expect((await unsigned.exited).code).toBe(1);
    expect(unsigned.stderr()).toContain('401');

    proxyCmd.child.kill('SIGTERM');
    expect(await proxyCmd.exited).toEqual({ code: 0, signal: null });
    expect(proxyCmd.stderr()).toContain('SIGTERM: closing');
  });

  it('refuses configurations that cannot work', async () => {
    const cases: Array<[string[], NodeJS.ProcessEnv, RegExp]> = [
      [['proxy', '--port', '0'], {}, /give --prefill and --decode, or --pd/],
      [['proxy', '--port', '0', '--prefill', '127.0.0.1:1'], {}, /--prefill and --decode go together/],
      [['proxy', '--port', '0', '--pd', '127.0.0.1:1', '--metaserver-timeout', 'soon'], {}, /duration like 500ms/],
      [['proxy', '--port', '0', '--pd', 'ftp://x'], {}, /http\(s\) instance URL/],
      [['proxy', '--port', '0', '--pd', '127.0.0.1:1'], { EPD_PROXY_SECRET: 'short' }, /at least 16 characters/],
      [['proxy', '--host', '0.0.0.0', '--port', '0', '--pd', '127.0.0.1:1'], {}, /wildcard address/],
      [['proxy', 'instances', 'frobnicate'], {}, /list, add or remove/],
    ];
    const runs = cases.map(([args, env]) => cli(args, env));
    for (const [i, [args, , why]] of cases.entries()) {
      const { code } = await runs[i].exited;
      expect(code, args.join(' ')).toBe(1);
      expect(runs[i].stderr(), args.join(' ')).toMatch(why);
    }
  });
});

describe('epd-transfer bench proxy', () => {
  it('reports the added latency and capacity fields (no timing is asserted)', async () => {
    const run = cli(['bench', 'proxy', '--rate', '100', '--duration', '300ms', '--runs', '1', '--concurrency', '4', '--json']);
    const { code } = await run.exited;
    expect(code, run.stderr()).toBe(0);
    const r = JSON.parse(run.stdout().trim().split('\n').pop()!);
    for (const field of ['addedP50Ms', 'addedP99Ms', 'requestsPerSec', 'directRequestsPerSec', 'achievedRate']) expect(typeof r[field], field).toBe('number');
    expect(r).toMatchObject({ bench: 'proxy', rate: 100, runs: 1, errors: 0 });
    expect(r.requestsPerSec).toBeGreaterThan(0);
    expect(r.direct.requests).toBe(30);
    expect(r.proxied.requests).toBe(30);
  }, 60_000);
});
