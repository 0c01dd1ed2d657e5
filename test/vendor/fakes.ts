/**
 * Builds the conformance fakes (test/fakes/*.c) with gcc into a cache directory
 * keyed by a hash of their sources, and helps tests drive them: the control file
 * (failure, delay and hang switches) and the call trace. Several test files may
 * build at once; each builds into its own temp directory and renames it into place.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const sourceDir = path.join(root, 'test', 'fakes');

export interface FakeLibraries {
  dir: string;
  acl: string;
  aclStub: string;
  aclNoSymbol: string;
  aclMinimal: string;
  cuda: string;
  cudaStub: string;
  cudaNoSymbol: string;
  hccl: string;
  hcclNoSymbol: string;
  mooncake: string;
}

interface Variant {
  out: string;
  source: string;
  soname: string;
  defines?: string[];
  link?: string[];
}

const VARIANTS: Variant[] = [
  { out: 'acl/libascendcl.so', source: 'fake_acl.c', soname: 'libascendcl.so' },
  { out: 'acl-stub/libascendcl.so', source: 'fake_acl.c', soname: 'libascendcl.so', defines: ['FAKE_STUB'] },
  { out: 'acl-nosym/libascendcl.so', source: 'fake_acl.c', soname: 'libascendcl.so', defines: ['FAKE_OMIT_REQUIRED'] },
  { out: 'acl-minimal/libascendcl.so', source: 'fake_acl.c', soname: 'libascendcl.so', defines: ['FAKE_MINIMAL'] },
  { out: 'cuda/libcuda.so.1', source: 'fake_cuda.c', soname: 'libcuda.so.1' },
  { out: 'cuda-stub/libcuda.so.1', source: 'fake_cuda.c', soname: 'libcuda.so.1', defines: ['FAKE_STUB'] },
  { out: 'cuda-nosym/libcuda.so.1', source: 'fake_cuda.c', soname: 'libcuda.so.1', defines: ['FAKE_OMIT_REQUIRED'] },
  // HCCL enqueues on the fake ACL's streams: it links against it, found via its rpath.
  { out: 'hccl/libhccl.so', source: 'fake_hccl.c', soname: 'libhccl.so', link: ['-L$ACL', '-lascendcl', "-Wl,-rpath,$ORIGIN/../acl"] },
  {
    out: 'hccl-nosym/libhccl.so',
    source: 'fake_hccl.c',
    soname: 'libhccl.so',
    defines: ['FAKE_OMIT_REQUIRED'],
    link: ['-L$ACL', '-lascendcl', "-Wl,-rpath,$ORIGIN/../acl"],
  },
  { out: 'mooncake/libtransfer_engine.so', source: 'fake_mooncake.c', soname: 'libtransfer_engine.so' },
];

function sourcesHash(): string {
  const h = createHash('sha256');
  for (const f of readdirSync(sourceDir).sort()) {
    if (f.endsWith('.c') || f.endsWith('.h')) h.update(f).update(readFileSync(path.join(sourceDir, f)));
  }
  h.update(JSON.stringify(VARIANTS));
  return h.digest('hex').slice(0, 16);
}

function libraries(dir: string): FakeLibraries {
  const p = (rel: string) => path.join(dir, rel);
  return {
    dir,
    acl: p('acl/libascendcl.so'),
    aclStub: p('acl-stub/libascendcl.so'),
    aclNoSymbol: p('acl-nosym/libascendcl.so'),
    aclMinimal: p('acl-minimal/libascendcl.so'),
    cuda: p('cuda/libcuda.so.1'),
    cudaStub: p('cuda-stub/libcuda.so.1'),
    cudaNoSymbol: p('cuda-nosym/libcuda.so.1'),
    hccl: p('hccl/libhccl.so'),
    hcclNoSymbol: p('hccl-nosym/libhccl.so'),
    mooncake: p('mooncake/libtransfer_engine.so'),
  };
}

/** Builds the fakes once per source version (about two seconds) and returns their paths. */
export function buildFakes(): FakeLibraries {
  const cacheRoot = path.join(os.tmpdir(), 'epd-transfer-fakes');
  const dir = path.join(cacheRoot, sourcesHash());
  if (existsSync(path.join(dir, '.complete'))) return libraries(dir);
  mkdirSync(cacheRoot, { recursive: true });
  const tmp = mkdtempSync(path.join(cacheRoot, 'build-'));
  try {
    for (const v of VARIANTS) {
      const out = path.join(tmp, v.out);
      mkdirSync(path.dirname(out), { recursive: true });
      const link = (v.link ?? []).map((a) => a.replace('$ACL', path.join(tmp, 'acl')));
      execFileSync(
        'gcc',
        [
          '-std=gnu11', '-O1', '-g', '-fPIC', '-shared', '-pthread', '-fvisibility=hidden', '-Wall', '-Wno-unused-function', '-Wno-format-truncation',
          ...(v.defines ?? []).map((d) => `-D${d}`),
          `-Wl,-soname,${v.soname}`,
          '-o', out, path.join(sourceDir, v.source), ...link, '-lrt',
        ],
        { stdio: ['ignore', 'inherit', 'inherit'] },
      );
    }
    writeFileSync(path.join(tmp, '.complete'), '');
    try {
      renameSync(tmp, dir);
    } catch {
      // Another test file finished first: use its build.
      rmSync(tmp, { recursive: true, force: true });
    }
  } catch (err) {
    rmSync(tmp, { recursive: true, force: true });
    throw err;
  }
  return libraries(dir);
}

