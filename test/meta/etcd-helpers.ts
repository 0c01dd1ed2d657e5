/**
 * A real etcd server for the metadata and cluster tests: one per test file, on a free
 * loopback port with a temporary data directory, stopped after the file. When no etcd
 * binary is installed the tests skip with a message saying how to get one (.ci/run
 * installs Debian's etcd-server, so CI always runs them).
 */
import { afterAll, beforeAll } from 'vitest';
import { findEtcdBinary, startEtcdServer, type EtcdServer } from '../../lib/meta/etcd-server.js';

export const etcdBinary = findEtcdBinary();
export const noEtcd = etcdBinary === null;
if (noEtcd) console.warn('SKIPPED etcd tests: no etcd binary (apt-get install etcd-server, or set EPD_ETCD_BIN)');

/** Starts etcd before the file's tests and stops it after; read `.url` inside tests. */
export function useEtcd(): { readonly url: string; readonly server: EtcdServer } {
  let server: EtcdServer | undefined;
  beforeAll(async () => {
    if (!noEtcd) server = await startEtcdServer();
  }, 30_000);
  afterAll(async () => {
    await server?.stop();
  });
  return {
    get url() {
      if (!server) throw new Error('etcd is not running');
      return server.url;
    },
    get server() {
      if (!server) throw new Error('etcd is not running');
      return server;
    },
  };
}

/** A unique key prefix per test, so tests sharing one etcd never see each other's keys. */
let seq = 0;
export function uniquePrefix(): string {
  return `t${process.pid}-${++seq}-${Date.now().toString(36)}/`;
}
