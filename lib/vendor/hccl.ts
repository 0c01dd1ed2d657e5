/**
 * The control-plane half of the `hccl` transport (the data half is
 * native/transport_hccl.cc). HCCL point-to-point is two-sided: every HcclSend must
 * meet an HcclRecv of the same size on the other rank, in the same order, or both
 * streams stall. So each batch is agreed first:
 *
 *   connector (rank 0)                         acceptor (rank 1)
 *   connect: HcclGetRootInfo ──── epd.hccl.join {session, rootInfo} ───▶ join as rank 1
 *            join as rank 0   ◀──────────────── joined ───────────────── (both block in
 *                                                                         HcclCommInitRootInfo)
 *   write:   validate + pin, hold ── epd.hccl.post {op: recv, items} ──▶ validate + pin,
 *            release (HcclSend)  ◀──────────────── posted ────────────── post HcclRecv
 *            ───────────────────────── epd.hccl.wait {id} ─────────────▶ (its receive done)
 *            resolve when both   ◀──────────────── landed ─────────────
 *
 * A write resolves only once the receiver's HcclRecv completed: a send completing
 * on our stream does not mean the bytes are in the receiver's buffer.
 *
 * A batch the acceptor refuses (bad region, wrong memory kind) is dropped on both
 * sides before anything is posted. A batch stopped after posting (deadline, abort)
 * closes the link: HCCL cannot cancel posted operations.
 */
import { randomUUID } from 'node:crypto';
import { TransferError } from '../errors.js';
import type { ControlSession, RequestContext } from '../meta/handshake.js';
import type { SegmentDescriptor } from '../meta/wire.js';
import type { NativeEngine } from '../native.js';

export const HCCL_JOIN = 'epd.hccl.join';
export const HCCL_POST = 'epd.hccl.post';
export const HCCL_CLOSE = 'epd.hccl.close';
export const HCCL_WAIT = 'epd.hccl.wait';

/** HCCL_ROOT_INFO_BYTES */
const ROOT_INFO_BYTES = 4108;
/** On the acceptor, the connector's side of every descriptor is this pseudo region: HCCL matches by order, not address. */
const STREAM_REGION = 0;
const STRIDE = 5;

function badRequest(message: string): never {
  throw new TransferError(message, 'ERR_BAD_ARGUMENT');
}

interface Session {
  peerId: number;
  control?: ControlSession;
  deadlines: Set<NodeJS.Timeout>;
  /** Receives posted for the connector's writes, until it waits for them. */
  receives: Map<number, Promise<number>>;
}

/** The acceptor side: answers join, post and close requests of connectors. */
export class HcclResponder {
  private readonly sessions = new Map<string, Session>();

  constructor(private readonly native: NativeEngine) {}

  /** Topic handlers to install on the engine. */
  handlers(): Array<[string, (body: unknown, ctx: RequestContext) => unknown]> {
    return [
      [HCCL_JOIN, (body, ctx) => this.join(body, ctx)],
      [HCCL_POST, (body) => this.post(body)],
      [HCCL_CLOSE, (body) => this.close(body)],
      [HCCL_WAIT, (body) => this.wait(body)],
    ];
  }

  private async join(raw: unknown, ctx: RequestContext): Promise<unknown> {
    const body = (raw ?? {}) as { session?: unknown; rootInfo?: unknown };
    if (typeof body.session !== 'string' || body.session.length === 0) badRequest('hccl join: missing session');
    if (typeof body.rootInfo !== 'string') badRequest('hccl join: missing rootInfo');
    const root = Buffer.from(body.rootInfo, 'base64');
    if (root.length !== ROOT_INFO_BYTES) badRequest(`hccl join: root info of ${root.length} bytes (expected ${ROOT_INFO_BYTES})`);
    if (this.sessions.has(body.session)) badRequest('hccl join: session already joined');
    const link = await this.native.hcclJoin(root, 1);
    let peerId: number;
    try {
      peerId = this.native.addPeer(`${ctx.peer} (hccl)`, 0, [{ id: STREAM_REGION, length: Number.MAX_SAFE_INTEGER, kind: 'stream' }], {
        transport: 'hccl',
        hccl: { link, initiator: false },
      });
    } catch (err) {
      this.native.hcclDiscard(link);
      throw err;
    }
    this.sessions.set(body.session, { peerId, control: ctx.session, deadlines: new Set(), receives: new Map() });
    return { joined: true };
  }

