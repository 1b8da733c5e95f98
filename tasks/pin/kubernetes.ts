// Pins Kubernetes: the patch release (exact, or the newest of a minor from stable-X.Y.txt),
// kubeadm, kubelet, kubectl, crictl, containerd, runc and the CNI plugins by upstream's
// checksum files, and the image set: what the fetched kubeadm lists, with manifests/.
import { execFile } from 'node:child_process';
import { chmod, copyFile, rm } from 'node:fs/promises';
import pLimit from 'p-limit';
import { kubeadmImages, type ManifestImage } from '../images.ts';
import { InputError, UserError } from '../lib/errors.ts';
import { goArch, upstreamBases } from '../lib/inputs/config.ts';
import type { Artifact, ImageRef } from '../lib/inputs/lock.ts';
import { parseChecksumFile } from '../lib/inputs/upstream.ts';
import { indentTail } from '../lib/run/tool.ts';
import { parseReference } from '../lib/store/oci.ts';
import { artifactSources, type ArtifactSource, type ComponentVersions } from './components.ts';
import { resolveImage, wantedImages } from './images.ts';
import type { ArtifactNotes } from './lock-text.ts';
import { downloadToCacheHashed, fetchText, type Pinned, type Session } from './session.ts';

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
/** The Kubernetes release, every binary with an upstream checksum file, and the image set its kubeadm names (with manifests/). */
export async function pinKubernetes(s: Session, components: ComponentVersions, manifestImages: readonly ManifestImage[]): Promise<Pinned & { version: string; images: ImageRef[] }> {
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
