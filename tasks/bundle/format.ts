// bundle / unbundle: everything the lock needs from cache/, as one plain POSIX tar to
// carry into an air-gapped site, and back into a cache there. Actions, not stages: they
// have no stamp and `make cluster` never runs them.
//
// The archive, in this order (ustar, written and read with tar-stream through archive.ts,
// which refuses any entry but a plain file where the manifest puts it; the manifest and
// the cache entries mode 0444, the four head entries 0644; owner 0:0, mtime 0, so the
// same cache gives the same bytes):
//   corekube-bundle.json        the manifest: every other entry's path, size and sha256
//   corekube.lock.yaml          the lock, cluster.yaml: the project's, as they are
//   cluster.yaml
//   cache/oci/oci-layout        cache/oci/index.json: only the lock's refs
//   cache/oci/index.json
//   cache/sha256/HEX            each artifact the lock needs (FCOS decompressed: its uncompressedSha256)
//   cache/oci/blobs/sha256/HEX  each blob of the lock's images (manifest, config, layers)
// `tar -xf` at the project root gives the same tree, unverified (and index.json holding
// only the bundle's refs); `make unbundle` verifies it first and merges the index.
//
// The manifest comes FIRST: the reader then knows every entry's size and sha256 before its
// bytes arrive, so it verifies while streaming and refuses a conflicting lock, an entry the
// lock does not name or a short file before writing anything big. The writer can put it
// first without a second pass because every big entry is content-addressed (its name is
// its sha256): sizes come from stat, and the bytes are hashed while they stream and
//
// The parts: format.ts (this: the entries, the manifest, the layout), write.ts (make
// bundle), read.ts (one verifying read of a bundle, start to end) and unbundle.ts (make
// unbundle and VERIFY: what a verified read puts into the cache and the project).
import { join } from 'node:path';
import type { RunContext } from '../lib/run/stage.ts';
import { tarLayout } from '../lib/store/archive.ts';
import { sha256Hasher } from '../lib/store/cache.ts';
import type { Progress } from '../lib/store/download.ts';

export const bundleFormat = 1;
export const manifestEntry = 'corekube-bundle.json';
export const lockEntry = 'corekube.lock.yaml';
export const configEntry = 'cluster.yaml';
export const ociLayoutEntry = 'cache/oci/oci-layout';
export const ociIndexEntry = 'cache/oci/index.json';
export const artifactPrefix = 'cache/sha256/';
export const blobPrefix = 'cache/oci/blobs/sha256/';
/** The small entries, always first after the manifest, in this order. */
export const headEntries = [lockEntry, configEntry, ociLayoutEntry, ociIndexEntry] as const;
/** What `make bundle` needs built first: a complete cache for the lock. */
export const bundleNeeds = ['fetch', 'images'] as const;

export interface BundleEntry {
  path: string;
  size: number;
  sha256: string;
}

export interface BundleManifest {
  corekubeBundle: typeof bundleFormat;
  cluster: string;
  kubernetes: string;
  fcos: string;
  entries: BundleEntry[];
}

export interface BundleSummary {
  file: string;
  /** sha256 of the manifest, which names every entry by its sha256: compare it on both sides. */
  id: string;
  bytes: number;
  entries: number;
  artifacts: number;
  images: number;
  blobs: number;
  seconds: number;
}

export interface UnbundleSummary extends BundleSummary {
  cluster: string;
  /** Cache entries (artifacts and blobs) that were not in the cache before. */
  added: number;
  /** lock/config files written into the project, and what became of them. */
  project: { file: string; action: 'installed' | 'unchanged' | 'replaced' }[];
  verifyOnly: boolean;
}

export interface BundleOptions {
  onProgress?: (progress: Progress) => void;
}

export interface UnbundleOptions extends BundleOptions {
  /** Replace a project lock or config that differs from the bundle's (the old one is kept as FILE.orig). */
  replace?: boolean;
  /** Read and verify everything, write nothing. */
  verifyOnly?: boolean;
}

export function defaultBundlePath(ctx: RunContext): string {
  return join(ctx.settings.outDir, `corekube-bundle-${ctx.config.name}.tar`);
}

/** Byte offset of each entry's header (the manifest's, at 0, left out), and the archive's total size, for a manifest. */
export function bundleLayout(manifestSize: number, entries: readonly BundleEntry[]): { offsets: number[]; total: number } {
  const { offsets, total } = tarLayout([manifestSize, ...entries.map((e) => e.size)]);
  return { offsets: offsets.slice(1), total };
}

export const sha256Hex = (bytes: Buffer | string) => sha256Hasher().update(bytes).digest('hex');
