/**
 * The block allocator of a simulated paged KV cache: a fixed set of block ids,
 * handed out first come, first served. A request that does not fit waits in line
 * (like a request a serving engine cannot schedule yet) until blocks are released,
 * its deadline passes (ERR_TIMEOUT) or its signal aborts (ERR_ABORTED).
 */
import { TransferError } from '../errors.js';
import { expectInteger } from '../validate.js';

interface Waiter {
  count: number;
  resolve(ids: number[]): void;
  reject(err: Error): void;
  cleanup(): void;
}

/** Options of {@link BlockPool.allocate}. */
export interface AllocateOptions {
  /** Longest wait in line, ms. */
  timeoutMs: number;
  signal?: AbortSignal;
}

/** Fixed-size pool of KV block ids. */
export class BlockPool {
  private readonly freeIds: number[];
  private readonly line: Waiter[] = [];

  /** @param total number of blocks (ids 0 … total − 1). */
  constructor(readonly total: number) {
    expectInteger(total, 'total', 1);
    // Popped from the end: low ids first.
    this.freeIds = Array.from({ length: total }, (_, i) => total - 1 - i);
  }

  /** Blocks free now. */
  get free(): number {
    return this.freeIds.length;
  }

  /** Requests waiting for blocks. */
  get waiting(): number {
    return this.line.length;
  }

  /**
   * `count` distinct block ids. Requests are served in arrival order: a large one at
   * the head is not overtaken by smaller ones. ERR_CAPACITY when `count` exceeds the
   * whole pool (it could never be served).
   */
  allocate(count: number, options: AllocateOptions): Promise<number[]> {
    expectInteger(count, 'count', 1);
    if (count > this.total) {
      return Promise.reject(new TransferError(`${count} KV blocks requested but the cache has only ${this.total}`, 'ERR_CAPACITY'));
    }
    if (options.signal?.aborted) return Promise.reject(new TransferError('block allocation aborted', 'ERR_ABORTED'));
    if (this.line.length === 0 && this.freeIds.length >= count) return Promise.resolve(this.take(count));
    return new Promise<number[]>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.drop(waiter);
        reject(new TransferError(`no ${count} free KV blocks within ${options.timeoutMs} ms`, 'ERR_TIMEOUT'));
      }, options.timeoutMs);
      const onAbort = () => {
        this.drop(waiter);
        reject(new TransferError('block allocation aborted', 'ERR_ABORTED'));
      };
      const waiter: Waiter = {
        count,
        resolve,
        reject,
        cleanup: () => {
          clearTimeout(timer);
          options.signal?.removeEventListener('abort', onAbort);
        },
      };
      options.signal?.addEventListener('abort', onAbort, { once: true });
      this.line.push(waiter);
    });
  }

  /** Returns blocks to the pool and serves the line. */
  release(ids: readonly number[]): void {
    for (const id of ids) this.freeIds.push(id);
    while (this.line.length > 0 && this.freeIds.length >= this.line[0].count) {
      const w = this.line.shift()!;
      w.cleanup();
      w.resolve(this.take(w.count));
    }
  }

  /** Fails every waiter (ERR_CLOSED). */
  close(): void {
    for (const w of this.line.splice(0)) {
      w.cleanup();
      w.reject(new TransferError('the KV cache is closing', 'ERR_CLOSED'));
    }
  }

  private take(count: number): number[] {
    return this.freeIds.splice(this.freeIds.length - count, count).reverse();
  }

  private drop(w: Waiter): void {
    w.cleanup();
    const i = this.line.indexOf(w);
    if (i >= 0) this.line.splice(i, 1);
    // The head may have been the one holding others back.
    this.release([]);
  }
}
