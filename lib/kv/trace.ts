/**
 * Tracing of layerwise transfers: per layer and request, when the layer was
 * ready, when its batch started and ended, when the receiver acknowledged it, and
 * the receiver's arrivals. Exported as Chrome-trace JSON (opens in Perfetto and
 * chrome://tracing). Timestamps are microseconds since the Unix epoch, so traces
 * of processes on one host line up when merged.
 */

/** What happened. */
export type KvTracePhase =
  /** Prefill: the layer's ready signal completed (compute of the layer done). */
  | 'ready'
  /** Prefill: a batch of the layer was submitted to the transport. */
  | 'sendStart'
  /** Prefill: that batch completed (bytes landed). */
  | 'sendEnd'
  /** Prefill: the receiver acknowledged that batch. */
  | 'acked'
  /** Decode: a layer of a request arrived (and was verified, if checksummed). */
  | 'arrived'
  /** Either side: the request completed. */
  | 'done'
  /** Either side: the request failed. */
  | 'failed';

export interface KvTraceEvent {
  phase: KvTracePhase;
  /** Microseconds since the Unix epoch. */
  ts: number;
  /** The layer; for a batch of several layers, the first one. */
  layer?: number;
  /** A batch of several layers (fused): its last layer. Absent when the batch has one layer. */
  lastLayer?: number;
  /** Requests the event concerns. */
  requests: string[];
  /** The peer (address or sender id) of a batch. */
  peer?: string;
  bytes?: number;
  /** Batch sequence number (pairs sendStart/sendEnd/acked). */
  seq?: number;
  /** Failure code. */
  code?: string;
}

/** One Chrome trace event (the subset used here). */
export interface ChromeTraceEvent {
  name: string;
  cat: string;
  ph: 'X' | 'i' | 'b' | 'e' | 'M';
  ts: number;
  pid: number;
  tid: number;
  dur?: number;
  id?: string;
  s?: 't' | 'p' | 'g';
  args?: Record<string, unknown>;
}

/** Per-layer timings of a traced run, in milliseconds since the first event. */
export interface KvLayerSummary {
  layer: number;
  readyMs?: number;
  sendStartMs?: number;
  sendEndMs?: number;
  ackedMs?: number;
  /**
   * Sum of the layer's batch durations (sendStart → sendEnd). A batch of several layers
   * counts for each of them with an equal share of its duration and bytes.
   */
  transferMs: number;
  bytes: number;
}

/** The layers an event concerns: `[layer]`, or every layer of a batch of several. */
export function layersOf(e: Pick<KvTraceEvent, 'layer' | 'lastLayer'>): number[] {
  if (e.layer === undefined) return [];
  const last = e.lastLayer ?? e.layer;
  return Array.from({ length: Math.max(1, last - e.layer + 1) }, (_, i) => e.layer! + i);
}

/** "L3", or "L3–7" for a batch of several layers. */
function layerLabel(e: Pick<KvTraceEvent, 'layer' | 'lastLayer'>): string {
  return e.lastLayer === undefined || e.lastLayer === e.layer ? `L${e.layer}` : `L${e.layer}–${e.lastLayer}`;
}

/** Microseconds since the Unix epoch, sub-millisecond resolution. */
export function nowMicros(): number {
  return (performance.timeOrigin + performance.now()) * 1000;
}

/** Records trace events (bounded) and exports them. */
export class KvTracer {
  private readonly list: KvTraceEvent[] = [];
  private dropped = 0;

  /**
   * @param label process label in the exported trace (e.g. "prefill").
   * @param limit events kept; later ones are counted in `dropped` and discarded.
   */
  constructor(
    readonly label = 'epd-transfer',
    private readonly limit = 1_000_000,
  ) {}

  /** Appends an event stamped now (unless `ts` is given). */
  record(event: Omit<KvTraceEvent, 'ts'> & { ts?: number }): void {
    if (this.list.length >= this.limit) {
      this.dropped++;
      return;
    }
    this.list.push({ ...event, ts: event.ts ?? nowMicros() });
  }

  /** Events recorded so far, oldest first. */
  get events(): readonly KvTraceEvent[] {
    return this.list;
  }

  /** Events discarded because the limit was reached. */
  get droppedEvents(): number {
    return this.dropped;
  }

  /** Drops every event recorded so far. */
  clear(): void {
    this.list.length = 0;
    this.dropped = 0;
  }

