// The test runner (test/run.ts) takes down whatever a test file started, however the file
// ends: a real QEMU started with -daemonize and a real vde_switch with -d (both leave the
// file's process group through setsid), and an ordinary child, from a fixture file
// (test/fixtures/runner/leaky.test.ts) that hangs until TEST_FILE_TIMEOUT, crashes,
// passes, or whose runner gets Ctrl-C (SIGINT). Checked by pid afterwards.
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { processRunning } from '../tasks/boot.ts';
import { waitFor } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-runner-'));
const seen: number[] = [];
test.after(() => {
  // Should the runner fail at its job, this file must not leak in turn.
  for (const pid of seen) if (processRunning(pid)) process.kill(pid, 'SIGKILL');
  rmSync(work, { recursive: true, force: true });
});

interface Pids {
  qemu: number;
  switch: number;
  sleeper: number;
}

function startRunner(name: string, env: Record<string, string>) {
  const dir = join(work, name);
  mkdirSync(dir);
  const runner = spawn(process.execPath, [join(import.meta.dirname, 'run.ts')], {
    env: { ...process.env, TEST_DIR: join(import.meta.dirname, 'fixtures', 'runner'), TEST_VERBOSE: '1', LEAK_DIR: dir, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let text = '';
  runner.stdout.setEncoding('utf8').on('data', (t: string) => (text += t));
  runner.stderr.setEncoding('utf8').on('data', (t: string) => (text += t));
  const ended = new Promise<number | null>((resolve) => runner.on('close', (code) => resolve(code)));
  const pidsFile = join(dir, 'pids.json');
  const pids = (): Pids => {
    assert.ok(existsSync(pidsFile), `the fixture never started its processes:\n${text}`);
    const value = JSON.parse(readFileSync(pidsFile, 'utf8')) as Pids;
    seen.push(value.qemu, value.switch, value.sleeper);
    return value;
  };
  return { runner, output: () => text, ended, pids, started: () => existsSync(pidsFile) };
}

function assertAllGone(pids: Pids, output: string) {
  for (const [what, pid] of Object.entries(pids)) assert.not.ok(processRunning(pid), `${what} (pid ${pid}) is still running\n${output}`);
}

test('a file killed at TEST_FILE_TIMEOUT takes its QEMU, vde_switch and children with it', async () => {
  const run = startRunner('timeout', { LEAK_MODE: 'hang', TEST_FILE_TIMEOUT: '10' });
  const code = await run.ended;
  const pids = run.pids();
  assert.is(code, 1);
  assert.match(run.output(), /still running after 10 s \(TEST_FILE_TIMEOUT\): killed/);
  assertAllGone(pids, run.output());
});

test('a file that crashes leaves nothing running; the runner names what it killed', async () => {
  const run = startRunner('crash', { LEAK_MODE: 'crash' });
  const code = await run.ended;
  const pids = run.pids();
  assert.is(code, 1);
  assert.match(run.output(), /crashed on purpose/);
  assert.match(run.output(), /left \d process\(es\) running when it ended, killed:/);
  assert.match(run.output(), new RegExp(`${pids.qemu} .*qemu-system`));
  assert.match(run.output(), new RegExp(`${pids.switch} .*vde_switch`));
  assertAllGone(pids, run.output());
});

test('a file that passes but leaks: its processes are killed all the same', async () => {
  const run = startRunner('pass', { LEAK_MODE: 'pass' });
  const code = await run.ended;
  const pids = run.pids();
  assert.is(code, 0, run.output());
  assert.match(run.output(), /1 passed, 0 failed/);
  assertAllGone(pids, run.output());
});

test('Ctrl-C of the runner (SIGINT) takes down everything the running file started', async () => {
  const run = startRunner('sigint', { LEAK_MODE: 'hang', TEST_FILE_TIMEOUT: '900' });
  await waitFor(run.started, 60_000, 'the fixture to start its processes');
  const pids = run.pids();
  for (const pid of Object.values(pids)) assert.ok(processRunning(pid), `pid ${pid} runs before the interrupt`);
  run.runner.kill('SIGINT');
  const code = await run.ended;
  assert.is(code, 130);
  assert.match(run.output(), /leaky\.test\.ts: interrupted \(SIGINT\); killed its processes/);
  assertAllGone(pids, run.output());
});

test.run();
