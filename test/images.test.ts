// The images stage against a real registry (Debian's docker-registry on 127.0.0.1,
// seeded with small real images built in the test) and a real containerd importing
// the result the way a node does at boot.
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { runStages } from '../tasks/lib/run/engine.ts';
import { OfflineError, UserError } from '../tasks/lib/errors.ts';
import { imagesStage, kubeadmImages, refsOf } from '../tasks/images.ts';
import { parseImageRef } from '../tasks/lib/inputs/lock.ts';
import { findRef, readIndex, refOf } from '../tasks/lib/store/oci.ts';
import { startContainerd, type ContainerdFixture } from './fixtures/containerd.ts';
import { startRegistry, type RegistryFixture, type SeededImage } from './fixtures/registry.ts';
import { buildUpstreamTree, type UpstreamTree } from './fixtures/upstream.ts';
import { fixtureMirrors, lockEntry, loud, makeWorkspace, projectImages, type Workspace, type WorkspaceOptions } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-images-'));
const version = 'v1.35.7';
const wanted = [
  ...projectImages(version),
  { name: 'docker.io/flannel/flannel', tag: 'v0.27.0', multiArch: true },
  { name: 'docker.io/library/busybox', tag: '1.37' },
];
let tree: UpstreamTree;
let registry: RegistryFixture;
const workspaces: Workspace[] = [];

test.before(loud(async () => {
  tree = await buildUpstreamTree(join(work, 'upstream'), { qcow2SizeMiB: 1, kubernetesVersion: version });
  registry = await startRegistry({ images: wanted, work });
}));

