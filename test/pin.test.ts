// The pin stage against real stand-ins for upstream: the fixture HTTP server laid out like
// builds.coreos.fedoraproject.org, dl.k8s.io and GitHub releases (with a kubeadm that
// answers `config images list`), and a real registry seeded with the project's images.
// The lock it writes must be what fetch and images accept.
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { ChecksumError } from '../tasks/lib/store/cache.ts';
import { runStages } from '../tasks/lib/run/engine.ts';
import { OfflineError, UserError } from '../tasks/lib/errors.ts';
import { fetchStage } from '../tasks/fetch.ts';
import { imagesStage } from '../tasks/images.ts';
import { artifactKeys, parseLock, type Lock } from '../tasks/lib/inputs/lock.ts';
import { parseFcosRelease, parseFcosReleaseIndex } from '../tasks/lib/inputs/upstream.ts';
import { artifactSources, resolveComponents } from '../tasks/pin/components.ts';
import { layoutChoice, wantedImages } from '../tasks/pin/images.ts';
import { kubernetesMarkerPath, parseKubeadmImageList, parseVersionMarker } from '../tasks/pin/kubernetes.ts';
import { diffLocks, renderLock } from '../tasks/pin/lock-text.ts';
import { pin, pinResults, pinStage, type PinResult } from '../tasks/pin/stage.ts';
import { findRef, readIndex } from '../tasks/lib/store/oci.ts';
import { parseFcosStream } from '../tasks/lib/inputs/upstream.ts';
import { startFixtureServer, type FixtureServer } from './fixtures/http-server.ts';
import { startRegistry, type RegistryFixture } from './fixtures/registry.ts';
import { buildUpstreamTree, type UpstreamTree } from './fixtures/upstream.ts';
import { signFixtureUpstream, trustConfig, type TestSigner } from './fixtures/signing.ts';
import { fixtureMirrors, loud, makeWorkspace, projectImages, projectRoot, runCli, workspaceArgs, type Workspace, type WorkspaceOptions } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-pin-'));
const version = 'v1.35.7';
const samples = join(projectRoot, 'test', 'fixtures', 'upstream-samples');
// The project's images, pause as a multi-arch index (its amd64 child lands in the layout),
// and a busybox that a test re-pushes in Docker v2s2 format.
const seeded = [
  ...projectImages(version).map((image) => (image.name === 'registry.k8s.io/pause' ? { ...image, multiArch: true } : image)),
  { name: 'docker.io/library/busybox', tag: '1.37' },
];
let tree: UpstreamTree;
let server: FixtureServer;
let registry: RegistryFixture;
let signer: TestSigner;
const workspaces: Workspace[] = [];

test.before(loud(async () => {
  tree = await buildUpstreamTree(join(work, 'upstream'), { qcow2SizeMiB: 1, kubernetesVersion: version });
  server = await startFixtureServer({ root: tree.root });
  registry = await startRegistry({ images: seeded, work });
  // Upstream signs what it serves (test/signatures.test.ts checks the refusals); pin trusts the test's signers.
  signer = await signFixtureUpstream(tree, registry, work);
}));

