#!/usr/bin/env node
/**
 * Developer build of the addon with cmake-js, offline.
 *
 *   node scripts/cmake-build.mjs              Release  -> build-cmake/Release/epd_transfer.node
 *   node scripts/cmake-build.mjs --sanitize   ASan+UBSan Debug -> build-asan/Debug/epd_transfer.node
 *   add --clean to start from an empty build folder.
 *
 * cmake-js downloads node headers from nodejs.org unless its "dist" directory already holds
 * them. We point that directory (cmake-js `runtimeDirectory`, which it also takes from
 * `npm_config_nodedir`) at the headers installed beside this node, and refuse to go on when
 * they are missing, so no build ever reaches the network.
 */
import { existsSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(path.join(root, 'package.json'));

/** Where each flavour is built and where its addon ends up. */
export function cmakeLayout(sanitize = false) {
  const out = path.join(root, sanitize ? 'build-asan' : 'build-cmake');
  const config = sanitize ? 'Debug' : 'Release';
  return { out, config, addon: path.join(out, config, 'epd_transfer.node') };
}

/**
 * The node "dist" folder with include/node/node_api.h: npm_config_nodedir when set, else the
 * prefix this node runs from (/usr for /usr/bin/node).
 */
export function localNodeDir() {
  const candidates = [process.env.npm_config_nodedir, path.resolve(path.dirname(process.execPath), '..')];
  for (const dir of candidates) {
    if (dir && existsSync(path.join(dir, 'include', 'node', 'node_api.h'))) return path.resolve(dir);
  }
  throw new Error(
    `no local node headers (include/node/node_api.h) under ${candidates.filter(Boolean).join(' or ')}; ` +
      'set npm_config_nodedir to a node install that has them (this build never downloads headers)',
  );
}

/** Builds one flavour and returns the path of the addon. */
export async function cmakeBuild({ sanitize = false, clean = false } = {}) {
  const { out, config, addon } = cmakeLayout(sanitize);
  const nodedir = localNodeDir();
  // cmake-js's BuildSystem replaces runtimeDirectory with npm_config_nodedir whenever any
  // npm_config_* variable is set (always so under `npm run`), so set both.
  process.env.npm_config_nodedir = nodedir;
  const { BuildSystem, Dist } = require('cmake-js');
  const options = {
    directory: root,
    out,
    config,
    runtimeDirectory: nodedir,
    parallel: os.availableParallelism(),
    cMakeOptions: { EPD_SANITIZE: sanitize ? 'ON' : 'OFF' },
  };
  if (!new Dist({ ...options }).downloaded) {
    throw new Error(`cmake-js does not accept the headers in ${nodedir}; refusing to let it download them`);
  }
  if (clean) rmSync(out, { recursive: true, force: true });
  await new BuildSystem(options).build();
  if (!existsSync(addon)) throw new Error(`cmake-js finished but ${addon} is missing`);
  return addon;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const args = process.argv.slice(2);
  const unknown = args.filter((a) => a !== '--sanitize' && a !== '--clean');
  if (unknown.length) {
    console.error(`usage: node scripts/cmake-build.mjs [--sanitize] [--clean]  (unknown: ${unknown.join(' ')})`);
    process.exit(2);
  }
  try {
    const addon = await cmakeBuild({ sanitize: args.includes('--sanitize'), clean: args.includes('--clean') });
    console.log(`built ${path.relative(process.cwd(), addon)}`);
  } catch (err) {
    console.error(`cmake-build: ${err.message}`);
    process.exit(1);
  }
}
