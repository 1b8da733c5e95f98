// Runs every test/*.test.ts in its own Node process (two at a time: tests start real
// servers and tools), prints each file's output, then restates uvu's totals as the one
// closing line CI counts: "N passed, N failed". Exits non-zero on any failure.
//
// Whatever a test file starts ends with it, however the file ends (passed, failed, crashed,
// killed at TEST_FILE_TIMEOUT, or the runner interrupted): each file runs in its own
// process group and with a variable of its own in its environment,
// COREKUBE_TEST_FILE_<random>=<file>, which every descendant inherits, including daemons
// that left the group with setsid() (QEMU -daemonize, vde_switch -d). When the file ends
// the runner kills its group and every process whose /proc/PID/environ carries that
// variable (the way Jenkins' ProcessTreeKiller finds a build's leftovers). No privileges,
// no cgroups: it works wherever /proc does, for the user who runs the tests.
//
// TEST_DIR runs the *.test.ts of another directory (the runner's own test uses it).
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import pLimit from 'p-limit';

const testDir = process.env.TEST_DIR ? resolve(process.env.TEST_DIR) : import.meta.dirname;
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
const fileTimeoutMs = Number(process.env.TEST_FILE_TIMEOUT ?? 1800) * 1000;

/** The processes whose environment carries `marker` (NAME=value), with their command lines. */
function processesMarked(marker: string): { pid: number; command: string }[] {
  const found: { pid: number; command: string }[] = [];
  const needle = Buffer.from(`\0${marker}\0`);
  for (const entry of readdirSync('/proc')) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    try {
      const environ = Buffer.concat([Buffer.from([0]), readFileSync(`/proc/${pid}/environ`)]);
      if (environ.indexOf(needle) < 0) continue;
      found.push({ pid, command: readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ').trim().slice(0, 100) });
    } catch {
      // gone, or not ours to read
    }
  }
  return found;
}

/** Kills a file's process group and every process that carries its marker, until none is left. */
function sweep(run: { pid: number | undefined; marker: string }): string[] {
  const killed = new Map<number, string>();
  if (run.pid) {
    try {
      process.kill(-run.pid, 'SIGKILL');
    } catch {
      // the group is gone already
    }
  }
  const deadline = Date.now() + 10_000;
  for (;;) {
    // A zombie keeps its pid but not its environment: it is not found, as it should be.
    const left = processesMarked(run.marker);
    if (left.length === 0 || Date.now() > deadline) break;
    for (const { pid, command } of left) {
      if (pid === run.pid) continue; // the file itself: its group was killed, it is being reaped
      try {
        process.kill(pid, 'SIGKILL');
        killed.set(pid, command);
      } catch {
        // gone meanwhile
      }
    }
    if (left.every(({ pid }) => pid === run.pid)) break;
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 20); // let the killed ones go
  }
  return [...killed].map(([pid, command]) => `${pid} ${command}`);
}

/** The files running now: the runner sweeps them when it is interrupted. */
const active = new Set<{ pid: number | undefined; marker: string; file: string }>();

function runFile(file: string): Promise<FileResult> {
  const started = performance.now();
  const variable = `COREKUBE_TEST_FILE_${randomBytes(8).toString('hex')}`;
  return new Promise((resolve) => {
    // detached: its own process group, so the file and its ordinary children die together.
    const child = spawn(process.execPath, [join(testDir, file)], {
      env: { ...process.env, NO_COLOR: '1', FORCE_COLOR: '0', [variable]: file },
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
    });
    const run = { pid: child.pid, marker: `${variable}=${file}`, file };
    active.add(run);
    const timer = setTimeout(() => {
      output += `\n${file}: still running after ${fileTimeoutMs / 1000} s (TEST_FILE_TIMEOUT): killed\n`;
      try {
        process.kill(-child.pid!, 'SIGTERM');
      } catch {
        // gone
      }
      // Whatever survived SIGTERM: the file itself too, so that 'close' below comes.
      setTimeout(() => active.has(run) && sweep(run), 5000).unref();
    }, fileTimeoutMs);
    let output = '';
    child.stdout.setEncoding('utf8').on('data', (text: string) => (output += text));
    child.stderr.setEncoding('utf8').on('data', (text: string) => (output += text));
    child.on('close', (code) => {
      clearTimeout(timer);
      const leftovers = sweep(run);
      active.delete(run);
      if (leftovers.length > 0) output += `\n${file}: left ${leftovers.length} process(es) running when it ended, killed:\n${leftovers.map((l) => `  ${l}`).join('\n')}\n`;
      const total = Number(/Total:\s+(\d+)/.exec(output)?.[1] ?? NaN);
      const passed = Number(/Passed:\s+(\d+)/.exec(output)?.[1] ?? 0);
      const skipped = Number(/Skipped:\s+(\d+)/.exec(output)?.[1] ?? 0);
      // A file that died before uvu's summary counts as one failure, never as a pass.
      const failed = Number.isNaN(total) ? 1 : Math.max(total - passed - skipped, code === 0 ? 0 : 1);
      resolve({ file, output, code, passed, failed, skipped, seconds: (performance.now() - started) / 1000 });
    });
  });
}

// Ctrl-C (or a kill) of the runner: the test files run in their own groups, so the signal
// reaches only the runner; it takes everything each running file started down with it.
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.on(signal, () => {
    for (const run of active) {
      const killed = sweep(run);
      process.stdout.write(`\n── ${run.file}: interrupted (${signal}); killed its processes${killed.length > 0 ? `: ${killed.join('; ')}` : ''}\n`);
    }
    process.exit(130);
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
