// Prunes node_modules to what bench/device/run-cuda.sh needs on a GPU machine without
// network: vitest (the conformance suite), node-gyp (the build) and the addon's
// runtime packages, with everything they depend on. About 55 MB instead of the full
// install, small enough to carry to a device machine. Restore the full install with
// `npm ci` afterwards.
//
//   node bench/device/prune-node-modules.mjs [--dry-run]
import { existsSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import path from 'node:path';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..', '..');
const KEEP = ['vitest', 'node-gyp', 'node-addon-api', 'node-gyp-build'];
const dryRun = process.argv.includes('--dry-run');

/** The directory of package `name` as Node would resolve it from `from`. */
function resolvePackage(name, from) {
  for (let dir = from; ; dir = path.dirname(dir)) {
    const pkg = path.join(dir, 'node_modules', name, 'package.json');
    if (existsSync(pkg)) return path.dirname(pkg);
    if (path.dirname(dir) === dir) return undefined;
  }
}

const keep = new Set();
function walk(name, from) {
  const dir = resolvePackage(name, from);
  if (!dir || keep.has(dir)) return;
  keep.add(dir);
  const pkg = JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8'));
  for (const dep of Object.keys({ ...pkg.dependencies, ...pkg.optionalDependencies, ...pkg.peerDependencies })) walk(dep, dir);
}
for (const name of KEEP) walk(name, root);

function size(p) {
  const st = statSync(p, { throwIfNoEntry: false });
  if (!st) return 0;
  if (!st.isDirectory()) return st.size;
  return readdirSync(p).reduce((n, e) => n + size(path.join(p, e)), 0);
}

const modules = path.join(root, 'node_modules');
let removed = 0;
for (const entry of readdirSync(modules)) {
  if (entry === '.bin' || entry === '.package-lock.json') continue;
  const names = entry.startsWith('@') ? readdirSync(path.join(modules, entry)).map((s) => `${entry}/${s}`) : [entry];
  for (const name of names) {
    const dir = path.join(modules, name);
    if (keep.has(dir)) continue;
    removed += size(dir);
    if (!dryRun) rmSync(dir, { recursive: true, force: true });
  }
}
console.log(`${dryRun ? 'would remove' : 'removed'} ${(removed / 1e6).toFixed(1)} MB; kept ${keep.size} packages (${(size(modules) / 1e6).toFixed(1)} MB${dryRun ? ' before pruning' : ''})`);
