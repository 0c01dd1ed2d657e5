/**
 * Progress of the demo's load on stderr: a bar redrawn in place on a terminal,
 * a plain line every tenth of the load otherwise (CI logs, pipes), nothing when
 * quiet. A few lines; a progress-bar dependency would buy nothing here.
 */
import type { WriteStream } from 'node:tty';

/** Shows how far the load is. */
export class Progress {
  private done = 0;
  private errors = 0;
  private readonly started = Date.now();
  private lastDraw = 0;
  private lastPlain = -1;
  private readonly tty: boolean;

  /**
   * @param total requests in the load.
   * @param out where to draw (stderr); undefined: say nothing.
   */
  constructor(
    private readonly total: number,
    private readonly out: NodeJS.WritableStream | undefined,
  ) {
    this.tty = Boolean((out as WriteStream | undefined)?.isTTY);
  }

  /** Counts one finished request. */
  tick(ok: boolean): void {
    this.done++;
    if (!ok) this.errors++;
    this.draw(this.done === this.total);
  }

  /** Ends the bar's line. */
  finish(): void {
    if (this.out && this.tty && this.lastDraw > 0) this.out.write('\n');
  }

  private draw(force: boolean): void {
    if (!this.out) return;
    const elapsed = ((Date.now() - this.started) / 1000).toFixed(1);
    const status = `${this.done}/${this.total} requests, ${this.errors} error${this.errors === 1 ? '' : 's'}, ${elapsed} s`;
    if (this.tty) {
      if (!force && Date.now() - this.lastDraw < 80) return;
      this.lastDraw = Date.now();
      const columns = (this.out as WriteStream).columns ?? 80;
      const width = Math.max(10, Math.min(40, columns - status.length - 10));
      const filled = Math.round((this.done / this.total) * width);
      this.out.write(`\r\x1b[2K[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${status}`);
      return;
    }
    const tenth = Math.floor((this.done * 10) / this.total);
    if (tenth === this.lastPlain) return;
    this.lastPlain = tenth;
    this.out.write(`progress: ${status}\n`);
  }
}
