/**
 * Health of upstream instances. Active checks: every `intervalMs` each instance's
 * health path is fetched with a deadline; `unhealthyAfter` failures in a row take a
 * healthy instance out of routing, `healthyAfter` successes put it back. Passive
 * checks: a refused connection during a real request takes the instance out at
 * once; a reset counts as one failed check. A newly added instance is routable
 * after its first successful check.
 */
import type { ProxyError } from './errors.js';
import type { Instance, InstancePool, InstanceState } from './instances.js';
import type { Upstream } from './upstream.js';

/** Health-check settings (`ProxyOptions.health`). */
export interface HealthOptions {
  /** Time between two rounds of checks (ms). */
  intervalMs: number;
  /** Deadline of one check (ms). */
  timeoutMs: number;
  /** Path fetched with GET; any 2xx is healthy (vLLM serves /health). */
  path: string;
  /** Failed checks in a row that take a healthy instance out. */
  unhealthyAfter: number;
  /** Successful checks in a row that bring an unhealthy instance back. */
  healthyAfter: number;
}

/** Called when an instance moves between states. */
export type HealthChange = (instance: Instance, from: InstanceState, to: InstanceState, reason: string) => void;

/** Runs the active checks and takes in passive evidence; owns instances' healthy/unhealthy state. */
export class HealthMonitor {
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private readonly inFlight = new Map<Instance, Promise<void>>();
  private readonly stop_ = new AbortController();

  constructor(
    private readonly pools: Map<string, InstancePool>,
    private readonly upstream: Upstream,
    private readonly options: HealthOptions,
    private readonly onChange: HealthChange,
  ) {}

  /** Starts periodic checks (the first round runs now). Resolves after the first round. */
  async start(): Promise<void> {
    await this.round();
    this.schedule();
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.stop_.abort(new Error('health monitor stopped'));
  }

  /** Checks one instance now (joins a check already running). */
  check(instance: Instance): Promise<void> {
    let p = this.inFlight.get(instance);
    if (!p) {
      p = this.probe(instance).finally(() => this.inFlight.delete(instance));
      this.inFlight.set(instance, p);
    }
    return p;
  }

  /** Feeds what a real request learned about an instance. */
  observe(instance: Instance, err: ProxyError): void {
    if (err.instance !== instance.url || !err.healthEvidence || this.stopped) return;
    instance.lastError = err.message;
    if (err.healthEvidence === 'down') this.mark(instance, false, err.message);
    else this.failed(instance, err.message);
  }

  /** A real request to the instance succeeded. */
  succeeded(instance: Instance): void {
    instance.consecutiveFailures = 0;
  }

  private schedule(): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => {
      void this.round().finally(() => this.schedule());
    }, this.options.intervalMs);
    this.timer.unref();
  }

  private async round(): Promise<void> {
    const all: Promise<void>[] = [];
    for (const pool of this.pools.values()) for (const i of pool.list()) if (i.state !== 'draining') all.push(this.check(i));
    await Promise.all(all);
  }

  private async probe(instance: Instance): Promise<void> {
    let ok = false;
    let reason = '';
    try {
      const res = await this.upstream.get(instance, this.options.path, { timeoutMs: this.options.timeoutMs, signal: this.stop_.signal });
      ok = res.status >= 200 && res.status < 300;
      if (!ok) reason = `GET ${this.options.path} answered ${res.status}`;
    } catch (err) {
      reason = (err as Error).message;
    }
    if (this.stopped) return;
    if (ok) {
      instance.consecutiveFailures = 0;
      instance.consecutiveSuccesses++;
      if (instance.state === 'probing' || instance.consecutiveSuccesses >= this.options.healthyAfter) this.mark(instance, true, 'health check passed');
    } else {
      instance.lastError = reason;
      if (instance.state === 'probing') this.mark(instance, false, reason);
      else this.failed(instance, reason);
    }
  }

  private failed(instance: Instance, reason: string): void {
    instance.consecutiveSuccesses = 0;
    instance.consecutiveFailures++;
    if (instance.consecutiveFailures >= this.options.unhealthyAfter) this.mark(instance, false, reason);
  }

  private mark(instance: Instance, healthy: boolean, reason: string): void {
    const from = instance.state;
    if (!healthy) instance.consecutiveSuccesses = 0;
    if (this.pools.get(instance.role)?.setHealthy(instance, healthy)) this.onChange(instance, from, instance.state, reason);
  }
}
