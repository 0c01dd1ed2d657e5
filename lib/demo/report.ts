/**
 * The demo's HTML report: one self-contained file (inline CSS and SVG, no
 * script, nothing fetched) with the summary, a timeline of every request's phases
 * and per-layer KV transfers, the layer-by-layer overlap of one prefill, and
 * latency plots. Charts are drawn here as SVG: a charting library would have to
 * be inlined into the file (hundreds of kilobytes) to keep it self-contained.
 */
import type { DemoSummary, RequestTimeline, ScaleSummary } from './summary.js';
import type { RequestKind } from './load.js';

/** What the report shows besides the summary. */
export interface ReportInput {
  summary: DemoSummary;
  timelines: readonly RequestTimeline[];
  /** Epoch ms the load started at (x = 0 of the timeline). */
  t0: number;
  /** When the report was made (ISO). */
  createdAt: string;
  /** The command that produced it. */
  command: string;
  /** Every gap between two streamed tokens (ms). */
  itlMs: readonly number[];
}

const COLORS = {
  client: '#d0d4da',
  encode: '#8e6bbf',
  encodeHit: '#cbb8e6',
  ecLoad: '#2a9d8f',
  prefill: '#f4a261',
  kv: '#1d6fb8',
  decode: '#57a773',
  firstToken: '#222',
  error: '#d62828',
};

const KIND_COLORS: Record<RequestKind, string> = { text: '#1d6fb8', image: '#e76f51', 'image-repeat': '#2a9d8f' };

function esc(s: string): string {
  return s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);
}

function fmt(v: number | null | undefined, digits = 1, unit = ''): string {
  return v === null || v === undefined || !Number.isFinite(v) ? '–' : `${v.toFixed(digits)}${unit}`;
}

