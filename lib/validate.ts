/**
 * Argument checks with uniform messages: "Expected <what> for <name> but received <value>".
 * They throw `TransferError('ERR_BAD_ARGUMENT')` before anything is started.
 */
import { TransferError } from './errors.js';

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (typeof value === 'string') return `string ${JSON.stringify(value.length > 40 ? value.slice(0, 40) + '…' : value)}`;
  if (typeof value === 'number' || typeof value === 'bigint' || typeof value === 'boolean') {
    return `${typeof value} ${String(value)}`;
  }
  if (typeof value === 'function') return 'a function';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'object') return `an instance of ${value.constructor?.name ?? 'Object'}`;
  return String(value);
}

/** Throws ERR_BAD_ARGUMENT. */
export function badArgument(name: string, expected: string, value: unknown): never {
  throw new TransferError(`Expected ${expected} for ${name} but received ${describe(value)}`, 'ERR_BAD_ARGUMENT');
}

/** A safe integer in [min, max]. */
export function expectInteger(value: unknown, name: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min || value > max) {
    const range = max === Number.MAX_SAFE_INTEGER ? `an integer >= ${min}` : `an integer in [${min}, ${max}]`;
    badArgument(name, range, value);
  }
  return value;
}

/** A positive finite number of milliseconds. */
export function expectTimeout(value: unknown, name: string): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0 || value > 2 ** 31 - 1) {
    badArgument(name, 'a timeout in milliseconds (0 < ms < 2^31)', value);
  }
  return value;
}

export function expectString(value: unknown, name: string): string {
  if (typeof value !== 'string' || value.length === 0) badArgument(name, 'a non-empty string', value);
  return value;
}

export function expectObject(value: unknown, name: string): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) badArgument(name, 'an object', value);
  return value as Record<string, unknown>;
}

export function expectOptionalObject(value: unknown, name: string): Record<string, unknown> {
  return value === undefined ? {} : expectObject(value, name);
}

/** Parses sizes like 4096, "4KiB", "1MiB", "2GB". Binary (KiB) and decimal (KB) units. */
export function parseBytes(value: unknown, name: string): number {
  if (typeof value === 'number') return expectInteger(value, name, 1);
  if (typeof value === 'string') {
    const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$/i.exec(value);
    if (m) {
      const n = Number(m[1]);
      const unit = (m[2] ?? 'b').toLowerCase();
      const pow = { b: 0, k: 1, m: 2, g: 3, t: 4 }[unit[0] as 'b' | 'k' | 'm' | 'g' | 't'];
      const base = unit.includes('i') || unit.length === 1 ? 1024 : 1000;
      const bytes = Math.round(n * base ** pow);
      if (Number.isSafeInteger(bytes) && bytes > 0) return bytes;
    }
  }
  return badArgument(name, 'a byte size (e.g. 4096, "64KiB", "1MiB")', value);
}

/** Formats bytes for humans: 1.5 MiB. */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${Number.isInteger(v) ? v : v.toFixed(1)} ${units[i]}`;
}
