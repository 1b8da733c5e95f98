// The command line as users and the Makefile call it: usage, unknown tasks, preflight
// of system tools (`make deps`), exit codes.
import { mkdirSync, mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { hostFamily, installCommands, missingTools } from '../tasks/tools.ts';
import { runCli } from './helpers.ts';

const dir = mkdtempSync(join(tmpdir(), 'corekube-cli-'));
// A PATH with node and nothing else: every system tool is missing.
const bare = join(dir, 'bin');
mkdirSync(bare);
symlinkSync(process.execPath, join(bare, 'node'));

test('--help lists every task and the variables', async () => {
  const result = await runCli(['--help']);
  assert.is(result.code, 0);
  assert.match(result.stdout, /fetch\s+downloads every artifact in the lock/);
  assert.match(result.stdout, /--offline .*\[OFFLINE=1\]/);
});

test('an unknown task is a usage error naming the known ones', async () => {
  const result = await runCli(['frobnicate']);
  assert.is(result.code, 2);
  assert.match(result.stderr, /unknown task "frobnicate": the tasks are fetch/);
});

test('deps names the missing tools with the install command for Debian/Ubuntu and Fedora', async () => {
  const result = await runCli(['deps', 'fetch'], { env: { PATH: bare } });
  assert.is(result.code, 0, result.stderr);
  assert.match(result.stdout, /missing: xz/);
  assert.match(result.stdout, /Debian\/Ubuntu: sudo apt-get install -y xz-utils/);
  assert.match(result.stdout, /Fedora: +sudo dnf install -y xz/);
});

test('deps says so when everything is there', async () => {
  const result = await runCli(['deps', 'fetch']);
  assert.is(result.code, 0);
  assert.match(result.stdout, /every tool fetch needs is installed/);
});

test('install commands are deduplicated and sorted; the host family comes from os-release', () => {
  assert.equal(installCommands(['debugfs', 'mkfs.ext4', 'xz']), {
    debian: 'sudo apt-get install -y e2fsprogs xz-utils',
    fedora: 'sudo dnf install -y e2fsprogs xz',
  });
  assert.equal(missingTools(['xz', 'vde_switch', 'xz'], bare).includes('xz'), true);
  assert.is(hostFamily({ ID: 'ubuntu', ID_LIKE: 'debian' }), 'debian');
  assert.is(hostFamily({ ID: 'fedora' }), 'fedora');
  assert.is(hostFamily({ ID: 'rocky', ID_LIKE: 'rhel centos fedora' }), 'fedora');
  assert.is(hostFamily({ ID: 'arch' }), undefined);
});

test('a missing config file is a config error that says how to make one', async () => {
  const result = await runCli(['fetch', '--config', join(dir, 'none.yaml'), '--out', join(dir, 'out')]);
  assert.is(result.code, 3);
  assert.match(result.stderr, /none\.yaml: no such file\. Copy the example/);
});

test.after(() => rmSync(dir, { recursive: true, force: true }));
test.run();
