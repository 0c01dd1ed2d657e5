/**
 * Link emulation options: pace the real transfers of any transport to an emulated
 * link (bandwidth, latency, jitter; deterministic for a seed) and inject faults.
 * See docs/TCP.md for the model.
 *
 * ```ts
 * const engine = await TransferEngine.open({ link: { bandwidth: '25GB/s', latency: '5us', jitter: '1us', seed: 7 } });
 * const peer = await engine.connect(address, { link: { bandwidth: '4GB/s' } }); // overrides per peer
 * ```
 */
import { native } from './native.js';
import { badArgument, expectInteger, expectObject, parseBytes } from './validate.js';

/** An emulated link between this engine and a peer. */
export interface LinkOptions {
  /**
   * Bandwidth: `'25GB/s'`, `'4GiB/s'`, `'100Gbit/s'`, `'200Gbps'` (B = bytes, b/bit = bits,
   * k/M/G/T decimal, Ki/Mi/Gi/Ti binary), or a number of bytes per second. Default: unpaced.
   */
  bandwidth?: string | number;
  /** One-way latency per message: `'5us'`, `'1.5ms'`, `'200ns'`, or a number of microseconds. Default 0. */
  latency?: string | number;
  /** Each message's latency varies uniformly by ± this much (same units as `latency`). Default 0. */
  jitter?: string | number;
  /** Seed of the jitter sequence: the same seed gives the same schedule. Default 1. */
  seed?: number;
  /** Fault injection for reliability tests. */
  faults?: LinkFaults;
}

/** Faults the link injects. */
export interface LinkFaults {
  /** After this many bytes have been delivered, the peer's connection drops: batches fail with ERR_PEER_LOST. */
  dropAfterBytes?: number | string;
  /** Holds one descriptor back: `index` counts descriptors over the link's life (0 = the first one sent). */
  delayDescriptor?: { index: number; delayMs: number };
}

/** What the addon takes (numbers in fixed units). @internal */
export interface NativeLinkSpec {
  bandwidth: number;
  latencyUs: number;
  jitterUs: number;
  seed: number;
  dropAfterBytes?: number;
  delayIndex?: number;
  delayMs?: number;
}

const PREFIX: Record<string, number> = { '': 1, k: 1e3, m: 1e6, g: 1e9, t: 1e12, ki: 2 ** 10, mi: 2 ** 20, gi: 2 ** 30, ti: 2 ** 40 };

/** Parses a bandwidth ('25GB/s', '100Gbit/s', '200Gbps', bytes/s as a number) into bytes per second. */
export function parseBandwidth(value: unknown, name: string): number {
  if (typeof value === 'number' && Number.isFinite(value) && value > 0) return value;
  if (typeof value === 'string') {
    const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?(B|b|bit)(?:\/s|ps)\s*$/i.exec(value);
    if (m && (m[3] === 'B' || m[3] === 'b' || m[3].toLowerCase() === 'bit')) {
      const bytes = Number(m[1]) * PREFIX[(m[2] ?? '').toLowerCase()] * (m[3] === 'B' ? 1 : 1 / 8);
      if (bytes > 0 && Number.isFinite(bytes)) return bytes;
    }
  }
  return badArgument(name, "a bandwidth such as '25GB/s', '100Gbit/s' or bytes per second", value);
}

const TIME: Record<string, number> = { ns: 1e-3, us: 1, 'µs': 1, ms: 1e3, s: 1e6 };

/** Parses a duration ('5us', '1.5ms', '200ns', '1s', or microseconds as a number) into microseconds. */
export function parseMicros(value: unknown, name: string): number {
  if (typeof value === 'number' && Number.isFinite(value) && value >= 0) return value;
  if (typeof value === 'string') {
    const m = /^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s)\s*$/.exec(value);
    if (m) return Number(m[1]) * TIME[m[2]];
  }
  return badArgument(name, "a duration such as '5us', '1.5ms' or microseconds", value);
}

/** Validates {@link LinkOptions} into the addon's form. @internal */
export function resolveLink(value: unknown, name: string): NativeLinkSpec | undefined {
  if (value === undefined) return undefined;
  const o = expectObject(value, name) as LinkOptions;
  const spec: NativeLinkSpec = {
    bandwidth: o.bandwidth === undefined ? 0 : parseBandwidth(o.bandwidth, `${name}.bandwidth`),
    latencyUs: o.latency === undefined ? 0 : parseMicros(o.latency, `${name}.latency`),
    jitterUs: o.jitter === undefined ? 0 : parseMicros(o.jitter, `${name}.jitter`),
    seed: o.seed === undefined ? 1 : expectInteger(o.seed, `${name}.seed`),
  };
  if (o.faults !== undefined) {
    const f = expectObject(o.faults, `${name}.faults`) as LinkFaults;
    if (f.dropAfterBytes !== undefined) {
      spec.dropAfterBytes =
        typeof f.dropAfterBytes === 'number'
          ? expectInteger(f.dropAfterBytes, `${name}.faults.dropAfterBytes`)
          : parseBytes(f.dropAfterBytes, `${name}.faults.dropAfterBytes`);
    }
    if (f.delayDescriptor !== undefined) {
      const d = expectObject(f.delayDescriptor, `${name}.faults.delayDescriptor`);
      spec.delayIndex = expectInteger(d.index, `${name}.faults.delayDescriptor.index`);
      const ms = d.delayMs;
      if (typeof ms !== 'number' || !Number.isFinite(ms) || ms < 0) badArgument(`${name}.faults.delayDescriptor.delayMs`, 'milliseconds >= 0', ms);
      spec.delayMs = ms;
    }
  }
  return spec;
}

/**
 * The emulator's schedule for `sizes` (bytes of each message, all offered at time 0):
 * the arrival of each message in microseconds. Same options, same result.
 */
export function linkSchedule(link: LinkOptions, sizes: number[]): number[] {
  const spec = resolveLink(link, 'link')!;
  if (!Array.isArray(sizes)) badArgument('sizes', 'an array of byte counts', sizes);
  sizes.forEach((s, i) => expectInteger(s, `sizes[${i}]`));
  return Array.from(native.linkSchedule(spec, sizes));
}
