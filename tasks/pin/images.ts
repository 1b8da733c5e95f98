// Pins the images: for each name:tag kubeadm or manifests/ asks for, the digest its
// registry serves and the digest of the linux/ARCH OCI manifest the images stage will get
// (from the manifest where that is exact, else by a real skopeo copy, whose blobs go into
// cache/oci).
import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { moveBlobsIntoStore, seededStagingLayout, skopeoCopy, storeDir, type ManifestImage } from '../images.ts';
import { ExitCode, UserError } from '../lib/errors.ts';
import { goArch, type ClusterConfig } from '../lib/inputs/config.ts';
import type { ImageRef } from '../lib/inputs/lock.ts';
import { indentTail, runTool, ToolError } from '../lib/run/tool.ts';
import { findRef, parseReference, readIndex, registryHasNoSuchImage, sha256Of, splitName } from '../lib/store/oci.ts';
import { compare } from './lock-text.ts';
import type { Session } from './session.ts';

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

/** Where skopeo reaches an image: its registry, or the mirror cluster.yaml names for that host. */
export function registryOf(config: ClusterConfig, name: string): { base: string; insecure: boolean } {
  const { host, repository } = splitName(name);
  const mirror = config.mirrors.registries[host];
  return { base: `docker://${mirror?.location ?? host}/${repository}`, insecure: mirror?.insecure ?? false };
}

export function skopeoFailure(image: string, reference: string, error: unknown, insecure: boolean, host: string): unknown {
  if (!(error instanceof ToolError)) return error;
  return new UserError(
    `pin: image ${image}: skopeo could not read ${reference}:\n${indentTail(error.stderr, 6)}\n` +
      (registryHasNoSuchImage(error.stderr)
        ? `The registry has no such tag or digest: check the image in kubeadm's list or manifests/, or the mirror for ${host}.`
        : `Check that the registry${insecure ? '' : ' (TLS)'} answers, or set a mirror in cluster.yaml (mirrors.registries.${host}).`),
  );
}

export async function resolveImage(s: Session, wanted: WantedImage): Promise<ImageRef> {
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