function bytes(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} kB`;
  return `${n} B`;
}

/** "Nice" tick step for a range. */
function tickStep(range: number, target: number): number {
  const raw = range / Math.max(1, target);
  const mag = 10 ** Math.floor(Math.log10(raw || 1));
  for (const m of [1, 2, 5, 10]) if (m * mag >= raw) return m * mag;
  return 10 * mag;
}

function rect(x: number, y: number, w: number, h: number, fill: string, title: string, extra = ''): string {
  return `<rect x="${x.toFixed(1)}" y="${y.toFixed(1)}" width="${Math.max(0.8, w).toFixed(1)}" height="${h}" fill="${fill}"${extra}><title>${esc(title)}</title></rect>`;
}

/** A time axis from 0 to `maxMs`: ticks in ms, or in s for spans of seconds; `label` gets the unit appended. */
function xAxis(x0: number, width: number, y: number, maxMs: number, label: string): string {
  const seconds = maxMs >= 5_000;
  const span = seconds ? maxMs / 1000 : maxMs;
  const step = tickStep(span, 8);
  const parts: string[] = [`<line x1="${x0}" y1="${y}" x2="${x0 + width}" y2="${y}" stroke="#888"/>`];
  for (let v = 0; v <= span + 1e-9; v += step) {
    const x = x0 + (v / span) * width;
    parts.push(`<line x1="${x.toFixed(1)}" y1="${y}" x2="${x.toFixed(1)}" y2="${y + 4}" stroke="#888"/>`);
    parts.push(`<text x="${x.toFixed(1)}" y="${y + 15}" class="tick" text-anchor="middle">${+v.toFixed(3)}</text>`);
  }
  parts.push(`<text x="${x0 + width / 2}" y="${y + 30}" class="axis" text-anchor="middle">${esc(`${label}, ${seconds ? 's' : 'ms'}`)}</text>`);
  return parts.join('');
}

function legend(items: Array<[string, string]>, x: number, y: number): string {
  let cx = x;
  return items
    .map(([color, label]) => {
      const s = `<rect x="${cx}" y="${y - 9}" width="12" height="10" fill="${color}"/><text x="${cx + 16}" y="${y}" class="tick">${esc(label)}</text>`;
      cx += 24 + label.length * 6.2;
      return s;
    })
    .join('');
}

/** Rows of the timeline at most (a larger load shows its first requests; the rest are in the numbers). */
const TIMELINE_ROWS = 400;

/** Every request on one time axis: phases on each worker, layer transfers, first token. */
function timelineSvg(all: readonly RequestTimeline[], t0: number): string {
  const timelines = all.slice(0, TIMELINE_ROWS);
  const left = 150;
  const width = 880;
  const row = 16;
  const top = 34;
  const end = Math.max(1, ...timelines.map((t) => t.end - t0));
  const x = (epoch: number) => left + ((epoch - t0) / end) * width;
  const height = top + timelines.length * row + 44;
  const parts: string[] = [];
  parts.push(
    legend(
      [
        [COLORS.client, 'client wait'],
        [COLORS.encode, 'encode (E)'],
        [COLORS.encodeHit, 'E cache hit'],
        [COLORS.ecLoad, 'embedding load (P)'],
        [COLORS.prefill, 'prefill compute'],
        [COLORS.kv, 'KV layer push'],
        [COLORS.decode, 'decode'],
      ],
      left,
      14,
    ),
  );
  timelines.forEach((t, i) => {
    const y = top + i * row;
    const label = `#${t.index} ${t.kind}${t.path === 'pd' ? ' (PD)' : ''}`;
    parts.push(`<text x="${left - 6}" y="${y + 11}" class="row${t.ok ? '' : ' bad'}" text-anchor="end">${esc(label)}</text>`);
    parts.push(rect(x(t.start), y + 6, x(t.end) - x(t.start), 2, COLORS.client, `${t.id}: ${(t.end - t.start).toFixed(1)} ms end to end`));
    for (const e of t.encode) {
      parts.push(rect(x(e.start), y + 2, x(e.end) - x(e.start), 10, e.hit ? COLORS.encodeHit : COLORS.encode, `${e.instance}: ${e.hit ? 'cache hit' : 'encode'} ${(e.end - e.start).toFixed(1)} ms`));
    }
    if (t.ecLoad) parts.push(rect(x(t.ecLoad.start), y + 2, x(t.ecLoad.end) - x(t.ecLoad.start), 10, COLORS.ecLoad, `${t.ecLoad.instance}: embedding load ${(t.ecLoad.end - t.ecLoad.start).toFixed(1)} ms`));
    if (t.prefill) {
      parts.push(rect(x(t.prefill.start), y + 2, x(t.prefill.end) - x(t.prefill.start), 6, COLORS.prefill, `${t.prefill.instance}: prefill ${(t.prefill.end - t.prefill.start).toFixed(1)} ms (${t.prefill.batch} request(s) in the step)`));
    }
    for (const l of t.layers) {
      if (l.sendStart === undefined || l.sendEnd === undefined) continue;
      parts.push(rect(x(l.sendStart), y + 9, x(l.sendEnd) - x(l.sendStart), 4, COLORS.kv, `layer ${l.layer}: pushed in ${(l.sendEnd - l.sendStart).toFixed(2)} ms`));
    }
    const d = t.decode;
    const decodeFrom = d?.kvComplete ?? t.prefill?.end;
    const decodeTo = d?.lastToken ?? (t.ok ? t.end : undefined);
    if (decodeFrom !== undefined && decodeTo !== undefined && decodeTo > decodeFrom) {
      parts.push(rect(x(decodeFrom), y + 2, x(decodeTo) - x(decodeFrom), 10, COLORS.decode, `${d?.instance ?? 'decode'}: ${t.tokens} tokens in ${(decodeTo - decodeFrom).toFixed(1)} ms`, ' opacity="0.85"'));
    }
    if (t.firstToken !== undefined) {
      const fx = x(t.firstToken);
      parts.push(`<path d="M${fx.toFixed(1)} ${y + 1} l3 6 l-3 6 l-3 -6 z" fill="${COLORS.firstToken}"><title>first token after ${(t.firstToken - t.start).toFixed(1)} ms</title></path>`);
    }
    if (!t.ok) {
      const ex = x(t.end);
      parts.push(`<path d="M${ex - 4} ${y + 3} l8 8 M${ex + 4} ${y + 3} l-8 8" stroke="${COLORS.error}" stroke-width="2"><title>${esc(t.error ?? 'failed')}</title></path>`);
    }
  });
  parts.push(xAxis(left, width, top + timelines.length * row + 4, end, 'time since the load started'));
  return `<svg viewBox="0 0 ${left + width + 20} ${height}" width="100%" role="img" aria-label="request timeline">${parts.join('')}</svg>`;
}

