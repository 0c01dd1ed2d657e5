// node-gyp (install fallback, prebuilds) and cmake-js (developer build) must build the same
// addon: same sources and defines, read from sources.json by both, and the same JS surface.
import { execFile, spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const run = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CMAKE_ADDON = path.join(root, 'build-cmake/Release/epd_transfer.node');
const CLASSES = ['NativeEngine', 'NativeStream', 'NativeEvent'];

/**
 * The node-gyp build: build/Release, or the prebuild node-gyp-build would load instead
 * (`npm run prebuild` moves build/Release/epd_transfer.node into prebuilds/).
 */
function gypAddon(): string {
  const gypBuild = createRequire(import.meta.url)('node-gyp-build') as { resolve(dir: string): string };
  try {
    return gypBuild.resolve(root);
  } catch {
    throw new Error('no node-gyp build of the addon: run `npm run build:native`');
  }
}

const hasCmake = !spawnSync('cmake', ['--version']).error;
if (!hasCmake) console.warn('SKIPPED cmake parity tests: no `cmake` on PATH (install cmake to run them)');

interface Surface {
  exports: string[];
  classes: Record<string, string[] | null>;
  values: Record<string, unknown>;
}

/** Loads an addon in a child process (never two copies in the test process) and lists its surface. */
async function surfaceOf(addon: string): Promise<Surface> {
  const script = `
    const b = require(process.argv[1]);
    const classes = {}, values = {};
    for (const name of ${JSON.stringify(CLASSES)}) {
      classes[name] = typeof b[name] === 'function'
        ? Object.getOwnPropertyNames(b[name].prototype).filter((m) => m !== 'constructor').sort()
        : null;
    }
    for (const [k, v] of Object.entries(b)) if (typeof v !== 'function') values[k] = v;
    console.log(JSON.stringify({ exports: Object.keys(b).sort(), classes, values }));`;
  const { stdout } = await run(process.execPath, ['-e', script, addon], { cwd: root });
  return JSON.parse(stdout) as Surface;
}

async function runOrExplain(cmd: string, args: string[], cwd: string, timeout: number): Promise<void> {
  try {
    await run(cmd, args, { cwd, timeout, maxBuffer: 64 << 20 });
  } catch (err) {
    const e = err as Error & { stdout?: string; stderr?: string };
    throw new Error(`${cmd} ${args.join(' ')} failed: ${e.message}\n${e.stdout ?? ''}\n${e.stderr ?? ''}`);
  }
}

describe.skipIf(!hasCmake)('cmake-js and node-gyp addons', () => {
  beforeAll(async () => {
    // Incremental: builds build-cmake/ from scratch when missing, else only what changed.
    await runOrExplain(process.execPath, ['scripts/cmake-build.mjs'], root, 290_000);
  }, 300_000);

  it('export the same names, classes and methods', async () => {
    const [gyp, cmake] = await Promise.all([surfaceOf(gypAddon()), surfaceOf(CMAKE_ADDON)]);
    expect(gyp.exports).toContain('NativeEngine');
    for (const name of CLASSES) expect(gyp.classes[name], `${name} in the node-gyp build`).not.toBeNull();
    expect(cmake.exports).toEqual(gyp.exports);
    expect(cmake.classes).toEqual(gyp.classes);
  });

  it('report the same wire and N-API versions (same defines)', async () => {
    const [gyp, cmake] = await Promise.all([surfaceOf(gypAddon()), surfaceOf(CMAKE_ADDON)]);
    expect(gyp.values).toHaveProperty('wireVersion');
    expect(gyp.values).toHaveProperty('napiVersion');
    expect(cmake.values).toEqual(gyp.values);
  });
});

/**
 * Fault injection: copy both build files beside a sources.json naming made-up files and a
 * made-up define, configure with each build system, and check that exactly those are what it
 * would compile. A source list or define hard-coded in either file makes this fail.
 */
describe('binding.gyp and CMakeLists.txt take sources and defines from sources.json', () => {
  const probe = {
    sources: ['native/parity_probe_a.cc', 'native/parity_probe_b.cc'],
    defines: ['EPD_PARITY_PROBE=42', 'NAPI_VERSION=8'],
  };
  let dir = '';

  beforeAll(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'epd-parity-'));
    mkdirSync(path.join(dir, 'native'));
    for (const f of ['binding.gyp', 'CMakeLists.txt']) writeFileSync(path.join(dir, f), readFileSync(path.join(root, f)));
    writeFileSync(path.join(dir, 'sources.json'), JSON.stringify(probe));
    for (const src of probe.sources) writeFileSync(path.join(dir, src), '');
    symlinkSync(path.join(root, 'node_modules'), path.join(dir, 'node_modules'));
  });
  afterAll(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('node-gyp compiles the sources and defines sources.json lists', async () => {
    const nodeGyp = path.join(root, 'node_modules/node-gyp/bin/node-gyp.js');
    // nodedir: the local headers; configure must not download anything.
    const nodedir = process.env.npm_config_nodedir || path.resolve(path.dirname(process.execPath), '..');
    await runOrExplain(process.execPath, [nodeGyp, 'configure', `--nodedir=${nodedir}`], dir, 60_000);
    const makefile = readFileSync(path.join(dir, 'build/epd_transfer.target.mk'), 'utf8');
    const objs = /^OBJS := \\\n((?:\t.*\n)+)/m.exec(makefile)?.[1] ?? '';
    const objects = [...objs.matchAll(/\$\(TARGET\)\/(\S+)\.o/g)].map((m) => `${m[1]}.cc`);
    expect(new Set(objects)).toEqual(new Set(probe.sources));
    for (const define of probe.defines) expect(makefile).toContain(`'-D${define}'`);
  });

  it.skipIf(!hasCmake)('CMake compiles the sources and defines sources.json lists', async () => {
    await runOrExplain('cmake', ['-S', '.', '-B', 'cmake', '-DCMAKE_EXPORT_COMPILE_COMMANDS=ON'], dir, 60_000);
    const commands = JSON.parse(readFileSync(path.join(dir, 'cmake/compile_commands.json'), 'utf8')) as { file: string; command: string }[];
    expect(new Set(commands.map((c) => path.relative(dir, c.file)))).toEqual(new Set(probe.sources));
    for (const c of commands) for (const define of probe.defines) expect(c.command).toContain(`-D${define}`);
  });
});