test.after(async () => {
  await registry?.close();
  for (const ws of workspaces) rmSync(ws.dir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
});

function workspace(options: WorkspaceOptions = {}): Workspace {
  const ws = makeWorkspace(tree, 'http://127.0.0.1:9', {
    registries: fixtureMirrors(registry.host),
    images: registry.images.map((image) => lockEntry(image)),
    ...options,
  });
  workspaces.push(ws);
  return ws;
}

const settingsForTests = { http: { retries: 1, stallTimeoutMs: 1500, backoffMs: 20 } };

async function imagesIn(ws: Workspace, overrides = {}) {
  return runStages(ws.context({ ...settingsForTests, ...overrides }), [imagesStage], { renderer: 'silent' });
}

async function imagesError(ws: Workspace, overrides = {}): Promise<Error> {
  try {
    await imagesIn(ws, overrides);
  } catch (error) {
    return error as Error;
  }
  throw new Error('the images stage succeeded where it should have failed');
}

const seeded = (name: string) => registry.images.find((i) => i.name === name)!;
const blobsIn = (layout: string) => readdirSync(join(layout, 'blobs', 'sha256')).sort();

function uniqueBlobs(images: readonly SeededImage[], layout: string): Set<string> {
  const blobs = new Set<string>();
  for (const image of images) {
    const manifest = JSON.parse(readFileSync(join(layout, 'blobs', 'sha256', image.storedDigest.slice(7)), 'utf8')) as {
      config: { digest: string };
      layers: { digest: string }[];
    };
    for (const digest of [image.storedDigest, manifest.config.digest, ...manifest.layers.map((l) => l.digest)]) blobs.add(digest.slice(7));
  }
  return blobs;
}

let shared: Workspace;

test('copies every pinned image into one layout, shared blobs once, named as the kubelet asks', async () => {
  shared = workspace();
  const before = registry.requestCount();
  await imagesIn(shared);
  assert.ok(registry.requestCount() > before, 'the registry served the copies');
  const layout = join(shared.outDir, 'images');
  const index = readIndex(layout);
  for (const image of registry.images) {
    const ref = parseImageRef(`${image.name}:${image.tag}@${image.digest}`)!;
    for (const name of refsOf({ ...ref, layoutDigest: image.storedDigest })) {
      assert.is(findRef(index, name)?.digest, image.storedDigest, `${name} points at the ${image.name} manifest`);
    }
  }
  assert.is(index.manifests.length, registry.images.length * 2 + 1, 'tag + digest refs, and the index digest for the multi-arch image');
  // Every image shares the base layer: it is there once, and nothing else is.
  assert.equal(blobsIn(layout), [...uniqueBlobs(registry.images, layout)].sort());
  const baseLayer = seeded('registry.k8s.io/pause').layers[0]!;
  assert.ok(registry.images.every((i) => i.layers.includes(baseLayer)));
  // Only the cluster's architecture came out of the multi-arch index.
  const flannel = seeded('docker.io/flannel/flannel');
  assert.is.not(flannel.storedDigest, flannel.digest);
  const config = JSON.parse(readFileSync(join(layout, 'blobs', 'sha256', JSON.parse(readFileSync(join(layout, 'blobs', 'sha256', flannel.storedDigest.slice(7)), 'utf8')).config.digest.slice(7)), 'utf8'));
  assert.is(config.architecture, 'amd64');
});

test('a run with every image present makes no registry request', async () => {
  const before = registry.requestCount();
  const report = await imagesIn(shared, { force: true });
  assert.ok(report.ran.includes('images'), 'forced, the stage ran');
  assert.is(registry.requestCount(), before);
  const fresh = workspace();
  // A second tree sharing the cache: only the output layout is built.
  const ws = { ...fresh, context: (o = {}) => fresh.context({ ...o, cacheDir: shared.cacheDir }) } as Workspace;
  await imagesIn(ws);
  assert.is(registry.requestCount(), before);
  assert.equal(readFileSync(join(fresh.outDir, 'images', 'index.json'), 'utf8'), readFileSync(join(shared.outDir, 'images', 'index.json'), 'utf8'));
});

test('a manifest digest that is not the pinned one: error naming both, no ref left behind', async () => {
  const busybox = seeded('docker.io/library/busybox');
  const wrong = `sha256:${'0'.repeat(64)}`;
  const ws = workspace({
    images: registry.images.map((image) => (image === busybox ? lockEntry(image, { layoutDigest: wrong }) : lockEntry(image))),
  });
  const error = await imagesError(ws);
  assert.instance(error, UserError);
  assert.match(error.message, 'image docker.io/library/busybox:1.37: the copied manifest is not the one the lock pins');
  assert.match(error.message, `expected ${wrong}`);
  assert.match(error.message, `found    ${busybox.storedDigest}`);
  const store = join(ws.cacheDir, 'oci');
  assert.is(findRef(readIndex(store), 'docker.io/library/busybox:1.37'), undefined);
  assert.ok(findRef(readIndex(store), 'registry.k8s.io/pause:3.10.1'), 'the other images were kept');
  assert.not.ok(existsSync(join(ws.outDir, 'images')), 'no output layout from a failed run');
  assert.equal(readdirSync(join(ws.cacheDir, 'tmp')).filter((n) => n.startsWith('oci-')), [], 'no staging left');
});

test('an image the registry does not have: the error says so and names the image', async () => {
  const pause = seeded('registry.k8s.io/pause');
  const absent = `sha256:${'1'.repeat(64)}`;
  const ws = workspace({
    images: registry.images.map((image) => (image === pause ? lockEntry(image, { digest: absent, layoutDigest: absent }) : lockEntry(image))),
  });
  const error = await imagesError(ws);
  assert.match(error.message, `image registry.k8s.io/pause:3.10.1@${absent}: skopeo could not copy it from docker://${registry.host}/registry.k8s.io/pause@${absent}`);
  assert.match(error.message, /has no manifest with that digest/);
});

test('OFFLINE=1 with an image missing from the cache names it and how to get it', async () => {
  const ws = workspace();
  const before = registry.requestCount();
  const error = await imagesError(ws, { offline: true });
  assert.instance(error, OfflineError);
  assert.match(error.message, `offline: ${registry.images.length} images are not in the cache`);
  assert.match(error.message, `docker.io/library/busybox:1.37@${seeded('docker.io/library/busybox').digest}`);
  assert.match(error.message, /make images/);
  assert.is(registry.requestCount(), before);
});

test('the registry down: an error after the retries, naming the image and what to check', async () => {
  const ws = workspace();
  await registry.stop();
  try {
    const error = await imagesError(ws);
    assert.match(error.message, /images failed/);
    assert.match(error.message, /skopeo could not copy it .*\(after 1 retry\)/);
    assert.match(error.message, /connection refused/);
    assert.match(error.message, /Check that the registry answers/);
  } finally {
    await registry.start();
  }
});

test('images dropped from the lock leave out/images, blobs and refs alike', async () => {
  const ws = workspace();
  const layout = join(ws.outDir, 'images');
  await imagesIn(ws);
  const busybox = seeded('docker.io/library/busybox');
  const busyboxOnly = busybox.layers.filter((l) => !registry.images.some((i) => i !== busybox && i.layers.includes(l)));
  assert.ok(busyboxOnly.length > 0);
  writeFileSync(ws.lockFile, readFileSync(ws.lockFile, 'utf8').replace(/^ {2}- .*busybox.*\n/m, ''));
  await imagesIn(ws);
  const refs = readIndex(layout).manifests.map(refOf);
  assert.not.ok(refs.some((r) => r?.includes('busybox')), 'no busybox ref');
  for (const layer of busyboxOnly) assert.not.ok(existsSync(join(layout, 'blobs', 'sha256', layer.slice(7))), `${layer} pruned`);
  assert.ok(findRef(readIndex(join(ws.cacheDir, 'oci')), 'docker.io/library/busybox:1.37'), 'the cache keeps it for later');
});

test('a manifest that refers to an image the lock lacks fails the build, naming file and image', async () => {
  const root = join(work, 'project');
  mkdirSync(join(root, 'manifests'), { recursive: true });
  writeFileSync(
    join(root, 'manifests', 'app.yaml'),
    ['apiVersion: v1', 'kind: Pod', 'metadata: {name: ok}', 'spec: {containers: [{name: a, image: "busybox:1.37"}]}', '---',
      'apiVersion: apps/v1', 'kind: Deployment', 'metadata: {name: web}',
      'spec: {template: {spec: {containers: [{name: web, image: "nginx:1.27"}]}}}', ''].join('\n'),
  );
  const ws = workspace();
  const before = registry.requestCount();
  const error = await imagesError(ws, { root });
  assert.match(error.message, /manifests\/app\.yaml: image nginx:1\.27 \(docker\.io\/library\/nginx:1\.27\) is not in the lock/);
  assert.not.match(error.message, /busybox/);
  assert.is(registry.requestCount(), before, 'checked before anything is copied');
});

let containerd: ContainerdFixture | undefined;
test.after(async () => containerd?.close());

test('a real containerd imports out/images and lists every image by the names the kubelet uses', async () => {
  containerd = await startContainerd({ work });
  const layout = join(shared.outDir, 'images');
  await containerd.importLayout(layout, { unpack: false });
  const names = new Map((await containerd.images()).map((i) => [i.name, i.digest]));
  const expected = readIndex(layout).manifests.map((d) => [refOf(d)!, d.digest] as const);
  assert.is(names.size, expected.length);
  for (const [ref, digest] of expected) assert.is(names.get(ref), digest, ref);
  assert.ok(names.has(`registry.k8s.io/kube-apiserver:${version}`));
});

test.run();
