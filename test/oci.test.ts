// Pure parts of the images and disk stages: references as the CRI normalizes them, the
// layout index, the image coverage check, lock image entries, disk naming rules.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { diskMode, diskUuid } from '../tasks/disk.ts';
import { checkImageCoverage, kubeadmImages, refsOf } from '../tasks/images.ts';
import { parseLock, type Lock } from '../tasks/lib/inputs/lock.ts';
import { imagesInDocument, parseReference, registryHasNoSuchImage, serializeIndex, withRef, type Descriptor } from '../tasks/lib/store/oci.ts';

const digestA = `sha256:${'a'.repeat(64)}`;
const digestB = `sha256:${'b'.repeat(64)}`;

test('references normalize the way containerd names images', () => {
  assert.equal(parseReference('busybox'), { name: 'docker.io/library/busybox' });
  assert.equal(parseReference('flannel/flannel:v0.27.0'), { name: 'docker.io/flannel/flannel', tag: 'v0.27.0' });
  assert.equal(parseReference('index.docker.io/library/nginx:1'), { name: 'docker.io/library/nginx', tag: '1' });
  assert.equal(parseReference('registry.k8s.io/coredns/coredns:v1.12.1'), { name: 'registry.k8s.io/coredns/coredns', tag: 'v1.12.1' });
  assert.equal(parseReference('localhost:5000/pause@' + digestA), { name: 'localhost:5000/pause', digest: digestA });
  assert.equal(parseReference('127.0.0.1:5000/a/b:1.0@' + digestA), { name: '127.0.0.1:5000/a/b', tag: '1.0', digest: digestA });
  assert.is(parseReference('Upper/Case:1'), undefined);
  assert.is(parseReference('pause@sha256:short'), undefined);
  assert.is(parseReference(''), undefined);
});

test('image: values are found at any depth of a Kubernetes document', () => {
  const daemonSet = {
    kind: 'DaemonSet',
    spec: { template: { spec: { initContainers: [{ image: 'a:1' }], containers: [{ name: 'x', image: 'b:2' }, { image: 'c@' + digestA }] } } },
  };
  assert.equal(imagesInDocument(daemonSet), ['a:1', 'b:2', `c@${digestA}`]);
  assert.equal(imagesInDocument({ kind: 'ConfigMap', data: { note: 'image: not-a-field' } }), []);
});

test('an index names each ref once, sorted, so equal content gives equal bytes', () => {
  const manifest: Descriptor = { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: digestA, size: 10 };
  let index = withRef({ schemaVersion: 2, manifests: [] }, 'registry.k8s.io/pause:3.10.1', manifest);
  index = withRef(index, 'docker.io/library/busybox:1', { ...manifest, digest: digestB });
  index = withRef(index, 'registry.k8s.io/pause:3.10.1', { ...manifest, digest: digestB });
  assert.is(index.manifests.length, 2);
  const text = serializeIndex(index);
  assert.ok(text.indexOf('docker.io/library/busybox:1') < text.indexOf('registry.k8s.io/pause:3.10.1'));
  assert.is(serializeIndex({ ...index, manifests: [...index.manifests].reverse() }), text);
  assert.not.match(text, digestA);
});

const lockHead = `lockVersion: 1
fcos: {stream: stable, release: 43.20260802.3.1, arch: x86_64}
kubernetes: {version: v1.35.7}
`;
// artifacts are checked elsewhere; the problems below are about images only
function imagesProblems(images: string): string {
  try {
    parseLock('corekube.lock.yaml', `${lockHead}images:\n${images}`);
    return '';
  } catch (error) {
    return (error as Error).message;
  }
}

