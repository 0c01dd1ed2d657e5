/**
 * The `epd-transfer` command line.
 *
 *   epd-transfer probe [--json]
 *   epd-transfer bench transfer [--transport shm|tcp] [--connections n] [--op write|read] [--block 1MiB]
 *                               [--batch 64] [--threads n] [--inflight 2] [--region 512MiB] [--runs 5] [--json]
 *   epd-transfer bench layerwise --model <profile> --tokens <n> [--link 25GB/s] [--transport shm]
 *                                [--runs 3] [--integrity] [--no-fuse] [--trace out.json] [--json]
 *   epd-transfer proxy [--prefill <url> --decode <url> | --pd <url>] [--encode <url>] [options]
 *   epd-transfer proxy instances list|add|remove --proxy <url> [--role <role>] [url...]
 *   epd-transfer bench proxy [--rate 500] [--json]
 *   epd-transfer bench ec [--bytes 18MiB] [--processes 1] [--runs 5] [--json]
 *   epd-transfer worker --role encode|prefill|decode|pd [--model <profile>] [options]
 *   epd-transfer demo [--topology 1e1pd|1e1p1d|2e2p2d] [--requests n] [--json] [--report <file>]
 *   epd-transfer shm-gc
 */
import { parseArgs } from 'node:util';
import { TransferError } from './errors.js';
import { native } from './native.js';
import { probe, type BackendStatus } from './probe.js';
import { DEMO_USAGE } from './demo/usage.js';
import { WORKER_USAGE } from './sim/usage.js';
import { BENCH_PROXY_USAGE, PROXY_USAGE, benchProxyCommand, runProxyCommand } from './proxy/cli.js';
import { META_USAGE, metadataCommand, registerCommand } from './meta/cli.js';
import { expectInteger, parseBytes } from './validate.js';

const USAGE = `Usage: epd-transfer <command> [options]

Commands:
  probe [--json]                 what this host offers: devices, transports, memcpy GB/s
  bench transfer [options]       bandwidth between two processes, next to memcpy (shm)
                                 or a raw loopback socket pump (tcp), measured in the same run
      --transport shm|tcp        transport (shm)
      --connections <n>          tcp data connections, also the pump's (2)
      --op write|read            push into the peer or pull from it (write)
      --block <size>             bytes per descriptor (1MiB)
      --batch <n>                descriptors per batch (64)
      --threads <n>              engine worker threads (min(4, max(2, CPUs)))
      --inflight <n>             batches kept in flight (2)
      --region <size>            working set per side (512MiB)
      --runs <n>                 measured runs, median reported (5)
      --json                     one JSON object instead of the table
  bench layerwise [options]      layerwise KV push vs bulk transfer after a simulated prefill
      --model <id>               model profile: llama3-8b, qwen2.5-7b, qwen2.5-vl-7b,
                                 deepseek-v2-lite, deepseek-r1 (llama3-8b)
      --tokens <n>               prompt tokens (4096)
      --link <bandwidth>         emulate a link, e.g. 4GB/s, 25GB/s, 200Gbit/s (unpaced)
      --transport shm|tcp        transport (shm)
      --runs <n>                 measured runs of each mode, median reported (3)
      --integrity                checksum every layer, verified by decode
      --no-fuse                  one batch per layer even when several are ready together
      --trace <file>             write a Chrome trace (prefill + decode) of the last run
      --json                     one JSON object instead of the table
  bench metadata [options]       etcd: lease-expiry detection and shared-load staleness, real etcd
      --metadata <etcd://h:p>    etcd to use (default: a private etcd-server for the run)
      --ttl <s,s>                lease TTLs to time a kill -9 against (2,5)
      --runs <n>                 kills per TTL (5)
      --sync <ms,ms>             proxy loadSyncMs values to measure staleness for (0,20,50)
      --changes <n>              load changes per loadSyncMs (400)
      --json                     one JSON object instead of the table
${BENCH_PROXY_USAGE}  bench ec [options]             encoder cache: save in one process, load in others, next to memcpy
      --bytes <size>             embedding size (18MiB)
      --processes <n>            loader processes, measured one after another (1)
      --runs <n>                 measured runs, median reported (5)
      --json                     one JSON object instead of the table
${PROXY_USAGE}${META_USAGE}${WORKER_USAGE}${DEMO_USAGE}  shm-gc                         remove shared memory left by crashed engines and encoder caches
`;

