// corekube.lock.yaml: what exactly ships. Every artifact with its upstream URL and
// sha256, every image as name:tag@sha256. Parsed once into typed values.
import { readFileSync } from 'node:fs';
import { architectures, fcosStreams, type Architecture, type ClusterConfig } from './config.ts';
import { ExitCode, InputError, UserError } from '../errors.ts';
import { fieldPath, parseYaml, Reader, sha256Pattern } from './fields.ts';
import { kubeVipImage } from '../node/kube-vip.ts';
import type { SignatureRecord } from '../signatures/evidence.ts';

export const defaultLockFile = 'corekube.lock.yaml';
export const lockVersion = 1;

/** Every artifact a node needs, in the order fetch reports them. */
export const artifactKeys = [
  'fcos-qemu',
  'kubeadm',
  'kubelet',
  'kubectl',
  'crictl',
  'containerd',
  'runc',
  'cni-plugins',
  'butane',
] as const;
export type ArtifactKey = (typeof artifactKeys)[number];
/**
 * Artifacts only some targets need: `fcos-openstack`, the FCOS OpenStack image (pinned
 * when the target is openstack). Any target may carry them; a target that needs one
 * refuses a lock without it.
 */
export const optionalArtifactKeys = ['fcos-openstack'] as const;
export type OptionalArtifactKey = (typeof optionalArtifactKeys)[number];
export type AnyArtifactKey = ArtifactKey | OptionalArtifactKey;

export interface Artifact {
  key: AnyArtifactKey;
  url: string;
  sha256: string; // of the bytes at url
  /** For an .xz download: sha256 of the decompressed bytes, which is what the cache keeps. */
  uncompressedSha256?: string;
}

export interface ImageRef {
  name: string; // registry.k8s.io/kube-apiserver
  tag: string; // v1.35.7
  digest: string; // sha256:… of what the registry serves for name:tag: pulled by this digest
  /**
   * sha256:… of the manifest the OCI layout holds: the cluster architecture's manifest
   * as skopeo writes it. It differs from `digest` when that pins a multi-arch index or a
   * Docker-format manifest (converted to OCI on copy); otherwise the two are equal.
   */
  layoutDigest: string;
  text: string; // name:tag@digest
}

export interface Lock {
  file: string;
  fcos: { stream: (typeof fcosStreams)[number]; release: string; arch: Architecture };
  kubernetes: { version: string };
  artifacts: Record<ArtifactKey, Artifact> & Partial<Record<OptionalArtifactKey, Artifact>>;
  images: ImageRef[];
  /**
   * Per artifact and per image (by name:tag): what pin verified and against whom, or why
   * nothing (upstream signs nothing). Absent in a lock written before signatures were
   * checked: fsck then says to pin again.
   */
  signatures?: LockSignatures;
}

export interface LockSignatures {
  artifacts: Partial<Record<AnyArtifactKey, SignatureRecord>>;
  images: Record<string, SignatureRecord>;
}

export const signatureMethods = ['openpgp', 'sigstore', 'cosign', 'attestation', 'none'] as const;

/** One signatures entry: {method, signer, evidence} or {method: none, why}. */
function parseSignatureRecord(r: Reader, value: unknown, path: string): SignatureRecord | undefined {
  const fields = r.object(value, path, ['method', 'signer', 'evidence', 'why']);
  if (!fields) return undefined;
  const method = r.oneOf(r.required(fields, 'method', path, 'how it was verified'), fieldPath(path, 'method'), signatureMethods);
  if (method === undefined) return undefined;
  if (method === 'none') {
    const why = r.string(r.required(fields, 'why', path, 'what upstream publishes instead'), fieldPath(path, 'why'), 'a sentence');
    return why === undefined ? undefined : { method, why };
  }
  const signer = r.string(r.required(fields, 'signer', path, 'the key fingerprint or identity'), fieldPath(path, 'signer'), 'the key fingerprint or identity');
  const evidence = r.string(r.required(fields, 'evidence', path, 'the sha256 of the evidence in the cache'), fieldPath(path, 'evidence'), '64 lowercase hex digits', sha256Pattern);
  return signer && evidence ? { method, signer, evidence } : undefined;
}

function parseSignatures(r: Reader, value: unknown): LockSignatures | undefined {
  const section = r.object(value, 'signatures', ['artifacts', 'images']);
  if (!section) return undefined;
  const result: LockSignatures = { artifacts: {}, images: {} };
  const artifacts = section.artifacts === undefined ? {} : r.object(section.artifacts, 'signatures.artifacts', [...artifactKeys, ...optionalArtifactKeys]);
  for (const [key, entry] of Object.entries(artifacts ?? {})) {
    const record = parseSignatureRecord(r, entry, fieldPath('signatures.artifacts', key));
    if (record) result.artifacts[key as AnyArtifactKey] = record;
  }
  const images = section.images === undefined ? {} : r.map(section.images, 'signatures.images');
  for (const [key, entry] of Object.entries(images ?? {})) {
    const record = parseSignatureRecord(r, entry, fieldPath('signatures.images', key));
    if (record) result.images[key] = record;
  }
  return result;
}

