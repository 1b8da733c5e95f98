// Upstream metadata formats, parsed once into typed values: FCOS stream metadata, the
// release index and one release's metadata, and the three checksum-file formats of the
// Kubernetes and GitHub release sites.
import { type Architecture } from './config.ts';
import { InputError } from '../errors.ts';
import { Reader, sha256Pattern } from './fields.ts';

export interface FcosDisk {
  release: string;
  location: string;
  signature?: string;
  sha256: string;
  /** Missing in older stream documents: verify it when present, never require it. */
  uncompressedSha256?: string;
}

/** The FCOS platforms corekube boots: their images are qcow2.xz disks in the metadata. */
export type FcosPlatform = 'qemu' | 'openstack';

/**
 * The qcow2.xz disk of one platform (qemu, openstack) and architecture in an FCOS stream
 * document (`streams/STREAM.json`): `.architectures.ARCH.artifacts.PLATFORM`.
 */
export function parseFcosStream(source: string, json: unknown, arch: Architecture, platform: FcosPlatform = 'qemu'): FcosDisk {
  const r = new Reader(source);
  const archEntry = architectureEntry(r, source, r.map(json, ''), arch);
  const artifacts = archEntry ? r.map(archEntry.artifacts, `architectures.${arch}.artifacts`) : undefined;
  const qemuPath = `architectures.${arch}.artifacts.${platform}`;
  const qemu = artifacts ? r.map(artifacts[platform], qemuPath) : undefined;
  const release = qemu ? r.string(qemu.release, `${qemuPath}.release`, 'an FCOS release', fcosReleasePattern) : undefined;
  const formats = qemu ? r.map(qemu.formats, `${qemuPath}.formats`) : undefined;
  const format = formats ? r.map(formats['qcow2.xz'], `${qemuPath}.formats["qcow2.xz"]`) : undefined;
  return qcow2XzDisk(r, release, format, `${qemuPath}.formats["qcow2.xz"].disk`);
}

export interface FcosReleaseEntry {
  version: string;
  /** URL of the release's metadata (release.json), as the index gives it. */
  metadata?: string;
  /** Architectures the release was built for (from its commits); empty when the index does not say. */
  architectures: string[];
}

const fcosReleasePattern = /^\d+\.\d{8}\.\d+\.\d+$/;

/** The release index `prod/streams/STREAM/releases.json`: every release, oldest first. */
export function parseFcosReleaseIndex(source: string, json: unknown): FcosReleaseEntry[] {
  const r = new Reader(source);
  const root = r.map(json, '');
  const list = root ? r.list(root.releases, 'releases', 'a list of releases') : undefined;
  const entries: FcosReleaseEntry[] = [];
  list?.forEach((item, index) => {
    const path = `releases[${index}]`;
    const entry = r.map(item, path);
    if (!entry) return;
    const version = r.string(entry.version, `${path}.version`, 'an FCOS release', fcosReleasePattern);
    const metadata = entry.metadata === undefined ? undefined : r.string(entry.metadata, `${path}.metadata`, 'a URL', /^https?:\/\/\S+$/);
    const architectures: string[] = [];
    if (Array.isArray(entry.commits)) {
      for (const commit of entry.commits) {
        const a = (commit as { architecture?: unknown } | null)?.architecture;
        if (typeof a === 'string') architectures.push(a);
      }
    }
    if (version) entries.push({ version, ...(metadata ? { metadata } : {}), architectures });
  });
  r.check();
  return entries;
}

/**
 * One release's metadata (`…/builds/RELEASE/release.json`): a platform's qcow2.xz disk at
 * `.architectures.ARCH.media.PLATFORM.artifacts["qcow2.xz"].disk`.
 */
