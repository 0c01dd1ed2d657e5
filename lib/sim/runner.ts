/**
 * The simulated model runner of one instance: one device stream that runs, in
 * order, encoder passes, prefill steps and decode steps, each taking the time the
 * model profile gives it (`stream.sleep`), with the KV writes of a prefill step
 * really done on the stream after each layer's compute.
 *
 * Scheduling follows a serving engine's outline:
 * - prefill: waiting requests are batched into one forward pass up to
 *   `maxBatchedTokens` (a larger request goes alone); per layer the step takes the
 *   sum of the requests' layer times (matmuls linear in tokens, attention
 *   quadratic per request);
 * - decode: every running sequence gains one token per step; a step reads the
 *   weights once plus every sequence's KV (memory-bound), so it slows as the batch
 *   and contexts grow;
 * - a combined (PD) instance alternates prefill and decode steps on its one device,
 *   so prefills stall its decodes — the interference disaggregation removes.
 *
 * Device waits run on the libuv pool; this loop is their only waiter (one at a
 * time), and layer readiness reaches a LayerwiseSender as promises it resolves.
 */
import type { DeviceEvent, DeviceStream } from '../device.js';
import type { TransferEngine } from '../engine.js';
import { TransferError } from '../errors.js';
import type { SimKvCache } from './kv-cache.js';
import { decodeStepUs, layerPrefillUs, type ModelProfile } from './profiles.js';

/** One request's prompt in a prefill step. */
export interface PrefillJob {
  requestId: string;
  tokens: number;
  /** Local cache blocks, in prompt order. */
  blocks: readonly number[];
  /** Fault injection: corrupt this layer of the request's first block after it is written. */
  corruptLayer?: number;
  signal?: AbortSignal;
}

/** Timings of a job's prefill (epoch ms). */
export interface PrefillTiming {
  /** The step started on the device (compute of layer 0 began). */
  start: number;
  /** The last layer's KV was written. */
  end: number;
  /** Requests in the step. */
  batch: number;
}

/** Called by the runner around each prefill step (prefill instances push KV). */
export interface StepHooks {
  /** Before layer 0 is enqueued, with the jobs of the step. */
  beginStep(jobs: readonly PrefillJob[]): void;
  /** Layer `layer` of the step is in the cache once `ready` resolves. */
  layerReady(layer: number, ready: Promise<void>): void;
}

/** A sequence being decoded. */
export interface DecodeSequence {
  requestId: string;
  /** Tokens in its KV cache (prompt plus generated). */
  context: number;
  /** Tokens still to generate. */
  remaining: number;
  /** Called after each step with the index of the token it produced. Must not throw. */
  onToken(index: number): void;
  signal?: AbortSignal;
}

/** Options of {@link ModelRunner}. */
export interface ModelRunnerOptions {
  /** Prompt tokens one prefill step takes at most (a longer prompt runs alone). Default 8192. */
  maxBatchedTokens?: number;
  /** Push hooks of a prefill instance. */
  hooks?: StepHooks;
}

interface QueuedPrefill {
  job: PrefillJob;
  resolve(t: PrefillTiming): void;
  reject(err: Error): void;
  onAbort(): void;
}

interface RunningDecode {
  seq: DecodeSequence;
  produced: number;
  resolve(): void;
  reject(err: Error): void;
}

interface QueuedCompute {
  us: number;
  resolve(): void;
  reject(err: Error): void;
}

function epochMs(): number {
  return performance.timeOrigin + performance.now();
}

/** Waits for an event; one that already completed costs no trip through the libuv pool. */
function settle(event: DeviceEvent, timeoutMs: number): Promise<void> {
  return event.query() ? Promise.resolve() : event.synchronize(timeoutMs);
}

function aborted(what: string): TransferError {
  return new TransferError(`${what} aborted`, 'ERR_ABORTED');
}