test('lock images: a string, or image plus layoutDigest; names must be fully qualified', () => {
  const message = imagesProblems(
    [
      `  - registry.k8s.io/pause:3.10.1@${digestA}`,
      `  - {image: "docker.io/flannel/flannel:v0.27.0@${digestA}", layoutDigest: "${digestB}"}`,
      `  - busybox:1@${digestA}`,
      `  - {image: "registry.k8s.io/etcd:3.6.8-0@${digestA}", layoutDigest: nope}`,
      `  - {image: "registry.k8s.io/etcd:3.6.8-0@${digestA}", digest: x}`,
    ].join('\n'),
  );
  assert.not.match(message, /images\[0\]/);
  assert.not.match(message, /images\[1\]/);
  assert.match(message, /images\[2\]: expected a fully qualified name with its registry host \(docker\.io\/library\/busybox/);
  assert.match(message, /images\[3\]\.layoutDigest: expected sha256:<64 hex>/);
  assert.match(message, /images\[4\]\.digest: expected one of the known keys/);
});

/** A lock value with just the parts the coverage check reads. */
function lockWith(images: string[]): Lock {
  return { file: 'corekube.lock.yaml', kubernetes: { version: 'v1.35.7' }, images: images.map(parse) } as unknown as Lock;
}
function parse(text: string) {
  const [nameTag, digest] = text.split('@') as [string, string];
  const colon = nameTag.lastIndexOf(':');
  return { name: nameTag.slice(0, colon), tag: nameTag.slice(colon + 1), digest, layoutDigest: digest, text };
}

const kubeadmSet = kubeadmImages('v1.35.7').map((i) => `${i.name}:${i.tag ?? 'x'}@${digestA}`);

test('coverage: the lock must hold what kubeadm and every manifest ask for', () => {
  const lock = lockWith([...kubeadmSet, `docker.io/flannel/flannel:v0.27.0@${digestB}`]);
  checkImageCoverage(lock, [
    { file: 'manifests/flannel.yaml', image: 'flannel/flannel:v0.27.0' },
    { file: 'manifests/flannel.yaml', image: `docker.io/flannel/flannel@${digestB}` },
  ]);
  assert.throws(
    () => checkImageCoverage(lock, [{ file: 'manifests/app.yaml', image: 'nginx:1.27' }]),
    /manifests\/app\.yaml: image nginx:1\.27 \(docker\.io\/library\/nginx:1\.27\) is not in the lock/,
  );
  assert.throws(() => checkImageCoverage(lock, [{ file: 'manifests/flannel.yaml', image: 'flannel/flannel:v0.26.0' }]), /flannel\.yaml: image flannel\/flannel:v0\.26\.0/);
  const partial = lockWith(kubeadmSet.filter((i) => !i.includes('kube-proxy')));
  assert.throws(() => checkImageCoverage(partial, []), /kubeadm v1\.35\.7 needs registry\.k8s\.io\/kube-proxy:v1\.35\.7/);
});

test('each image answers to its tag and to every digest a pod spec may name', () => {
  const image = { name: 'registry.k8s.io/pause', tag: '3.10.1', digest: digestA, layoutDigest: digestB, text: '' };
  assert.equal(refsOf(image), ['registry.k8s.io/pause:3.10.1', `registry.k8s.io/pause@${digestA}`, `registry.k8s.io/pause@${digestB}`]);
  assert.equal(refsOf({ ...image, layoutDigest: digestA }).length, 2);
});

test('disk UUID is fixed per cluster name and well formed; modes follow the path', () => {
  assert.is(diskUuid('lab'), diskUuid('lab'));
  assert.is.not(diskUuid('lab'), diskUuid('ci'));
  assert.match(diskUuid('lab'), /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  const file = (mode: number) => ({ mode, isDirectory: () => false });
  assert.is(diskMode('bin/kubelet', file(0o444)), 0o755);
  assert.is(diskMode('images/index.json', file(0o644)), 0o644);
  assert.is(diskMode('cni/bridge', file(0o755)), 0o755);
  assert.is(diskMode('cni/LICENSE', file(0o644)), 0o644);
  assert.is(diskMode('images', { mode: 0o700, isDirectory: () => true }), 0o755);
});

test("skopeo's errors: a registry that lacks the image, told apart from one that does not answer (digits in a temp path mean nothing)", () => {
  const staging = '/tmp/corekube-ws-a404b1/cache/tmp/oci-busybox-404x';
  assert.ok(registryHasNoSuchImage(`time="…" level=fatal msg="initializing source docker://127.0.0.1:5000/library/busybox@sha256:${'a'.repeat(64)}: reading manifest sha256:${'a'.repeat(64)} in 127.0.0.1:5000/library/busybox: manifest unknown: manifest unknown"`));
  assert.ok(registryHasNoSuchImage('reading manifest v1 in registry.example/x: name unknown: repository name not known to registry'));
  assert.ok(registryHasNoSuchImage('Error reading manifest: received unexpected HTTP status: 404 Not Found'));
  assert.not.ok(registryHasNoSuchImage(`copying to oci:${staging}:x: pinging container registry 127.0.0.1:40404: Get "http://127.0.0.1:40404/v2/": dial tcp 127.0.0.1:40404: connect: connection refused`));
  assert.not.ok(registryHasNoSuchImage(`writing blob to ${staging}/blobs/sha256/404404: no space left on device`));
});

test.run();
