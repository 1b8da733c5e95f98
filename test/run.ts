// Runs every test/*.test.ts in its own Node process (two at a time: tests start real
// servers and tools), prints each file's output, then restates uvu's totals as the one
// closing line CI counts: "N passed, N failed". Exits non-zero on any failure.
import { spawn } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import pLimit from 'p-limit';

const testDir = import.meta.dirname;
const filter = process.argv[2] ? new RegExp(process.argv[2]) : undefined;
const files = readdirSync(testDir)
  .filter((name) => name.endsWith('.test.ts') && (!filter || filter.test(name)))
  .sort();
if (files.length === 0) {
  console.error(`no test files match ${filter ?? 'test/*.test.ts'}`);
  process.exit(1);
}

interface FileResult {
  file: string;
  output: string;
  code: number | null;
  passed: number;
  failed: number;
  skipped: number;
  seconds: number;
}

// A file that hangs fails after this long (tests assert what happened, not how fast it
// was on this machine: a hang is the only timing failure).
const fileTimeoutMs = Number(process.env.TEST_FILE_TIMEOUT ?? 900) * 1000;

function runFile(file: string): Promise<FileResult> {
  const started = performance.now();
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [join(testDir, file)], {
      env: { ...process.env, NO_COLOR: '1', FORCE_COLOR: '0' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const timer = setTimeout(() => {
      output += `\n${file}: still running after ${fileTimeoutMs / 1000} s (TEST_FILE_TIMEOUT): killed\n`;
      child.kill('SIGTERM');
      setTimeout(() => child.kill('SIGKILL'), 5000).unref();
    }, fileTimeoutMs);
    let output = '';
    child.stdout.setEncoding('utf8').on('data', (text: string) => (output += text));
    child.stderr.setEncoding('utf8').on('data', (text: string) => (output += text));
    child.on('close', (code) => {
      clearTimeout(timer);
      const total = Number(/Total:\s+(\d+)/.exec(output)?.[1] ?? NaN);
      const passed = Number(/Passed:\s+(\d+)/.exec(output)?.[1] ?? 0);
      const skipped = Number(/Skipped:\s+(\d+)/.exec(output)?.[1] ?? 0);
      // A file that died before uvu's summary counts as one failure, never as a pass.
      const failed = Number.isNaN(total) ? 1 : Math.max(total - passed - skipped, code === 0 ? 0 : 1);
      resolve({ file, output, code, passed, failed, skipped, seconds: (performance.now() - started) / 1000 });
    });
  });
}

const limit = pLimit(Number(process.env.TEST_JOBS ?? 2));
const results = await Promise.all(
  files.map((file) =>
    limit(async () => {
      const result = await runFile(file);
      const status = result.failed > 0 ? 'FAIL' : 'ok';
      process.stdout.write(`\n── ${file}: ${status} (${result.passed} passed, ${result.failed} failed, ${result.seconds.toFixed(1)} s)\n`);
      if (result.failed > 0 || process.env.TEST_VERBOSE) process.stdout.write(result.output);
      return result;
    }),
  ),
);

const passed = results.reduce((n, r) => n + r.passed, 0);
const failed = results.reduce((n, r) => n + r.failed, 0);
const skipped = results.reduce((n, r) => n + r.skipped, 0);
console.log(`\n${passed} passed, ${failed} failed${skipped > 0 ? `, ${skipped} skipped` : ''}`);
process.exit(failed > 0 ? 1 : 0);