/** One prefill, layer by layer: compute of each layer and the push of its KV. */
function layerSvg(t: RequestTimeline): string {
  const layers = t.layers.filter((l) => l.ready !== undefined);
  if (!t.prefill || layers.length === 0) return '';
  const start = t.prefill.start;
  const last = Math.max(...layers.map((l) => Math.max(l.sendEnd ?? 0, l.ready ?? 0)), t.kvDone ?? 0);
  const span = Math.max(0.001, last - start);
  const left = 70;
  const width = 880;
  const row = Math.max(5, Math.min(12, Math.floor(420 / layers.length)));
  const top = 26;
  const x = (epoch: number) => left + ((epoch - start) / span) * width;
  const parts: string[] = [legend([[COLORS.prefill, 'layer compute (simulated)'], [COLORS.kv, 'KV push of the layer (real bytes)']], left, 14)];
  layers.forEach((l, i) => {
    const y = top + i * row;
    const computeFrom = i === 0 ? start : (layers[i - 1].ready ?? start);
    parts.push(`<text x="${left - 6}" y="${y + row - 2}" class="tick" text-anchor="end">L${l.layer}</text>`);
    parts.push(rect(x(computeFrom), y + 1, x(l.ready!) - x(computeFrom), row - 2, COLORS.prefill, `layer ${l.layer} compute ${(l.ready! - computeFrom).toFixed(2)} ms`));
    if (l.sendStart !== undefined && l.sendEnd !== undefined) {
      parts.push(rect(x(l.sendStart), y + 1, x(l.sendEnd) - x(l.sendStart), row - 2, COLORS.kv, `layer ${l.layer} push ${(l.sendEnd - l.sendStart).toFixed(2)} ms`));
    }
  });
  const bottom = top + layers.length * row;
  if (t.kvDone !== undefined) {
    const dx = x(t.kvDone);
    parts.push(`<line x1="${dx.toFixed(1)}" y1="${top}" x2="${dx.toFixed(1)}" y2="${bottom}" stroke="${COLORS.error}" stroke-dasharray="3 2"/>`);
    parts.push(`<text x="${(dx - 4).toFixed(1)}" y="${top - 4}" class="tick" text-anchor="end">decode has all KV (DONE)</text>`);
  }
  parts.push(xAxis(left, width, bottom + 4, span, 'time since the prefill step started'));
  return `<svg viewBox="0 0 ${left + width + 20} ${bottom + 44}" width="100%" role="img" aria-label="layer overlap">${parts.join('')}</svg>`;
}