export function parseFcosRelease(source: string, json: unknown, arch: Architecture, platform: FcosPlatform = 'qemu'): FcosDisk {
  const r = new Reader(source);
  const root = r.map(json, '');
  const release = root ? r.string(root.release, 'release', 'an FCOS release', fcosReleasePattern) : undefined;
  const archEntry = architectureEntry(r, source, root, arch);
  const mediaPath = `architectures.${arch}.media`;
  const media = archEntry ? r.map(archEntry.media, mediaPath) : undefined;
  const qemu = media ? r.map(media[platform], `${mediaPath}.${platform}`) : undefined;
  const artifacts = qemu ? r.map(qemu.artifacts, `${mediaPath}.${platform}.artifacts`) : undefined;
  const format = artifacts ? r.map(artifacts['qcow2.xz'], `${mediaPath}.${platform}.artifacts["qcow2.xz"]`) : undefined;
  return qcow2XzDisk(r, release, format, `${mediaPath}.${platform}.artifacts["qcow2.xz"].disk`);
}

/** `.architectures.ARCH` of a stream or release document; a missing architecture names the ones offered. */
function architectureEntry(r: Reader, source: string, root: Record<string, unknown> | undefined, arch: Architecture): Record<string, unknown> | undefined {
  const architectures = root ? r.map(root.architectures, 'architectures') : undefined;
  if (architectures && architectures[arch] === undefined) {
    throw new InputError(source, [
      { path: `architectures.${arch}`, expected: `the architecture ${arch}`, found: `only ${Object.keys(architectures).join(', ') || 'none'}` },
    ]);
  }
  return architectures ? r.map(architectures[arch], `architectures.${arch}`) : undefined;
}

/** The `disk` of a qcow2.xz format entry: location, sha256, and where given the signature and uncompressed sha256. */
function qcow2XzDisk(r: Reader, release: string | undefined, format: Record<string, unknown> | undefined, diskPath: string): FcosDisk {
  const disk = format ? r.map(format.disk, diskPath) : undefined;
  const location = disk ? r.string(disk.location, `${diskPath}.location`, 'an https URL ending in .qcow2.xz', /^https?:\/\/\S+\.qcow2\.xz$/) : undefined;
  const sha256 = disk ? r.string(disk.sha256, `${diskPath}.sha256`, '64 lowercase hex digits', sha256Pattern) : undefined;
  const signature = disk?.signature === undefined ? undefined : r.string(disk.signature, `${diskPath}.signature`, 'a URL');
  const uncompressed =
    disk?.['uncompressed-sha256'] === undefined
      ? undefined
      : r.string(disk['uncompressed-sha256'], `${diskPath}["uncompressed-sha256"]`, '64 lowercase hex digits', sha256Pattern);
  r.check();
  return {
    release: release!,
    location: location!,
    sha256: sha256!,
    ...(signature ? { signature } : {}),
    ...(uncompressed ? { uncompressedSha256: uncompressed } : {}),
  };
}

/** The architectures an FCOS stream document offers (`.architectures` keys), or undefined if it has none. */
export function streamArchitectures(json: unknown): string[] | undefined {
  const archs = (json as { architectures?: unknown } | null)?.architectures;
  return archs !== null && typeof archs === 'object' && !Array.isArray(archs) ? Object.keys(archs) : undefined;
}

/**
 * The sha256 for `fileName` in a checksum file, in any of upstream's formats: the bare
 * hex digest (dl.k8s.io: no newline, no name; crictl: with a newline), or
 * `HASH  NAME` lines (sha256sum output: CNI plugins, containerd, runc), `*NAME` too.
 */
export function parseChecksumFile(source: string, text: string, fileName: string): string {
  const lines = text.split('\n').map((line) => line.trim()).filter(Boolean);
  if (lines.length === 1 && /^[0-9a-fA-F]{64}$/.test(lines[0]!)) return lines[0]!.toLowerCase();
  const found: string[] = [];
  for (const line of lines) {
    const match = /^([0-9a-fA-F]{64})\s+\*?(.+)$/.exec(line);
    if (!match) continue;
    const name = match[2]!.replace(/^\.\//, '').split('/').pop();
    found.push(name ?? '');
    if (name === fileName) return match[1]!.toLowerCase();
  }
  throw new InputError(source, [
    {
      path: '',
      expected: `a sha256 for ${fileName} (a bare digest, or "HASH  ${fileName}" lines)`,
      found: found.length > 0 ? `digests for ${found.join(', ')}` : JSON.stringify(text.slice(0, 80)),
    },
  ]);
}
