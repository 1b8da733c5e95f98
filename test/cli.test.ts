// The command line as users and the Makefile call it: usage, unknown tasks, preflight
// of system tools (`make deps`), exit codes.
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { hostFamily, installCommands, missingTools } from '../tasks/lib/run/tools.ts';
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
  assert.match(result.stderr, /unknown task "frobnicate": the tasks are pin, fetch, images, pki, disk, ignition, boot, verify/);
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

test('make test on a system that is neither Debian nor Fedora: one message naming every missing tool and the install commands, exit 4', async () => {
  const osRelease = join(dir, 'os-release');
  writeFileSync(osRelease, 'ID=arch\nNAME="Arch Linux"\n');
  const result = await runCli(['deps', '--test', '--install'], { env: { PATH: bare, COREKUBE_OS_RELEASE: osRelease } });
  assert.is(result.code, 4, result.stderr);
  assert.not.match(result.stderr, /\bat \w+ \(|node:internal/, 'no stack trace');
  for (const tool of ['skopeo', 'docker-registry', 'umoci', 'qemu-img', 'ignition-validate', 'shellcheck']) assert.match(result.stderr, `  ${tool} (`);
  assert.match(result.stderr, /neither a Debian\/Ubuntu nor a Fedora system/);
  assert.match(result.stderr, /Debian\/Ubuntu: sudo apt-get install -y .*docker-registry.*skopeo/);
  assert.match(result.stderr, /Fedora: +sudo dnf install -y .*skopeo/);
  assert.match(result.stderr, /or run: make test/);
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
test('cluster with no lock yet pins first (shown by --dry-run), then builds from the lock pin writes', async () => {
  const work = mkdtempSync(join(dir, 'nolock-'));
  writeFileSync(join(work, 'key.pub'), 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGNvcmVrdWJldGVzdGtleQ test@corekube\n');
  writeFileSync(join(work, 'cluster.yaml'), 'name: demo\nkubernetes: {version: v1.35.7}\nnodes:\n  - {name: cp1, role: control-plane, ip: 10.77.0.10}\nsshPublicKeyFile: key.pub\n');
  const args = ['--config', join(work, 'cluster.yaml'), '--lock', join(work, 'corekube.lock.yaml'), '--out', join(work, 'out'), '--cache', join(work, 'cache')];
  const result = await runCli(['cluster', '--dry-run', ...args]);
  assert.is(result.code, 0, result.stderr);
  assert.match(result.stdout, /no lock yet \(.*corekube\.lock\.yaml\): pinning from upstream first/);
  assert.match(result.stdout, /pin/);
  assert.match(result.stdout, /then, once pin has written the lock: fetch, images, pki, disk, ignition, boot, verify/);
  // Offline there is no upstream to pin from: the missing lock is the error, saying how to make one.
  const offline = await runCli(['cluster', '--offline', ...args]);
  assert.is(offline.code, 3);
  assert.match(offline.stderr, /no lock file.*make pin/s);
});

test.run();
