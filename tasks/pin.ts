// pin: the one task that asks upstream what to ship. From cluster.yaml it resolves the
// FCOS release (stream metadata, or an explicit release from the release index), the
// Kubernetes patch release (exact, or the newest of a minor from stable-X.Y.txt), every
// artifact's sha256 from upstream's own checksum files, and every image's digest from its
// registry, then writes corekube.lock.yaml: deterministic, atomically, with a diff-style
// summary of what changed. Every other task reads the lock and nothing else.
//
// Trust: pin takes upstream's checksum files as the truth, and checks them against the
// bytes where it downloads anyway: kubeadm (it must run it to learn the image set) and
// butane (no checksum file: its sha256 is computed here, and the lock says so). fetch
// checks every other artifact against the lock later. Image digests are what the registry
// serves for each tag; the layout digest is derived from the manifest where that is exact
// (an OCI manifest is stored unchanged, an index's single linux/ARCH OCI child likewise),
// and found by a real `skopeo copy` into a scratch layout where skopeo converts (Docker
// v2s2, schema 1) or chooses among several candidates: that is what the images stage
// will get from the same skopeo. The blobs such a copy fetched go into cache/oci, so
// `make images` does not fetch them again.
import { execFile } from 'node:child_process';
import { createWriteStream, readFileSync } from 'node:fs';
import { chmod, copyFile, readdir, rm } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import pLimit from 'p-limit';
import { parse as parseYamlScalar } from 'yaml';
import { ChecksumError, removeQuietly, sha256Hasher, type Cache } from './lib/store/cache.ts';
import { goArch, mirrorUrl, upstreamBases, type Architecture, type ClusterConfig, type DownloadFamily } from './lib/inputs/config.ts';
import { downloadChunks, DownloadError, type DownloadOptions } from './lib/store/download.ts';
import { writeAtomically } from './lib/run/engine.ts';
import { ExitCode, InputError, isAbortError, OfflineError, UserError } from './lib/errors.ts';
import { writeXzDecompressed } from './fetch.ts';
import { kubeadmImages, moveBlobsIntoStore, readManifestImages, seededStagingLayout, skopeoCopy, storeDir, type ManifestImage } from './images.ts';
import { checkLockMatchesConfig, lockedArtifacts, lockVersion, parseLock, type AnyArtifactKey, type Artifact, type ArtifactKey, type ImageRef, type Lock } from './lib/inputs/lock.ts';
import { findRef, parseReference, readIndex, registryHasNoSuchImage, sha256Of, splitName } from './lib/store/oci.ts';
import type { RunContext, Stage } from './lib/run/stage.ts';
import { indentTail, runTool, ToolError } from './lib/run/tool.ts';
import { parseChecksumFile, parseFcosRelease, parseFcosReleaseIndex, parseFcosStream, streamArchitectures, type FcosDisk } from './lib/inputs/upstream.ts';

// ---- what to pin ------------------------------------------------------------------------

/** Versions of the node components that do not follow Kubernetes' version. */
export interface ComponentVersions {
  crictl: string;
  containerd: string;
  runc: string;
  cniPlugins: string;
  butane: string;
}

/**
 * The component versions corekube is tested with: the defaults pin writes into the lock
 * (written without a leading v; either form is accepted as an override).
 */
export const testedComponents: Readonly<ComponentVersions> = {
  crictl: '1.37.0',
  containerd: '2.3.7',
  runc: '1.4.4',
  cniPlugins: '1.9.1',
  butane: '0.29.0',
};

export interface PinOptions {
  /** Overrides of testedComponents. */
  components?: Partial<ComponentVersions>;
  /** One line of progress now and then (the stage shows it as the task's output). */
  onProgress?: (line: string) => void;
}

export interface PinResult {
  file: string;
  /** True when the file was (re)written; false when it is byte-identical to what pin made. */
  written: boolean;
  /** The first line of the summary: "corekube.lock.yaml: unchanged", "… 3 changes", "… new lock, 19 entries". */
  headline: string;
  /** Diff-style lines: "+ key: value", "- key: value", "~ key: old → new". */
  changes: string[];
  /** headline and changes, one per line. */
  summary: string;
  lock: Lock;
  text: string;
}

const versionPattern = /^v?\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?$/;

export function resolveComponents(overrides: Partial<ComponentVersions> = {}): ComponentVersions {
  const merged = { ...testedComponents, ...overrides };
  const problems = Object.entries(merged)
    .filter(([, value]) => typeof value !== 'string' || !versionPattern.test(value))
    .map(([key, value]) => `${key}: expected a version like "1.2.3", found ${JSON.stringify(value)}`);
  if (problems.length > 0) throw new UserError(`pin: bad component versions:\n  ${problems.join('\n  ')}`, ExitCode.config);
  const bare = (v: string) => v.replace(/^v/, '');
  return {
    crictl: bare(merged.crictl),
    containerd: bare(merged.containerd),
    runc: bare(merged.runc),
    cniPlugins: bare(merged.cniPlugins),
    butane: bare(merged.butane),
  };
}

export type BinaryKey = Exclude<ArtifactKey, 'fcos-qemu'>;

export interface ArtifactSource {
  key: BinaryKey;
  /** The upstream URL, as the lock records it. */
  url: string;
  /** Upstream's checksum file for url; undefined where upstream publishes none (butane). */
  checksumUrl?: string;
  /** The name the checksum file gives the artifact (for `HASH  NAME` files). */
  fileName: string;
}

