// The disk stage: fetch and images feed it (real fixture server and registry), mkfs.ext4
// builds it without root, debugfs reads it back without mounting. Two builds from two
// separate trees must be byte-identical.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, openSync, readFileSync, readSync, rmSync, statSync, writeSync, closeSync, copyFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { diskLabel, diskStage, verifyDisk, type DiskManifest } from '../tasks/disk.ts';
import { runStages } from '../tasks/lib/run/engine.ts';
import { fetchStage } from '../tasks/fetch.ts';
import { imagesStage } from '../tasks/images.ts';
import { startFixtureServer, type FixtureServer } from './fixtures/http-server.ts';
import { startRegistry, type RegistryFixture } from './fixtures/registry.ts';
import { buildUpstreamTree, type UpstreamTree } from './fixtures/upstream.ts';
import { fixtureMirrors, loud, makeWorkspace, projectImages, type Workspace } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-disk-'));
const version = 'v1.35.7';
let tree: UpstreamTree;
let server: FixtureServer;
let registry: RegistryFixture;
const workspaces: Workspace[] = [];

test.before(loud(async () => {
  tree = await buildUpstreamTree(join(work, 'upstream'), { qcow2SizeMiB: 1, kubernetesVersion: version });
  server = await startFixtureServer({ root: join(work, 'upstream') });
  registry = await startRegistry({
    images: projectImages(version),
    work,
  });
}));

test.after(async () => {
  await server?.close();
  await registry?.close();
  for (const ws of workspaces) rmSync(ws.dir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
});

function workspace(): Workspace {
  const ws = makeWorkspace(tree, server.url, {
    registries: fixtureMirrors(registry.host),
    images: registry.images.map((i) => `${i.name}:${i.tag}@${i.digest}`),
  });
  workspaces.push(ws);
  return ws;
}

const build = (ws: Workspace, overrides = {}) =>
  runStages(ws.context(overrides), [fetchStage, imagesStage, diskStage], { renderer: 'silent' });
const sha256 = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');
const debugfs = (image: string, request: string) => execFileSync('debugfs', ['-R', request, image], { stdio: ['ignore', 'pipe', 'ignore'], maxBuffer: 1 << 28 });

let first: Workspace;
let manifest: DiskManifest;

test('builds a labelled ext4 disk holding images, binaries, CNI plugins and a MANIFEST.json', async () => {
  first = workspace();
  await build(first);
  const image = join(first.outDir, 'image-disk.img');
  const stats = debugfs(image, 'stats').toString();
  assert.match(stats, new RegExp(`Filesystem volume name:\\s+${diskLabel}\\n`));
  manifest = JSON.parse(debugfs(image, 'cat /MANIFEST.json').toString()) as DiskManifest;
  const paths = manifest.files.map((f) => f.path);
  for (const path of ['bin/kubeadm', 'bin/kubelet', 'bin/kubectl', 'bin/crictl', 'bin/containerd', 'bin/containerd-shim-runc-v2', 'bin/runc', 'cni/bridge', 'images/index.json', 'images/oci-layout']) {
    assert.ok(paths.includes(path), `${path} on the disk`);
  }
  assert.is(manifest.files.find((f) => f.path === 'bin/kubelet')!.mode, 0o755);
  // The boot scripts the units run from the disk, executable, and the manifests.
  for (const script of ['install.sh', 'import-images.sh', 'control-plane-up.sh', 'worker-up.sh']) {
    assert.is(manifest.files.find((f) => f.path === `scripts/${script}`)?.mode, 0o755, `scripts/${script}`);
  }
  assert.ok(paths.includes('manifests/10-flannel.yaml'));
  assert.is(manifest.files.find((f) => f.path === 'images/index.json')!.mode, 0o644);
  // The kubelet on the disk is the fetched one, byte for byte.
  const kubelet = debugfs(image, 'cat /bin/kubelet');
  assert.is(createHash('sha256').update(kubelet).digest('hex'), tree.artifacts.kubelet!.sha256);
  assert.match(debugfs(image, 'stat /bin/kubelet').toString(), /Mode: {2}0755/);
  assert.match(debugfs(image, 'stat /bin/kubelet').toString(), /User: {5}0 +Group: {5}0/);
  // Sized from the content, with little to spare.
  const content = manifest.files.reduce((n, f) => n + f.size, 0);
  assert.ok(statSync(image).size < content * 1.3 + 4 * 1024 * 1024, `${statSync(image).size} bytes for ${content} of content`);
  assert.equal((await verifyDisk(image)).files, manifest.files);
});

test('the same inputs from another tree give a byte-identical disk', async () => {
  const second = workspace();
  await build(second);
  assert.is(sha256(join(second.outDir, 'image-disk.img')), sha256(join(first.outDir, 'image-disk.img')));
});

test('a disk whose content was changed after the build fails the read-back, naming the file', async () => {
  const image = join(first.outDir, 'image-disk.img');
  const copy = join(work, 'tampered.img');
  copyFileSync(image, copy);
  // Flip one byte inside the kubeadm stand-in's content, found by its text.
  const kubeadm = readFileSync(join(tree.root, tree.artifacts.kubeadm!.servedPath));
  const bytes = readFileSync(copy);
  const at = bytes.indexOf(kubeadm.subarray(0, 64));
  assert.ok(at > 0, 'the kubeadm bytes are on the disk');
  const fd = openSync(copy, 'r+');
  const one = Buffer.alloc(1);
  readSync(fd, one, 0, 1, at + 10);
  one[0] = one[0]! ^ 0xff;
  writeSync(fd, one, 0, 1, at + 10);
  closeSync(fd);
  try {
    await verifyDisk(copy);
    assert.unreachable('verifyDisk accepted a tampered disk');
  } catch (error) {
    assert.match((error as Error).message, /expected \/bin\/kubeadm: \d+ bytes, sha256 [0-9a-f]{64}\n {2}found {4}\d+ bytes, sha256 [0-9a-f]{64}/);
  }
});

test('a no-op rebuild does not touch the disk; a changed manifest rebuilds only the disk', async () => {
  const image = join(first.outDir, 'image-disk.img');
  const before = statSync(image);
  const report = await build(first);
  assert.equal(report.ran, []);
  assert.is(statSync(image).ino, before.ino);
});

test.run();