async function benchEc(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      bytes: { type: 'string', default: '18MiB' },
      processes: { type: 'string', default: '1' },
      runs: { type: 'string', default: '5' },
      'run-ms': { type: 'string', default: '500' },
      json: { type: 'boolean', default: false },
    },
  });
  const { runEcBench, printEcResult } = await import('../bench/ec.js');
  const result = await runEcBench({
    bytes: parseBytes(values.bytes, '--bytes'),
    processes: expectInteger(Number(values.processes), '--processes', 1, 64),
    runs: expectInteger(Number(values.runs), '--runs', 1),
    runMillis: expectInteger(Number(values['run-ms']), '--run-ms', 10),
  });
  if (values.json) console.log(JSON.stringify(result));
  else printEcResult(result);
}

async function benchTransfer(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      transport: { type: 'string', default: 'shm' },
      connections: { type: 'string', default: '2' },
      op: { type: 'string', default: 'write' },
      block: { type: 'string', default: '1MiB' },
      batch: { type: 'string', default: '64' },
      threads: { type: 'string' },
      inflight: { type: 'string', default: '2' },
      region: { type: 'string', default: '512MiB' },
      runs: { type: 'string', default: '5' },
      'run-ms': { type: 'string', default: '600' },
      json: { type: 'boolean', default: false },
    },
  });
  if (values.transport !== 'shm' && values.transport !== 'tcp') {
    throw new TransferError(`--transport ${values.transport}: expected shm or tcp`, 'ERR_BACKEND_UNAVAILABLE');
  }
  if (values.op !== 'write' && values.op !== 'read') throw new TransferError('--op must be write or read', 'ERR_BAD_ARGUMENT');
  const { runTransferBench, printTransferResult } = await import('../bench/transfer.js');
  const result = await runTransferBench({
    transport: values.transport,
    connections: expectInteger(Number(values.connections), '--connections', 1, 16),
    op: values.op,
    blockBytes: parseBytes(values.block, '--block'),
    batch: expectInteger(Number(values.batch), '--batch', 1),
    threads: values.threads === undefined ? undefined : expectInteger(Number(values.threads), '--threads', 1, 64),
    inflight: expectInteger(Number(values.inflight), '--inflight', 1, 64),
    regionBytes: parseBytes(values.region, '--region'),
    runs: expectInteger(Number(values.runs), '--runs', 1),
    runMillis: expectInteger(Number(values['run-ms']), '--run-ms', 10),
  });
  if (values.json) console.log(JSON.stringify(result));
  else printTransferResult(result);
}

async function benchMetadata(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      metadata: { type: 'string' },
      ttl: { type: 'string', default: '2,5' },
      runs: { type: 'string', default: '5' },
      sync: { type: 'string', default: '0,20,50' },
      changes: { type: 'string', default: '400' },
      json: { type: 'boolean', default: false },
    },
  });
  const list = (v: string, name: string, min: number, max: number) => v.split(',').map((x) => expectInteger(Number(x), name, min, max));
  const { runMetadataBench, printMetadataResult } = await import('../bench/metadata.js');
  const result = await runMetadataBench({
    metadata: values.metadata,
    ttls: list(values.ttl, '--ttl', 2, 60),
    runs: expectInteger(Number(values.runs), '--runs', 1, 100),
    syncs: list(values.sync, '--sync', 0, 10_000),
    changes: expectInteger(Number(values.changes), '--changes', 10, 100_000),
  });
  if (values.json) console.log(JSON.stringify(result));
  else printMetadataResult(result);
}

