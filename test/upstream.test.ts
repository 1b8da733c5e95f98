import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { InputError } from '../tasks/lib/errors.ts';
import { parseChecksumFile, parseFcosStream } from '../tasks/lib/inputs/upstream.ts';

// Real FCOS stream metadata (test/fixtures/upstream-samples: coreos/stream-metadata-go's fixtures, Apache-2.0).
const samples = join(import.meta.dirname, 'fixtures', 'upstream-samples');
const stream = JSON.parse(readFileSync(join(samples, 'fcos-stream.json'), 'utf8'));

test('the qemu disk of a real stream document', () => {
  const disk = parseFcosStream('stable.json', stream, 'x86_64');
  assert.is(disk.release, '33.20201201.3.0');
  assert.is(
    disk.location,
    'https://builds.coreos.fedoraproject.org/prod/streams/stable/builds/33.20201201.3.0/x86_64/fedora-coreos-33.20201201.3.0-qemu.x86_64.qcow2.xz',
  );
  assert.match(disk.sha256, /^a7e93e32665086d4a07a14dbe6c1251774/);
  assert.is(disk.uncompressedSha256, undefined, 'this older document has no uncompressed-sha256, and that is fine');
  assert.match(disk.signature ?? '', /\.qcow2\.xz\.sig$/);
});

test('uncompressed-sha256 is read when present', () => {
  const copy = structuredClone(stream);
  copy.architectures.x86_64.artifacts.qemu.formats['qcow2.xz'].disk['uncompressed-sha256'] = 'c'.repeat(64);
  assert.is(parseFcosStream('stable.json', copy, 'x86_64').uncompressedSha256, 'c'.repeat(64));
});

test('a stream without the requested architecture names what it has', () => {
  try {
    parseFcosStream('stable.json', stream, 'aarch64');
    assert.unreachable();
  } catch (error) {
    assert.instance(error, InputError);
    const problem = (error as InputError).problems[0]!;
    assert.is(problem.path, 'architectures.aarch64');
    assert.is(problem.found, 'only x86_64');
  }
});

test('a malformed disk entry names the field path', () => {
  const copy = structuredClone(stream);
  copy.architectures.x86_64.artifacts.qemu.formats['qcow2.xz'].disk.sha256 = 'nope';
  try {
    parseFcosStream('stable.json', copy, 'x86_64');
    assert.unreachable();
  } catch (error) {
    assert.equal((error as InputError).problems.map((p) => p.path), ['architectures.x86_64.artifacts.qemu.formats["qcow2.xz"].disk.sha256']);
  }
});

test('checksum files in upstream formats', () => {
  const h = 'ab'.repeat(32);
  assert.is(parseChecksumFile('kubeadm.sha256', h, 'kubeadm'), h, 'dl.k8s.io: bare digest, no newline');
  assert.is(parseChecksumFile('crictl.sha256', `${h}\n`, 'crictl-v1.36.0-linux-amd64.tar.gz'), h, 'crictl: bare digest and newline');
  assert.is(parseChecksumFile('cni.sha256', `${h}  cni-plugins-linux-amd64-v1.9.1.tgz\n`, 'cni-plugins-linux-amd64-v1.9.1.tgz'), h);
  const runc = `${'11'.repeat(32)}  runc.arm64\n${h}  runc.amd64\n${'22'.repeat(32)} *libseccomp.tar.gz\n`;
  assert.is(parseChecksumFile('runc.sha256sum', runc, 'runc.amd64'), h, 'a multi-file list');
  assert.is(parseChecksumFile('x', h.toUpperCase(), 'x'), h);
  assert.throws(() => parseChecksumFile('runc.sha256sum', runc, 'runc.ppc64le'), /a sha256 for runc\.ppc64le.*found digests for runc\.arm64, runc\.amd64, libseccomp/s);
  assert.throws(() => parseChecksumFile('x.sha256', '<html>404</html>', 'x'), /expected a sha256 for x/);
});

test.run();
