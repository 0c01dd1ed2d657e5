// The installable package, as a user gets it: `npm pack` makes the tarball; a fresh
// project installs it offline (from npm's cache, with a lockfile generated from ours,
// so no registry is asked); with no compiler on PATH the install script must pick the
// linux-x64 prebuild (no build/ directory may appear), and where no prebuild matches
// it must build from source. publint checks exports/types, and tsc compiles a
// TypeScript consumer against the published types.
//
// Needs prebuilds/ (`npm run prebuild`); skips without one unless EPD_REQUIRE_PREBUILD=1
// (.ci/run runs it in the "prebuilds only" step, after `npm run prebuild`).
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const exec = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const prebuildDir = path.join(root, 'prebuilds', `${process.platform}-${process.arch}`);
const hasPrebuild = existsSync(prebuildDir) && readdirSync(prebuildDir).some((f) => f.endsWith('.node'));
const skip = !hasPrebuild && process.env.EPD_REQUIRE_PREBUILD !== '1';
if (skip) console.warn('SKIPPED package tests: no prebuild in prebuilds/ (run `npm run prebuild`)');

// npm's own entry point, run with node (the `npm` wrapper is a shell script, and the bare PATH below has no shell but sh).
const npmCli = [process.env.npm_execpath, path.join(path.dirname(path.dirname(process.execPath)), 'lib/node_modules/npm/bin/npm-cli.js')].find(
  (p): p is string => p !== undefined && /npm-cli\.js$/.test(p) && existsSync(p),
) ?? 'npm-cli.js (not found)';
const pkg = JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8')) as { name: string; version: string; dependencies: Record<string, string>; bin: unknown; engines: unknown };

let work = '';
let tarball = '';
let files: string[] = [];

/** The environment of a child: ours, without switches that change which addon loads. */
function childEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, ...extra };
  delete env.PREBUILDS_ONLY;
  delete env.EPD_TRANSFER_ADDON;
  delete env.EPD_TRANSFER_METADATA;
  return env;
}

function npm(args: string[], cwd: string, env: NodeJS.ProcessEnv) {
  return exec(process.execPath, [npmCli, ...args], { cwd, env, maxBuffer: 64 << 20 });
}

interface LockEntry {
  version: string;
  resolved?: string;
  integrity?: string;
  dependencies?: Record<string, string>;
  optionalDependencies?: Record<string, string>;
  dev?: boolean;
  devOptional?: boolean;
  peer?: boolean;
}

/**
 * A consumer project depending on the tarball, with a lockfile holding the tarball
 * and exactly our production dependency tree (copied from our lockfile), so `npm ci
 * --offline` installs from the cache that `npm ci` of this repository filled.
 */
async function consumerProject(dir: string, tgz: string): Promise<void> {
  mkdirSync(dir, { recursive: true });
  const lock = JSON.parse(readFileSync(path.join(root, 'package-lock.json'), 'utf8')) as { packages: Record<string, LockEntry> };
  const registry = (await npm(['config', 'get', 'registry'], root, childEnv())).stdout.trim().replace(/\/?$/, '/');
  const resolveFrom = (from: string, name: string): string | null => {
    for (let base = from; ; ) {
      const p = `${base ? `${base}/` : ''}node_modules/${name}`;
      if (lock.packages[p]) return p;
      if (!base) return null;
      const i = base.lastIndexOf('/node_modules/');
      base = i < 0 ? '' : base.slice(0, i);
    }
  };
  const packages: Record<string, LockEntry> = {};
  const queue: Array<[string, string]> = Object.keys(pkg.dependencies).map((n) => ['', n]);
  while (queue.length > 0) {
    const [from, name] = queue.shift()!;
    const at = resolveFrom(from, name);
    if (!at) throw new Error(`package-lock.json has no ${name} (needed by ${from || pkg.name})`);
    if (packages[at]) continue;
    const { dev: _dev, devOptional: _devOptional, peer: _peer, ...entry } = lock.packages[at];
    const id = at.slice(at.lastIndexOf('node_modules/') + 'node_modules/'.length);
    // Lockfiles written with omit-lockfile-registry-resolved carry no URL; the registry's canonical one keys the cache.
    entry.resolved ??= `${registry}${id}/-/${id.split('/').pop()}-${entry.version}.tgz`;
    packages[at] = entry;
    for (const d of Object.keys({ ...entry.dependencies, ...entry.optionalDependencies })) queue.push([at, d]);
  }
  const spec = `file:${tgz}`;
  const integrity = `sha512-${createHash('sha512').update(readFileSync(tgz)).digest('base64')}`;
  // npm >= 11 runs a dependency's install script only when the project allows it.
  const manifest = { name: 'consumer', version: '1.0.0', private: true, type: 'module', dependencies: { [pkg.name]: spec }, allowScripts: { [pkg.name]: true, [spec]: true } };
  writeFileSync(path.join(dir, 'package.json'), JSON.stringify(manifest, null, 2));
  writeFileSync(
    path.join(dir, 'package-lock.json'),
    JSON.stringify({
      name: 'consumer',
      version: '1.0.0',
      lockfileVersion: 3,
      requires: true,
      packages: {
        '': { name: 'consumer', version: '1.0.0', dependencies: manifest.dependencies },
        [`node_modules/${pkg.name}`]: { version: pkg.version, resolved: spec, integrity, hasInstallScript: true, dependencies: pkg.dependencies, bin: pkg.bin, engines: pkg.engines },
        ...packages,
      },
    }, null, 2),
  );
}

