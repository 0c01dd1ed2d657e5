/**
 * The embedded handshake: every engine listens on a small control port; a peer
 * connects, says HELLO, and gets the engine's segment descriptor. The connection
 * stays open: its close is how an engine learns that a peer went away, and the
 * same connection serves refreshes (GET_SEGMENT).
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import net from 'node:net';
import { TransferError, type ErrorCode } from '../errors.js';
import { encodeFrame, FrameDecoder, MAX_BODY, MessageType, WIRE_VERSION, type Frame, type SegmentDescriptor } from './wire.js';

/** Who sent a control request. */
export interface RequestContext {
  /** The peer's engine name, from its HELLO. */
  peer: string;
  /** The control connection the request came on (per-connection state hangs on it). */
  session?: ControlSession;
}

/** One accepted, authenticated control connection; the engine hangs per-peer state (a tcp grant) on it. */
export interface ControlSession {
  /**
   * Unique per accepted connection (random): a peer that reconnects, or a restarted
   * process that reuses the name, comes back under another id.
   */
  readonly id: string;
  /** The peer's engine name, from its HELLO. */
  peer: string;
  /** Where the connection came from, "host:port". */
  readonly address: string;
  /** The tcp grant the engine gave this connection (hex), if any. */
  grant?: string;
}

const CLIENT_LABEL = 'epd-transfer control client v2';
const SERVER_LABEL = 'epd-transfer control server v2';
/** How long an accepted connection may take to say HELLO and authenticate. */
const HANDSHAKE_MS = 10_000;
/** Idle time before TCP keep-alive probes start (both ends), so a peer whose host vanished is noticed. */
const KEEPALIVE_MS = 1_000;

function remoteAddress(socket: net.Socket): string {
  const host = socket.remoteAddress ?? 'unknown';
  return `${host.includes(':') ? `[${host}]` : host}:${socket.remotePort ?? 0}`;
}

/** HMAC-SHA256 proof over a label and two nonces (docs/WIRE.md, "Authentication"). */
export function controlProof(secret: Buffer, side: 'client' | 'server', first: Buffer, second: Buffer): Buffer {
  return createHmac('sha256', secret)
    .update(side === 'client' ? CLIENT_LABEL : SERVER_LABEL)
    .update(first)
    .update(second)
    .digest();
}

/** The key a tcp grant's data connections prove: HMAC-SHA256(secret, label || grant). */
export function dataKey(secret: Buffer | undefined, grant: Buffer): Buffer {
  return createHmac('sha256', secret ?? Buffer.alloc(0)).update('epd-transfer data key v2').update(grant).digest();
}

function decodeNonce(value: unknown): Buffer | null {
  if (typeof value !== 'string') return null;
  const b = Buffer.from(value, 'base64');
  return b.length === 32 ? b : null;
}

function sameBytes(a: Buffer, b: Buffer | null): boolean {
  return b !== null && a.length === b.length && timingSafeEqual(a, b);
}

/** Answers one control-request topic. Throwing a TransferError sends its code back. */
export type RequestHandler = (body: unknown, context: RequestContext) => unknown | Promise<unknown>;

export interface ControlServerOptions {
  host: string;
  port: number;
  /** Builds the current descriptor for one connection at request time. */
  describe(session: ControlSession): SegmentDescriptor;
  /** Handlers of control requests by topic. */
  handlers?: Map<string, RequestHandler>;
  /** Shared secret: peers must prove it (HMAC challenge-response) before they learn anything. */
  secret?: Buffer;
  /**
   * A connection that was served a descriptor has closed; `cause` is the socket
   * error that broke it (ECONNRESET, a keep-alive timeout), if any.
   */
  onSessionEnd?(session: ControlSession, cause: Error | undefined): void;
}

/** Serves this engine's segment descriptor on host:port. */
export class ControlServer {
  private readonly server: net.Server;
  private readonly sockets = new Set<net.Socket>();
  private boundAddress: net.AddressInfo | null = null;

  private constructor(server: net.Server, private readonly options: ControlServerOptions) {
    this.server = server;
  }