/** Every artifact the lock holds, required ones first, in the order fetch reports them. */
export function lockedArtifacts(lock: Pick<Lock, 'artifacts'>): Artifact[] {
  return [...artifactKeys, ...optionalArtifactKeys].flatMap((key) => (lock.artifacts[key] ? [lock.artifacts[key]] : []));
}

/** The sha256 of what the cache holds for an artifact (decompressed, where it is compressed). */
export function storedSha256(artifact: Artifact): string {
  return artifact.uncompressedSha256 ?? artifact.sha256;
}

/** The file name an artifact has in out/artifacts/: the URL's, less the compression suffix. */
export function artifactFileName(artifact: Artifact): string {
  const base = decodeURIComponent(new URL(artifact.url).pathname.split('/').pop() ?? artifact.key);
  return isXz(artifact) ? base.replace(/\.xz$/, '') : base;
}

export function isXz(artifact: Artifact): boolean {
  return new URL(artifact.url).pathname.endsWith('.xz');
}

export function loadLock(file: string): Lock {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new UserError(
        `${file}: no lock file. corekube ships no lock with checksums it has not verified: ` +
          'write it with `make pin` (online: it reads upstream\'s published checksums and digests), ' +
          'or bring one from a machine that has it (`make bundle` there, `make unbundle FILE=…` here).',
        ExitCode.config,
      );
    }
    throw new UserError(`${file}: cannot read it (${String(error)})`, ExitCode.config);
  }
  return parseLock(file, text);
}