/** Runs the instance's simulated device work. See the module comment. */
export class ModelRunner {
  private readonly stream: DeviceStream;
  private readonly maxBatchedTokens: number;
  private readonly prefills: QueuedPrefill[] = [];
  private readonly computes: QueuedCompute[] = [];
  private readonly running: RunningDecode[] = [];
  private pumping = false;
  private lastWasPrefill = false;
  private closed = false;
  private idle: Promise<void> = Promise.resolve();
  /** Busy device time, µs, by kind (for stats). */
  readonly busyUs = { prefill: 0, decode: 0, encode: 0 };
  /** Steps run, by kind. */
  readonly steps = { prefill: 0, decode: 0, encode: 0 };

  constructor(
    private readonly engine: TransferEngine,
    private readonly profile: ModelProfile,
    private readonly cache: SimKvCache | undefined,
    private readonly options: ModelRunnerOptions = {},
  ) {
    this.stream = engine.device.createStream();
    this.maxBatchedTokens = options.maxBatchedTokens ?? 8192;
  }

  /** Queues a prompt for prefill; resolves when its KV is written (all layers). */
  prefill(job: PrefillJob): Promise<PrefillTiming> {
    if (this.closed) return Promise.reject(new TransferError('the model runner is closed', 'ERR_CLOSED'));
    if (!this.cache) return Promise.reject(new TransferError('this instance has no KV cache', 'ERR_BAD_ARGUMENT'));
    if (job.signal?.aborted) return Promise.reject(aborted('prefill'));
    return new Promise<PrefillTiming>((resolve, reject) => {
      const entry: QueuedPrefill = {
        job,
        resolve,
        reject,
        onAbort: () => {
          const i = this.prefills.indexOf(entry);
          if (i < 0) return; // already on the device: it finishes
          this.prefills.splice(i, 1);
          reject(aborted('prefill'));
        },
      };
      job.signal?.addEventListener('abort', entry.onAbort, { once: true });
      this.prefills.push(entry);
      this.pump();
    });
  }