/** Where each binary lives upstream and where its checksum file is. Pure. */
export function artifactSources(arch: Architecture, kubernetesVersion: string, components: ComponentVersions): ArtifactSource[] {
  const ga = goArch(arch);
  const gh = upstreamBases.github;
  const k8s = (name: 'kubeadm' | 'kubelet' | 'kubectl'): ArtifactSource => {
    const url = `${upstreamBases.kubernetes}/release/${kubernetesVersion}/bin/linux/${ga}/${name}`;
    return { key: name, url, checksumUrl: `${url}.sha256`, fileName: name };
  };
  const { crictl, containerd, runc, cniPlugins, butane } = components;
  const crictlName = `crictl-v${crictl}-linux-${ga}.tar.gz`;
  const crictlUrl = `${gh}/kubernetes-sigs/cri-tools/releases/download/v${crictl}/${crictlName}`;
  const containerdName = `containerd-${containerd}-linux-${ga}.tar.gz`;
  const containerdUrl = `${gh}/containerd/containerd/releases/download/v${containerd}/${containerdName}`;
  const runcBase = `${gh}/opencontainers/runc/releases/download/v${runc}`;
  const cniName = `cni-plugins-linux-${ga}-v${cniPlugins}.tgz`;
  const cniUrl = `${gh}/containernetworking/plugins/releases/download/v${cniPlugins}/${cniName}`;
  const butaneName = `butane-${arch}-unknown-linux-gnu`;
  return [
    k8s('kubeadm'),
    k8s('kubelet'),
    k8s('kubectl'),
    { key: 'crictl', url: crictlUrl, checksumUrl: `${crictlUrl}.sha256`, fileName: crictlName },
    { key: 'containerd', url: containerdUrl, checksumUrl: `${containerdUrl}.sha256sum`, fileName: containerdName },
    { key: 'runc', url: `${runcBase}/runc.${ga}`, checksumUrl: `${runcBase}/runc.sha256sum`, fileName: `runc.${ga}` },
    { key: 'cni-plugins', url: cniUrl, checksumUrl: `${cniUrl}.sha256`, fileName: cniName },
    { key: 'butane', url: `${gh}/coreos/butane/releases/download/v${butane}/${butaneName}`, fileName: butaneName },
  ];
}

// ---- upstream documents, parsed (pure) -----------------------------------------------------

/** For a minor like "v1.35": the version marker path under dl.k8s.io; undefined for an exact release. */
export function kubernetesMarkerPath(requested: string): string | undefined {
  const minor = /^v(\d+)\.(\d+)$/.exec(requested);
  return minor ? `/release/stable-${minor[1]}.${minor[2]}.txt` : undefined;
}

/** The content of `stable-X.Y.txt`: one exact release of that minor. */
export function parseVersionMarker(source: string, text: string, minor: string): string {
  const version = text.trim();
  if (!/^v\d+\.\d+\.\d+$/.test(version) || !version.startsWith(`${minor}.`)) {
    throw new InputError(source, [{ path: '', expected: `one ${minor}.x release, like "${minor}.0"`, found: JSON.stringify(text.slice(0, 80)) }]);
  }
  return version;
}

/**
 * What `kubeadm config images list` printed: one image reference per line (lines with
 * spaces are log noise). Must cover the set kubeadm is known to pull for the version.
 */
export function parseKubeadmImageList(source: string, stdout: string, version: string): { name: string; tag: string }[] {
  const images: { name: string; tag: string }[] = [];
  const bad: string[] = [];
  for (const line of stdout.split('\n').map((l) => l.trim())) {
    if (!line || /\s/.test(line)) continue;
    const ref = parseReference(line);
    if (!ref || ref.tag === undefined || ref.digest !== undefined) bad.push(line);
    else images.push({ name: ref.name, tag: ref.tag });
  }
  const lacking = kubeadmImages(version)
    .filter((wanted) => !images.some((i) => i.name === wanted.name && (wanted.tag === undefined || i.tag === wanted.tag)))
    .map((wanted) => `${wanted.name}${wanted.tag ? `:${wanted.tag}` : ''}`);
  if (bad.length > 0 || lacking.length > 0) {
    throw new UserError(
      `${source}: not the image list kubeadm ${version} prints` +
        (bad.length > 0 ? `\n  lines that are no name:tag: ${bad.slice(0, 5).join(', ')}` : '') +
        (lacking.length > 0 ? `\n  missing: ${lacking.join(', ')}` : '') +
        `\n  output: ${JSON.stringify(stdout.slice(0, 400))}`,
    );
  }
  return images;
}

export interface WantedImage {
  name: string;
  tag: string;
  /** Pinned by the manifest itself (name:tag@sha256:…): pin keeps it and checks the registry has it. */
  digest?: string;
  /** Who asks for it, for messages. */
  from: string;
}

/** The images the cluster runs: kubeadm's set and every image: in manifests/, one per name:tag, sorted. */
export function wantedImages(kubeadmList: readonly { name: string; tag: string }[], version: string, manifestImages: readonly ManifestImage[]): WantedImage[] {
  const byRef = new Map<string, WantedImage>();
  const problems: string[] = [];
  const add = (image: WantedImage) => {
    const key = `${image.name}:${image.tag}`;
    const before = byRef.get(key);
    if (before && image.digest && before.digest && before.digest !== image.digest) {
      problems.push(`  ${key}: ${before.from} pins ${before.digest}, ${image.from} pins ${image.digest}`);
      return;
    }
    if (!before || (image.digest && !before.digest)) byRef.set(key, image);
  };
  for (const image of kubeadmList) add({ ...image, from: `kubeadm ${version}` });
  for (const { file, image } of manifestImages) {
    const ref = parseReference(image);
    if (!ref) {
      problems.push(`  ${file}: "${image}" is not an image reference`);
      continue;
    }
    if (ref.digest && ref.tag === undefined) {
      problems.push(`  ${file}: ${image} has a digest but no tag: write it as name:tag@sha256:… (the lock and the kubelet name images by tag too)`);
      continue;
    }
    add({ name: ref.name, tag: ref.tag ?? 'latest', ...(ref.digest ? { digest: ref.digest } : {}), from: file });
  }
  if (problems.length > 0) throw new UserError(`pin: cannot pin the images the cluster needs:\n${problems.join('\n')}`, ExitCode.config);
  return [...byRef.values()].sort((a, b) => compare(`${a.name}:${a.tag}`, `${b.name}:${b.tag}`));
}

const ociManifest = 'application/vnd.oci.image.manifest.v1+json';
const ociIndex = 'application/vnd.oci.image.index.v1+json';
const ociConfig = 'application/vnd.oci.image.config.v1+json';
const dockerList = 'application/vnd.docker.distribution.manifest.list.v2+json';

export type LayoutChoice = { layoutDigest: string } | { copy: string };

/**
 * Which manifest lands in an OCI layout when skopeo copies `digest` for linux/ARCH, where
 * that follows from the manifest alone: an OCI manifest is stored unchanged; of an index,
 * the one linux/ARCH child, when it is an OCI manifest. Anything skopeo converts (Docker
 * v2s2, schema 1) or chooses by rules of its own (several candidates) needs a real copy:
 * `{copy: why}`. An index without linux/ARCH is an error.
 */
