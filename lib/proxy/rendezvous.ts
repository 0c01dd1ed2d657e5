/**
 * The decode-first rendezvous behind POST /v1/metaserver. When the proxy sends a
 * request to D it registers the hop here; D allocates its KV blocks and calls the
 * metaserver with its block ids and address; the proxy then runs the prefill on a
 * P instance with those parameters and answers D with the outcome.
 *
 * Unlike the original, every wait has a deadline (D must call within
 * `timeoutMs`, or the hop fails with 504), a call for an unknown, finished or
 * cancelled hop gets 404, a second call for the same hop 409, and D always learns
 * whether the prefill failed (a non-2xx answer) instead of waiting forever.
 */
import { ProxyError } from './errors.js';

/** The outcome D gets back from its metaserver call. */
export interface PrefillResult {
  /** Base URL of the P instance that ran the prefill. */
  prefill: string;
}

/** Runs the prefill for D's parameters. Rejects with a ProxyError. */
export type PrefillRunner = (decodeParams: Record<string, unknown>) => Promise<PrefillResult>;

interface Waiting {
  called: boolean;
  run: PrefillRunner;
  timer: NodeJS.Timeout;
}

/** vLLM ids look like `chatcmpl-<id>` or `cmpl-<id>-<prompt index>`; the proxy's hop id is `<id>`. */
function candidateIds(requestId: string): string[] {
  const bare = requestId.replace(/^(?:chatcmpl|cmpl)-/, '');
  return [requestId, bare, bare.replace(/-\d+$/, '')];
}

/** Decode hops waiting for D's metaserver call, by hop id. */
export class Rendezvous {
  private readonly waiting = new Map<string, Waiting>();

  /**
   * Registers a decode hop. `onTimeout` fires if D has not called within
   * `timeoutMs`. Returns `close()`, which must be called when the hop ends (any path).
   */
  open(hopId: string, timeoutMs: number, onTimeout: (err: ProxyError) => void, run: PrefillRunner): () => void {
    const timer = setTimeout(() => {
      this.waiting.delete(hopId);
      onTimeout(
        new ProxyError(`the decode instance did not call /v1/metaserver within ${timeoutMs} ms`, 'ERR_TIMEOUT', { status: 504 }),
      );
    }, timeoutMs);
    this.waiting.set(hopId, { called: false, run, timer });
    return () => {
      const w = this.waiting.get(hopId);
      if (!w) return;
      clearTimeout(w.timer);
      this.waiting.delete(hopId);
    };
  }

  /** D's call: runs the prefill once and resolves with its outcome. */
  async arrive(requestId: string, decodeParams: Record<string, unknown>): Promise<PrefillResult> {
    for (const id of candidateIds(requestId)) {
      const w = this.waiting.get(id);
      if (!w) continue;
      if (w.called) throw new ProxyError(`request ${requestId} already called /v1/metaserver`, 'ERR_BAD_ARGUMENT', { status: 409, type: 'conflict_error' });
      w.called = true;
      clearTimeout(w.timer);
      return w.run(decodeParams);
    }
    throw new ProxyError(`no request ${requestId} is waiting for its prefill (unknown, finished, cancelled or past its deadline)`, 'ERR_BAD_ARGUMENT', {
      status: 404,
    });
  }

  /** Hops waiting for, or in the middle of, their metaserver call. */
  get size(): number {
    return this.waiting.size;
  }
}
