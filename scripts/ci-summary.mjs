#!/usr/bin/env node
/**
 * Adds up vitest JSON reports and prints one line, `N passed, N failed`, last.
 *
 *   node scripts/ci-summary.mjs .vitest-report.json --step-failed .vitest-asan.json …
 *
 * A missing or unreadable report counts as one failure (its run died before writing it), and
 * so does a test file that failed without a failed test (it crashed or did not import), and a
 * report marked --step-failed whose tests all passed (e.g. a sanitizer report outside a test).
 * Exits 1 when anything failed or no test passed at all.
 */
import { readFileSync } from 'node:fs';

let passed = 0;
let failed = 0;
const args = process.argv.slice(2);
for (let i = 0; i < args.length; i++) {
  const stepFailed = args[i] === '--step-failed';
  const file = stepFailed ? args[++i] : args[i];
  let report;
  try {
    report = JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    console.error(`ci-summary: ${file}: no report (${err.code ?? err.message}); counted as 1 failure`);
    failed++;
    continue;
  }
  passed += report.numPassedTests;
  failed += report.numFailedTests;
  const before = failed;
  for (const suite of report.testResults ?? []) {
    if (suite.status === 'failed' && !suite.assertionResults?.some((t) => t.status === 'failed')) {
      console.error(`ci-summary: ${file}: ${suite.name} failed outside any test; counted as 1 failure`);
      failed++;
    }
  }
  if (stepFailed && report.numFailedTests === 0 && failed === before) {
    console.error(`ci-summary: ${file}: its step failed with every test passing; counted as 1 failure`);
    failed++;
  }
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed > 0 || passed === 0 ? 1 : 0);
