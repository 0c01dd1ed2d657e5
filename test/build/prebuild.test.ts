// The package must work from prebuilds/ alone (what `npm install` of a published tarball
// loads): a child with PREBUILDS_ONLY=1, which makes node-gyp-build ignore build/, imports
// the compiled package and moves bytes. `npm run prebuild` makes the prebuild; without
// one these tests skip, unless EPD_REQUIRE_PREBUILD=1 (.ci/run sets it) makes that a failure.
import { execFile } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';

const run = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const prebuildDir = path.join(root, 'prebuilds', `${process.platform}-${process.arch}`);
const prebuilds = existsSync(prebuildDir) ? readdirSync(prebuildDir).filter((f) => f.endsWith('.node')) : [];
const required = process.env.EPD_REQUIRE_PREBUILD === '1';
const skip = prebuilds.length === 0 && !required;
if (skip) console.warn(`SKIPPED prebuild tests: nothing in ${path.relative(root, prebuildDir)}/ (run \`npm run prebuild\`)`);

const transferScript = (entry: string) => `
  const { TransferEngine } = await import(${JSON.stringify(entry)});
  const engine = await TransferEngine.open();
  const src = engine.allocate(1 << 16);
  const dst = engine.allocate(1 << 16);
  src.buffer.fill(0xa5);
  const self = await engine.connect(engine.address);
  const result = await engine.write(self, [{ localRegion: src, localOffset: 0, remoteRegion: dst.id, remoteOffset: 0, length: 1 << 16 }]);
  const same = dst.buffer.equals(src.buffer);
  const addon = engine.capabilities().addon;
  await engine.close();
  console.log(JSON.stringify({ addon, bytes: result.bytes, same }));`;

describe.skipIf(skip)('prebuilds/ alone', () => {
  it(`has a prebuild for ${process.platform}-${process.arch}`, () => {
    expect(prebuilds, `no .node file in ${prebuildDir}: run \`npm run prebuild\``).not.toHaveLength(0);
  });

  it('loads the prebuild with PREBUILDS_ONLY=1 and moves bytes through it', async () => {
    const entry = path.join(root, 'dist/lib/index.js');
    expect(existsSync(entry), `${entry} is missing: run \`npm run build:ts\``).toBe(true);
    const env: NodeJS.ProcessEnv = { ...process.env, PREBUILDS_ONLY: '1' };
    delete env.EPD_TRANSFER_ADDON;
    const { stdout } = await run(process.execPath, ['--input-type=module', '-e', transferScript(pathToFileURL(entry).href)], { cwd: root, env });
    const result = JSON.parse(stdout) as { addon: string; bytes: number; same: boolean };
    expect(path.dirname(result.addon)).toBe(prebuildDir);
    expect(result).toMatchObject({ bytes: 1 << 16, same: true });
  });
});
