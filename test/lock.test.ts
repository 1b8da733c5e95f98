import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { parseConfig } from '../tasks/lib/inputs/config.ts';
import { InputError, UserError } from '../tasks/lib/errors.ts';
import { artifactFileName, artifactKeys, checkLockMatchesConfig, loadLock, parseImageRef, parseLock, storedSha256 } from '../tasks/lib/inputs/lock.ts';

const a = 'a'.repeat(64);
const b = 'b'.repeat(64);
const artifactsYaml = artifactKeys
  .map((key) =>
    key === 'fcos-qemu'
      ? `  fcos-qemu:\n    url: https://builds.coreos.fedoraproject.org/prod/streams/stable/builds/43.20260802.3.1/x86_64/fedora-coreos-43.20260802.3.1-qemu.x86_64.qcow2.xz\n    sha256: ${a}\n    uncompressedSha256: ${b}`
      : `  ${key}:\n    url: https://dl.k8s.io/release/v1.35.7/bin/linux/amd64/${key}\n    sha256: ${a}`,
  )
  .join('\n');
const valid = `lockVersion: 1
fcos: {stream: stable, release: 43.20260802.3.1, arch: x86_64}
kubernetes: {version: v1.35.7}
artifacts:
${artifactsYaml}
images:
  - registry.k8s.io/pause:3.10.1@sha256:${a}
  - 127.0.0.1:5000/corekube/app:v1@sha256:${b}
`;

function problemPaths(text: string): string[] {
  try {
    parseLock('corekube.lock.yaml', text);
  } catch (error) {
    if (error instanceof InputError) return error.problems.map((p) => p.path);
    throw error;
  }
  assert.unreachable('the lock should have been refused');
  return [];
}

test('a valid lock parses into typed artifacts and images', () => {
  const lock = parseLock('corekube.lock.yaml', valid);
  assert.is(lock.fcos.release, '43.20260802.3.1');
  assert.is(lock.artifacts['fcos-qemu'].uncompressedSha256, b);
  assert.is(storedSha256(lock.artifacts['fcos-qemu']), b, 'the cache keeps the decompressed image');
  assert.is(storedSha256(lock.artifacts.kubeadm), a);
  assert.is(artifactFileName(lock.artifacts['fcos-qemu']), 'fedora-coreos-43.20260802.3.1-qemu.x86_64.qcow2');
  assert.is(artifactFileName(lock.artifacts.kubelet), 'kubelet');
  assert.equal(lock.images[1], { name: '127.0.0.1:5000/corekube/app', tag: 'v1', digest: `sha256:${b}`, layoutDigest: `sha256:${b}`, text: `127.0.0.1:5000/corekube/app:v1@sha256:${b}` });
});

test('an .xz artifact without its uncompressed sha256 is refused', () => {
  assert.equal(problemPaths(valid.replace(`    uncompressedSha256: ${b}\n`, '')), ['artifacts.fcos-qemu.uncompressedSha256']);
});

test('a missing artifact, a bad checksum and an unknown key are named', () => {
  const paths = problemPaths(
    valid.replace(/  runc:\n.*\n.*\n/, '').replace(`kubelet\n    sha256: ${a}`, 'kubelet\n    sha256: ABC').replace('lockVersion: 1', 'lockVersion: 1\nextra: 1'),
  );
  assert.equal(paths.sort(), ['artifacts.kubelet.sha256', 'artifacts.runc', 'extra']);
});

test('images must be name:tag@sha256 and unique per name:tag', () => {
  assert.equal(problemPaths(valid.replace(`pause:3.10.1@sha256:${a}`, 'pause:3.10.1')), ['images[0]']);
  assert.equal(problemPaths(valid.replace(`pause:3.10.1@sha256:${a}`, `pause@sha256:${a}`)), ['images[0]']);
  assert.equal(problemPaths(`${valid}  - registry.k8s.io/pause:3.10.1@sha256:${b}\n`), ['images[2]']);
  assert.is(parseImageRef(`ghcr.io/flannel-io/flannel:v0.28.9@sha256:${a}`)?.name, 'ghcr.io/flannel-io/flannel');
  assert.is(parseImageRef(`Registry.k8s.io/pause:3@sha256:${a}`), undefined);
});

test('a lock pinned for another cluster.yaml is refused, naming both sides', () => {
  const dir = mkdtempSync(join(tmpdir(), 'corekube-lock-'));
  writeFileSync(join(dir, 'k.pub'), 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx0ZXN0 t\n');
  const config = (version: string, arch = 'x86_64') =>
    parseConfig(
      join(dir, 'cluster.yaml'),
      `name: x\nfcos: {arch: ${arch}}\nkubernetes: {version: ${version}}\nnodes: [{name: a, role: control-plane, ip: 10.77.0.2}]\nsshPublicKeyFile: k.pub\n`,
    );
  const lock = parseLock('corekube.lock.yaml', valid);
  checkLockMatchesConfig(lock, config('v1.35.7'));
  checkLockMatchesConfig(lock, config('v1.35'));
  try {
    checkLockMatchesConfig(lock, config('v1.36', 'aarch64'));
    assert.unreachable();
  } catch (error) {
    assert.instance(error, InputError);
    const problems = (error as InputError).problems;
    assert.equal(problems.map((p) => p.path), ['fcos.arch', 'kubernetes.version']);
    assert.match(problems[1]!.expected, /a v1\.36\.x release/);
    assert.is(problems[1]!.found, 'v1.35.7');
    assert.match((error as Error).message, /re-pin/);
  }
  rmSync(dir, { recursive: true, force: true });
});

test('a missing lock says how to create one', () => {
  try {
    loadLock('/nonexistent/corekube.lock.yaml');
    assert.unreachable();
  } catch (error) {
    assert.instance(error, UserError);
    assert.match((error as Error).message, /no lock file.*make pin/s);
  }
});

test.run();
