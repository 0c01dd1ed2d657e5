/**
 * `epd-transfer demo [--topology 1e1pd|1e1p1d|2e2p2d] [--requests n] [--json] …
 *  [--metadata etcd://h:p --proxies n --netns auto|on|off --kill <process>@<n>]`
 *
 * Prints a table (or, with --json, one JSON object on stdout) and writes the HTML
 * report. Exit code: 0 when every request succeeded, 1 when some failed, 130 when
 * interrupted. The first Ctrl-C (SIGINT, SIGTERM, SIGHUP) stops the load and shuts everything
 * down in order; a second one stops at once (the children are killed).
 */
import { parseArgs } from 'node:util';
import { TransferError } from '../errors.js';
import { getProfile } from '../sim/profiles.js';
import { expectInteger, parseBytes } from '../validate.js';
import { runDemo } from './run.js';
import type { NetnsMode } from './scale.js';
import type { DemoSummary, ScaleSummary, Topology } from './summary.js';

const TOPOLOGIES: readonly Topology[] = ['1e1pd', '1e1p1d', '2e2p2d'];

function fmt(v: number | null, digits = 1): string {
  return v === null ? '–' : v.toFixed(digits);
}

function gb(bytes: number): string {
  return bytes >= 1e9 ? `${(bytes / 1e9).toFixed(2)} GB` : `${(bytes / 1e6).toFixed(1)} MB`;
}

/** The cluster's lines of the human summary. */
function scaleLines(c: ScaleSummary): Array<[string, string]> {
  const lines: Array<[string, string]> = [
    ['etcd', `${c.metadata} (${c.etcdKeysLeft === null ? 'could not check what is left' : `${c.etcdKeysLeft} keys left after the run`})`],
    ['network', c.network.mode === 'netns' ? `one network namespace per worker, bridge ${c.network.subnet}` : `loopback: ${c.network.reason}`],
    ['KV path', c.paths.kv],
    ['embedding path', c.paths.embeddings],
    [
      'proxies',
      c.proxies
        .map((p) => {
          const stale = p.staleness ? `, shared-load staleness p50 ${p.staleness.p50} ms, p99 ${p.staleness.p99} ms (${p.staleness.samples} samples)` : '';
          return `${p.name}: ${p.requests} requests, ${p.errors} failed${p.killed ? ' (killed)' : ''}${stale}`;
        })
        .join('\n'),
    ],
    ['routed to', Object.entries(c.instances).map(([name, n]) => `${name} ${n}`).join(', ')],
  ];
  if (c.failovers > 0) lines.push(['failovers', `${c.failovers} requests refused by a dead proxy went to the next one`]);
  if (c.kill) {
    const after = c.failures.filter((f) => f.sentAfterKill).length;
    lines.push([
      'fault',
      `${c.kill.target} killed after ${c.kill.afterRequests} requests: ${c.failures.filter((f) => f.inFlightAtKill).length} in flight at it failed, ${after} sent afterwards failed`,
    ]);
  }
  return lines;
}

