#!/usr/bin/env node
/**
 * Runs the native-facing tests against an AddressSanitizer + UBSan build of the addon.
 *
 *   node scripts/asan.mjs [vitest args…]     (npm run test:asan)
 *
 * 1. Builds build-asan/Debug/epd_transfer.node (cmake-js, EPD_SANITIZE=ON).
 * 2. Runs vitest on test/engine, test/device, test/build/native-smoke.test.ts and the tcp tests (those that
 *    exist; or the paths/args given) with EPD_TRANSFER_ADDON pointing at that build and gcc's
 *    libasan/libubsan in LD_PRELOAD. Node is not instrumented, so the sanitizer runtime must be
 *    preloaded; every process of the run inherits it (vitest's forks, peers the tests spawn).
 * 3. Fails when vitest fails or when any process wrote a sanitizer report. ASan reports go to
 *    files (log_path), so one from a peer child whose stderr a test swallows still fails the
 *    run. UBSan reports cannot: gcc's separate libubsan ignores log_path once libasan is loaded,
 *    so they are found in the output only, and halt_on_error=1 makes the reporting process
 *    exit 1.
 *
 * Writes the vitest JSON report to .vitest-asan.json.
 */
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { cmakeBuild } from './cmake-build.mjs';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const NATIVE_TESTS = [
  'test/engine',
  'test/device',
  // vendor devices and transports (shared VendorDevice base, polling transports) against the C fakes.
  'test/vendor',
  'test/build/native-smoke.test.ts',
  // encoder-cache store: robust process-shared mutex, crash recovery, 4 GiB view windows.
  'test/ec',
  // tcp transport and link emulator: sockets, threads and frame parsing in C++ (about a minute).
  'test/tcp/transfer.test.ts',
  'test/tcp/faults.test.ts',
  'test/tcp/link.test.ts',
  // a prefill killed mid-push over tcp: its grant is revoked and its data connections cut (onPeerLost itself is in test/engine).
  'test/kv/prefill-lost.test.ts',
];
const REPORT_PATTERN = /ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer/;
export const ASAN_REPORT_FILE = '.vitest-asan.json';

/** gcc's runtime library `name` (libasan.so, libubsan.so), as the compiler that built the addon links it. */
function sanitizerRuntime(name) {
  const cxx = process.env.CXX || 'g++';
  const file = execFileSync(cxx, [`-print-file-name=${name}`], { encoding: 'utf8' }).trim();
  if (!path.isAbsolute(file) || !existsSync(file)) throw new Error(`${cxx} cannot find ${name} (install libasan/libubsan)`);
  return file;
}

function runVitest(args, env) {
  return new Promise((resolve, reject) => {
    const vitest = path.join(root, 'node_modules', 'vitest', 'vitest.mjs');
    const child = spawn(process.execPath, [vitest, 'run', ...args], { cwd: root, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (chunk) => {
      output += chunk;
      process.stdout.write(chunk);
    });
    child.stderr.on('data', (chunk) => {
      output += chunk;
      process.stderr.write(chunk);
    });
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code: code ?? 128, signal, output }));
  });
}

async function main() {
  const extra = process.argv.slice(2);
  const targets = extra.some((a) => !a.startsWith('-')) ? [] : NATIVE_TESTS.filter((p) => existsSync(path.join(root, p)));
  if (targets.length === 0 && extra.length === 0) throw new Error(`none of ${NATIVE_TESTS.join(', ')} exists`);

  const addon = await cmakeBuild({ sanitize: true });
  const logDir = mkdtempSync(path.join(os.tmpdir(), 'epd-asan-'));
  const logPath = path.join(logDir, 'report');
  const env = {
    ...process.env,
    EPD_TRANSFER_ADDON: addon,
    // libasan must come first in the library list; libubsan is then found already loaded.
    LD_PRELOAD: [sanitizerRuntime('libasan.so'), sanitizerRuntime('libubsan.so'), process.env.LD_PRELOAD].filter(Boolean).join(':'),
    // detect_leaks=0: node itself does not free everything at exit.
    ASAN_OPTIONS: [
      'detect_leaks=0',
      'halt_on_error=1',
      'detect_stack_use_after_return=1',
      'check_initialization_order=1',
      `log_path=${logPath}`,
      process.env.ASAN_OPTIONS,
    ].filter(Boolean).join(':'),
    UBSAN_OPTIONS: ['halt_on_error=1', 'print_stacktrace=1', `log_path=${logPath}`, process.env.UBSAN_OPTIONS].filter(Boolean).join(':'),
  };
  console.log(`asan: addon ${path.relative(root, addon)}; tests ${[...targets, ...extra].join(' ')}`);

  const args = [...targets, '--reporter=default', '--reporter=json', `--outputFile.json=${ASAN_REPORT_FILE}`, ...extra];
  const { code, signal, output } = await runVitest(args, env);

  const reports = readdirSync(logDir).map((f) => readFileSync(path.join(logDir, f), 'utf8'));
  rmSync(logDir, { recursive: true, force: true });
  for (const report of reports) process.stderr.write(`\n----- sanitizer report -----\n${report}`);
  const inOutput = REPORT_PATTERN.test(output);

  const problems = [];
  if (code !== 0) problems.push(`vitest exited with ${signal ?? code}`);
  if (reports.length) problems.push(`${reports.length} sanitizer report(s)`);
  if (inOutput) problems.push('sanitizer output in the test log');
  if (problems.length) {
    console.error(`asan: FAILED: ${problems.join('; ')}`);
    process.exit(1);
  }
  console.log('asan: no sanitizer reports');
}

main().catch((err) => {
  console.error(`asan: ${err.message}`);
  process.exit(1);
});