  /**
   * Per-layer summary of the events (optionally of one request): first ready,
   * first send start, last send end, last ack, summed transfer time and bytes.
   */
  summary(requestId?: string): KvLayerSummary[] {
    const events = requestId === undefined ? this.list : this.list.filter((e) => e.requests.includes(requestId));
    if (events.length === 0) return [];
    let t0 = Infinity;
    for (const e of events) t0 = Math.min(t0, e.ts);
    const ms = (ts: number) => (ts - t0) / 1000;
    const layers = new Map<number, KvLayerSummary>();
    const starts = new Map<number, number>();
    for (const e of events) {
      const covered = layersOf(e);
      if (e.phase === 'sendStart' && e.seq !== undefined) starts.set(e.seq, e.ts);
      for (const layer of covered) {
        let s = layers.get(layer);
        if (!s) layers.set(layer, (s = { layer, transferMs: 0, bytes: 0 }));
        if (e.phase === 'ready') s.readyMs ??= ms(e.ts);
        if (e.phase === 'sendStart') s.sendStartMs ??= ms(e.ts);
        if (e.phase === 'sendEnd') {
          s.sendEndMs = ms(e.ts);
          s.bytes += (e.bytes ?? 0) / covered.length;
          const start = e.seq === undefined ? undefined : starts.get(e.seq);
          if (start !== undefined) s.transferMs += (e.ts - start) / 1000 / covered.length;
        }
        if (e.phase === 'acked') s.ackedMs = ms(e.ts);
      }
    }
    return [...layers.values()].sort((a, b) => a.layer - b.layer);
  }

  /** The events as Chrome-trace JSON (`{ traceEvents }`); merge several with {@link mergeChromeTraces}. */
  toChromeTrace(pid = process.pid): { traceEvents: ChromeTraceEvent[]; displayTimeUnit: 'ms' } {
    const out: ChromeTraceEvent[] = [{ name: 'process_name', cat: '__metadata', ph: 'M', ts: 0, pid, tid: 0, args: { name: this.label } }];
    const tids = new Map<string, number>();
    const tid = (name: string) => {
      let id = tids.get(name);
      if (id === undefined) {
        tids.set(name, (id = tids.size + 1));
        out.push({ name: 'thread_name', cat: '__metadata', ph: 'M', ts: 0, pid, tid: id, args: { name } });
      }
      return id;
    };
    const starts = new Map<number, KvTraceEvent>();
    const ends = new Map<number, KvTraceEvent>();
    const opened = new Set<string>();
    for (const e of this.list) {
      const args: Record<string, unknown> = { requests: e.requests };
      if (e.bytes !== undefined) args.bytes = e.bytes;
      if (e.code !== undefined) args.code = e.code;
      switch (e.phase) {
        case 'ready':
          out.push({ name: `ready L${e.layer}`, cat: 'compute', ph: 'i', s: 't', ts: e.ts, pid, tid: tid('compute'), args });
          break;
        case 'sendStart':
          if (e.seq !== undefined) starts.set(e.seq, e);
          for (const r of e.requests) {
            if (!opened.has(r)) {
              opened.add(r);
              out.push({ name: r, cat: 'request', ph: 'b', id: r, ts: e.ts, pid, tid: tid('requests') });
            }
          }
          break;
        case 'sendEnd': {
          const start = e.seq === undefined ? undefined : starts.get(e.seq);
          if (start) {
            out.push({ name: `send ${layerLabel(e)}`, cat: 'transfer', ph: 'X', ts: start.ts, dur: e.ts - start.ts, pid, tid: tid(`send → ${e.peer ?? '?'}`), args });
          }
          if (e.seq !== undefined) ends.set(e.seq, e);
          break;
        }
        case 'acked': {
          const end = e.seq === undefined ? undefined : ends.get(e.seq);
          if (end) out.push({ name: `ack ${layerLabel(e)}`, cat: 'control', ph: 'X', ts: end.ts, dur: e.ts - end.ts, pid, tid: tid(`ack ← ${e.peer ?? '?'}`), args });
          break;
        }
        case 'arrived':
          out.push({ name: `arrived L${e.layer}`, cat: 'receive', ph: 'i', s: 't', ts: e.ts, pid, tid: tid(`receive ← ${e.peer ?? '?'}`), args });
          break;
        case 'done':
        case 'failed':
          for (const r of e.requests) {
            out.push({ name: `${e.phase} ${r}`, cat: 'request', ph: 'i', s: 'p', ts: e.ts, pid, tid: tid('requests'), args });
            if (opened.delete(r)) out.push({ name: r, cat: 'request', ph: 'e', id: r, ts: e.ts, pid, tid: tid('requests') });
          }
          break;
      }
    }
    return { traceEvents: out, displayTimeUnit: 'ms' };
  }
}

/** Concatenates Chrome traces (e.g. prefill's and decode's) into one file's object. */
export function mergeChromeTraces(...traces: Array<{ traceEvents: ChromeTraceEvent[] }>): { traceEvents: ChromeTraceEvent[]; displayTimeUnit: 'ms' } {
  return { traceEvents: traces.flatMap((t) => t.traceEvents), displayTimeUnit: 'ms' };
}