export function layoutChoice(raw: string | Buffer, digest: string, arch: 'amd64' | 'arm64', where: string): LayoutChoice {
  let json: {
    schemaVersion?: number;
    mediaType?: string;
    config?: { mediaType?: string };
    manifests?: { mediaType?: string; digest?: string; platform?: { os?: string; architecture?: string; variant?: string } }[];
  };
  try {
    json = JSON.parse(raw.toString());
  } catch {
    throw new UserError(`${where}: the registry's manifest for it is not JSON`);
  }
  const isIndex = json.mediaType === ociIndex || json.mediaType === dockerList || (json.mediaType === undefined && Array.isArray(json.manifests));
  if (isIndex) {
    const all = Array.isArray(json.manifests) ? json.manifests : [];
    let candidates = all.filter((m) => m.platform?.os === 'linux' && m.platform.architecture === arch);
    if (candidates.length > 1 && arch === 'arm64') {
      const v8 = candidates.filter((m) => m.platform?.variant === undefined || m.platform.variant === 'v8');
      if (v8.length > 0) candidates = v8;
    }
    if (candidates.length === 0) {
      const offered = all
        .map((m) => [m.platform?.os, m.platform?.architecture, m.platform?.variant].filter(Boolean).join('/'))
        .filter(Boolean);
      throw new UserError(
        `${where}: the image has no linux/${arch} variant (it has ${[...new Set(offered)].join(', ') || 'none'}).\n` +
          'Choose another image or tag for this architecture (fcos.arch in cluster.yaml).',
      );
    }
    if (candidates.length > 1) return { copy: `the index has ${candidates.length} linux/${arch} manifests; skopeo picks one` };
    const child = candidates[0]!;
    if (typeof child.digest !== 'string' || !/^sha256:[0-9a-f]{64}$/.test(child.digest)) throw new UserError(`${where}: the index's linux/${arch} entry has no sha256 digest`);
    return child.mediaType === ociManifest ? { layoutDigest: child.digest } : { copy: `its linux/${arch} manifest is ${child.mediaType ?? 'untyped'}, converted to OCI on copy` };
  }
  if (json.mediaType === ociManifest || (json.mediaType === undefined && json.schemaVersion === 2 && json.config?.mediaType === ociConfig)) {
    return { layoutDigest: digest };
  }
  return { copy: `its manifest is ${json.mediaType ?? `schema ${json.schemaVersion ?? '?'}`}, converted to OCI on copy` };
}

// ---- the lock's text and its diff (pure) ---------------------------------------------------

export type LockContent = Pick<Lock, 'fcos' | 'kubernetes' | 'artifacts' | 'images'>;

/** One comment per artifact: where its checksum came from. */
export type ArtifactNotes = Partial<Record<AnyArtifactKey, string>>;

const compare = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);