  private post(raw: unknown): unknown {
    const body = (raw ?? {}) as { session?: unknown; op?: unknown; items?: unknown; deadlineMs?: unknown };
    const s = typeof body.session === 'string' ? this.sessions.get(body.session) : undefined;
    if (!s) throw new TransferError('hccl post: unknown session (connect again)', 'ERR_PEER_LOST');
    if (body.op !== 'send' && body.op !== 'recv') badRequest('hccl post: op must be "send" or "recv"');
    const items = body.items;
    if (!Array.isArray(items) || items.length === 0 || items.length % 3 !== 0) badRequest('hccl post: items must be (region, offset, length) triples');
    const deadlineMs = typeof body.deadlineMs === 'number' && body.deadlineMs > 0 ? Math.min(body.deadlineMs, 2 ** 31 - 1) : 30_000;
    const count = items.length / 3;
    const data = new Float64Array(count * STRIDE);
    for (let i = 0; i < count; i++) {
      const [region, offset, length] = [items[3 * i], items[3 * i + 1], items[3 * i + 2]];
      if (![region, offset, length].every((x) => typeof x === 'number')) badRequest(`hccl post: item ${i} is not numeric`);
      data.set([region, offset, STREAM_REGION, 0, length], i * STRIDE);
    }
    // Validated, pinned and posted at once; refusal throws back to the connector
    // before either side posted anything.
    const [batchId, done] = this.native.submit(body.op === 'recv' ? 1 : 0, s.peerId, data, count);
    const timer = setTimeout(() => this.native.abort(batchId, 'ERR_TIMEOUT'), deadlineMs);
    s.deadlines.add(timer);
    done.catch(() => {}).finally(() => {
      clearTimeout(timer);
      s.deadlines.delete(timer);
    });
    // A receive's completion is what tells the writer its bytes landed (HCCL_WAIT);
    // for a send, the connector's own receive tells it.
    if (body.op === 'recv') s.receives.set(batchId, done);
    return { posted: true, id: batchId };
  }

  private async wait(raw: unknown): Promise<unknown> {
    const body = (raw ?? {}) as { session?: unknown; id?: unknown };
    const s = typeof body.session === 'string' ? this.sessions.get(body.session) : undefined;
    if (!s) throw new TransferError('hccl wait: unknown session (connect again)', 'ERR_PEER_LOST');
    const done = typeof body.id === 'number' ? s.receives.get(body.id) : undefined;
    if (!done) badRequest('hccl wait: no such receive');
    try {
      return { bytes: await done };
    } finally {
      s.receives.delete(body.id as number);
    }
  }

  private close(raw: unknown): unknown {
    const body = (raw ?? {}) as { session?: unknown };
    if (typeof body.session === 'string') this.drop(body.session);
    return { closed: true };
  }

  /** The control connection closed: its sessions go too. */
  endSession(control: ControlSession): void {
    for (const [id, s] of this.sessions) if (s.control === control) this.drop(id);
  }

  private drop(id: string): void {
    const s = this.sessions.get(id);
    if (!s) return;
    this.sessions.delete(id);
    for (const t of s.deadlines) clearTimeout(t);
    try {
      this.native.dropPeer(s.peerId, 'ERR_PEER_LOST', true);
    } catch {
      // the engine is closing
    }
  }
}

/** The connector side of connect(): joins a two-rank communicator with the peer. */
export async function hcclConnect(
  native: NativeEngine,
  request: (topic: string, body: unknown, timeoutMs: number) => Promise<unknown>,
  segment: SegmentDescriptor,
  pid: number,
  timeoutMs: number,
): Promise<{ peerId: number; session: string }> {
  if (!segment.transports.includes('hccl')) {
    throw new TransferError(`peer '${segment.name}' did not open with hccl`, 'ERR_BACKEND_UNAVAILABLE');
  }
  const root = native.hcclRootInfo();
  const session = randomUUID();
  // Both ranks block in HcclCommInitRootInfo until the other arrives.
  const joining = native.hcclJoin(root, 0);
  let link: number;
  try {
    [link] = await Promise.all([joining, request(HCCL_JOIN, { session, rootInfo: root.toString('base64') }, timeoutMs)]);
  } catch (err) {
    joining.then((l) => native.hcclDiscard(l), () => {});
    throw err;
  }
  try {
    const peerId = native.addPeer(segment.name, pid, segment.regions, { transport: 'hccl', hccl: { link, initiator: true } });
    return { peerId, session };
  } catch (err) {
    native.hcclDiscard(link);
    request(HCCL_CLOSE, { session }, timeoutMs).catch(() => {});
    throw err;
  }
}

/**
 * Asks the acceptor to post its half of a held batch (the mirror operation on the
 * same descriptors, as (region, offset, length) triples of its side). Resolves with
 * the id of the acceptor's half once it is posted; the caller then releases the held
 * batch. Rejects with the acceptor's refusal, ERR_TIMEOUT or ERR_PEER_LOST.
 */
export async function hcclAgree(
  request: (topic: string, body: unknown, timeoutMs: number) => Promise<unknown>,
  session: string,
  op: 0 | 1,
  data: Float64Array,
  count: number,
  timeoutMs: number,
): Promise<number> {
  const items: number[] = [];
  for (let i = 0; i < count; i++) items.push(data[i * STRIDE + 2], data[i * STRIDE + 3], data[i * STRIDE + 4]);
  // Our write is its receive, our read its send.
  const reply = (await request(HCCL_POST, { session, op: op === 0 ? 'recv' : 'send', items, deadlineMs: timeoutMs }, timeoutMs)) as { id?: unknown };
  if (typeof reply?.id !== 'number') throw new TransferError('hccl post: malformed answer', 'ERR_PROTOCOL');
  return reply.id;
}

/** A write's second half: resolves once the acceptor's receive of post `id` completed. */
export async function hcclLanded(
  request: (topic: string, body: unknown, timeoutMs: number) => Promise<unknown>,
  session: string,
  id: number,
  timeoutMs: number,
): Promise<void> {
  await request(HCCL_WAIT, { session, id }, timeoutMs);
}