  static async listen(options: ControlServerOptions): Promise<ControlServer> {
    const server = net.createServer();
    const cs = new ControlServer(server, options);
    server.on('connection', (socket) => cs.accept(socket));
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err: NodeJS.ErrnoException) =>
        reject(new TransferError(`cannot listen on ${options.host}:${options.port}: ${err.message}`, 'ERR_SYSTEM', { cause: err })),
      );
      server.listen(options.port, options.host, () => resolve());
    });
    server.unref();
    cs.bound();
    return cs;
  }

  /** "host:port" peers connect to. */
  get address(): string {
    const a = this.bound();
    const host = a.family === 'IPv6' ? `[${a.address}]` : a.address;
    return `${host}:${a.port}`;
  }

  get port(): number {
    return this.bound().port;
  }

  /** Where the server listens; still answers after close(), when net.Server.address() is null. */
  private bound(): net.AddressInfo {
    this.boundAddress ??= this.server.address() as net.AddressInfo;
    return this.boundAddress;
  }

  private accept(socket: net.Socket): void {
    this.sockets.add(socket);
    socket.unref();
    socket.setNoDelay(true);
    const decoder = new FrameDecoder();
    const secret = this.options.secret;
    // hello: waiting for HELLO; challenged: sent CHALLENGE, waiting for AUTH; ready: authenticated.
    let state: 'hello' | 'challenged' | 'ready' = 'hello';
    let clientNonce: Buffer | null = null;
    let serverNonce: Buffer | null = null;
    let session: ControlSession | null = null;
    let broken: Error | undefined;
    // Read now: a closed socket no longer knows its remote end.
    const address = remoteAddress(socket);
    const newSession = (peer: string): ControlSession => ({ id: randomBytes(8).toString('hex'), peer, address });
    // A connection that never authenticates must not hold a socket forever.
    const deadline = setTimeout(() => fail('ERR_TIMEOUT', `handshake did not complete within ${HANDSHAKE_MS} ms`), HANDSHAKE_MS);
    deadline.unref();
    const fail = (code: string, message: string) => {
      clearTimeout(deadline);
      socket.end(encodeFrame(MessageType.Error, { code, message }));
      socket.destroySoon();
    };
    const ready = (peer: string) => {
      clearTimeout(deadline);
      state = 'ready';
      session ??= newSession(peer);
      // The peer is known now: a host that vanishes without a FIN must not hold it forever.
      socket.setKeepAlive(true, KEEPALIVE_MS);
      socket.write(encodeFrame(MessageType.Segment, this.options.describe(session)));
    };
    socket.on('data', (chunk: Buffer) => {
      let frames: Frame[];
      try {
        frames = decoder.push(chunk);
      } catch (err) {
        fail('ERR_PROTOCOL', (err as Error).message);
        return;
      }
      for (const f of frames) {
        if (f.version !== WIRE_VERSION) {
          fail('ERR_PROTOCOL_VERSION', `peer speaks wire version ${f.version}; this engine speaks ${WIRE_VERSION}`);
          return;
        }
        const body = (f.body ?? {}) as Record<string, unknown>;
        if (f.type === MessageType.Hello && state === 'hello') {
          const name = typeof body.name === 'string' ? body.name : '';
          if (!secret) {
            ready(name);
            continue;
          }
          clientNonce = decodeNonce(body.nonce);
          if (!clientNonce) {
            fail('ERR_AUTH', 'this engine requires a shared secret and the peer sent no nonce');
            return;
          }
          serverNonce = randomBytes(32);
          state = 'challenged';
          socket.write(
            encodeFrame(MessageType.Challenge, {
              nonce: serverNonce.toString('base64'),
              proof: controlProof(secret, 'server', clientNonce, serverNonce).toString('base64'),
            }),
          );
          session = newSession(name);
        } else if (f.type === MessageType.Auth && state === 'challenged' && secret && clientNonce && serverNonce) {
          const expected = controlProof(secret, 'client', serverNonce, clientNonce);
          if (!sameBytes(expected, decodeNonce(body.proof))) {
            fail('ERR_AUTH', 'the peer did not prove the shared secret');
            return;
          }
          ready(session!.peer);
        } else if (f.type === MessageType.GetSegment && state === 'ready') {
          socket.write(encodeFrame(MessageType.Segment, this.options.describe(session!)));
        } else if (f.type === MessageType.Request && state === 'ready') {
          this.answer(socket, f.body, session!);
        } else {
          // Out of order (a request before HELLO, or instead of AUTH): nothing is described either way.
          fail('ERR_PROTOCOL', `unexpected control message type ${f.type}`);
          return;
        }
      }
    });
    socket.on('error', (err) => {
      broken ??= err;
      socket.destroy();
    });
    socket.on('close', () => {
      clearTimeout(deadline);
      this.sockets.delete(socket);
      if (state === 'ready' && session) this.options.onSessionEnd?.(session, broken);
    });
  }

  private answer(socket: net.Socket, raw: unknown, session: ControlSession): void {
    const req = (raw ?? {}) as { id?: unknown; topic?: unknown; body?: unknown };
    if (typeof req.id !== 'number' || typeof req.topic !== 'string') {
      socket.end(encodeFrame(MessageType.Error, { code: 'ERR_PROTOCOL', message: 'malformed request' }));
      socket.destroySoon();
      return;
    }
    const id = req.id;
    const handler = this.options.handlers?.get(req.topic);
    const reply = (body: unknown) => {
      if (socket.destroyed) return;
      let frame: Buffer;
      try {
        frame = encodeFrame(MessageType.Response, body);
      } catch (err) {
        // Too large or not JSON: the caller gets an error, this process keeps running.
        const message = `the answer to '${String(req.topic)}' cannot be sent: ${(err as Error).message}`;
        frame = encodeFrame(MessageType.Response, { id, ok: false, code: 'ERR_REMOTE', message });
      }
      socket.write(frame);
    };
    if (!handler) {
      reply({ id, ok: false, code: 'ERR_NO_HANDLER', message: `no handler for topic '${req.topic}'` });
      return;
    }
    Promise.resolve()
      .then(() => handler(req.body, { peer: session.peer, session }))
      .then(
        (body) => reply({ id, ok: true, body: body ?? null }),
        (err: unknown) => {
          const e = err as { code?: unknown; message?: unknown };
          reply({ id, ok: false, code: typeof e?.code === 'string' ? e.code : 'ERR_REMOTE', message: String(e?.message ?? err) });
        },
      );
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

/** The client side of one control connection. */
export class ControlClient {
  private readonly decoder = new FrameDecoder();
  /** HELLO / GET_SEGMENT requests awaiting their SEGMENT answer; the server answers in order. */
  private readonly waiters: Array<{ resolve(d: SegmentDescriptor): void; reject(e: Error): void }> = [];
  private closedError: TransferError | null = null;
  private closeListeners: Array<(err: TransferError) => void> = [];
  private nextRequestId = 1;
  private readonly requests = new Map<number, { resolve(v: unknown): void; reject(e: Error): void; timer: NodeJS.Timeout }>();

  private helloNonce: Buffer | null = null;
  private authenticated = false;

  private constructor(
    private readonly socket: net.Socket,
    readonly address: string,
    private readonly secret?: Buffer,
  ) {
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', () => {});
    socket.on('close', () => this.handleClose(new TransferError(`control connection to ${address} closed`, 'ERR_PEER_LOST')));
  }

  /**
   * Connects and fetches the peer's segment descriptor. With `secret`, both sides
   * prove it (mutual HMAC challenge-response) before any region is described; a peer
   * that cannot, or that does not ask, fails the connect with ERR_AUTH.
   */
  static async connect(
    address: string,
    timeoutMs: number,
    hello: { name?: string } = {},
    secret?: Buffer,
  ): Promise<{ client: ControlClient; segment: SegmentDescriptor }> {
    const { host, port } = parseAddress(address);
    const socket = net.connect({ host, port });
    socket.setNoDelay(true);
    const client = new ControlClient(socket, address, secret);
    client.helloNonce = randomBytes(32);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new TransferError(`handshake with ${address} did not complete within ${timeoutMs} ms`, 'ERR_TIMEOUT')),
        timeoutMs,
      );
    });
    const connected = new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', (err: NodeJS.ErrnoException) =>
        reject(new TransferError(`cannot connect to ${address}: ${err.code ?? err.message}`, 'ERR_CONNECT', { cause: err })),
      );
    });
    connected.catch(() => {});
    try {
      await Promise.race([connected, timeout]);
      const segment = await Promise.race([
        client.request(MessageType.Hello, { version: WIRE_VERSION, ...hello, nonce: client.helloNonce!.toString('base64') }),
        timeout,
      ]);
      socket.setKeepAlive(true, KEEPALIVE_MS);
      // Like the server, an idle connection does not keep the process alive (pending
      // requests do, through their timers).
      socket.unref();
      return { client, segment };
    } catch (err) {
      socket.destroy();
      if (err instanceof TransferError && err.code === 'ERR_PEER_LOST') {
        throw new TransferError(`${address} closed the connection during the handshake`, 'ERR_CONNECT', { cause: err });
      }
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Fetches the descriptor again (e.g. after the peer allocated a region). */
  refresh(timeoutMs: number): Promise<SegmentDescriptor> {
    const timer = setTimeout(
      () => this.abort(new TransferError(`segment refresh from ${this.address} timed out after ${timeoutMs} ms`, 'ERR_TIMEOUT')),
      timeoutMs,
    );
    return this.request(MessageType.GetSegment, {}).finally(() => clearTimeout(timer));
  }

  /**
   * Sends a control request to the peer's handler for `topic` and resolves with its
   * answer. Rejects with the handler's error code, ERR_TIMEOUT after `timeoutMs`, or
   * ERR_PEER_LOST if the connection ends first.
   */
  call(topic: string, body: unknown, timeoutMs: number): Promise<unknown> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextRequestId++;
    let frame: Buffer;
    try {
      frame = encodeFrame(MessageType.Request, { id, topic, body });
    } catch (err) {
      const reason = (err as Error).message;
      return Promise.reject(
        new TransferError(`Expected a JSON body under ${MAX_BODY} bytes for request '${topic}' but encoding failed: ${reason}`, 'ERR_BAD_ARGUMENT', { cause: err }),
      );
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.requests.delete(id);
        reject(new TransferError(`request '${topic}' to ${this.address} timed out after ${timeoutMs} ms`, 'ERR_TIMEOUT'));
      }, timeoutMs);
      this.requests.set(id, { resolve, reject, timer });
      this.socket.write(frame);
    });
  }

  /** Calls `listener` once when the connection ends, with the reason. */
  onClose(listener: (err: TransferError) => void): void {
    if (this.closedError) listener(this.closedError);
    else this.closeListeners.push(listener);
  }

  private handleClose(err: TransferError): void {
    if (this.closedError) return;
    this.closedError = err;
    for (const w of this.waiters.splice(0)) w.reject(err);
    for (const r of this.requests.values()) {
      clearTimeout(r.timer);
      r.reject(err);
    }
    this.requests.clear();
    const listeners = this.closeListeners;
    this.closeListeners = [];
    for (const l of listeners) l(err);
  }

  get closed(): boolean {
    return this.closedError !== null;
  }

  /** Ends the connection. Close listeners run now, not when the socket's close event arrives later. */
  close(): void {
    this.abort(new TransferError(`control connection to ${this.address} closed`, 'ERR_PEER_LOST'));
  }

  private abort(err: TransferError): void {
    this.handleClose(err);
    this.socket.destroy();
  }

  private request(type: MessageType, body: unknown): Promise<SegmentDescriptor> {
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise((resolve, reject) => {
      this.waiters.push({ resolve, reject });
      this.socket.write(encodeFrame(type, body));
    });
  }

  /** CHALLENGE from the server: check its proof, answer with ours. False when the connection was aborted. */
  private answerChallenge(raw: unknown): boolean {
    const body = (raw ?? {}) as { nonce?: unknown; proof?: unknown };
    if (!this.secret) {
      this.abort(new TransferError(`peer ${this.address} requires a shared secret (set the secret option or EPD_TRANSFER_SECRET)`, 'ERR_AUTH'));
      return false;
    }
    const serverNonce = decodeNonce(body.nonce);
    const expected = serverNonce && controlProof(this.secret, 'server', this.helloNonce!, serverNonce);
    if (!serverNonce || !expected || !sameBytes(expected, decodeNonce(body.proof))) {
      this.abort(new TransferError(`peer ${this.address} failed to prove the shared secret`, 'ERR_AUTH'));
      return false;
    }
    this.authenticated = true;
    this.socket.write(encodeFrame(MessageType.Auth, { proof: controlProof(this.secret, 'client', serverNonce, this.helloNonce!).toString('base64') }));
    return true;
  }

  private settle(raw: unknown): void {
    const res = (raw ?? {}) as { id?: unknown; ok?: unknown; body?: unknown; code?: unknown; message?: unknown };
    const pending = typeof res.id === 'number' ? this.requests.get(res.id) : undefined;
    if (!pending) return; // timed out already
    this.requests.delete(res.id as number);
    clearTimeout(pending.timer);
    if (res.ok === true) {
      pending.resolve(res.body);
    } else {
      const code = typeof res.code === 'string' && REMOTE_CODES.has(res.code) ? res.code : 'ERR_REMOTE';
      pending.reject(new TransferError(`peer ${this.address}: ${String(res.message ?? 'request failed')}`, code as ErrorCode));
    }
  }

  private onData(chunk: Buffer): void {
    let frames: Frame[];
    try {
      frames = this.decoder.push(chunk);
    } catch (err) {
      this.abort(err as TransferError);
      return;
    }
    for (const f of frames) {
      if (f.type === MessageType.Response && f.version === WIRE_VERSION) {
        this.settle(f.body);
        continue;
      }
      // Every failure below aborts, which rejects the waiting requests too; a request
      // leaves the queue only when its SEGMENT arrives.
      const waiter = this.waiters[0];
      if (f.type === MessageType.Error) {
        const body = (f.body ?? {}) as { code?: string; message?: string };
        const code = body.code === 'ERR_PROTOCOL_VERSION' || body.code === 'ERR_AUTH' ? body.code : 'ERR_PROTOCOL';
        this.abort(new TransferError(`peer ${this.address} refused: ${body.message ?? 'error'}`, code));
        return;
      }
      if (f.version !== WIRE_VERSION) {
        this.abort(
          new TransferError(`peer ${this.address} speaks wire version ${f.version}; this engine speaks ${WIRE_VERSION}`, 'ERR_PROTOCOL_VERSION'),
        );
        return;
      }
      if (f.type === MessageType.Challenge && waiter && !this.authenticated) {
        if (!this.answerChallenge(f.body)) return;
        continue;
      }
      if (f.type === MessageType.Segment && waiter && this.secret && !this.authenticated) {
        // Mutual authentication: a peer that describes itself without proving the
        // secret could be anyone.
        this.abort(new TransferError(`peer ${this.address} did not authenticate (it has no shared secret set)`, 'ERR_AUTH'));
        return;
      }
      if (f.type !== MessageType.Segment || !waiter) {
        this.abort(new TransferError(`unexpected control message type ${f.type} from ${this.address}`, 'ERR_PROTOCOL'));
        return;
      }
      this.waiters.shift();
      waiter.resolve(f.body as SegmentDescriptor);
    }
  }
}

