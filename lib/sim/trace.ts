/**
 * Per-request layer timelines of a LayerwiseSender, kept only for the requests a
 * worker tracks and handed over when each one ends (the demo draws them). A
 * KvTracer keeps every event of every request; this one files events by request
 * and forgets a request once it is taken, so memory stays bounded by the requests
 * in flight.
 */
import { KvTracer, layersOf, type KvTraceEvent } from '../kv/trace.js';

/** One layer of one request on the prefill side (epoch ms). */
export interface LayerSpan {
  layer: number;
  /** The layer's compute ended (its ready signal completed). */
  ready?: number;
  /** First write of the layer submitted. */
  sendStart?: number;
  /** Last write of the layer landed. */
  sendEnd?: number;
  /** Decode acknowledged the layer's last write. */
  acked?: number;
  /**
   * Bytes of the batches that carried it (shared with requests fused into the same batch;
   * a batch of several layers counts an equal share for each).
   */
  bytes: number;
}

/** What the sender did for one request. */
export interface RequestKvTimeline {
  layers: LayerSpan[];
  /** Decode accepted DONE (epoch ms). */
  done?: number;
  /** The push failed, with this code. */
  failed?: string;
  /** Batches written for the request and their summed durations (ms). */
  batches: number;
  writeMs: number;
}

/** A KvTracer that files events by request (see the module comment). */
export class RequestTraces extends KvTracer {
  private readonly tracked = new Map<string, KvTraceEvent[]>();
  /** Bytes and time of every batch written (not only tracked ones). */
  readonly totals = { batches: 0, bytes: 0, writeMs: 0 };
  private readonly starts = new Map<number, number>();

  constructor(label = 'prefill (simulated)') {
    super(label, 0);
  }

  /** Starts filing events of `requestId`. */
  track(requestId: string): void {
    this.tracked.set(requestId, []);
  }

  /** Stops tracking `requestId` and returns its timeline. */
  take(requestId: string): RequestKvTimeline {
    const events = this.tracked.get(requestId) ?? [];
    this.tracked.delete(requestId);
    return timeline(events);
  }

  override record(event: Omit<KvTraceEvent, 'ts'> & { ts?: number }): void {
    const e: KvTraceEvent = { ...event, ts: event.ts ?? (performance.timeOrigin + performance.now()) * 1000 };
    if (e.phase === 'sendStart' && e.seq !== undefined) this.starts.set(e.seq, e.ts);
    if (e.phase === 'sendEnd' && e.seq !== undefined) {
      const start = this.starts.get(e.seq);
      this.starts.delete(e.seq);
      this.totals.batches++;
      this.totals.bytes += e.bytes ?? 0;
      if (start !== undefined) this.totals.writeMs += (e.ts - start) / 1000;
    }
    if (e.phase === 'failed' && e.seq !== undefined) this.starts.delete(e.seq);
    for (const id of e.requests) this.tracked.get(id)?.push(e);
  }
}

function timeline(events: readonly KvTraceEvent[]): RequestKvTimeline {
  const layers = new Map<number, LayerSpan>();
  const starts = new Map<number, number>();
  const out: RequestKvTimeline = { layers: [], batches: 0, writeMs: 0 };
  const ms = (us: number) => us / 1000;
  const span = (layer: number) => {
    let s = layers.get(layer);
    if (!s) layers.set(layer, (s = { layer, bytes: 0 }));
    return s;
  };
  for (const e of events) {
    if (e.phase === 'done') out.done = ms(e.ts);
    else if (e.phase === 'failed') out.failed = e.code;
    if (e.phase === 'sendStart' && e.seq !== undefined) starts.set(e.seq, e.ts);
    if (e.phase === 'sendEnd') {
      out.batches++;
      const start = e.seq === undefined ? undefined : starts.get(e.seq);
      if (start !== undefined) out.writeMs += ms(e.ts - start);
    }
    const covered = layersOf(e);
    for (const layer of covered) {
      const s = span(layer);
      switch (e.phase) {
        case 'ready':
          s.ready ??= ms(e.ts);
          break;
        case 'sendStart':
          s.sendStart ??= ms(e.ts);
          break;
        case 'sendEnd':
          s.sendEnd = ms(e.ts);
          s.bytes += (e.bytes ?? 0) / covered.length;
          break;
        case 'acked':
          s.acked = ms(e.ts);
          break;
        default:
          break;
      }
    }
  }
  out.layers = [...layers.values()].sort((a, b) => a.layer - b.layer);
  return out;
}
