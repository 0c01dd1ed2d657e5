/**
 * The embedded handshake: every engine listens on a small control port; a peer
 * connects, says HELLO, and gets the engine's segment descriptor. The connection
 * stays open: its close is how an engine learns that a peer went away, and the
 * same connection serves refreshes (GET_SEGMENT).
 */
import net from 'node:net';
import { TransferError, type ErrorCode } from '../errors.js';
import { encodeFrame, FrameDecoder, MessageType, WIRE_VERSION, type Frame, type SegmentDescriptor } from './wire.js';

/** Who sent a control request. */
export interface RequestContext {
  /** The peer's engine name, from its HELLO. */
  peer: string;
}

/** Answers one control-request topic. Throwing a TransferError sends its code back. */
export type RequestHandler = (body: unknown, context: RequestContext) => unknown | Promise<unknown>;

export interface ControlServerOptions {
  host: string;
  port: number;
  /** Builds the current descriptor at request time. */
  describe(): SegmentDescriptor;
  /** Handlers of control requests by topic. */
  handlers?: Map<string, RequestHandler>;
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
    let greeted = false;
    let peerName = '';
    const fail = (code: string, message: string) => {
      socket.end(encodeFrame(MessageType.Error, { code, message }));
      socket.destroySoon();
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
        if (f.type === MessageType.Hello) {
          greeted = true;
          const hello = (f.body ?? {}) as { name?: unknown };
          peerName = typeof hello.name === 'string' ? hello.name : '';
          socket.write(encodeFrame(MessageType.Segment, this.options.describe()));
        } else if (f.type === MessageType.GetSegment && greeted) {
          socket.write(encodeFrame(MessageType.Segment, this.options.describe()));
        } else if (f.type === MessageType.Request && greeted) {
          this.answer(socket, f.body, peerName);
        } else {
          fail('ERR_PROTOCOL', `unexpected control message type ${f.type}`);
          return;
        }
      }
    });
    socket.on('error', () => socket.destroy());
    socket.on('close', () => this.sockets.delete(socket));
  }

  private answer(socket: net.Socket, raw: unknown, peer: string): void {
    const req = (raw ?? {}) as { id?: unknown; topic?: unknown; body?: unknown };
    if (typeof req.id !== 'number' || typeof req.topic !== 'string') {
      socket.end(encodeFrame(MessageType.Error, { code: 'ERR_PROTOCOL', message: 'malformed request' }));
      socket.destroySoon();
      return;
    }
    const id = req.id;
    const handler = this.options.handlers?.get(req.topic);
    const reply = (body: unknown) => {
      if (!socket.destroyed) socket.write(encodeFrame(MessageType.Response, body));
    };
    if (!handler) {
      reply({ id, ok: false, code: 'ERR_NO_HANDLER', message: `no handler for topic '${req.topic}'` });
      return;
    }
    Promise.resolve()
      .then(() => handler(req.body, { peer }))
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
  private waiter: { resolve(d: SegmentDescriptor): void; reject(e: Error): void } | null = null;
  private closedError: TransferError | null = null;
  private closeListeners: Array<(err: TransferError) => void> = [];
  private nextRequestId = 1;
  private readonly requests = new Map<number, { resolve(v: unknown): void; reject(e: Error): void; timer: NodeJS.Timeout }>();

  private constructor(private readonly socket: net.Socket, readonly address: string) {
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', () => {});
    socket.on('close', () => this.handleClose(new TransferError(`control connection to ${address} closed`, 'ERR_PEER_LOST')));
  }

  /** Connects and fetches the peer's segment descriptor. */
  static async connect(
    address: string,
    timeoutMs: number,
    hello: { name?: string } = {},
  ): Promise<{ client: ControlClient; segment: SegmentDescriptor }> {
    const { host, port } = parseAddress(address);
    const socket = net.connect({ host, port });
    socket.setNoDelay(true);
    const client = new ControlClient(socket, address);
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
      const segment = await Promise.race([client.request(MessageType.Hello, { version: WIRE_VERSION, ...hello }), timeout]);
      socket.setKeepAlive(true, 1000);
      return { client, segment };
    } catch (err) {
      socket.destroy();
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
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.requests.delete(id);
        reject(new TransferError(`request '${topic}' to ${this.address} timed out after ${timeoutMs} ms`, 'ERR_TIMEOUT'));
      }, timeoutMs);
      this.requests.set(id, { resolve, reject, timer });
      this.socket.write(encodeFrame(MessageType.Request, { id, topic, body }));
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
    this.waiter?.reject(err);
    this.waiter = null;
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
    if (this.waiter) return Promise.reject(new TransferError('a control request is already in progress', 'ERR_PROTOCOL'));
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject };
      this.socket.write(encodeFrame(type, body));
    });
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
      const waiter = this.waiter;
      this.waiter = null;
      if (f.type === MessageType.Error) {
        const body = (f.body ?? {}) as { code?: string; message?: string };
        const code = body.code === 'ERR_PROTOCOL_VERSION' ? 'ERR_PROTOCOL_VERSION' : 'ERR_PROTOCOL';
        this.abort(new TransferError(`peer ${this.address} refused: ${body.message ?? 'error'}`, code));
        return;
      }
      if (f.version !== WIRE_VERSION) {
        this.abort(
          new TransferError(`peer ${this.address} speaks wire version ${f.version}; this engine speaks ${WIRE_VERSION}`, 'ERR_PROTOCOL_VERSION'),
        );
        return;
      }
      if (f.type !== MessageType.Segment || !waiter) {
        this.abort(new TransferError(`unexpected control message type ${f.type} from ${this.address}`, 'ERR_PROTOCOL'));
        return;
      }
      waiter.resolve(f.body as SegmentDescriptor);
    }
  }
}

/** Codes a remote handler may send back that keep their meaning here. */
const REMOTE_CODES = new Set([
  'ERR_BAD_ARGUMENT', 'ERR_OUT_OF_RANGE', 'ERR_UNKNOWN_REGION', 'ERR_CLOSED', 'ERR_ABORTED', 'ERR_TIMEOUT',
  'ERR_PEER_LOST', 'ERR_NOT_SHAREABLE', 'ERR_BACKEND_UNAVAILABLE', 'ERR_NO_HANDLER', 'ERR_REMOTE',
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
