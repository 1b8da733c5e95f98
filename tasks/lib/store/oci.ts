// OCI image layouts and image references, as pure functions: parsing references the way
// the kubelet and containerd normalize them, reading index.json and manifests, and
// composing a layout's index from refs. The stages do the file work around these.
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

export const refNameAnnotation = 'org.opencontainers.image.ref.name';
export const ociLayoutFile = JSON.stringify({ imageLayoutVersion: '1.0.0' });

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
  platform?: { architecture: string; os: string; variant?: string };
}

export interface OciIndex {
  schemaVersion: 2;
  mediaType?: string;
  manifests: Descriptor[];
}

export interface ImageManifest {
  mediaType?: string;
  config: Descriptor;
  layers: Descriptor[];
}

export interface ParsedReference {
  /** Fully qualified, as containerd stores it: docker.io/library/busybox, registry.k8s.io/pause. */
  name: string;
  tag?: string;
  digest?: string;
}

const digestPattern = /^sha256:[0-9a-f]{64}$/;
const componentPattern = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const tagPattern = /^[\w][\w.-]{0,127}$/;

/**
 * Parses an image reference the way the CRI resolves what a pod asks for: no domain
 * means docker.io, and a single docker.io path component means library/. Returns
 * undefined for text that is no reference.
 */
export function parseReference(text: string): ParsedReference | undefined {
  let rest = text.trim();
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!digestPattern.test(digest)) return undefined;
  }
  let tag: string | undefined;
  const colon = rest.lastIndexOf(':');
  if (colon > rest.lastIndexOf('/')) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!tagPattern.test(tag)) return undefined;
  }
  const parts = rest.split('/');
  let domain = 'docker.io';
  if (parts.length > 1 && (parts[0]!.includes('.') || parts[0]!.includes(':') || parts[0] === 'localhost')) {
    domain = parts.shift()!;
  }
  if (domain === 'index.docker.io') domain = 'docker.io';
  if (domain === 'docker.io' && parts.length === 1) parts.unshift('library');
  if (parts.length === 0 || !parts.every((p) => componentPattern.test(p))) return undefined;
  if (!/^[a-z0-9.-]+(:\d+)?$/.test(domain) && domain !== 'localhost') return undefined;
  return { name: `${domain}/${parts.join('/')}`, ...(tag !== undefined ? { tag } : {}), ...(digest ? { digest } : {}) };
}

/** The registry host of a normalized name, and the repository path on it. */
export function splitName(name: string): { host: string; repository: string } {
  const slash = name.indexOf('/');
  return { host: name.slice(0, slash), repository: name.slice(slash + 1) };
}

export function sha256Of(bytes: Buffer | string): string {
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
}

export function blobPath(layout: string, digest: string): string {
  const [algorithm, hex] = digest.split(':');
  return join(layout, 'blobs', algorithm!, hex!);
}

/** The index.json of a layout, or an empty index where there is none yet. */
export function readIndex(layout: string): OciIndex {
  const file = join(layout, 'index.json');
  if (!existsSync(file)) return { schemaVersion: 2, manifests: [] };
  const parsed = JSON.parse(readFileSync(file, 'utf8')) as OciIndex;
  if (parsed.schemaVersion !== 2 || !Array.isArray(parsed.manifests)) {
    throw new Error(`${file}: not an OCI image index (schemaVersion 2 with manifests[])`);
  }
  return parsed;
}

export function refOf(descriptor: Descriptor): string | undefined {
  return descriptor.annotations?.[refNameAnnotation];
}

export function findRef(index: OciIndex, ref: string): Descriptor | undefined {
  return index.manifests.find((d) => refOf(d) === ref);
}

/** The index with `ref` pointing at `descriptor` (any older descriptor under that ref goes). */
export function withRef(index: OciIndex, ref: string, descriptor: Descriptor): OciIndex {
  const kept = index.manifests.filter((d) => refOf(d) !== ref);
  const entry: Descriptor = {
    mediaType: descriptor.mediaType,
    digest: descriptor.digest,
    size: descriptor.size,
    ...(descriptor.platform ? { platform: descriptor.platform } : {}),
    annotations: { ...descriptor.annotations, [refNameAnnotation]: ref },
  };
  return { ...index, manifests: [...kept, entry] };
}

/** Serialized deterministically: descriptors sorted by ref, so equal content gives equal bytes. */
export function serializeIndex(index: OciIndex): string {
  const manifests = [...index.manifests].sort((a, b) => (refOf(a) ?? a.digest).localeCompare(refOf(b) ?? b.digest));
  return `${JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.oci.image.index.v1+json', manifests }, null, 2)}\n`;
}

export const manifestMediaTypes = new Set([
  'application/vnd.oci.image.manifest.v1+json',
  'application/vnd.docker.distribution.manifest.v2+json',
]);

export function parseManifest(bytes: Buffer | string, where: string): ImageManifest {
  const parsed = JSON.parse(bytes.toString()) as Partial<ImageManifest> & { manifests?: unknown };
  if (parsed.manifests !== undefined) throw new Error(`${where}: an image index, where a single-platform image manifest was expected`);
  if (!parsed.config?.digest || !Array.isArray(parsed.layers)) throw new Error(`${where}: not an image manifest (config and layers)`);
  return parsed as ImageManifest;
}

/** Every blob an image needs: its manifest, config and layers. */
export function imageBlobs(layout: string, manifestDigest: string): string[] {
  const manifest = parseManifest(readFileSync(blobPath(layout, manifestDigest)), `${layout} ${manifestDigest}`);
  return [manifestDigest, manifest.config.digest, ...manifest.layers.map((l) => l.digest)];
}

/** True when the layout holds `ref` at `digest` with every blob the image needs. */
export function layoutHasImage(layout: string, ref: string, digest: string): boolean {
  const descriptor = findRef(readIndex(layout), ref);
  if (descriptor?.digest !== digest || !existsSync(blobPath(layout, digest))) return false;
  try {
    return imageBlobs(layout, digest).every((blob) => existsSync(blobPath(layout, blob)));
  } catch {
    return false;
  }
}

/** Every `image:` value in a Kubernetes YAML tree (pods, deployments, daemonsets, lists…). */
export function imagesInDocument(value: unknown, found: string[] = []): string[] {
  if (Array.isArray(value)) {
    for (const item of value) imagesInDocument(item, found);
  } else if (value !== null && typeof value === 'object') {
    for (const [key, child] of Object.entries(value)) {
      if (key === 'image' && typeof child === 'string') found.push(child);
      else imagesInDocument(child, found);
    }
  }
  return found;
}

/**
 * Whether skopeo's error says the registry lacks the image (the distribution API's
 * MANIFEST_UNKNOWN or NAME_UNKNOWN, or a bare HTTP 404), as opposed to a registry that
 * does not answer. Matched on those words only: stderr also carries paths, whose random
 * parts may hold any digits.
 */
export function registryHasNoSuchImage(stderr: string): boolean {
  return /manifest unknown|name unknown|\b404 Not Found\b|status code 404\b|\(404\)/i.test(stderr);
}