const imagePattern = /^((?:[a-z0-9.-]+(?::\d+)?\/)?[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:\/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*):([\w][\w.-]{0,127})@(sha256:[0-9a-f]{64})$/;

export function parseImageRef(text: string): ImageRef | undefined {
  const match = imagePattern.exec(text);
  if (!match) return undefined;
  return { name: match[1]!, tag: match[2]!, digest: match[3]!, layoutDigest: match[3]!, text };
}

const imageExample = 'an image as name:tag@sha256:<64 hex>, like "registry.k8s.io/pause:3.10.1@sha256:…"';

/** One images[] entry: `name:tag@sha256:…`, or `{image: …, layoutDigest: sha256:…}` where the two differ. */
function parseImageEntry(r: Reader, item: unknown, path: string): ImageRef | undefined {
  let text = item;
  let layoutDigest: string | undefined;
  if (item !== null && typeof item === 'object' && !Array.isArray(item)) {
    const fields = r.object(item, path, ['image', 'layoutDigest']);
    if (!fields) return undefined;
    text = r.required(fields, 'image', path, imageExample);
    if (fields.layoutDigest !== undefined) {
      layoutDigest = r.string(fields.layoutDigest, fieldPath(path, 'layoutDigest'), 'sha256:<64 hex>', /^sha256:[0-9a-f]{64}$/);
      if (layoutDigest === undefined) return undefined;
    }
    path = fieldPath(path, 'image');
  }
  if (text === undefined) return undefined;
  const ref = typeof text === 'string' ? parseImageRef(text) : undefined;
  if (!ref) {
    r.problem(path, imageExample, JSON.stringify(text));
    return undefined;
  }
  if (!/^[a-z0-9-]+(\.[a-z0-9-]+)+(:\d+)?\/|^localhost(:\d+)?\/|^[a-z0-9.-]+:\d+\//.test(ref.name)) {
    r.problem(path, `a fully qualified name with its registry host (docker.io/library/${ref.name.split('/').pop()}, not ${ref.name}), as containerd names it`, ref.text);
    return undefined;
  }
  return layoutDigest ? { ...ref, layoutDigest } : ref;
}

export function parseLock(file: string, text: string): Lock {
  const r = new Reader(file);
  const root = r.object(parseYaml(file, text) ?? {}, '', ['lockVersion', 'fcos', 'kubernetes', 'artifacts', 'images', 'signatures']);
  if (!root) throw new InputError(file, r.problems);
  const version = r.required(root, 'lockVersion', '', `lockVersion ${lockVersion}`);
  if (version !== undefined && version !== lockVersion) {
    r.problem('lockVersion', `${lockVersion} (this corekube's lock format)`, JSON.stringify(version));
  }

  const fcosIn = r.object(r.required(root, 'fcos', '', 'the pinned FCOS release'), 'fcos', ['stream', 'release', 'arch']);
  const stream = fcosIn ? r.oneOf(fcosIn.stream, 'fcos.stream', fcosStreams) : undefined;
  const release = fcosIn ? r.string(fcosIn.release, 'fcos.release', 'an FCOS release', /^\d+\.\d{8}\.\d+\.\d+$/) : undefined;
  const arch = fcosIn ? r.oneOf(fcosIn.arch, 'fcos.arch', architectures) : undefined;

  const kubeIn = r.object(r.required(root, 'kubernetes', '', 'the pinned Kubernetes release'), 'kubernetes', ['version']);
  const kubeVersion = kubeIn
    ? r.string(kubeIn.version, 'kubernetes.version', 'an exact Kubernetes release like "v1.35.7"', /^v\d+\.\d+\.\d+$/)
    : undefined;

  const artifactsIn = r.object(r.required(root, 'artifacts', '', 'the pinned artifacts'), 'artifacts', [...artifactKeys, ...optionalArtifactKeys]);
  const artifacts: Partial<Record<AnyArtifactKey, Artifact>> = {};
  if (artifactsIn) {
    for (const key of [...artifactKeys, ...optionalArtifactKeys.filter((k) => artifactsIn[k] !== undefined)]) {
      const path = fieldPath('artifacts', key);
      const entry = r.object(r.required(artifactsIn, key, 'artifacts', 'url and sha256'), path, [
        'url',
        'sha256',
        'uncompressedSha256',
      ]);
      if (!entry) continue;
      const url = r.string(entry.url, fieldPath(path, 'url'), 'an https URL', /^https?:\/\/\S+$/);
      const sha256 = r.string(entry.sha256, fieldPath(path, 'sha256'), '64 lowercase hex digits', sha256Pattern);
      const compressed = url !== undefined && url.endsWith('.xz');
      let uncompressedSha256: string | undefined;
      if (entry.uncompressedSha256 !== undefined || compressed) {
        uncompressedSha256 = r.string(
          entry.uncompressedSha256,
          fieldPath(path, 'uncompressedSha256'),
          compressed ? '64 lowercase hex digits (an .xz download needs the sha256 of its decompressed bytes)' : '64 lowercase hex digits',
          sha256Pattern,
        );
        if (uncompressedSha256 !== undefined && !compressed) {
          r.problem(fieldPath(path, 'uncompressedSha256'), 'no uncompressedSha256 for a URL that is not .xz', uncompressedSha256);
        }
      }
      if (url && sha256) artifacts[key] = { key, url, sha256, ...(uncompressedSha256 ? { uncompressedSha256 } : {}) };
    }
  }

  const imagesIn = root.images === undefined ? [] : r.list(root.images, 'images', 'a list of name:tag@sha256:… references');
  const images: ImageRef[] = [];
  const seen = new Map<string, number>();
  imagesIn?.forEach((item, index) => {
    const path = fieldPath('images', index);
    const ref = parseImageEntry(r, item, path);
    if (!ref) return;
    const key = `${ref.name}:${ref.tag}`;
    const first = seen.get(key);
    if (first !== undefined) r.problem(path, `one entry per name:tag (images[${first}] has ${key})`, JSON.stringify(item));
    seen.set(key, index);
    images.push(ref);
  });

  const signatures = root.signatures === undefined ? undefined : parseSignatures(r, root.signatures);

  r.check();
  return {
    ...(signatures ? { signatures } : {}),
    file,
    fcos: { stream: stream!, release: release!, arch: arch! },
    kubernetes: { version: kubeVersion! },
    artifacts: artifacts as Lock['artifacts'],
    images,
  };
}

/** The lock must have been pinned for what cluster.yaml asks; otherwise the user re-pins. */
export function checkLockMatchesConfig(lock: Lock, config: ClusterConfig): void {
  const problems: { path: string; expected: string; found: string }[] = [];
  if (lock.fcos.arch !== config.fcos.arch) {
    problems.push({ path: 'fcos.arch', expected: `${config.fcos.arch} (from ${config.file})`, found: lock.fcos.arch });
  }
  if (lock.fcos.stream !== config.fcos.stream) {
    problems.push({ path: 'fcos.stream', expected: `${config.fcos.stream} (from ${config.file})`, found: lock.fcos.stream });
  }
  if (config.fcos.release && lock.fcos.release !== config.fcos.release) {
    problems.push({ path: 'fcos.release', expected: `${config.fcos.release} (from ${config.file})`, found: lock.fcos.release });
  }
  const wanted = config.kubernetes.version;
  const exact = /^v\d+\.\d+\.\d+$/.test(wanted);
  const locked = lock.kubernetes.version;
  if (exact ? locked !== wanted : !locked.startsWith(`${wanted}.`)) {
    problems.push({
      path: 'kubernetes.version',
      expected: exact ? `${wanted} (from ${config.file})` : `a ${wanted}.x release (from ${config.file})`,
      found: locked,
    });
  }
  if (config.target === 'openstack' && !lock.artifacts['fcos-openstack']) {
    problems.push({
      path: 'artifacts.fcos-openstack',
      expected: `the FCOS OpenStack image (target openstack in ${config.file}): make pin TARGET=openstack`,
      found: 'nothing',
    });
  }
  if (config.controlPlane?.virtualIp && !lock.images.some((i) => i.name === kubeVipImage.name && i.tag === kubeVipImage.tag)) {
    problems.push({
      path: 'images',
      expected: `${kubeVipImage.name}:${kubeVipImage.tag} (three control planes in ${config.file} hold their virtual IP with kube-vip): make pin`,
      found: 'no kube-vip image',
    });
  }
  if (problems.length > 0) {
    throw new InputError(lock.file, problems, `The lock was pinned for another cluster.yaml: re-pin it, or change ${config.file} back.`);
  }
}