async function benchLayerwise(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      model: { type: 'string', default: 'llama3-8b' },
      tokens: { type: 'string', default: '4096' },
      link: { type: 'string' },
      transport: { type: 'string', default: 'shm' },
      runs: { type: 'string', default: '3' },
      integrity: { type: 'boolean', default: false },
      'no-fuse': { type: 'boolean', default: false },
      trace: { type: 'string' },
      json: { type: 'boolean', default: false },
    },
  });
  if (values.transport !== 'shm' && values.transport !== 'tcp') throw new TransferError('--transport must be shm or tcp', 'ERR_BAD_ARGUMENT');
  const { runLayerwiseBench, printLayerwiseResult } = await import('../bench/layerwise.js');
  const result = await runLayerwiseBench({
    model: values.model,
    tokens: expectInteger(Number(values.tokens), '--tokens', 1, 1 << 20),
    link: values.link,
    transport: values.transport,
    runs: expectInteger(Number(values.runs), '--runs', 1, 100),
    integrity: values.integrity,
    trace: values.trace,
    fuse: !values['no-fuse'],
  });
  if (values.json) console.log(JSON.stringify(result));
  else printLayerwiseResult(result);
}

function runProbe(args: string[]): void {
  const { values } = parseArgs({ args, options: { json: { type: 'boolean', default: false } } });
  const result = probe();
  if (values.json) {
    console.log(JSON.stringify(result));
    return;
  }
  const line = (v: BackendStatus): string => {
    if (!v.available) return `unavailable: ${v.status ? `${v.status}: ` : ''}${v.reason}`;
    const details = [
      v.library,
      v.devices === undefined ? undefined : `${v.devices} device(s)`,
      v.version,
      v.driverVersion === undefined ? undefined : `CUDA ${Math.floor(v.driverVersion / 1000)}.${(v.driverVersion % 1000) / 10}`,
      v.ipc === false ? 'no IPC' : undefined,
    ].filter(Boolean);
    return details.length > 0 ? `available (${details.join(', ')})` : 'available';
  };
  console.log('devices:');
  for (const [k, v] of Object.entries(result.devices)) console.log(`  ${k.padEnd(9)} ${line(v)}`);
  console.log('transports:');
  for (const [k, v] of Object.entries(result.transports)) console.log(`  ${k.padEnd(9)} ${line(v)}`);
  console.log(`memcpy: ${result.memcpyGbps.toFixed(2)} GB/s (single thread, 256 MiB working set)`);
  console.log(`tcp loopback: ${result.tcpLoopbackGbps.toFixed(2)} GB/s (raw sockets, one connection, 1 MiB sends)`);
}

/** Runs the CLI with `argv` (without node and script). Returns the exit code. */
export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case 'probe':
        runProbe(rest);
        return 0;
      case 'bench': {
        const [what, ...args] = rest;
        if (what === 'transfer') {
          await benchTransfer(args);
          return 0;
        }
        if (what === 'layerwise') {
          await benchLayerwise(args);
          return 0;
        }
        if (what === 'proxy') return await benchProxyCommand(args);
        if (what === 'metadata') {
          await benchMetadata(args);
          return 0;
        }
        if (what === 'ec') {
          await benchEc(args);
          return 0;
        }
        console.error(`unknown bench '${what ?? ''}'\n\n${USAGE}`);
        return 2;
      }
      case 'proxy':
        return await runProxyCommand(rest);
      case 'register':
        return await registerCommand(rest);
      case 'metadata':
        return await metadataCommand(rest);
      case 'worker': {
        const { runWorkerCommand } = await import('./sim/cli.js');
        return await runWorkerCommand(rest);
      }
      case 'demo': {
        const { runDemoCommand } = await import('./demo/cli.js');
        return await runDemoCommand(rest);
      }
      case 'shm-gc':
        console.log(`removed ${native.reclaimStaleShm()} stale shared-memory object(s)`);
        console.log(`removed ${native.reclaimStaleEcStores()} stale encoder-cache store(s)`);
        return 0;
      case undefined:
      case 'help':
      case '--help':
      case '-h':
        console.log(USAGE);
        return command === undefined ? 2 : 0;
      default:
        console.error(`unknown command '${command}'\n\n${USAGE}`);
        return 2;
    }
  } catch (err) {
    const e = err as { code?: string; message?: string };
    if (e?.code === 'ERR_PARSE_ARGS_UNKNOWN_OPTION' || e?.code === 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE') {
      console.error(`${e.message}\n\n${USAGE}`);
      return 2;
    }
    console.error(`epd-transfer: ${e?.code ? `${e.code}: ` : ''}${e?.message ?? String(err)}`);
    return 1;
  }
}