/** The switches file the fakes read at every call (EPD_FAKE_CONTROL) and their trace. */
export class FakeControl {
  readonly dir = mkdtempSync(path.join(os.tmpdir(), 'epd-fake-ctl-'));
  readonly controlFile = path.join(this.dir, 'control');
  readonly traceFile = path.join(this.dir, 'trace');

  constructor() {
    writeFileSync(this.controlFile, '');
  }

  /** Environment for this process or a child so the fakes use this control and trace. */
  env(): Record<string, string> {
    return { EPD_FAKE_CONTROL: this.controlFile, EPD_FAKE_TRACE: this.traceFile };
  }

  /** Replaces every switch, e.g. set({ 'acl.fail': 'aclrtMalloc:207001', 'acl.delay_ms': 50 }). */
  set(switches: Record<string, string | number | Array<string | number>>): void {
    const lines: string[] = [];
    for (const [k, v] of Object.entries(switches)) for (const x of Array.isArray(v) ? v : [v]) lines.push(`${k}=${x}`);
    writeFileSync(this.controlFile, lines.join('\n') + '\n');
  }

  clear(): void {
    writeFileSync(this.controlFile, '');
  }

  /** Trace lines so far: { lib, pid, tid, fn, details, rc }. */
  trace(): Array<{ lib: string; pid: number; tid: number; fn: string; details: string; rc: number }> {
    if (!existsSync(this.traceFile)) return [];
    return readFileSync(this.traceFile, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((line) => {
        const m = /^(\S+) (\d+) (\d+) (\S+) (.*) -> (-?\d+)$/.exec(line);
        if (!m) throw new Error(`bad trace line: ${line}`);
        return { lib: m[1], pid: Number(m[2]), tid: Number(m[3]), fn: m[4], details: m[5], rc: Number(m[6]) };
      });
  }

  resetTrace(): void {
    if (existsSync(this.traceFile)) unlinkSync(this.traceFile);
  }

  dispose(): void {
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Removes /dev/shm objects the fakes left behind for processes that are gone. */
export function reclaimFakeShm(): void {
  let names: string[] = [];
  try {
    names = readdirSync('/dev/shm');
  } catch {
    return;
  }
  for (const name of names) {
    const m = /^epdfake-[a-z]+-(\d+)-/.exec(name);
    if (!m) continue;
    const pid = Number(m[1]);
    let alive = true;
    try {
      process.kill(pid, 0);
    } catch (err) {
      alive = (err as NodeJS.ErrnoException).code === 'EPERM';
    }
    if (!alive) {
      try {
        unlinkSync(path.join('/dev/shm', name));
      } catch {
        // raced with another cleaner
      }
    }
  }
}