/** A scalar as YAML: plain where it reads back as the same string, quoted otherwise. */
function scalar(value: string): string {
  let plain = false;
  try {
    plain = !/[,{}[\]#]|: |^[-?:&*!|>'"%@`]|\s$/.test(value) && parseYamlScalar(value) === value;
  } catch {
    plain = false;
  }
  return plain ? value : JSON.stringify(value);
}

/** The lock's text: fixed key order, images sorted by name:tag, one comment per artifact. */
export function renderLock(content: LockContent, notes: ArtifactNotes = {}): string {
  const lines = [
    '# corekube.lock.yaml: what exactly ships. Written by `make pin` (tasks/pin.ts) from upstream\'s',
    '# metadata, checksum files and registries; change cluster.yaml and pin again rather than',
    '# editing it. Every other task reads this file and nothing else.',
    `lockVersion: ${lockVersion}`,
    `fcos: {stream: ${scalar(content.fcos.stream)}, release: ${scalar(content.fcos.release)}, arch: ${scalar(content.fcos.arch)}}`,
    `kubernetes: {version: ${scalar(content.kubernetes.version)}}`,
    'artifacts:',
  ];
  for (const artifact of lockedArtifacts(content)) {
    const key = artifact.key;
    lines.push(`  ${key}:`);
    for (const note of (notes[key] ?? '').split('\n').filter(Boolean)) lines.push(`    # ${note}`);
    lines.push(`    url: ${scalar(artifact.url)}`, `    sha256: ${scalar(artifact.sha256)}`);
    if (artifact.uncompressedSha256) lines.push(`    uncompressedSha256: ${scalar(artifact.uncompressedSha256)}`);
  }
  const images = [...content.images].sort((a, b) => compare(`${a.name}:${a.tag}`, `${b.name}:${b.tag}`));
  if (images.length === 0) lines.push('images: []');
  else {
    lines.push('images:  # name:tag@digest the registry serves for the tag; layoutDigest: the linux/ARCH OCI manifest the layout holds, where it differs');
    for (const image of images) {
      const text = `${image.name}:${image.tag}@${image.digest}`;
      if (image.layoutDigest === image.digest) lines.push(`  - ${scalar(text)}`);
      else lines.push(`  - image: ${scalar(text)}`, `    layoutDigest: ${scalar(image.layoutDigest)}`);
    }
  }
  return `${lines.join('\n')}\n`;
}

const short = (digest: string) => digest.replace(/^(sha256:)?([0-9a-f]{12})[0-9a-f]{52}$/, (_, prefix: string | undefined, head: string) => `${prefix ?? ''}${head}…`);

/** Every entry of a lock as key → value, for the diff. Images are keyed by name where the name is unique. */
export function lockEntries(lock: LockContent, uniqueNames: ReadonlySet<string>): Map<string, string> {
  const entries = new Map<string, string>();
  entries.set('fcos', `${lock.fcos.stream} ${lock.fcos.release} ${lock.fcos.arch}`);
  entries.set('kubernetes.version', lock.kubernetes.version);
  for (const a of lockedArtifacts(lock)) {
    const key = a.key;
    entries.set(`artifacts.${key}`, `${a.url} sha256:${a.sha256}${a.uncompressedSha256 ? ` uncompressed sha256:${a.uncompressedSha256}` : ''}`);
  }
  for (const image of [...lock.images].sort((a, b) => compare(`${a.name}:${a.tag}`, `${b.name}:${b.tag}`))) {
    const key = uniqueNames.has(image.name) ? `image ${image.name}` : `image ${image.name}:${image.tag}`;
    entries.set(key, `${image.name}:${image.tag}@${image.digest}${image.layoutDigest !== image.digest ? ` layout ${image.layoutDigest}` : ''}`);
  }
  return entries;
}

/** Diff-style lines between two locks: `+ key: value`, `- key: value`, `~ key: old → new`. */
export function diffLocks(before: LockContent | undefined, after: LockContent): string[] {
  const counts = (lock: LockContent | undefined) => {
    const map = new Map<string, number>();
    for (const image of lock?.images ?? []) map.set(image.name, (map.get(image.name) ?? 0) + 1);
    return map;
  };
  const [b, a] = [counts(before), counts(after)];
  const unique = new Set([...new Set([...b.keys(), ...a.keys()])].filter((name) => (b.get(name) ?? 0) <= 1 && (a.get(name) ?? 0) <= 1));
  const old = before ? lockEntries(before, unique) : new Map<string, string>();
  const now = lockEntries(after, unique);
  const shown = (value: string) => value.replace(/(sha256:)?\b[0-9a-f]{64}\b/g, (match) => short(match));
  const lines: string[] = [];
  for (const key of [...new Set([...old.keys(), ...now.keys()])]) {
    const [was, is] = [old.get(key), now.get(key)];
    if (was === is) continue;
    if (was === undefined) lines.push(`+ ${key}: ${shown(is!)}`);
    else if (is === undefined) lines.push(`- ${key}: ${shown(was)}`);
    else {
      // An artifact whose URL stayed: only its checksums changed (upstream re-published it).
      const [wasUrl, ...wasRest] = was.split(' ');
      const [isUrl, ...isRest] = is.split(' ');
      const sameUrl = key.startsWith('artifacts.') && wasUrl === isUrl;
      lines.push(sameUrl ? `~ ${key}: ${shown(wasRest.join(' '))} → ${shown(isRest.join(' '))} (same URL)` : `~ ${key}: ${shown(was)} → ${shown(is)}`);
    }
  }
  return lines;
}

/** The summary pin prints: a headline and the diff lines. */
export function summarize(name: string, beforeText: string | undefined, before: LockContent | undefined, beforeProblem: string | undefined, text: string, after: LockContent): { headline: string; changes: string[]; written: boolean } {
  if (beforeText === text) return { headline: `${name}: unchanged`, changes: [], written: false };
  if (beforeText === undefined) {
    const changes = diffLocks(undefined, after);
    return { headline: `${name}: new lock, ${changes.length} entries`, changes, written: true };
  }
  if (!before) {
    const changes = diffLocks(undefined, after);
    return { headline: `${name}: the old lock did not parse (${beforeProblem ?? 'unreadable'}); replaced, ${changes.length} entries`, changes, written: true };
  }
  const changes = diffLocks(before, after);
  if (changes.length === 0) return { headline: `${name}: unchanged pins (the file was rewritten in pin's format)`, changes, written: true };
  return { headline: `${name}: ${changes.length} change${changes.length === 1 ? '' : 's'}`, changes, written: true };
}

// ---- talking to upstream -------------------------------------------------------------------

interface Session {
  ctx: RunContext;
  config: ClusterConfig;
  cache: Cache;
  signal: AbortSignal;
  download: DownloadOptions;
  progress: (line: string) => void;
}

const firstLine = (text: string) => text.split('\n')[0] ?? text;

/** Where a download family comes from: the mirror from cluster.yaml, said in messages when it is one. */
function mirrorNote(config: ClusterConfig, family: DownloadFamily): string {
  const base = config.mirrors.downloads[family];
  return base === upstreamBases[family] ? '' : ` (mirrors.${family} in ${config.file}: ${base})`;
}

function familyOf(url: string): DownloadFamily {
  return (Object.keys(upstreamBases) as DownloadFamily[]).find((f) => url.startsWith(`${upstreamBases[f]}/`)) ?? 'github';
}

/** A small document (metadata, checksum file, version marker) as text. */
async function fetchText(s: Session, upstreamUrl: string, what: string, hint: string): Promise<{ text: string; url: string }> {
  const url = mirrorUrl(upstreamUrl, s.config.mirrors.downloads);
  const chunks: Buffer[] = [];
  let size = 0;
  try {
    for await (const chunk of downloadChunks(url, s.download)) {
      size += chunk.length;
      if (size > 64 << 20) throw new UserError(`pin: ${what}: ${url} is larger than 64 MiB: not the document pin expects`);
      chunks.push(chunk);
    }
  } catch (error) {
    if (!(error instanceof DownloadError)) throw error;
    throw new UserError(`pin: ${what}: ${firstLine(error.message)}${mirrorNote(s.config, familyOf(upstreamUrl))}\n${hint}`);
  }
  return { text: Buffer.concat(chunks).toString('utf8'), url };
}

async function fetchJson(s: Session, upstreamUrl: string, what: string, hint: string): Promise<{ json: unknown; url: string }> {
  const { text, url } = await fetchText(s, upstreamUrl, what, hint);
  try {
    return { json: JSON.parse(text), url };
  } catch (error) {
    throw new UserError(`pin: ${what}: ${url} is not JSON (${(error as Error).message})\n${hint}`);
  }
}

/**
 * Downloads a file into the cache, hashing it as it streams; checked against `expected`
 * when upstream published one. Returns the sha256 and the cache entry.
 */
async function downloadToCacheHashed(
  s: Session,
  key: string,
  upstreamUrl: string,
  expected?: { sha256: string; checksumUrl: string },
): Promise<{ sha256: string; path: string }> {
  if (expected && s.cache.has(expected.sha256)) return { sha256: expected.sha256, path: s.cache.entryPath(expected.sha256) };
  const url = mirrorUrl(upstreamUrl, s.config.mirrors.downloads);
  const tmp = await s.cache.temporaryPath(`pin-${key}`);
  try {
    const hash = sha256Hasher();
    s.progress(`downloading ${key} from ${url}`);
    try {
      await pipeline(
        downloadChunks(url, s.download),
        new Transform({
          transform(chunk: Buffer, _encoding, callback) {
            hash.update(chunk);
            callback(null, chunk);
          },
        }),
        createWriteStream(tmp, { flags: 'wx' }),
      );
    } catch (error) {
      if (!(error instanceof DownloadError)) throw error;
      throw new UserError(`pin: ${key}: ${firstLine(error.message)}${mirrorNote(s.config, familyOf(upstreamUrl))}\nCheck the version and the mirror, then pin again.`);
    }
    const found = hash.digest('hex');
    if (expected && found !== expected.sha256) {
      throw new ChecksumError(
        `pin: ${key}: ${url} does not match its upstream checksum file ${mirrorUrl(expected.checksumUrl, s.config.mirrors.downloads)}`,
        `${expected.sha256} (the checksum file)`,
        `${found} (the downloaded bytes)`,
        'Upstream (or the mirror) serves a file and a checksum that disagree. Nothing was written: the lock keeps what it had.\n' +
          'Check the mirror, or try again once upstream is consistent.',
      );
    }
    return { sha256: found, path: await s.cache.commit(tmp, found) };
  } finally {
    await removeQuietly(tmp);
  }
}

interface PinnedFcos {
  release: string;
  disk: FcosDisk;
  note: string;
  /** The OpenStack image of the same release, when the target is openstack. */
  openstack?: { disk: FcosDisk; note: string };
}

/** The FCOS release and its qemu disk from the metadata (no image download). */
async function resolveFcos(s: Session): Promise<PinnedFcos> {
  const { stream, arch, release: wanted } = s.config.fcos;
  const base = upstreamBases.fcos;
  const hint = `Check fcos.stream and fcos.release in ${s.config.file}, and mirrors.fcos if you use one.`;
  let disk: FcosDisk;
  let note: string;
  let openstack: PinnedFcos['openstack'];
  if (!wanted) {
    s.progress(`reading the ${stream} stream metadata`);
    const { json, url } = await fetchJson(s, `${base}/streams/${stream}.json`, `the FCOS ${stream} stream metadata`, hint);
    const offered = streamArchitectures(json);
    if (offered && !offered.includes(arch)) {
      throw new UserError(
        `pin: the FCOS ${stream} stream has no ${arch} build: ${url} offers only ${offered.join(', ') || 'no architecture'}.\n` +
          `Set fcos.arch in ${s.config.file} to one of those, or choose another fcos.stream.`,
        ExitCode.config,
      );
    }
    const docStream = (json as { stream?: unknown }).stream;
    if (typeof docStream === 'string' && docStream !== stream) {
      throw new UserError(`pin: ${url} is the metadata of the ${docStream} stream, not ${stream}: check the mirror`);
    }
    disk = parseFcosStream(url, json, arch);
    note = `from streams/${stream}.json: architectures.${arch}.artifacts.qemu.formats["qcow2.xz"].disk`;
    if (s.config.target === 'openstack') {
      openstack = { disk: parseFcosStream(url, json, arch, 'openstack'), note: note.replace('.qemu.', '.openstack.') };
    }
  } else {
    s.progress(`reading the ${stream} release index`);
    const { json, url } = await fetchJson(s, `${base}/prod/streams/${stream}/releases.json`, `the FCOS ${stream} release index`, hint);
    const entries = parseFcosReleaseIndex(url, json);
    const entry = entries.find((e) => e.version === wanted);
    if (!entry) {
      const newest = entries.slice(-3).map((e) => e.version).reverse();
      throw new UserError(
        `pin: FCOS release ${wanted} is not in the ${stream} stream's release index (${url}; newest there: ${newest.join(', ') || 'none'}).\n` +
          `Set fcos.release in ${s.config.file} to a release of that stream, or leave it out for the newest.`,
        ExitCode.config,
      );
    }
    if (entry.architectures.length > 0 && !entry.architectures.includes(arch)) {
      throw new UserError(
        `pin: FCOS release ${wanted} of the ${stream} stream has no ${arch} build (it has ${entry.architectures.join(', ')}).\n` +
          `Set fcos.arch in ${s.config.file} to one of those, or choose another release.`,
        ExitCode.config,
      );
    }
    const metadataUrl = entry.metadata ?? `${base}/prod/streams/${stream}/builds/${wanted}/release.json`;
    const metadata = await fetchJson(s, metadataUrl, `the metadata of FCOS ${wanted}`, hint);
    disk = parseFcosRelease(metadata.url, metadata.json, arch);
    if (disk.release !== wanted) throw new UserError(`pin: ${metadata.url} describes FCOS ${disk.release}, not ${wanted}: check the mirror`);
    note = `from prod/streams/${stream}/builds/${wanted}/release.json: architectures.${arch}.media.qemu.artifacts["qcow2.xz"].disk`;
    if (s.config.target === 'openstack') {
      openstack = { disk: { ...parseFcosRelease(metadata.url, metadata.json, arch, 'openstack'), release: disk.release }, note: note.replace('.qemu.', '.openstack.') };
    }
  }
  if (openstack && openstack.disk.release !== disk.release) {
    throw new UserError(`pin: the FCOS metadata offers qemu ${disk.release} but openstack ${openstack.disk.release}: pin again once upstream has published both (or set fcos.release)`);
  }
  // A mirror that rewrote the location to itself: the lock keeps upstream's URL.
  const mirrorBase = s.config.mirrors.downloads.fcos;
  const upstream = (location: string) => (mirrorBase !== base && location.startsWith(`${mirrorBase}/`) ? base + location.slice(mirrorBase.length) : location);
  return {
    release: disk.release,
    disk: { ...disk, location: upstream(disk.location) },
    note,
    ...(openstack ? { openstack: { disk: { ...openstack.disk, location: upstream(openstack.disk.location) }, note: openstack.note } } : {}),
  };
}

/**
 * The lock's fcos-qemu (or fcos-openstack) entry. Where the metadata lacks uncompressed-sha256 it is computed
 * from the image, once: a re-pin of the same .xz (same URL and sha256) keeps the previous
 * lock's value when the cache holds that decompressed image (fetch or pin checked the pair
 * before storing it; the same compressed bytes always decompress to the same bytes).
 */
async function fcosArtifact(s: Session, key: 'fcos-qemu' | 'fcos-openstack', disk: FcosDisk, previous: Lock | undefined): Promise<Artifact> {
  const { location, sha256 } = disk;
  const old = previous?.artifacts[key];
  const known = old && old.url === location && old.sha256 === sha256 && old.uncompressedSha256 && s.cache.has(old.uncompressedSha256) ? old.uncompressedSha256 : undefined;
  const uncompressedSha256 = disk.uncompressedSha256 ?? known ?? (await hashFcosImage(s, key, location, sha256));
  return { key, url: location, sha256, uncompressedSha256 };
}

/** Downloads and decompresses the qcow2.xz once (into the cache) to learn the sha256 the metadata lacks. */
async function hashFcosImage(s: Session, key: 'fcos-qemu' | 'fcos-openstack', upstreamUrl: string, sha256: string): Promise<string> {
  const url = mirrorUrl(upstreamUrl, s.config.mirrors.downloads);
  const tmp = await s.cache.temporaryPath(`pin-${key}`);
  s.progress(`the metadata has no uncompressed-sha256: downloading ${url} to compute it`);
  try {
    let result: { compressedSha256: string; sha256: string };
    try {
      result = await writeXzDecompressed(downloadChunks(url, s.download), tmp, s.signal);
    } catch (error) {
      if (error instanceof UserError && !(error instanceof DownloadError)) throw error;
      if (isAbortError(error) || s.signal.aborted) throw error;
      throw new UserError(`pin: ${key}: ${firstLine((error as Error).message)}${mirrorNote(s.config, 'fcos')}`);
    }
    if (result.compressedSha256 !== sha256) {
      throw new ChecksumError(
        `pin: ${key}: ${url} does not match the sha256 in the FCOS metadata`,
        `${sha256} (the metadata)`,
        `${result.compressedSha256} (the downloaded bytes)`,
        'Nothing was written: the lock keeps what it had. Check the mirror, or try again.',
      );
    }
    await s.cache.commit(tmp, result.sha256);
    return result.sha256;
  } finally {
    await removeQuietly(tmp);
  }
}

async function resolveKubernetesVersion(s: Session): Promise<string> {
  const requested = s.config.kubernetes.version;
  const marker = kubernetesMarkerPath(requested);
  if (!marker) return requested;
  s.progress(`reading the newest ${requested} release`);
  const { text, url } = await fetchText(
    s,
    `${upstreamBases.kubernetes}${marker}`,
    `the newest Kubernetes ${requested} release`,
    `Check kubernetes.version in ${s.config.file} (is ${requested} released?), and mirrors.kubernetes if you use one.`,
  );
  return parseVersionMarker(url, text, requested);
}

async function readChecksum(s: Session, source: ArtifactSource, kubernetesVersion: string): Promise<string> {
  const { text, url } = await fetchText(
    s,
    source.checksumUrl!,
    `the checksum file of ${source.key}`,
    source.key.startsWith('kube')
      ? `Check that Kubernetes ${kubernetesVersion} exists (kubernetes.version in ${s.config.file}) and the mirror has it.`
      : `Check the ${source.key} version pin uses and the mirror (mirrors.github).`,
  );
  return parseChecksumFile(url, text, source.fileName);
}

/** Runs the fetched kubeadm: `config images list --kubernetes-version V`. */
async function kubeadmImageList(s: Session, binary: string, version: string): Promise<{ name: string; tag: string }[]> {
  const exe = await s.cache.temporaryPath('pin-kubeadm');
  await copyFile(binary, exe);
  await chmod(exe, 0o755);
  const args = ['config', 'images', 'list', '--kubernetes-version', version];
  s.progress(`kubeadm ${args.join(' ')}`);
  try {
    const stdout = await new Promise<string>((resolve, reject) => {
      execFile(exe, args, { signal: s.signal, timeout: 120_000, maxBuffer: 1 << 20, encoding: 'utf8' }, (error, out, err) => {
        if (!error) return resolve(out);
        if (s.signal.aborted) return reject(s.signal.reason);
        const code = (error as { code?: unknown }).code;
        reject(new UserError(`pin: the fetched kubeadm failed: kubeadm ${args.join(' ')} (${typeof code === 'number' ? `exit ${code}` : String(code ?? error.message)}):\n${indentTail(err || out || error.message)}`));
      });
    });
    return parseKubeadmImageList(`kubeadm ${args.join(' ')}`, stdout, version);
  } finally {
    await rm(exe, { force: true });
  }
}

function hostGoArch(): 'amd64' | 'arm64' | undefined {
  return process.arch === 'x64' ? 'amd64' : process.arch === 'arm64' ? 'arm64' : undefined;
}

/** Where skopeo reaches an image: its registry, or the mirror cluster.yaml names for that host. */
function registryOf(config: ClusterConfig, name: string): { base: string; insecure: boolean } {
  const { host, repository } = splitName(name);
  const mirror = config.mirrors.registries[host];
  return { base: `docker://${mirror?.location ?? host}/${repository}`, insecure: mirror?.insecure ?? false };
}

function skopeoFailure(image: string, reference: string, error: unknown, insecure: boolean, host: string): unknown {
  if (!(error instanceof ToolError)) return error;
  return new UserError(
    `pin: image ${image}: skopeo could not read ${reference}:\n${indentTail(error.stderr, 6)}\n` +
      (registryHasNoSuchImage(error.stderr)
        ? `The registry has no such tag or digest: check the image in kubeadm's list or manifests/, or the mirror for ${host}.`
        : `Check that the registry${insecure ? '' : ' (TLS)'} answers, or set a mirror in cluster.yaml (mirrors.registries.${host}).`),
  );
}

async function resolveImage(s: Session, wanted: WantedImage): Promise<ImageRef> {
  const ref = `${wanted.name}:${wanted.tag}`;
  const { base, insecure } = registryOf(s.config, wanted.name);
  const host = splitName(wanted.name).host;
  const retries = `--retry-times=${s.ctx.settings.http.retries}`;
  const reference = wanted.digest ? `${base}@${wanted.digest}` : `${base}:${wanted.tag}`;
  s.progress(`skopeo inspect --raw ${reference}`);
  const raw = await runTool('skopeo', ['inspect', '--raw', retries, `--tls-verify=${!insecure}`, reference], { signal: s.signal }).catch((error: unknown) => {
    throw skopeoFailure(ref, reference, error, insecure, host);
  });
  const digest = sha256Of(Buffer.from(raw, 'utf8'));
  if (wanted.digest && digest !== wanted.digest) {
    throw new UserError(`pin: image ${ref}: ${reference} serves a manifest with digest ${digest}, not the ${wanted.digest} that ${wanted.from} pins`);
  }
  const arch = goArch(s.config.fcos.arch);
  const choice = layoutChoice(raw, digest, arch, `pin: image ${ref} (${wanted.from})`);
  const layoutDigest = 'layoutDigest' in choice ? choice.layoutDigest : await copiedLayoutDigest(s, ref, `${base}@${digest}`, insecure, host);
  return { name: wanted.name, tag: wanted.tag, digest, layoutDigest, text: `${ref}@${digest}` };
}

/**
 * The digest skopeo gives the image in an OCI layout, found by copying it (by digest) into
 * a scratch layout with the images stage's flags. The scratch layout starts with the
 * store's blobs (hardlinks: skopeo skips them), and the blobs it fetched go into the store.
 */
async function copiedLayoutDigest(s: Session, ref: string, reference: string, insecure: boolean, host: string): Promise<string> {
  const store = storeDir(s.ctx);
  const staging = await seededStagingLayout(s.cache, store, `pin-oci-${ref.split('/').pop()}`);
  try {
    s.progress(`skopeo copy ${reference} (to learn its OCI layout digest)`);
    await skopeoCopy({ reference, layout: staging, ref, arch: s.config.fcos.arch, retries: s.ctx.settings.http.retries, insecure, signal: s.signal }).catch((error: unknown) => {
      throw skopeoFailure(ref, reference, error, insecure, host);
    });
    const descriptor = findRef(readIndex(staging), ref);
    if (!descriptor) throw new UserError(`pin: image ${ref}: skopeo copied ${reference} but left no manifest for it`);
    // Content-addressed and verified by skopeo: keep what was fetched for the images stage.
    const fetched = (await readdir(join(staging, 'blobs', 'sha256'))).map((name) => `sha256:${name}`);
    await moveBlobsIntoStore(staging, store, fetched);
    return descriptor.digest;
  } finally {
    await rm(staging, { recursive: true, force: true });
  }
}

/** Runs jobs side by side; on the first failure cancels the rest, waits for them, and throws it. */
async function allOrNothing<T extends readonly unknown[]>(parent: AbortSignal, jobs: { [K in keyof T]: (signal: AbortSignal) => Promise<T[K]> }): Promise<T> {
  const controller = new AbortController();
  const onAbort = () => controller.abort(parent.reason);
  parent.addEventListener('abort', onAbort, { once: true });
  let first: { error: unknown } | undefined;
  try {
    const settled = await Promise.allSettled(
      jobs.map((job) =>
        job(controller.signal).catch((error: unknown) => {
          if (!first && !(controller.signal.aborted && isAbortError(error))) {
            first = { error };
            controller.abort(error);
          }
          throw error;
        }),
      ),
    );
    if (parent.aborted) throw parent.reason;
    if (first) throw first.error;
    return settled.map((r) => (r as PromiseFulfilledResult<unknown>).value) as unknown as T;
  } finally {
    parent.removeEventListener('abort', onAbort);
  }
}

// ---- each component, resolved -----------------------------------------------------------
// One function per part of the lock; pin runs them side by side (allOrNothing). Each
// returns its artifacts with the note the lock prints above each (where its sha256 came from).

/** What one resolver contributes to the lock. */
interface Pinned {
  artifacts: Artifact[];
  notes: ArtifactNotes;
}

/** The FCOS qemu image: URL and sha256 from the metadata, the uncompressed sha256 from it or from the image. */
async function pinFcosQemu(s: Session, fcos: PinnedFcos, previous: Lock | undefined): Promise<Pinned> {
  const note = fcos.disk.uncompressedSha256 ? fcos.note : `${fcos.note}\nuncompressedSha256: computed by pin from the decompressed download (the metadata has none)`;
  return { artifacts: [await fcosArtifact(s, 'fcos-qemu', fcos.disk, previous)], notes: { 'fcos-qemu': note } };
}

/** The FCOS openstack image of the same release, for target openstack (nothing for qemu). */
async function pinFcosOpenstack(s: Session, fcos: PinnedFcos, previous: Lock | undefined): Promise<Pinned> {
  if (!fcos.openstack) return { artifacts: [], notes: {} };
  const { disk, note } = fcos.openstack;
  const shown = disk.uncompressedSha256 ? note : `${note}\nuncompressedSha256: computed by pin from the decompressed download (the metadata has none)`;
  return { artifacts: [await fcosArtifact(s, 'fcos-openstack', disk, previous)], notes: { 'fcos-openstack': shown } };
}

/** The Kubernetes release, every binary with an upstream checksum file, and the image set its kubeadm names (with manifests/). */
async function pinKubernetes(s: Session, components: ComponentVersions, manifestImages: readonly ManifestImage[]): Promise<Pinned & { version: string; images: ImageRef[] }> {
  const version = await resolveKubernetesVersion(s);
  const sources = artifactSources(s.config.fcos.arch, version, components).filter((src) => src.checksumUrl);
  const sums = await Promise.all(sources.map((src) => readChecksum(s, src, version)));
  const artifacts = sources.map((src, i): Artifact => ({ key: src.key, url: src.url, sha256: sums[i]! }));
  const notes: ArtifactNotes = {};
  for (const src of sources) notes[src.key] = `sha256 from ${src.checksumUrl}${src.key === 'kubeadm' ? ' (checked against the download)' : ''}`;
  const kubeadm = await runnableKubeadm(s, artifacts.find((a) => a.key === 'kubeadm')!, sources.find((src) => src.key === 'kubeadm')!, version);
  const wanted = wantedImages(await kubeadmImageList(s, kubeadm, version), version, manifestImages);
  const limit = pLimit(s.ctx.settings.jobs);
  const images = await Promise.all(wanted.map((w) => limit(() => resolveImage(s, w))));
  return { version, artifacts, notes, images };
}

/**
 * kubeadm, downloaded and checked against its checksum file, to run here: the cluster's
 * own, or where that cannot run on this machine, the same release built for this host.
 */
async function runnableKubeadm(s: Session, kubeadm: Artifact, source: ArtifactSource, version: string): Promise<string> {
  const entry = await downloadToCacheHashed(s, 'kubeadm', kubeadm.url, { sha256: kubeadm.sha256, checksumUrl: source.checksumUrl! });
  const host = hostGoArch();
  const clusterArch = goArch(s.config.fcos.arch);
  if (host === clusterArch) return entry.path;
  if (!host) throw new UserError(`pin: cannot run kubeadm on this machine (${process.arch}): pin on an amd64 or arm64 host`);
  const hostUrl = kubeadm.url.replace(`/linux/${clusterArch}/`, `/linux/${host}/`);
  const hostSum = await readChecksum(s, { key: 'kubeadm', url: hostUrl, checksumUrl: `${hostUrl}.sha256`, fileName: 'kubeadm' }, version);
  return (await downloadToCacheHashed(s, 'kubeadm', hostUrl, { sha256: hostSum, checksumUrl: `${hostUrl}.sha256` })).path;
}

/** butane: upstream publishes no checksum file, so its sha256 is computed from the download (and the lock says so). */
async function pinButane(s: Session, components: ComponentVersions): Promise<Pinned> {
  const source = artifactSources(s.config.fcos.arch, 'v0.0.0', components).find((src) => src.key === 'butane')!;
  const { sha256 } = await downloadToCacheHashed(s, 'butane', source.url);
  return {
    artifacts: [{ key: 'butane', url: source.url, sha256 }],
    notes: { butane: 'no upstream checksum file (only a detached .asc signature, not checked here):\nsha256 computed by pin from the downloaded bytes' },
  };
}

// ---- pin ------------------------------------------------------------------------------------

/** Resolves everything cluster.yaml asks for against upstream and writes the lock. */
export async function pin(ctx: RunContext, options: PinOptions = {}): Promise<PinResult> {
  const { settings } = ctx;
  if (settings.offline) {
    throw new OfflineError(
      'offline: pin asks upstream (FCOS stream metadata, dl.k8s.io, GitHub releases, registries) and cannot run offline.\n' +
        `Run it on a machine with network, or bring ${settings.lockFile} from one.`,
    );
  }
  const config = ctx.config;
  const components = resolveComponents(options.components);
  const progress = options.onProgress ?? (() => undefined);
  const session = (signal: AbortSignal): Session => ({
    ctx,
    config,
    cache: ctx.cache,
    signal,
    download: { signal, offline: false, http: settings.http },
    progress,
  });
  // Manifests first: a bad manifest fails before anything is downloaded.
  const manifestImages = readManifestImages(join(settings.root, 'manifests'));
  const previous = readPrevious(settings.lockFile);
  await ctx.cache.removeStaleTemporaries();

  // The FCOS metadata first: a stream or release without the cluster's architecture is a
  // configuration error, reported before anything else is asked.
  const fcos = await resolveFcos(session(ctx.signal));
  const [fcosQemu, kubernetes, butane, fcosOpenstack] = await allOrNothing<[Pinned, Pinned & { version: string; images: ImageRef[] }, Pinned, Pinned]>(ctx.signal, [
    (signal) => pinFcosQemu(session(signal), fcos, previous.lock),
    (signal) => pinKubernetes(session(signal), components, manifestImages),
    (signal) => pinButane(session(signal), components),
    (signal) => pinFcosOpenstack(session(signal), fcos, previous.lock),
  ]);
  const pinned = [fcosQemu, kubernetes, butane, fcosOpenstack];
  const content: LockContent = {
    fcos: { stream: config.fcos.stream, release: fcos.release, arch: config.fcos.arch },
    kubernetes: { version: kubernetes.version },
    artifacts: Object.fromEntries(pinned.flatMap((p) => p.artifacts).map((a) => [a.key, a])) as Lock['artifacts'],
    images: kubernetes.images,
  };
  return writeLock(ctx, content, Object.assign({}, ...pinned.map((p) => p.notes)) as ArtifactNotes, previous);
}

/**
 * Renders the lock, checks that it reads back as exactly what was resolved and matches
 * cluster.yaml, and writes it (atomically) only where it differs from the previous one.
 */
async function writeLock(ctx: RunContext, content: LockContent, notes: ArtifactNotes, previous: ReturnType<typeof readPrevious>): Promise<PinResult> {
  const file = ctx.settings.lockFile;
  const text = renderLock(content, notes);
  const lock = parseLock(file, text);
  checkLockMatchesConfig(lock, ctx.config);
  if (renderLock(lock, notes) !== text) throw new Error('pin: the rendered lock does not read back the same (a bug)');

  const shownName = relative(process.cwd(), file).startsWith('..') ? file : relative(process.cwd(), file) || file;
  const { headline, changes, written } = summarize(shownName, previous.text, previous.lock, previous.problem, text, lock);
  if (written) await writeAtomically(file, text);
  const summary = [headline, ...changes.map((line) => `  ${line}`)].join('\n');
  return { file, written, headline, changes, summary, lock, text };
}

/** The lock pin replaces: its text, and its content where it parses. */
function readPrevious(file: string): { text?: string; lock?: Lock; problem?: string } {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return {};
    throw new UserError(`${file}: cannot read it (${String(error)})`);
  }
  try {
    return { text, lock: parseLock(file, text) };
  } catch (error) {
    return { text, problem: firstLine((error as Error).message) };
  }
}

/** The result of each pin run, by its context: the CLI prints `summary` after the run. */
export const pinResults = new WeakMap<RunContext, PinResult>();

export const pinStage: Stage = {
  name: 'pin',
  title: 'Pin every artifact and image from upstream',
  summary: 'resolves cluster.yaml against upstream (FCOS stream, Kubernetes release, checksum files, registries) and writes the lock (online)',
  needs: [],
  tools: ['skopeo', 'xz'],
  inputs(ctx) {
    const { config } = ctx;
    return {
      'fcos.stream': config.fcos.stream,
      'fcos.arch': config.fcos.arch,
      'fcos.release': config.fcos.release ?? '(newest)',
      target: config.target,
      'kubernetes.version': config.kubernetes.version,
      components: JSON.stringify(resolveComponents()),
      mirrors: JSON.stringify(config.mirrors),
    };
  },
  // Upstream moves without any input changing: pin always asks (the lock changes only if upstream did).
  expired: () => 'pin asks upstream every time it runs',
  outputs: () => [],
  async run(ctx, task) {
    const result = await pin(ctx, { onProgress: (line) => (task.output = line) });
    pinResults.set(ctx, result);
    task.title = `${pinStage.title}: ${result.headline}`;
  },
};