/** Cumulative distribution of TTFT per kind of request. */
function cdfSvg(series: Array<{ label: string; color: string; values: number[] }>, axisLabel: string): string {
  const left = 50;
  const width = 420;
  const top = 26;
  const height = 200;
  const all = series.flatMap((s) => s.values);
  if (all.length === 0) return '<p>No completed requests.</p>';
  const max = Math.max(...all) * 1.05;
  const x = (v: number) => left + (v / max) * width;
  const y = (p: number) => top + height - p * height;
  const parts: string[] = [legend(series.filter((s) => s.values.length > 0).map((s) => [s.color, `${s.label} (${s.values.length})`]), left, 14)];
  for (const p of [0, 0.25, 0.5, 0.75, 0.9, 1]) {
    parts.push(`<line x1="${left}" y1="${y(p)}" x2="${left + width}" y2="${y(p)}" stroke="#eee"/><text x="${left - 4}" y="${y(p) + 4}" class="tick" text-anchor="end">${p}</text>`);
  }
  for (const s of series) {
    if (s.values.length === 0) continue;
    const sorted = [...s.values].sort((a, b) => a - b);
    let d = `M${x(sorted[0]).toFixed(1)} ${y(0)}`;
    sorted.forEach((v, i) => {
      d += ` L${x(v).toFixed(1)} ${y(i / sorted.length).toFixed(1)} L${x(v).toFixed(1)} ${y((i + 1) / sorted.length).toFixed(1)}`;
    });
    parts.push(`<path d="${d}" fill="none" stroke="${s.color}" stroke-width="2"/>`);
  }
  parts.push(xAxis(left, width, top + height, max, axisLabel));
  return `<svg viewBox="0 0 ${left + width + 20} ${top + height + 40}" width="100%" role="img">${parts.join('')}</svg>`;
}

/** Histogram of values. */
function histogramSvg(values: readonly number[], axisLabel: string, color: string): string {
  if (values.length === 0) return '<p>No tokens.</p>';
  const left = 50;
  const width = 420;
  const top = 16;
  const height = 200;
  const sorted = [...values].sort((a, b) => a - b);
  // Clip the far tail so the body of the distribution stays readable; say so.
  const max = sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * 0.995))] * 1.05 || 1;
  const bins = 40;
  const counts = new Array<number>(bins).fill(0);
  let clipped = 0;
  for (const v of values) {
    if (v > max) clipped++;
    else counts[Math.min(bins - 1, Math.floor((v / max) * bins))]++;
  }
  const peak = Math.max(...counts, 1);
  const bw = width / bins;
  const parts = counts.map((c, i) =>
    rect(left + i * bw + 0.5, top + height - (c / peak) * height, bw - 1, (c / peak) * height, color, `${((i * max) / bins).toFixed(1)}–${(((i + 1) * max) / bins).toFixed(1)} ms: ${c}`),
  );
  parts.push(xAxis(left, width, top + height, max, `${axisLabel}${clipped > 0 ? ` (${clipped} above ${max.toFixed(0)} ms not shown)` : ''}`));
  parts.push(`<text x="${left}" y="${top + height + 44}" class="tick">bar height: number of gaps (tallest ${peak})</text>`);
  return `<svg viewBox="0 0 ${left + width + 20} ${top + height + 52}" width="100%" role="img">${parts.join('')}</svg>`;
}

function row(label: string, value: string, note = ''): string {
  return `<tr><th>${esc(label)}</th><td>${esc(value)}</td><td class="note">${esc(note)}</td></tr>`;
}

/** The cluster part of the report (`--metadata`). */
function scaleSection(c: ScaleSummary): string {
  const network = c.network.mode === 'netns' ? `one network namespace per worker on ${c.network.subnet}` : `loopback (${c.network.reason})`;
  return `<h2>Cluster</h2>
<table>
${row('etcd', c.metadata, c.etcdKeysLeft === null ? '' : `${c.etcdKeysLeft} keys left after the run`)}
${row('network', network)}
${row('KV path', c.paths.kv)}
${row('embedding path', c.paths.embeddings)}
${c.proxies.map((p) => row(p.name, `${p.requests} requests, ${p.errors} failed${p.killed ? ' (killed)' : ''}`, p.staleness ? `shared-load staleness p50 ${p.staleness.p50} ms, p99 ${p.staleness.p99} ms, max ${p.staleness.max} ms (${p.staleness.samples} samples)` : '')).join('\n')}
${row('routed to', Object.entries(c.instances).map(([n, k]) => `${n} ${k}`).join(', '), 'hops per instance, from the proxies\' timelines')}
${c.kill ? row('fault', `${c.kill.target} killed after ${c.kill.afterRequests} requests`, `${c.failures.filter((f) => f.inFlightAtKill).length} in flight failed; ${c.failures.filter((f) => f.sentAfterKill).length} sent afterwards failed; ${c.failovers} refused connections went to the next proxy`) : ''}
</table>`;
}