test.after(async () => {
  await server?.close();
  await registry?.close();
  for (const ws of workspaces) rmSync(ws.dir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
});

/** A workspace with cluster.yaml pointing at the fixtures, and no lock. */
function workspace(options: WorkspaceOptions = {}): Workspace {
  const ws = makeWorkspace(tree, server.url, {
    registries: fixtureMirrors(registry.host),
    ...options,
    extraConfig: [...(options.extraConfig ?? []), ...trustConfig(signer, mkdtempSync(join(work, 'trust-')), server.url)],
  });
  rmSync(ws.lockFile);
  workspaces.push(ws);
  return ws;
}

const quick = { http: { retries: 1, stallTimeoutMs: 1500, backoffMs: 20 } };

async function pinIn(ws: Workspace, overrides = {}): Promise<PinResult> {
  return pin(ws.context({ ...quick, ...overrides }));
}

async function pinError(ws: Workspace, overrides = {}): Promise<Error> {
  try {
    await pinIn(ws, overrides);
  } catch (error) {
    return error as Error;
  }
  throw new Error('pin succeeded where it should have failed');
}

const image = (lock: Lock, name: string) => lock.images.find((i) => i.name === name)!;
const seededImage = (name: string) => registry.images.find((i) => i.name === name)!;

// ---- pure parts ----

test('the artifact URLs for the tested components are where upstream (and the fixture tree) has them', () => {
  for (const source of artifactSources('x86_64', version, resolveComponents())) {
    assert.is(source.url, tree.artifacts[source.key]!.upstreamUrl, source.key);
  }
  const arm = artifactSources('aarch64', 'v1.36.3', resolveComponents({ containerd: 'v2.2.0' }));
  assert.is(arm.find((s) => s.key === 'kubelet')!.url, 'https://dl.k8s.io/release/v1.36.3/bin/linux/arm64/kubelet');
  assert.is(arm.find((s) => s.key === 'containerd')!.url, 'https://github.com/containerd/containerd/releases/download/v2.2.0/containerd-2.2.0-linux-arm64.tar.gz');
  assert.is(arm.find((s) => s.key === 'runc')!.checksumUrl, 'https://github.com/opencontainers/runc/releases/download/v1.4.4/runc.sha256sum');
  assert.is(arm.find((s) => s.key === 'butane')!.url, 'https://github.com/coreos/butane/releases/download/v0.29.0/butane-aarch64-unknown-linux-gnu');
  assert.is(arm.find((s) => s.key === 'butane')!.checksumUrl, undefined, 'butane publishes no checksum file');
  assert.throws(() => resolveComponents({ runc: 'latest' }), /runc: expected a version/);
});

test('upstream samples: the release index, one release, and a stream without the asked architecture', () => {
  const index = parseFcosReleaseIndex('releases.json', JSON.parse(readFileSync(join(samples, 'fcos-releases.json'), 'utf8')));
  const last = index.at(-1)!;
  assert.is(last.version, '33.20201214.3.1');
  assert.equal(last.architectures, ['x86_64']);
  assert.match(last.metadata!, /\/prod\/streams\/stable\/builds\/33\.20201214\.3\.1\/release\.json$/);
  const release = parseFcosRelease('release.json', JSON.parse(readFileSync(join(samples, 'fcos-release.json'), 'utf8')), 'x86_64');
  assert.is(release.release, '33.20201201.3.0');
  assert.match(release.location, /fedora-coreos-33\.20201201\.3\.0-qemu\.x86_64\.qcow2\.xz$/);
  assert.is(release.sha256, 'a7e93e32665086d4a07a14dbe6c125177402f04603fc5bb575035028701afa5b');
  assert.is(release.uncompressedSha256, undefined, 'older metadata has none; pin computes it');
  assert.throws(() => parseFcosRelease('release.json', JSON.parse(readFileSync(join(samples, 'fcos-release.json'), 'utf8')), 'aarch64'), /architectures\.aarch64: expected the architecture aarch64, found only x86_64/);
  assert.throws(() => parseFcosStream('stable.json', JSON.parse(readFileSync(join(samples, 'fcos-stream.json'), 'utf8')), 'aarch64'), /aarch64/);
});

test('upstream samples: the openstack qcow2.xz of the stream and of one release', () => {
  const stream = parseFcosStream('stable.json', JSON.parse(readFileSync(join(samples, 'fcos-stream.json'), 'utf8')), 'x86_64', 'openstack');
  assert.match(stream.location, /fedora-coreos-33\.20201201\.3\.0-openstack\.x86_64\.qcow2\.xz$/);
  assert.is(stream.sha256, '2be55c5aa1f53eb9a869826dacbab75706ee6bd59185b935ac9be546cc132a85');
  assert.is(stream.release, '33.20201201.3.0');
  const release = parseFcosRelease('release.json', JSON.parse(readFileSync(join(samples, 'fcos-release.json'), 'utf8')), 'x86_64', 'openstack');
  assert.match(release.location, /-openstack\.x86_64\.qcow2\.xz$/);
  assert.is(release.sha256, stream.sha256);
  assert.throws(() => parseFcosStream('s.json', { architectures: { x86_64: { artifacts: { qemu: {} } } } }, 'x86_64', 'openstack'), /architectures\.x86_64\.artifacts\.openstack: expected a mapping/);
});

test('kubernetes versions: a minor goes through stable-X.Y.txt; the marker must name a release of that minor', () => {
  assert.is(kubernetesMarkerPath('v1.35'), '/release/stable-1.35.txt');
  assert.is(kubernetesMarkerPath('v1.35.7'), undefined);
  assert.is(parseVersionMarker('stable-1.35.txt', 'v1.35.7\n', 'v1.35'), 'v1.35.7');
  assert.throws(() => parseVersionMarker('stable-1.35.txt', 'v1.36.0', 'v1.35'), /stable-1\.35\.txt: 1 problem\n {2}\(top level\): expected one v1\.35\.x release/);
  assert.throws(() => parseVersionMarker('stable-1.35.txt', '<html>', 'v1.35'), /found "<html>"/);
});

test("kubeadm's image list: parsed, log lines skipped, must hold kubeadm's set for the version", () => {
  const out = [
    'W1125 10:00:00.000000  1 version.go:104] could not fetch a Kubernetes version from the internet',
    ...['kube-apiserver', 'kube-controller-manager', 'kube-scheduler', 'kube-proxy'].map((n) => `registry.k8s.io/${n}:v1.35.7`),
    'registry.k8s.io/coredns/coredns:v1.13.1',
    'registry.k8s.io/pause:3.10.1',
    'registry.k8s.io/etcd:3.6.6-0',
    '',
  ].join('\n');
  const images = parseKubeadmImageList('kubeadm', out, 'v1.35.7');
  assert.is(images.length, 7);
  assert.equal(images[4], { name: 'registry.k8s.io/coredns/coredns', tag: 'v1.13.1' });
  assert.throws(() => parseKubeadmImageList('kubeadm', out, 'v1.35.8'), /missing: registry\.k8s\.io\/kube-apiserver:v1\.35\.8/);
  const wanted = wantedImages(images, 'v1.35.7', [
    { file: 'manifests/a.yaml', image: 'busybox' },
    { file: 'manifests/b.yaml', image: `registry.k8s.io/pause:3.10.1@sha256:${'a'.repeat(64)}` },
  ]);
  assert.equal(wanted.map((w) => `${w.name}:${w.tag}`), [
    'docker.io/library/busybox:latest',
    'registry.k8s.io/coredns/coredns:v1.13.1',
    'registry.k8s.io/etcd:3.6.6-0',
    'registry.k8s.io/kube-apiserver:v1.35.7',
    'registry.k8s.io/kube-controller-manager:v1.35.7',
    'registry.k8s.io/kube-proxy:v1.35.7',
    'registry.k8s.io/kube-scheduler:v1.35.7',
    'registry.k8s.io/pause:3.10.1',
  ]);
  assert.is(wanted.at(-1)!.digest, `sha256:${'a'.repeat(64)}`, 'a digest pinned in a manifest is kept');
  assert.throws(() => wantedImages([], 'v1.35.7', [{ file: 'manifests/c.yaml', image: `busybox@sha256:${'b'.repeat(64)}` }]), /manifests\/c\.yaml: .* has a digest but no tag/);
});

test('layout digest: an OCI manifest as is, an index by its one linux/ARCH OCI child, a copy for Docker formats', () => {
  const d = (c: string) => `sha256:${c.repeat(64)}`;
  const oci = JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.oci.image.manifest.v1+json', config: {}, layers: [] });
  assert.equal(layoutChoice(oci, d('1'), 'amd64', 'x'), { layoutDigest: d('1') });
  const index = (mediaType: string, childType: string) =>
    JSON.stringify({
      schemaVersion: 2,
      mediaType,
      manifests: [
        { mediaType: childType, digest: d('2'), platform: { os: 'linux', architecture: 'amd64' } },
        { mediaType: childType, digest: d('3'), platform: { os: 'linux', architecture: 'arm64', variant: 'v8' } },
        { mediaType: childType, digest: d('4'), platform: { os: 'unknown', architecture: 'unknown' } },
      ],
    });
  const ociIndex = index('application/vnd.oci.image.index.v1+json', 'application/vnd.oci.image.manifest.v1+json');
  assert.equal(layoutChoice(ociIndex, d('9'), 'amd64', 'x'), { layoutDigest: d('2') });
  assert.equal(layoutChoice(ociIndex, d('9'), 'arm64', 'x'), { layoutDigest: d('3') });
  const dockerList = index('application/vnd.docker.distribution.manifest.list.v2+json', 'application/vnd.docker.distribution.manifest.v2+json');
  assert.ok('copy' in layoutChoice(dockerList, d('9'), 'amd64', 'x'), 'a Docker child is converted: copy');
  const v2s2 = JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.docker.distribution.manifest.v2+json', config: {}, layers: [] });
  assert.ok('copy' in layoutChoice(v2s2, d('9'), 'amd64', 'x'));
  const amd64Only = JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.oci.image.index.v1+json', manifests: [JSON.parse(ociIndex).manifests[0]] });
  assert.throws(() => layoutChoice(amd64Only, d('9'), 'arm64', 'image foo:1'), /image foo:1: the image has no linux\/arm64 variant \(it has linux\/amd64\)/);
});

// ---- against the fixtures ----

let first: { ws: Workspace; result: PinResult };

test('pin from scratch writes a lock that parseLock accepts, and fetch and images work from it', async () => {
  const ws = workspace();
  const ctx = ws.context(quick);
  const report = await runStages(ctx, [pinStage], { renderer: 'silent' });
  assert.equal(report.ran, ['pin']);
  const result = pinResults.get(ctx)!;
  assert.ok(result.written);
  assert.match(result.headline, /: new lock, \d+ entries$/);
  assert.ok(result.changes.includes(`+ kubernetes.version: ${version}`), result.summary);
  const text = readFileSync(ws.lockFile, 'utf8');
  assert.is(text, result.text);
  const lock = parseLock(ws.lockFile, text);
  assert.equal(lock.fcos, { stream: 'stable', release: tree.fcosRelease, arch: 'x86_64' });
  assert.equal(lock.kubernetes, { version });
  for (const key of artifactKeys) {
    const want = tree.artifacts[key]!;
    assert.is(lock.artifacts[key].url, want.upstreamUrl, `${key} url`);
    assert.is(lock.artifacts[key].sha256, want.sha256, `${key} sha256`);
    assert.is(lock.artifacts[key].uncompressedSha256, want.uncompressedSha256, `${key} uncompressedSha256`);
  }
  assert.match(text, /butane:\n {4}# no upstream checksum file .*\n {4}# sha256 computed by pin from the downloaded bytes\n/);
  assert.match(text, /kubeadm:\n {4}# sha256 from https:\/\/dl\.k8s\.io\/release\/v1\.35\.7\/bin\/linux\/amd64\/kubeadm\.sha256 \(checked against the download\)\n/);
  assert.not.match(text, /127\.0\.0\.1/, 'the lock names upstream, never the mirrors');
  // The image set: kubeadm's (from running the fetched kubeadm) and the manifests', by the registry's digests.
  // One control plane: no kube-vip.
  const wanted = projectImages(version, { virtualIp: false });
  assert.equal(lock.images.map((i) => `${i.name}:${i.tag}`), wanted.map((i) => `${i.name}:${i.tag}`).sort());
  for (const ref of lock.images) {
    const seededRef = seededImage(ref.name);
    assert.is(ref.digest, seededRef.digest, `${ref.name} digest`);
    assert.is(ref.layoutDigest, seededRef.storedDigest, `${ref.name} layoutDigest`);
  }
  assert.is.not(image(lock, 'registry.k8s.io/pause').layoutDigest, image(lock, 'registry.k8s.io/pause').digest, 'the index and its amd64 child');
  assert.ok(existsSync(join(ws.cacheDir, 'sha256', tree.artifacts.kubeadm!.sha256)), 'kubeadm was downloaded into the cache');
  assert.equal(readdirSync(join(ws.cacheDir, 'tmp')), [], 'no temporary file is left');

  server.requests.length = 0;
  const built = await runStages(ws.context(quick), [fetchStage, imagesStage], { renderer: 'silent' });
  assert.equal(built.ran.sort(), ['fetch', 'images']);
  assert.not.ok(server.requests.some((r) => r.path === tree.artifacts.kubeadm!.servedPath), 'fetch found kubeadm in the cache pin filled');
  first = { ws, result };
});

const openstackConfig = ['target: openstack', 'openstack: {cloud: test, flavors: {controlPlane: m1.large, worker: m1.medium}, adminCidr: 192.0.2.0/24}'];

test('target openstack: pin adds the FCOS openstack image with both sha256s; fetch and the bundle carry it', async () => {
  const ws = workspace({ extraConfig: openstackConfig });
  const result = await pinIn(ws);
  const want = tree.artifacts['fcos-openstack']!;
  assert.equal(result.lock.artifacts['fcos-openstack'], { key: 'fcos-openstack', url: want.upstreamUrl, sha256: want.sha256, uncompressedSha256: want.uncompressedSha256 });
  assert.match(result.text, /fcos-openstack:\n {4}# from streams\/stable\.json: architectures\.x86_64\.artifacts\.openstack\.formats\["qcow2\.xz"\]\.disk\n/);
  assert.ok(result.changes.some((line) => line.startsWith('+ artifacts.fcos-openstack: ')), result.summary);
  // A qemu lock (the same config with TARGET=qemu) has none, and the openstack target refuses it.
  const qemuLock = (await pinIn(ws, { target: 'qemu' })).lock;
  assert.is(qemuLock.artifacts['fcos-openstack'], undefined);
  try {
    void ws.context(quick).lock;
    assert.unreachable('an openstack target accepted a lock without its image');
  } catch (error) {
    assert.match((error as Error).message, /artifacts\.fcos-openstack: expected the FCOS OpenStack image/);
  }
  await pinIn(ws);
  server.requests.length = 0;
  await runStages(ws.context(quick), [fetchStage], { renderer: 'silent' });
  assert.ok(server.requests.some((r) => r.path === want.servedPath), 'fetched the openstack image');
  const out = readdirSync(join(ws.outDir, 'artifacts'));
  assert.ok(out.includes(`fedora-coreos-${tree.fcosRelease}-openstack.x86_64.qcow2`), out.join(' '));
  assert.ok(existsSync(join(ws.cacheDir, 'sha256', want.uncompressedSha256!)), 'decompressed and checked into the cache');
  // An air-gapped cloud gets it through the bundle, like every artifact the lock names.
  const bundle = join(ws.dir, 'bundle.tar');
  const made = await runCli(['bundle', '--file', bundle, ...workspaceArgs(ws)]);
  assert.is(made.code, 0, made.stderr);
  assert.ok(execFileSync('tar', ['-tf', bundle], { encoding: 'utf8' }).split('\n').some((p) => p.endsWith(`sha256/${want.uncompressedSha256}`)), 'the bundle carries the openstack image');
});

test('pin again: the lock is byte-identical and untouched, and the summary says unchanged', async () => {
  const { ws } = first;
  const before = statSync(ws.lockFile);
  const ctx = ws.context(quick);
  const report = await runStages(ctx, [pinStage], { renderer: 'silent' });
  assert.equal(report.ran, ['pin'], 'pin always asks upstream, whatever its stamp says');
  const result = pinResults.get(ctx)!;
  assert.match(result.headline, /corekube\.lock\.yaml: unchanged$/);
  assert.equal(result.changes, []);
  assert.not.ok(result.written);
  assert.is(readFileSync(ws.lockFile, 'utf8'), first.result.text);
  const after = statSync(ws.lockFile);
  assert.is(after.ino, before.ino);
  assert.is(after.mtimeMs, before.mtimeMs);
});

test('changed pins are summarized entry by entry, and the lock is rewritten whole', async () => {
  const ws = workspace();
  const lock = first.result.lock;
  const pause = image(lock, 'registry.k8s.io/pause');
  const edited = renderLock({
    ...lock,
    kubernetes: { version: 'v1.35.6' },
    artifacts: { ...lock.artifacts, kubectl: { ...lock.artifacts.kubectl, sha256: '0'.repeat(64) } },
    images: [
      ...lock.images.filter((i) => i !== pause && i.name !== 'ghcr.io/flannel-io/flannel'),
      { ...pause, digest: `sha256:${'1'.repeat(64)}`, text: '' },
      { name: 'docker.io/library/gone', tag: '1', digest: `sha256:${'2'.repeat(64)}`, layoutDigest: `sha256:${'2'.repeat(64)}`, text: '' },
    ],
  });
  writeFileSync(ws.lockFile, edited);
  const result = await pinIn(ws);
  assert.ok(result.written);
  assert.is(result.headline.replace(/^.*: /, ''), '5 changes');
  assert.equal(result.changes, [
    `~ kubernetes.version: v1.35.6 → ${version}`,
    `~ artifacts.kubectl: sha256:000000000000… → sha256:${lock.artifacts.kubectl.sha256.slice(0, 12)}… (same URL)`,
    '- image docker.io/library/gone: docker.io/library/gone:1@sha256:222222222222…',
    `~ image registry.k8s.io/pause: registry.k8s.io/pause:3.10.1@sha256:111111111111… layout ${pause.layoutDigest.slice(0, 19)}… → registry.k8s.io/pause:3.10.1@${pause.digest.slice(0, 19)}… layout ${pause.layoutDigest.slice(0, 19)}…`,
    `+ image ghcr.io/flannel-io/flannel: ${image(lock, 'ghcr.io/flannel-io/flannel').text.replace(/[0-9a-f]{52}$/, '…')}`,
  ]);
  assert.match(result.summary, /\n {2}~ kubernetes\.version: v1\.35\.6 → v1\.35\.7/);
  assert.is(readFileSync(ws.lockFile, 'utf8'), first.result.text);
  assert.equal(diffLocks(lock, parseLock('x', edited)).length, 5);
});

test('a minor version resolves to the newest patch through stable-X.Y.txt', async () => {
  const marker = join(tree.root, 'k8s', 'release', 'stable-1.35.txt');
  writeFileSync(marker, `${version}\n`);
  try {
    const ws = workspace();
    writeFileSync(ws.configFile, readFileSync(ws.configFile, 'utf8').replace(`version: ${version}`, 'version: v1.35'));
    copyFileSync(first.ws.lockFile, ws.lockFile);
    const result = await pinIn(ws);
    assert.is(result.headline.replace(/^.*: /, ''), 'unchanged', 'v1.35 pins exactly what v1.35.7 did');
    writeFileSync(ws.configFile, readFileSync(ws.configFile, 'utf8').replace('version: v1.35', 'version: v1.34'));
    const error = await pinError(ws);
    assert.instance(error, UserError);
    assert.match(error.message, /the newest Kubernetes v1\.34 release: http:\/\/127\.0\.0\.1:\d+\/k8s\/release\/stable-1\.34\.txt: HTTP 404/);
    assert.match(error.message, /mirrors\.kubernetes/);
  } finally {
    rmSync(marker, { force: true });
  }
});

test('an explicit fcos.release comes from the release index; sha256s the metadata lacks are computed', async () => {
  const base = join(tree.root, 'fcos', 'prod', 'streams', 'stable');
  const fcos = tree.artifacts['fcos-qemu']!;
  mkdirSync(join(base, 'builds', tree.fcosRelease), { recursive: true });
  const metadata = `https://builds.coreos.fedoraproject.org/prod/streams/stable/builds/${tree.fcosRelease}/release.json`;
  writeFileSync(
    join(base, 'releases.json'),
    JSON.stringify({
      releases: [
        { commits: [{ architecture: 'x86_64', checksum: 'a'.repeat(64) }], version: '42.20260701.3.0', metadata: metadata.replace(tree.fcosRelease, '42.20260701.3.0') },
        { commits: [{ architecture: 'x86_64', checksum: 'b'.repeat(64) }], version: tree.fcosRelease, metadata },
      ],
      metadata: { 'last-modified': '2026-08-04T00:00:00Z' },
      stream: 'stable',
    }),
  );
  // Like older release metadata: no uncompressed-sha256.
  writeFileSync(
    join(base, 'builds', tree.fcosRelease, 'release.json'),
    JSON.stringify({
      release: tree.fcosRelease,
      stream: 'stable',
      architectures: { x86_64: { media: { qemu: { artifacts: { 'qcow2.xz': { disk: { location: fcos.upstreamUrl, signature: `${fcos.upstreamUrl}.sig`, sha256: fcos.sha256 } } } } } } },
    }),
  );
  const ws = workspace({ extraConfig: [`fcos: {release: "${tree.fcosRelease}"}`] });
  const result = await pinIn(ws);
  assert.equal(result.lock.fcos, { stream: 'stable', release: tree.fcosRelease, arch: 'x86_64' });
  assert.equal(result.lock.artifacts['fcos-qemu'], { key: 'fcos-qemu', url: fcos.upstreamUrl, sha256: fcos.sha256, uncompressedSha256: fcos.uncompressedSha256 });
  assert.match(result.text, /# uncompressedSha256: computed by pin from the decompressed download \(the metadata has none\)/);
  assert.ok(existsSync(join(ws.cacheDir, 'sha256', fcos.uncompressedSha256!)), 'the image it hashed is in the cache for fetch');
  server.requests.length = 0;
  const again = await pinIn(ws);
  assert.match(again.headline, /: unchanged$/);
  assert.not.ok(server.requests.some((r) => r.path === fcos.servedPath), 'a re-pin does not download the image again');

  const missing = workspace({ extraConfig: ['fcos: {release: "43.20990101.3.0"}'] });
  const error = await pinError(missing);
  assert.instance(error, UserError);
  assert.match(error.message, /FCOS release 43\.20990101\.3\.0 is not in the stable stream's release index \(http:\/\/127\.0\.0\.1:\d+\/fcos\/prod\/streams\/stable\/releases\.json; newest there: 43\.20260802\.3\.1, 42\.20260701\.3\.0\)/);
  assert.not.ok(existsSync(missing.lockFile), 'no lock written');
});

test('an upstream checksum file that disagrees with kubeadm is refused, naming the URLs, expected and found', async () => {
  const sumFile = join(tree.root, tree.artifacts.kubeadm!.servedPath + '.sha256');
  const good = readFileSync(sumFile, 'utf8');
  const wrong = 'f'.repeat(64);
  writeFileSync(sumFile, wrong);
  try {
    const ws = workspace();
    const error = await pinError(ws);
    assert.instance(error, ChecksumError);
    const served = `${server.url}${tree.artifacts.kubeadm!.servedPath}`;
    assert.ok(error.message.includes(`kubeadm: ${served} does not match its upstream checksum file ${served}.sha256`), error.message);
    assert.ok(error.message.includes(`expected ${wrong} (the checksum file)`), error.message);
    assert.ok(error.message.includes(`found    ${tree.artifacts.kubeadm!.sha256} (the downloaded bytes)`), error.message);
    assert.not.ok(existsSync(ws.lockFile), 'no lock written');
    assert.not.ok(existsSync(join(ws.cacheDir, 'sha256', tree.artifacts.kubeadm!.sha256)), 'nothing unverified in the cache');
  } finally {
    writeFileSync(sumFile, good);
  }
});

test('a stream without the asked architecture is an error naming the stream and the architecture', async () => {
  const ws = workspace({ extraConfig: ['fcos: {arch: aarch64}'] });
  const before = server.requests.length;
  const error = await pinError(ws);
  assert.instance(error, UserError);
  assert.match(error.message, /the FCOS stable stream has no aarch64 build: http:\/\/127\.0\.0\.1:\d+\/fcos\/streams\/stable\.json offers only x86_64/);
  assert.match(error.message, /fcos\.arch/);
  assert.equal(server.requests.slice(before).map((r) => r.path), ['/fcos/streams/stable.json'], 'nothing else was asked');
  assert.not.ok(existsSync(ws.lockFile));
});

test('offline, pin refuses at once', async () => {
  const ws = workspace();
  const error = await pinError(ws, { offline: true });
  assert.instance(error, OfflineError);
  assert.match(error.message, /pin asks upstream .* cannot run offline/);
});

test('a Docker-format image gets the layout digest skopeo gives it, and the images stage agrees', async () => {
  // Re-push busybox in Docker v2s2 format, name it in a manifest of a project of its own.
  const busybox = seededImage('docker.io/library/busybox');
  execFileSync('skopeo', [
    '--insecure-policy', 'copy', '--quiet', '--src-tls-verify=false', '--dest-tls-verify=false', '--format', 'v2s2',
    `docker://${registry.host}/${busybox.repository}@${busybox.digest}`, `docker://${registry.host}/docker.io/library/busybox:1.37-docker`,
  ]);
  const root = join(work, 'project');
  mkdirSync(join(root, 'manifests'), { recursive: true });
  copyFileSync(join(projectRoot, 'manifests', '10-flannel.yaml'), join(root, 'manifests', '10-flannel.yaml'));
  writeFileSync(join(root, 'manifests', '20-app.yaml'), 'apiVersion: v1\nkind: Pod\nmetadata: {name: app}\nspec:\n  containers:\n    - {name: app, image: busybox:1.37-docker}\n');
  const ws = workspace();
  const result = await pinIn(ws, { root });
  const ref = image(result.lock, 'docker.io/library/busybox');
  assert.is(ref.tag, '1.37-docker');
  assert.is.not(ref.layoutDigest, ref.digest, 'converted to OCI, so its digest changes');
  assert.match(result.text, /- image: docker\.io\/library\/busybox:1\.37-docker@sha256:[0-9a-f]{64}\n {4}layoutDigest: sha256:[0-9a-f]{64}\n/);
  const blobs = readdirSync(join(ws.cacheDir, 'oci', 'blobs', 'sha256'));
  assert.ok(blobs.includes(ref.layoutDigest.slice(7)), 'the copy pin made left its blobs in cache/oci');
  const before = registry.requests().length;
  const built = await runStages(ws.context({ ...quick, root }), [imagesStage], { renderer: 'silent' });
  assert.equal(built.ran, ['images'], 'the images stage copied it to the layout digest pin recorded');
  // skopeo reads the source config again to convert it; the layers come from the blobs pin kept in cache/oci.
  const layerGets = registry.requests().slice(before).filter((r) => busybox.layers.some((layer) => r === `GET /v2/docker.io/library/busybox/blobs/${layer}`));
  assert.equal(layerGets, [], 'no busybox layer fetched again');
  const layout = readIndex(join(ws.outDir, 'images'));
  assert.is(findRef(layout, 'docker.io/library/busybox:1.37-docker')?.digest, ref.layoutDigest);
});

test.run();
