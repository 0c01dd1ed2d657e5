// Device-path bandwidth on a real NVIDIA GPU, through epd-transfer's cuda device:
//   d2d  device-to-device copies on a DeviceStream (cuMemcpyDtoDAsync_v2 underneath)
//   ipc  a second process imports our allocation with an IPC key and copies out of it
// each printed next to the bare driver's cuMemcpyDtoD bandwidth measured in the same
// run by bench/device/dtod_peak (the reference), all timed the same way: wall clock
// from the first enqueue to the stream's completion. Run by bench/device/run-cuda.sh.
//
//   node bench/device/cuda-bench.mjs --peak build/dtod_peak [--device 0] [--bytes 268435456]
//                                    [--copies 256] [--runs 5] [--json]
import { execFileSync, fork } from 'node:child_process';
import { createHash } from 'node:crypto';
import { parseArgs } from 'node:util';
import { TransferEngine, probe } from '../../dist/lib/index.js';

const { values } = parseArgs({
  options: {
    peak: { type: 'string' },
    device: { type: 'string', default: '0' },
    bytes: { type: 'string', default: String(256 << 20) },
    copies: { type: 'string', default: '256' },
    runs: { type: 'string', default: '5' },
    json: { type: 'boolean', default: false },
    child: { type: 'string' }, // internal: the IPC importer
  },
});
const device = Number(values.device);
const bytes = Number(values.bytes);
const copies = Number(values.copies);
const runs = Number(values.runs);
const CHECK_BYTES = 1 << 20;

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const sha = (b) => createHash('sha256').update(b).digest('hex');
function marker(seed) {
  const b = Buffer.alloc(CHECK_BYTES);
  for (let i = 0; i < b.length; i++) b[i] = (i * 131 + seed * 7) & 0xff;
  return b;
}

/** Times `copies` copies src -> dst on `stream`, `runs` times after one warm-up run. GB/s per run. */
async function timeCopies(stream, dst, src) {
  const once = async () => {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < copies; i++) stream.copy(dst, src, bytes);
    await stream.synchronize(120_000);
    return Number(process.hrtime.bigint() - t0) / 1e9;
  };
  await once();
  const out = [];
  for (let r = 0; r < runs; r++) out.push((bytes * copies) / (await once()) / 1e9);
  return out;
}

async function child(key) {
  const engine = await TransferEngine.open({ device: 'cuda', deviceId: device, listen: false });
  const imported = engine.device.ipcImport(key);
  const own = engine.device.alloc(bytes);
  const stream = engine.device.createStream();
  const gbps = await timeCopies(stream, own.ptr, imported.ptr);
  const check = Buffer.alloc(CHECK_BYTES);
  engine.device.read(check, own.ptr);
  stream.destroy();
  engine.device.ipcClose(imported.ptr);
  engine.device.free(own.ptr);
  await engine.close();
  process.send({ gbps, hash: sha(check) });
}

async function main() {
  if (!values.peak) throw new Error('--peak <path to the dtod_peak binary> is required');
  const cuda = probe({ memcpyBytes: 64 << 20, millis: 100 }).devices.cuda;
  if (!cuda.available) throw new Error(`the cuda device is unavailable: ${cuda.reason}`);

  const peak = JSON.parse(execFileSync(values.peak, [String(device), String(bytes), String(copies), String(runs)], { encoding: 'utf8' }).trim().split('\n').pop());

  const engine = await TransferEngine.open({ device: 'cuda', deviceId: device, listen: false });
  const a = engine.device.alloc(bytes);
  const b = engine.device.alloc(bytes);
  engine.device.write(a.ptr, marker(1));
  const stream = engine.device.createStream();
  const d2d = await timeCopies(stream, b.ptr, a.ptr);
  const back = Buffer.alloc(CHECK_BYTES);
  engine.device.read(back, b.ptr);
  if (!back.equals(marker(1))) throw new Error('d2d: the copied bytes differ from the source');

  const key = engine.device.ipcExport(a.ptr, bytes);
  const proc = fork(new URL(import.meta.url).pathname, ['--child', key, '--device', String(device), '--bytes', String(bytes), '--copies', String(copies), '--runs', String(runs)], {
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  const ipcResult = await new Promise((resolve, reject) => {
    proc.once('message', resolve);
    proc.once('exit', (code) => reject(new Error(`the IPC importer exited with ${code}`)));
  });
  if (ipcResult.hash !== sha(marker(1))) throw new Error('ipc: the importer copied bytes that differ from the exporter\'s');
  stream.destroy();
  engine.device.free(a.ptr);
  engine.device.free(b.ptr);
  await engine.close();

  const ref = median(peak.gbps);
  const result = {
    bench: 'device-cuda',
    device,
    driver: cuda.driverVersion,
    bytesPerCopy: bytes,
    copiesPerRun: copies,
    runs,
    referenceGbps: ref,
    d2dGbps: median(d2d),
    ipcGbps: median(ipcResult.gbps),
    d2dRatio: median(d2d) / ref,
    ipcRatio: median(ipcResult.gbps) / ref,
    spread: { reference: peak.gbps, d2d, ipc: ipcResult.gbps },
  };
  if (values.json) {
    console.log(JSON.stringify(result));
    return;
  }
  const row = (name, gbps, all) =>
    `${name.padEnd(34)} ${gbps.toFixed(1).padStart(8)} GB/s  ${(gbps / ref).toFixed(2).padStart(5)}x  [${all.map((x) => x.toFixed(0)).join(' ')}]`;
  console.log(`cuda device ${device}, ${bytes >> 20} MiB x ${copies} copies per run, median of ${runs} runs (1 GB = 1e9 B)`);
  console.log(row('cuMemcpyDtoD (driver, reference)', ref, peak.gbps));
  console.log(row('epd-transfer d2d (DeviceStream)', result.d2dGbps, d2d));
  console.log(row('epd-transfer ipc (other process)', result.ipcGbps, ipcResult.gbps));
  console.log(JSON.stringify(result));
}

if (values.child) {
  child(values.child).catch((err) => {
    console.error(`cuda-bench child: ${err.code ?? ''} ${err.message}`);
    process.exit(1);
  });
} else {
  main().catch((err) => {
    console.error(`cuda-bench: ${err.code ? `${err.code}: ` : ''}${err.message}`);
    process.exit(1);
  });
}
