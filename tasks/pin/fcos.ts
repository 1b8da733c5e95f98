// Pins Fedora CoreOS: the release (newest of the stream, or the one cluster.yaml names,
// from the release index), its qemu image and, for target openstack, its openstack image:
// URL and sha256 from the metadata; the uncompressed sha256 from it, or computed once
// from the image where the metadata has none.
import { writeXzDecompressed } from '../fetch.ts';
import { ExitCode, isAbortError, UserError } from '../lib/errors.ts';
import { mirrorUrl, upstreamBases } from '../lib/inputs/config.ts';
import type { Artifact, Lock } from '../lib/inputs/lock.ts';
import { parseFcosRelease, parseFcosReleaseIndex, parseFcosStream, streamArchitectures, type FcosDisk } from '../lib/inputs/upstream.ts';
import { ChecksumError, removeQuietly } from '../lib/store/cache.ts';
import { downloadChunks, DownloadError } from '../lib/store/download.ts';
import { fetchJson, firstLine, mirrorNote, type Pinned, type Session } from './session.ts';

export interface PinnedFcos {
  release: string;
  disk: FcosDisk;
  note: string;
  /** The OpenStack image of the same release, when the target is openstack. */
  openstack?: { disk: FcosDisk; note: string };
}

/** The FCOS release and its qemu disk from the metadata (no image download). */
export async function resolveFcos(s: Session): Promise<PinnedFcos> {
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

/** The FCOS qemu image: URL and sha256 from the metadata, the uncompressed sha256 from it or from the image. */
export async function pinFcosQemu(s: Session, fcos: PinnedFcos, previous: Lock | undefined): Promise<Pinned> {
  const note = fcos.disk.uncompressedSha256 ? fcos.note : `${fcos.note}\nuncompressedSha256: computed by pin from the decompressed download (the metadata has none)`;
  return { artifacts: [await fcosArtifact(s, 'fcos-qemu', fcos.disk, previous)], notes: { 'fcos-qemu': note } };
}

/** The FCOS openstack image of the same release, for target openstack (nothing for qemu). */
export async function pinFcosOpenstack(s: Session, fcos: PinnedFcos, previous: Lock | undefined): Promise<Pinned> {
  if (!fcos.openstack) return { artifacts: [], notes: {} };
  const { disk, note } = fcos.openstack;
  const shown = disk.uncompressedSha256 ? note : `${note}\nuncompressedSha256: computed by pin from the decompressed download (the metadata has none)`;
  return { artifacts: [await fcosArtifact(s, 'fcos-openstack', disk, previous)], notes: { 'fcos-openstack': shown } };
}