/** The human summary. */
export function formatSummary(s: DemoSummary): string {
  const k = s.byKind;
  const lines: Array<[string, string]> = [
    ['requests', `${s.requests}, ${s.errors} error${s.errors === 1 ? '' : 's'}${s.interrupted ? ` (interrupted; ${s.cancelled} cancelled)` : ''}   ${s.concurrency} in flight, ${s.durationS.toFixed(1)} s, ${s.requestsPerSec.toFixed(2)} req/s`],
    ['TTFT p50 / p99', `${fmt(s.ttftP50Ms)} / ${fmt(s.ttftP99Ms)} ms   text ${fmt(k.text.ttftP50Ms, 0)}, new image ${fmt(k.image.ttftP50Ms, 0)}, repeated image ${fmt(k['image-repeat'].ttftP50Ms, 0)} ms (p50)`],
    ['inter-token p50 / p99', `${fmt(s.itlP50Ms)} / ${fmt(s.itlP99Ms)} ms`],
    [
      'EC bytes (E → P)',
      `${gb(s.bytes.ec)} loaded ${s.bytes.ecPulled > 0 ? `(${gb(s.bytes.ecPulled)} pulled from the encoders' hosts)` : 'from the shared cache'} at ${fmt(s.ecGBps, 2)} GB/s; ` +
        `${gb(s.bytes.ecSaved)} saved by encoders; ${gb(s.verifiedBytes.ec)} checked`,
    ],
    [
      'KV bytes (P → D)',
      s.topology === '1e1pd'
        ? '– (a combined PD instance keeps its KV where it computed it)'
        : `${gb(s.bytes.kv)} pushed layer by layer at ${fmt(s.kvGBps, 2)} GB/s; ${gb(s.verifiedBytes.kv)} checked byte for byte by D${s.kvVerifyFailures > 0 ? ` (${s.kvVerifyFailures} FAILED the check)` : ''}`,
    ],
    [
      'encoder-cache hit rate',
      s.ecHitRate === null
        ? '– (no media)'
        : `${(s.ecHitRate * 100).toFixed(0)} % of ${s.media.items} items (${s.media.proxyCacheHits} skipped the encoder, ${s.media.coalesced} coalesced, ${s.media.encoderHits} hit at the encoder; ${s.media.encoded} encoded)`,
    ],
    ['layerwise exposed tail', s.exposedTailP50Ms === null ? '–' : `${fmt(s.exposedTailP50Ms, 2)} ms p50, ${fmt(s.exposedTailP99Ms, 2)} ms p99 (KV complete after the last layer's compute)`],
  ];
  if (s.scale) lines.push(...scaleLines(s.scale));
  if (s.errorSamples.length > 0) lines.push(['errors', s.errorSamples.join('\n')]);
  if (s.unreachable.length > 0) lines.push(['lost', `${s.unreachable.join(', ')} (died during the run; their bytes are not counted)`]);
  if (s.report) lines.push(['report', s.report]);
  const width = Math.max(...lines.map(([a]) => a.length));
  return [
    `epd-transfer demo — ${s.topology}, ${s.model}`,
    `SIMULATION: ${s.simulation}`,
    '',
    ...lines.map(([a, b]) => `  ${a.padEnd(width)}  ${b.split('\n').join(`\n${' '.repeat(width + 4)}`)}`),
  ].join('\n');
}

/** Runs the `demo` command. Returns the exit code. */
export async function runDemoCommand(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      topology: { type: 'string', default: '1e1p1d' },
      requests: { type: 'string', default: '40' },
      concurrency: { type: 'string', default: '4' },
      model: { type: 'string', default: 'qwen2.5-vl-7b' },
      report: { type: 'string', default: './epd-demo-report.html' },
      json: { type: 'boolean', default: false },
      seed: { type: 'string', default: '1' },
      'kv-memory': { type: 'string', default: '384MiB' },
      'corrupt-kv': { type: 'string' },
      metadata: { type: 'string' },
      proxies: { type: 'string', default: '1' },
      netns: { type: 'string', default: 'auto' },
      kill: { type: 'string' },
    },
  });
  const topology = values.topology as Topology;
  if (!TOPOLOGIES.includes(topology)) {
    throw new TransferError(`Expected --topology ${TOPOLOGIES.join(', ')} but received ${JSON.stringify(values.topology)}`, 'ERR_BAD_ARGUMENT');
  }
  const profile = getProfile(values.model);
  const requests = expectInteger(Number(values.requests), '--requests', 1, 100_000);
  const concurrency = expectInteger(Number(values.concurrency), '--concurrency', 1, 1024);
  const seed = expectInteger(Number(values.seed), '--seed', 0);
  const corruptKv = values['corrupt-kv'] === undefined ? undefined : expectInteger(Number(values['corrupt-kv']), '--corrupt-kv', 1);
  const proxies = expectInteger(Number(values.proxies), '--proxies', 1, 16);
  const netns = values.netns as NetnsMode;
  if (!['auto', 'on', 'off'].includes(netns)) throw new TransferError(`Expected --netns auto, on or off but received ${JSON.stringify(values.netns)}`, 'ERR_BAD_ARGUMENT');
  let kill: { target: string; after: number } | undefined;
  if (values.kill !== undefined) {
    const m = /^([\w-]+)@(\d+)$/.exec(values.kill);
    if (!m) throw new TransferError(`Expected --kill <process>@<n> (e.g. proxy-1@10, decode-0@12) but received ${JSON.stringify(values.kill)}`, 'ERR_BAD_ARGUMENT');
    kill = { target: m[1], after: expectInteger(Number(m[2]), '--kill …@<n>', 1) };
  }
  const json = values.json;
  const stderr = process.stderr;

  const interrupt = new AbortController();
  let signals = 0;
  const onSignal = (signal: NodeJS.Signals) => {
    signals++;
    if (signals === 1) {
      stderr.write(`\n${signal}: stopping the load and shutting the demo down (again to force)\n`);
      interrupt.abort();
    } else {
      stderr.write(`${signal}: forced stop\n`);
      process.exit(130); // the supervisor's exit hook kills the children
    }
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('SIGHUP', onSignal);
  try {
    const summary = await runDemo({
      topology,
      requests,
      concurrency,
      model: profile.id,
      seed,
      report: values.report === '-' ? null : values.report,
      corruptKv,
      kvMemory: parseBytes(values['kv-memory'], '--kv-memory'),
      metadata: values.metadata,
      proxies,
      netns,
      kill,
      signal: interrupt.signal,
      progress: json && !stderr.isTTY ? undefined : stderr,
      log: (line) => {
        if (!json) stderr.write(`${line}\n`);
      },
      command: ['epd-transfer', 'demo', ...args].join(' '),
    });
    process.stdout.write(json ? `${JSON.stringify(summary)}\n` : `${formatSummary(summary)}\n`);
    if (summary.interrupted) return 130;
    return summary.errors > 0 ? 1 : 0;
  } catch (err) {
    if (interrupt.signal.aborted) {
      stderr.write('demo interrupted before the load finished; everything was shut down\n');
      return 130;
    }
    throw err;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    process.off('SIGHUP', onSignal);
  }
}
