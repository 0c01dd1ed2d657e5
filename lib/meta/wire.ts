/**
 * The control-plane wire format (documented in docs/WIRE.md).
 *
 * Every message is one frame: a 12-byte header then a UTF-8 JSON body.
 *
 *   offset 0  4 bytes  magic "EPDX"
 *   offset 4  u16 BE   wire version (WIRE_VERSION)
 *   offset 6  u16 BE   message type (MessageType)
 *   offset 8  u32 BE   body length in bytes (at most MAX_BODY)
 *
 * An ERROR frame may carry any version, so a peer that speaks another version can
 * still say so; every other frame must carry ours.
 */
import { TransferError } from '../errors.js';

export const MAGIC = 0x45504458; // "EPDX"
export const WIRE_VERSION = 2;
export const HEADER_BYTES = 12;
export const MAX_BODY = 1 << 20;

export enum MessageType {
  Hello = 1,
  Segment = 2,
  Error = 3,
  GetSegment = 4,
  /** Client -> server: { id, topic, body }. */
  Request = 5,
  /** Server -> client: { id, ok: true, body } or { id, ok: false, code, message }. */
  Response = 6,
  /** Server -> client, when it has a secret: { nonce, proof } (docs/WIRE.md, "Authentication"). */
  Challenge = 7,
  /** Client -> server: { proof }. */
  Auth = 8,
}

export interface Frame {
  version: number;
  type: number;
  body: unknown;
}

/** Encodes one frame. `version` is overridable only for tests of mismatch handling. */
export function encodeFrame(type: MessageType, body: unknown, version = WIRE_VERSION): Buffer {
  const json = Buffer.from(JSON.stringify(body ?? null), 'utf8');
  if (json.length > MAX_BODY) throw new TransferError(`control message of ${json.length} bytes is too large`, 'ERR_PROTOCOL');
  const header = Buffer.allocUnsafe(HEADER_BYTES);
  header.writeUInt32BE(MAGIC, 0);
  header.writeUInt16BE(version, 4);
  header.writeUInt16BE(type, 6);
  header.writeUInt32BE(json.length, 8);
  return Buffer.concat([header, json]);
}

/**
 * Incremental decoder: feed it socket chunks, get whole frames. A bad magic, an
 * oversized body or invalid JSON throws ERR_PROTOCOL (the caller closes the socket).
 */
export class FrameDecoder {
  private pending: Buffer[] = [];
  private pendingBytes = 0;

  push(chunk: Buffer): Frame[] {
    this.pending.push(chunk);
    this.pendingBytes += chunk.length;
    const frames: Frame[] = [];
    for (;;) {
      if (this.pendingBytes < HEADER_BYTES) break;
      const buf = this.pending.length === 1 ? this.pending[0] : Buffer.concat(this.pending);
      this.pending = [buf];
      if (buf.readUInt32BE(0) !== MAGIC) throw new TransferError('not an epd-transfer control stream (bad magic)', 'ERR_PROTOCOL');
      const length = buf.readUInt32BE(8);
      if (length > MAX_BODY) throw new TransferError(`control frame body of ${length} bytes exceeds ${MAX_BODY}`, 'ERR_PROTOCOL');
      if (buf.length < HEADER_BYTES + length) break;
      let body: unknown;
      try {
        body = JSON.parse(buf.subarray(HEADER_BYTES, HEADER_BYTES + length).toString('utf8'));
      } catch {
        throw new TransferError('control frame body is not valid JSON', 'ERR_PROTOCOL');
      }
      frames.push({ version: buf.readUInt16BE(4), type: buf.readUInt16BE(6), body });
      const rest = buf.subarray(HEADER_BYTES + length);
      this.pending = rest.length > 0 ? [rest] : [];
      this.pendingBytes = rest.length;
    }
    return frames;
  }
}

/** A segment descriptor: what a peer tells others about itself. */
export interface SegmentDescriptor {
  name: string;
  pid: number;
  /** Kernel boot id: equal on processes of the same host (shm is reachable). */
  bootId: string;
  hostname: string;
  transports: string[];
  regions: Array<{ id: number; length: number; kind: string; shm?: string; offset?: number; ipcKey?: string; addr?: string }>;
  /**
   * The tcp data listener, when the engine has one: its "host:port" addresses (a
   * wildcard host means "the host you reached my control port at") and the grant
   * this control connection was given (hex, 16 bytes).
   */
  tcp?: { addresses: string[]; grant: string };
  /** The engine's Mooncake segment ("ip:port"), when it opened with mooncake; regions then carry `addr`. */
  mooncake?: { segment: string };
}