/** The report as one HTML document. */
export function renderReport(input: ReportInput): string {
  const s = input.summary;
  const t = input.timelines;
  const kinds: RequestKind[] = ['text', 'image', 'image-repeat'];
  // The layer chart shows the largest prefill that pushed KV.
  const showcase = [...t].filter((r) => r.layers.length > 0 && r.prefill).sort((a, b) => b.layers.reduce((n, l) => n + l.bytes, 0) - a.layers.reduce((n, l) => n + l.bytes, 0))[0];
  const ttftSeries = kinds.map((k) => ({ label: k, color: KIND_COLORS[k], values: t.filter((r) => r.kind === k && r.ok && r.firstToken !== undefined).map((r) => r.firstToken! - r.start) }));
  const errors = t.filter((r) => !r.ok);
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>epd-transfer demo report (simulation) — ${esc(s.topology)}, ${esc(s.model)}</title>
<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1080px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 32px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.sim { background: #fff4d6; border: 1px solid #e9c46a; padding: 10px 14px; border-radius: 6px; margin: 12px 0; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; min-width: 120px; }
.card b { display: block; font-size: 20px; } .card span { color: #666; font-size: 12px; }
table { border-collapse: collapse; margin: 8px 0; } th, td { text-align: left; padding: 3px 12px 3px 0; vertical-align: top; }
th { font-weight: 600; } td.note { color: #666; font-size: 12px; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
svg text.tick { font-size: 10px; fill: #555; } svg text.axis { font-size: 11px; fill: #333; }
svg text.row { font-size: 10px; fill: #333; } svg text.row.bad { fill: ${COLORS.error}; font-weight: 600; }
code { background: #f3f3f3; padding: 1px 4px; border-radius: 3px; }
.bad { color: ${COLORS.error}; }
</style></head><body>
<h1>epd-transfer demo — ${esc(s.topology)}, ${esc(s.model)}</h1>
<div>${esc(input.createdAt)} · <code>${esc(input.command)}</code></div>
<div class="sim"><b>Simulation.</b> ${esc(s.simulation)}</div>
<div class="cards">
<div class="card"><b>${s.requests}</b><span>requests</span></div>
<div class="card"><b class="${s.errors > 0 ? 'bad' : ''}">${s.errors}</b><span>errors</span></div>
<div class="card"><b>${fmt(s.ttftP50Ms, 0, ' ms')}</b><span>TTFT p50 (p99 ${fmt(s.ttftP99Ms, 0, ' ms')})</span></div>
<div class="card"><b>${fmt(s.itlP50Ms, 1, ' ms')}</b><span>inter-token p50 (p99 ${fmt(s.itlP99Ms, 1, ' ms')})</span></div>
<div class="card"><b>${s.ecHitRate === null ? '–' : `${(s.ecHitRate * 100).toFixed(0)} %`}</b><span>encoder-cache hit rate</span></div>
<div class="card"><b>${bytes(s.bytes.kv)}</b><span>KV pushed P → D</span></div>
<div class="card"><b>${fmt(s.exposedTailP50Ms, 2, ' ms')}</b><span>layerwise exposed tail p50</span></div>
</div>
${s.interrupted ? '<p class="bad"><b>Interrupted:</b> the load was cut short; the numbers cover the requests that ran.</p>' : ''}

<h2>Summary</h2>
<table>
${row('topology', s.topology, 'E = encoder, P = prefill, D = decode, PD = combined; each a separate process, proxy in front')}
${row('requests / errors', `${s.requests} / ${s.errors}`, `${s.concurrency} in flight, ${s.durationS.toFixed(1)} s, ${s.requestsPerSec.toFixed(2)} req/s`)}
${row('TTFT p50 / p99', `${fmt(s.ttftP50Ms)} / ${fmt(s.ttftP99Ms)} ms`, 'client-side, to the first content token')}
${kinds.map((k) => row(`  ${k}`, `${fmt(s.byKind[k].ttftP50Ms)} / ${fmt(s.byKind[k].ttftP99Ms)} ms`, `${s.byKind[k].requests} requests, ${s.byKind[k].errors} errors`)).join('\n')}
${row('inter-token p50 / p99', `${fmt(s.itlP50Ms)} / ${fmt(s.itlP99Ms)} ms`, 'gaps between streamed tokens')}
${row('end to end p50 / p99', `${fmt(s.e2eP50Ms)} / ${fmt(s.e2eP99Ms)} ms`)}
${row('media items', String(s.media.items), `${s.media.proxyCacheHits} skipped the encoder (already cached), ${s.media.coalesced} waited for an identical encode, ${s.media.encoderHits} found in the cache by the encoder, ${s.media.encoded} encoded`)}
${row('encoder-cache hit rate', s.ecHitRate === null ? '–' : `${(s.ecHitRate * 100).toFixed(1)} %`, 'items whose embedding was reused instead of encoded')}
${row('EC bytes', `${bytes(s.bytes.ec)} loaded by P/PD`, `${bytes(s.bytes.ecSaved)} saved by encoders; ${bytes(s.verifiedBytes.ec)} checked byte for byte; ${fmt(s.ecGBps, 2, ' GB/s')} load rate`)}
${row('KV bytes', `${bytes(s.bytes.kv)} pushed P → D`, `${bytes(s.verifiedBytes.kv)} checked byte for byte by D (${s.kvVerifyFailures} failed); ${fmt(s.kvGBps, 2, ' GB/s')} while writing`)}
${row('layerwise exposed tail p50 / p99', `${fmt(s.exposedTailP50Ms, 2)} / ${fmt(s.exposedTailP99Ms, 2)} ms`, "from the last layer's compute to decode holding all KV")}
</table>
${s.scale ? scaleSection(s.scale) : ''}

<h2>Timeline</h2>
<p>One row per request${t.length > TIMELINE_ROWS ? ` (the first ${TIMELINE_ROWS} of ${t.length})` : ''}. Thin grey: the client waiting; purple: the encoder; teal: prefill loading the embedding from the shared cache; orange: prefill compute (upper half) with each layer's KV push in blue (lower half); green: decode streaming; ◆ first token; ✕ failure. Hover for numbers.</p>
${timelineSvg(t, input.t0)}

${showcase ? `<h2>Layer by layer: ${esc(showcase.id)}</h2>
<p>The prefill with the most KV. Each layer's compute (orange, a simulated device sleep) is followed by the push of that layer's KV into decode's blocks (blue, real one-sided writes) while the next layer computes; only the last layer's push and one acknowledgement are left after the compute ends.</p>
${layerSvg(showcase)}` : ''}

<h2>Latency</h2>
<div class="grid">
<div><h3>Time to first token (CDF)</h3>${cdfSvg(ttftSeries, 'time to first token')}</div>
<div><h3>Inter-token latency</h3>${histogramSvg(input.itlMs, 'gap between two tokens', COLORS.decode)}</div>
</div>

${errors.length > 0 ? `<h2>Errors</h2><table>${errors.map((e) => row(`#${e.index} ${e.kind}`, e.error ?? 'failed', e.id)).join('')}</table>` : ''}

<h2>Processes</h2>
<table>${s.processes.map((p) => row(p.name, p.url, `pid ${p.pid}`)).join('')}</table>
<p class="note">Numbers come from the client (latencies), the proxy (routing, cache hits) and each worker's <code>/sim/stats</code> (bytes moved and checked). Compute times are simulated from the model profile; bytes and transfers are real.</p>
</body></html>
`;
}
