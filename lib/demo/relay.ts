/**
 * A byte-for-byte TCP relay: listens on one address and pipes every connection to
 * a target. The demo uses it to make an etcd that listens on 127.0.0.1 of the root
 * network namespace reachable from the workers' namespaces (where 127.0.0.1 is
 * their own loopback): the relay listens on the bridge address. etcd's gRPC runs
 * over it unchanged; nothing is parsed.
 */
import net from 'node:net';
import { TransferError } from '../errors.js';

/** A running relay. */
export interface TcpRelay {
  /** `host:port` it listens on. */
  readonly endpoint: string;
  /** Stops listening and cuts every relayed connection. Idempotent. */
  close(): Promise<void>;
}

/** Starts a relay from `listenHost` (a free port) to `target` (`host:port`). */
export async function startTcpRelay(listenHost: string, target: string): Promise<TcpRelay> {
  const colon = target.lastIndexOf(':');
  const host = target.slice(0, colon).replace(/^\[|\]$/g, '');
  const port = Number(target.slice(colon + 1));
  const sockets = new Set<net.Socket>();
  const track = (s: net.Socket) => {
    sockets.add(s);
    s.once('close', () => sockets.delete(s));
  };
  const server = net.createServer((client) => {
    const upstream = net.connect({ host, port });
    track(client);
    track(upstream);
    client.setNoDelay(true);
    upstream.setNoDelay(true);
    // Either side failing or closing takes the other down with it.
    client.on('error', () => upstream.destroy());
    upstream.on('error', () => client.destroy());
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err) => reject(new TransferError(`cannot listen on ${listenHost} for the etcd relay: ${err.message}`, 'ERR_SYSTEM', { cause: err })));
    server.listen(0, listenHost, () => resolve());
  });
  const { port: bound } = server.address() as net.AddressInfo;
  let closing: Promise<void> | undefined;
  return {
    endpoint: `${listenHost.includes(':') ? `[${listenHost}]` : listenHost}:${bound}`,
    close: () =>
      (closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const s of sockets) s.destroy();
      })),
  };
}