/** Codes a remote handler may send back that keep their meaning here. */
const REMOTE_CODES = new Set([
  'ERR_BAD_ARGUMENT', 'ERR_OUT_OF_RANGE', 'ERR_UNKNOWN_REGION', 'ERR_CLOSED', 'ERR_ABORTED', 'ERR_TIMEOUT',
  'ERR_PEER_LOST', 'ERR_NOT_SHAREABLE', 'ERR_BACKEND_UNAVAILABLE', 'ERR_NO_HANDLER', 'ERR_REMOTE',
  'ERR_REGION_FREED', 'ERR_UNKNOWN_PEER', 'ERR_INTEGRITY', 'ERR_CAPACITY', 'ERR_NOT_FOUND', 'ERR_AUTH',
  // A handler backed by etcd (e.g. a served encoder-cache directory) reports these as they are.
  'ERR_METADATA_UNAVAILABLE', 'ERR_NAME_IN_USE', 'ERR_LEASE_LOST',
]);

/** Splits "host:port" or "[v6]:port". */
export function parseAddress(address: string): { host: string; port: number } {
  const m = /^\[?([^\]]+?)\]?:(\d{1,5})$/.exec(address);
  const port = m ? Number(m[2]) : NaN;
  if (!m || !(port > 0 && port < 65536)) {
    throw new TransferError(`Expected an address "host:port" but received ${JSON.stringify(address)}`, 'ERR_BAD_ARGUMENT');
  }
  return { host: m[1], port };
}
