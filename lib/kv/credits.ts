/**
 * Byte credits granted by a receiver: a sender spends them when it submits a
 * batch and gets them back when the receiver acknowledges it, so the bytes written
 * but not yet acknowledged never exceed the receiver's window.
 */
import { TransferError } from '../errors.js';

/** Byte credits of one sender towards one receiver (see the module comment). */
export class CreditGate {
  private available: number;
  private readonly waiters: Array<{ bytes: number; resolve(): void; reject(err: Error): void }> = [];
  private broken: TransferError | null = null;
  /** Highest `inFlight` seen. */
  peak = 0;
  /** Acquisitions that had to wait. */
  waits = 0;

  constructor(readonly window: number) {
    this.available = window;
  }

  /** Bytes spent and not yet returned. */
  get inFlight(): number {
    return this.window - this.available;
  }

  /** Resolves once `bytes` (≤ window) are available, first come first served; rejects if the gate breaks. */
  acquire(bytes: number): Promise<void> {
    if (this.broken) return Promise.reject(this.broken);
    if (bytes > this.window) return Promise.reject(new TransferError(`a batch of ${bytes} bytes exceeds the credit window of ${this.window}`, 'ERR_OUT_OF_RANGE'));
    if (this.waiters.length === 0 && bytes <= this.available) {
      this.take(bytes);
      return Promise.resolve();
    }
    this.waits++;
    return new Promise((resolve, reject) => this.waiters.push({ bytes, resolve, reject }));
  }

  /** Returns `bytes` of credit (capped at the window) and wakes waiters in order. */
  release(bytes: number): void {
    this.available = Math.min(this.window, this.available + Math.max(0, bytes));
    while (this.waiters.length > 0 && this.waiters[0].bytes <= this.available) {
      const w = this.waiters.shift()!;
      this.take(w.bytes);
      w.resolve();
    }
  }

  /** Fails every waiter and every later acquire with `err`. */
  break(err: TransferError): void {
    this.broken ??= err;
    for (const w of this.waiters.splice(0)) w.reject(err);
  }

  private take(bytes: number): void {
    this.available -= bytes;
    this.peak = Math.max(this.peak, this.inFlight);
  }
}