/** A PATH with node and sh and nothing else: no compiler, no make, no python. */
function bareBin(): string {
  const bin = path.join(work, 'bare-bin');
  mkdirSync(bin, { recursive: true });
  symlinkSync(process.execPath, path.join(bin, 'node'));
  symlinkSync('/bin/sh', path.join(bin, 'sh'));
  return bin;
}

const useScript = `
  const { TransferEngine } = await import('epd-transfer');
  const engine = await TransferEngine.open();
  const src = engine.allocate(1 << 16);
  const dst = engine.allocate(1 << 16);
  src.buffer.fill(0x3c);
  const self = await engine.connect(engine.address);
  const { bytes } = await engine.write(self, [{ localRegion: src, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: 1 << 16 }]);
  const same = dst.buffer.equals(src.buffer);
  const addon = engine.capabilities().addon;
  await engine.close();
  console.log(JSON.stringify({ addon, bytes, same }));`;

async function useInstalled(dir: string): Promise<{ addon: string; bytes: number; same: boolean }> {
  const { stdout } = await exec(process.execPath, ['--input-type=module', '-e', useScript], { cwd: dir, env: childEnv() });
  return JSON.parse(stdout.trim().split('\n').pop()!);
}

describe.skipIf(skip)('npm package', () => {
  beforeAll(async () => {
    work = mkdtempSync(path.join(os.tmpdir(), 'epd-package-'));
    // --ignore-scripts: dist/ is already compiled by `npm ci` (prepare); packing must not rebuild anything.
    const { stdout } = await npm(['pack', '--ignore-scripts', '--json', '--pack-destination', work], root, childEnv());
    const [packed] = JSON.parse(stdout) as Array<{ filename: string; files: Array<{ path: string }> }>;
    tarball = path.join(work, packed.filename);
    files = packed.files.map((f) => f.path);
    mkdirSync(path.join(work, 'unpacked'));
    await exec('tar', ['-xzf', tarball, '-C', path.join(work, 'unpacked')]);
  }, 120_000);

  afterAll(() => {
    if (work) rmSync(work, { recursive: true, force: true });
  });

  it('the tarball holds the compiled TypeScript, its types, the linux-x64 prebuild and what a source build needs; no tests or local builds', () => {
    for (const f of ['package.json', 'dist/lib/index.js', 'dist/lib/index.d.ts', 'bin/epd-transfer.js', 'binding.gyp', 'sources.json', 'native/engine.cc']) expect(files).toContain(f);
    expect(files.some((f) => /^prebuilds\/linux-x64\/[^/]+\.node$/.test(f))).toBe(true);
    expect(files.filter((f) => /^(test|build|build-[^/]*|node_modules)\//.test(f))).toEqual([]);
  });

  it('publint finds nothing wrong with exports, types or files', async () => {
    const { publint } = await import('publint');
    const { formatMessage } = await import('publint/utils');
    // The unpacked tarball is exactly what was published: nothing to pack again.
    const { messages, pkg: packed } = await publint({ pkgDir: path.join(work, 'unpacked', 'package'), level: 'warning', pack: false });
    expect(messages.map((m) => `${m.type}: ${formatMessage(m, packed) ?? m.code}`)).toEqual([]);
  });

  it('installs offline into a fresh project with no compiler on PATH and loads the prebuild: no build ran', async () => {
    const app = path.join(work, 'app');
    await consumerProject(app, tarball);
    const { stdout } = await npm(['ci', '--offline', '--no-audit', '--no-fund', '--foreground-scripts'], app, childEnv({ PATH: bareBin() }));
    expect(stdout).toMatch(/node-gyp-build/); // the install script ran…
    const installed = path.join(app, 'node_modules', pkg.name);
    expect(existsSync(path.join(installed, 'build'))).toBe(false); // …and chose the prebuild
    const used = await useInstalled(app);
    expect(used).toMatchObject({ bytes: 1 << 16, same: true });
    expect(path.relative(installed, used.addon)).toBe(path.join('prebuilds', `${process.platform}-${process.arch}`, path.basename(used.addon)));
    const help = await exec(process.execPath, [path.join(app, 'node_modules/.bin/epd-transfer'), 'help'], { cwd: app, env: childEnv() });
    expect(help.stdout).toMatch(/Usage: epd-transfer/);
  }, 120_000);

  it('a TypeScript consumer compiles against the published types (exports, NodeNext)', async () => {
    const app = path.join(work, 'app');
    writeFileSync(
      path.join(app, 'consumer.ts'),
      `import { TransferEngine, EpdProxy, TransferError, type EngineOptions, type ProxyOptions } from 'epd-transfer';
const options: EngineOptions = { metadata: 'etcd://127.0.0.1:2379', metadataOptions: { ttlSeconds: 10 } };
const proxy: ProxyOptions = { cluster: { metadata: 'etcd://127.0.0.1:2379' } };
export async function main(): Promise<string> {
  const engine: TransferEngine = await TransferEngine.open(options);
  try { return engine.metadata.kind; } finally { await engine.close(); }
}
export const types = [EpdProxy, TransferError, proxy] as const;
`,
    );
    const tsc = path.join(root, 'node_modules/typescript/bin/tsc');
    const args = ['--noEmit', '--strict', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--target', 'es2022', '--types', 'node', '--typeRoots', path.join(root, 'node_modules/@types'), 'consumer.ts'];
    await expect(exec(process.execPath, [tsc, ...args], { cwd: app, env: childEnv() }).then(() => 'ok', (e: { stdout: string }) => e.stdout)).resolves.toBe('ok');
  }, 60_000);

  it('where no prebuild matches, the install builds from source', async () => {
    // The same package without prebuilds/: what a platform we ship no prebuild for sees.
    const unpacked = path.join(work, 'unpacked-source');
    mkdirSync(unpacked);
    await exec('tar', ['-xzf', tarball, '-C', unpacked]);
    rmSync(path.join(unpacked, 'package', 'prebuilds'), { recursive: true, force: true });
    const bare = path.join(work, `${pkg.name}-${pkg.version}-noprebuild.tgz`);
    await exec('tar', ['-czf', bare, '-C', unpacked, 'package']);
    const app = path.join(work, 'app-source');
    await consumerProject(app, bare);
    await npm(['ci', '--offline', '--no-audit', '--no-fund'], app, childEnv());
    const installed = path.join(app, 'node_modules', pkg.name);
    const built = path.join(installed, 'build', 'Release');
    expect(existsSync(built) && readdirSync(built).some((f) => f.endsWith('.node'))).toBe(true);
    const used = await useInstalled(app);
    expect(used).toMatchObject({ bytes: 1 << 16, same: true });
    expect(path.relative(installed, used.addon).startsWith(path.join('build', 'Release'))).toBe(true);
  }, 600_000);
});