  /** Adds a sequence to the decode batch; resolves after its last token. */
  decode(seq: DecodeSequence): Promise<void> {
    if (this.closed) return Promise.reject(new TransferError('the model runner is closed', 'ERR_CLOSED'));
    if (seq.signal?.aborted) return Promise.reject(aborted('decode'));
    if (seq.remaining < 1) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      this.running.push({ seq, produced: 0, resolve, reject });
      this.pump();
    });
  }

  /** Occupies the device for `us` microseconds (an encoder pass); resolves when done. */
  compute(us: number): Promise<void> {
    if (this.closed) return Promise.reject(new TransferError('the model runner is closed', 'ERR_CLOSED'));
    return new Promise<void>((resolve, reject) => {
      this.computes.push({ us: Math.max(1, Math.round(us)), resolve, reject });
      this.pump();
    });
  }

  /** Sequences decoding now. */
  get decoding(): number {
    return this.running.length;
  }

  /** Prompts waiting for prefill. */
  get queued(): number {
    return this.prefills.length;
  }

  /** Fails queued and running work (ERR_CLOSED) once the current step ended; destroys the stream. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const err = new TransferError('the model runner is closed', 'ERR_CLOSED');
    for (const p of this.prefills.splice(0)) {
      p.job.signal?.removeEventListener('abort', p.onAbort);
      p.reject(err);
    }
    for (const c of this.computes.splice(0)) c.reject(err);
    for (const r of this.running.splice(0)) r.reject(err);
    await this.idle;
    this.stream.destroy();
  }

  private pump(): void {
    if (this.pumping || this.closed) return;
    this.pumping = true;
    this.idle = (async () => {
      try {
        for (;;) {
          if (this.closed) break;
          if (this.computes.length > 0) await this.runCompute(this.computes.shift()!);
          else if (this.prefills.length > 0 && (this.running.length === 0 || !this.lastWasPrefill)) await this.runPrefill(this.takeBatch());
          else if (this.running.length > 0) await this.runDecode();
          else break;
        }
      } finally {
        this.pumping = false;
      }
    })();
  }

  private takeBatch(): QueuedPrefill[] {
    const batch: QueuedPrefill[] = [];
    let tokens = 0;
    while (this.prefills.length > 0) {
      const next = this.prefills[0];
      if (batch.length > 0 && tokens + next.job.tokens > this.maxBatchedTokens) break;
      this.prefills.shift();
      next.job.signal?.removeEventListener('abort', next.onAbort);
      if (next.job.signal?.aborted) {
        next.reject(aborted('prefill'));
        continue;
      }
      batch.push(next);
      tokens += next.job.tokens;
    }
    return batch;
  }

  /** Records an event on the stream and waits for it (generous deadline: the device is a sleep). */
  private async fence(expectedUs: number): Promise<void> {
    const event: DeviceEvent = this.engine.device.createEvent();
    try {
      event.record(this.stream);
      await settle(event, Math.ceil(expectedUs / 1000) * 4 + 30_000);
    } finally {
      event.destroy();
    }
  }

  private async runCompute(c: QueuedCompute): Promise<void> {
    this.lastWasPrefill = false;
    try {
      this.stream.sleep(c.us);
      await this.fence(c.us);
      this.busyUs.encode += c.us;
      this.steps.encode++;
      c.resolve();
    } catch (err) {
      c.reject(err as Error);
    }
  }

  private async runPrefill(batch: QueuedPrefill[]): Promise<void> {
    this.lastWasPrefill = true;
    if (batch.length === 0) return;
    const jobs = batch.map((b) => b.job);
    const layers = this.profile.layers;
    const layerUs = Math.max(1, Math.round(jobs.reduce((s, j) => s + layerPrefillUs(this.profile, j.tokens), 0)));
    const hooks = this.options.hooks;
    const ready: Array<{ resolve(): void; reject(err: Error): void }> = [];
    try {
      hooks?.beginStep(jobs);
      for (let l = 0; l < layers; l++) {
        hooks?.layerReady(l, new Promise<void>((resolve, reject) => ready.push({ resolve, reject })));
      }
    } catch (err) {
      for (const r of ready) r.reject(err as Error);
      for (const b of batch) b.reject(err as Error);
      return;
    }
    const start = epochMs();
    const events: DeviceEvent[] = [];
    try {
      for (let l = 0; l < layers; l++) {
        this.stream.sleep(layerUs);
        for (const j of jobs) this.cache!.writeLayer(this.stream, j.requestId, l, j.blocks);
        const ev = this.engine.device.createEvent();
        ev.record(this.stream);
        events.push(ev);
      }
      for (let l = 0; l < layers; l++) {
        await settle(events[l], Math.ceil(layerUs / 1000) * (l + 1) * 4 + 30_000);
        for (const j of jobs) if (j.corruptLayer === l) this.cache!.corrupt(l, j.blocks[0]);
        ready[l]?.resolve();
      }
      this.busyUs.prefill += layerUs * layers;
      this.steps.prefill++;
      const timing: PrefillTiming = { start, end: epochMs(), batch: jobs.length };
      for (const b of batch) b.resolve(timing);
    } catch (err) {
      for (const r of ready) r.reject(err as Error);
      for (const b of batch) b.reject(err as Error);
    } finally {
      for (const ev of events) ev.destroy();
    }
  }

  private async runDecode(): Promise<void> {
    this.lastWasPrefill = false;
    // Sequences whose client went away leave the batch before the step.
    for (let i = this.running.length - 1; i >= 0; i--) {
      const r = this.running[i];
      if (r.seq.signal?.aborted) {
        this.running.splice(i, 1);
        r.reject(aborted('decode'));
      }
    }
    if (this.running.length === 0) return;
    const batch = [...this.running];
    const us = Math.max(1, Math.round(decodeStepUs(this.profile, batch.map((r) => r.seq.context + r.produced))));
    try {
      this.stream.sleep(us);
      await this.fence(us);
    } catch (err) {
      for (const r of batch) this.finish(r, err as Error);
      return;
    }
    this.busyUs.decode += us;
    this.steps.decode++;
    for (const r of batch) {
      if (!this.running.includes(r)) continue;
      if (r.seq.signal?.aborted) {
        this.finish(r, aborted('decode'));
        continue;
      }
      r.seq.onToken(r.produced++);
      if (r.produced >= r.seq.remaining) this.finish(r);
    }
  }

  private finish(r: RunningDecode, err?: Error): void {
    const i = this.running.indexOf(r);
    if (i >= 0) this.running.splice(i, 1);
    if (err) r.reject(err);
    else r.resolve();
  }
}
