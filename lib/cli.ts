/**
 * The `epd-transfer` command line.
 *
 *   epd-transfer probe [--json]
 *   epd-transfer bench transfer [--transport shm] [--op write|read] [--block 1MiB] [--batch 64]
 *                               [--threads n] [--inflight 2] [--region 512MiB] [--runs 5] [--json]
 *   epd-transfer bench ec [--bytes 18MiB] [--processes 1] [--runs 5] [--json]
 *   epd-transfer shm-gc
 */
import { parseArgs } from 'node:util';
import { TransferError } from './errors.js';
import { native } from './native.js';
import { probe } from './probe.js';
import { expectInteger, parseBytes } from './validate.js';

const USAGE = `Usage: epd-transfer <command> [options]

Commands:
  probe [--json]                 what this host offers: devices, transports, memcpy GB/s
  bench transfer [options]       bandwidth between two processes, next to memcpy
      --transport shm            transport (shm)
      --op write|read            push into the peer or pull from it (write)
      --block <size>             bytes per descriptor (1MiB)
      --batch <n>                descriptors per batch (64)
      --threads <n>              engine worker threads (min(4, max(2, CPUs)))
      --inflight <n>             batches kept in flight (2)
      --region <size>            working set per side (512MiB)
      --runs <n>                 measured runs, median reported (5)
      --json                     one JSON object instead of the table
  bench ec [options]             encoder cache: save in one process, load in others, next to memcpy
      --bytes <size>             embedding size (18MiB)
      --processes <n>            loader processes, measured one after another (1)
      --runs <n>                 measured runs, median reported (5)
      --json                     one JSON object instead of the table
  shm-gc                         remove shared memory left by crashed engines and encoder caches
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
  if (values.transport !== 'shm') {
    throw new TransferError(`--transport ${values.transport}: only shm is built into this version`, 'ERR_BACKEND_UNAVAILABLE');
  }
  if (values.op !== 'write' && values.op !== 'read') throw new TransferError('--op must be write or read', 'ERR_BAD_ARGUMENT');
  const { runTransferBench, printTransferResult } = await import('../bench/transfer.js');
  const result = await runTransferBench({
    transport: 'shm',
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

function runProbe(args: string[]): void {
  const { values } = parseArgs({ args, options: { json: { type: 'boolean', default: false } } });
  const result = probe();
  if (values.json) {
    console.log(JSON.stringify(result));
    return;
  }
  console.log('devices:');
  for (const [k, v] of Object.entries(result.devices)) console.log(`  ${k.padEnd(9)} ${v.available ? 'available' : `unavailable (${v.reason})`}`);
  console.log('transports:');
  for (const [k, v] of Object.entries(result.transports)) console.log(`  ${k.padEnd(9)} ${v.available ? 'available' : `unavailable (${v.reason})`}`);
  console.log(`memcpy: ${result.memcpyGbps.toFixed(2)} GB/s (single thread, 256 MiB working set)`);
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
        if (what === 'ec') {
          await benchEc(args);
          return 0;
        }
        console.error(`unknown bench '${what ?? ''}'\n\n${USAGE}`);
        return 2;
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
