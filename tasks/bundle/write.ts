// make bundle: the cache entries the lock needs, planned from the cache (refusing what is
// missing), written as one tar under a temporary name with every cache entry hashed as it
// streams and checked against its name, then renamed into place.
import { readdirSync } from 'node:fs';
import { mkdir, open, readFile, rename, rm, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { refName, storeDir } from '../images.ts';
import { UserError } from '../lib/errors.ts';
import { lockedArtifacts, storedSha256 } from '../lib/inputs/lock.ts';
import { acquireRunLock } from '../lib/run/engine.ts';
import { formatBytes, progressMeter } from '../lib/run/progress.ts';
import type { RunContext, StageTask } from '../lib/run/stage.ts';
import { writeTar, type TarSource } from '../lib/store/archive.ts';
import { ChecksumError, processAlive, sha256Hasher } from '../lib/store/cache.ts';
import { readChunks } from '../lib/store/chunks.ts';
import { blobPath, findRef, imageBlobs, layoutHasImage, ociLayoutFile, readIndex, serializeIndex, withRef, type OciIndex } from '../lib/store/oci.ts';
import { artifactPrefix, blobPrefix, bundleFormat, bundleLayout, configEntry, defaultBundlePath, lockEntry, manifestEntry, ociIndexEntry, ociLayoutEntry, sha256Hex, type BundleEntry, type BundleManifest, type BundleOptions, type BundleSummary } from './format.ts';

interface Source {
  entry: BundleEntry;
  data?: Buffer;
  file?: string;
  /** For a damaged cache entry: what to name and what to do. */
  what: string;
}

/** What the bundle holds for the lock, from the cache; refuses naming whatever is missing. */
async function planBundle(ctx: RunContext): Promise<{ manifest: BundleManifest; sources: Source[]; images: number }> {
  const { lock, config, cache } = ctx;
  const missing: string[] = [];
  const small = (path: string, data: Buffer, what: string): Source => ({ entry: { path, size: data.length, sha256: sha256Hex(data) }, data, what });
  const sources: Source[] = [
    small(lockEntry, await readFile(ctx.settings.lockFile), ctx.settings.lockFile),
    small(configEntry, await readFile(ctx.settings.configFile), ctx.settings.configFile),
  ];

  const artifacts: Source[] = [];
  const seen = new Set<string>();
  for (const { key } of lockedArtifacts(lock)) {
    const hex = storedSha256(lock.artifacts[key]!);
    if (seen.has(hex)) continue;
    seen.add(hex);
    const file = cache.entryPath(hex);
    const info = await stat(file).catch(() => undefined);
    if (!info) {
      missing.push(`  artifact ${key}: sha256 ${hex} (make fetch)`);
      continue;
    }
    artifacts.push({ entry: { path: `${artifactPrefix}${hex}`, size: info.size, sha256: hex }, file, what: `cache entry ${file} (artifact ${key})` });
  }
  // The signatures' evidence, and the bytes each signature covers where the cache keeps
  // them apart (FCOS: the .xz as published): fsck re-verifies them on the air-gapped side.
  const records = [...Object.entries(lock.signatures?.artifacts ?? {}), ...Object.entries(lock.signatures?.images ?? {})];
  for (const [subject, record] of records) {
    const wanted = record.evidence ? [record.evidence, ...(lock.artifacts[subject as 'butane'] ? [lock.artifacts[subject as 'butane']!.sha256] : [])] : [];
    for (const hex of wanted) {
      if (seen.has(hex)) continue;
      seen.add(hex);
      const file = cache.entryPath(hex);
      const info = await stat(file).catch(() => undefined);
      if (!info) {
        missing.push(`  the signature of ${subject}: cache entry ${hex} (make pin keeps it; pin again)`);
        continue;
      }
      artifacts.push({ entry: { path: `${artifactPrefix}${hex}`, size: info.size, sha256: hex }, file, what: `cache entry ${file} (the signature of ${subject})` });
    }
  }

  const store = storeDir(ctx);
  const storeIndex = readIndex(store);
  let index: OciIndex = { schemaVersion: 2, manifests: [] };
  const blobs: Source[] = [];
  const blobSeen = new Set<string>();
  for (const image of lock.images) {
    if (!layoutHasImage(store, refName(image), image.layoutDigest)) {
      missing.push(`  image ${image.text} (make images)`);
      continue;
    }
    index = withRef(index, refName(image), findRef(storeIndex, refName(image))!);
    for (const digest of imageBlobs(store, image.layoutDigest)) {
      if (blobSeen.has(digest)) continue;
      blobSeen.add(digest);
      const file = blobPath(store, digest);
      const hex = digest.slice('sha256:'.length);
      blobs.push({ entry: { path: `${blobPrefix}${hex}`, size: (await stat(file)).size, sha256: hex }, file, what: `cache entry ${file} (a blob of ${refName(image)})` });
    }
  }
  if (missing.length > 0) {
    throw new UserError(
      `cannot bundle: the cache (${ctx.settings.cacheDir}) lacks what ${ctx.settings.lockFile} needs:\n${missing.join('\n')}\n` +
        'Run make fetch images on a machine with network first, then make bundle again.',
    );
  }
  sources.push(small(ociLayoutEntry, Buffer.from(ociLayoutFile), ociLayoutEntry), small(ociIndexEntry, Buffer.from(serializeIndex(index)), ociIndexEntry));
  sources.push(...artifacts, ...blobs);
  const manifest: BundleManifest = {
    corekubeBundle: bundleFormat,
    cluster: config.name,
    kubernetes: lock.kubernetes.version,
    fcos: `${lock.fcos.stream} ${lock.fcos.release} ${lock.fcos.arch}`,
    entries: sources.map((s) => s.entry),
  };
  return { manifest, sources, images: lock.images.length };
}

/**
 * Writes the bundle: under a temporary name beside `file`, every cache entry hashed as it
 * streams and checked against its name, the size checked at the end, then renamed.
 */
export async function writeBundle(ctx: RunContext, file: string = defaultBundlePath(ctx), options: BundleOptions = {}): Promise<BundleSummary> {
  const started = performance.now();
  void ctx.lock; // a bad lock or config stops before anything is written
  const runLock = await acquireRunLock(ctx.settings, 'bundle');
  try {
    const { manifest, sources, images } = await planBundle(ctx);
    const manifestBytes = Buffer.from(`${JSON.stringify(manifest, null, 2)}\n`);
    const { total } = bundleLayout(manifestBytes.length, manifest.entries);
    await mkdir(dirname(file), { recursive: true });
    removeStaleTemporaries(file);
    const tmp = `${file}.tmp-${process.pid}`;
    await rm(tmp, { force: true });
    const handle = await open(tmp, 'wx', 0o644);
    try {
      // The small entries 0644 (an extracted cluster.yaml can be edited), the manifest and the cache entries 0444.
      const entries: TarSource[] = [
        { name: manifestEntry, size: manifestBytes.length, mode: 0o444, chunks: () => [manifestBytes] },
        ...sources.map((source): TarSource => ({
          name: source.entry.path,
          size: source.entry.size,
          mode: source.data ? 0o644 : 0o444,
          chunks: () => (source.data ? [source.data] : checkedChunks(source, ctx.signal)),
        })),
      ];
      const progress = { received: 0, total };
      await writeTar(handle, entries, {
        signal: ctx.signal,
        onWritten: (bytes) => {
          progress.received += bytes;
          options.onProgress?.(progress);
        },
      });
    } finally {
      await handle.close();
    }
    try {
      const written = (await stat(tmp)).size;
      if (written !== total) throw new Error(`${tmp}: wrote ${written} bytes, expected ${total}`);
      await rename(tmp, file);
    } finally {
      await rm(tmp, { force: true });
    }
    return {
      file,
      id: sha256Hex(manifestBytes),
      bytes: total,
      entries: manifest.entries.length,
      artifacts: manifest.entries.filter((e) => e.path.startsWith(artifactPrefix)).length,
      images,
      blobs: manifest.entries.filter((e) => e.path.startsWith(blobPrefix)).length,
      seconds: (performance.now() - started) / 1000,
    };
  } catch (error) {
    await rm(`${file}.tmp-${process.pid}`, { force: true });
    throw error;
  } finally {
    await runLock.release();
  }
}

/** A cache entry's bytes for the archive, hashed on the way and checked against its name and size at the end. */
async function* checkedChunks(source: Source, signal: AbortSignal): AsyncGenerator<Buffer> {
  const { entry } = source;
  const hash = sha256Hasher();
  let size = 0;
  for await (const chunk of readChunks(source.file!, signal)) {
    hash.update(chunk);
    size += chunk.length;
    if (size > entry.size) break;
    yield chunk;
  }
  if (size !== entry.size) throw new UserError(`${source.what} changed while it was being bundled (${entry.size} bytes, then ${size}); run make bundle again`);
  const found = hash.digest('hex');
  if (found !== entry.sha256) {
    throw new ChecksumError(
      source.what,
      entry.sha256,
      found,
      'The cache entry is damaged (disk fault?) and no bundle was written. make fsck FIX=1 moves it aside (to cache/corrupt/); then make fetch images bundle fetches it again and writes the bundle.',
    );
  }
}

/** Temporary bundles of runs that are gone (killed, power cut). */
function removeStaleTemporaries(file: string): void {
  const prefix = `${basename(file)}.tmp-`;
  let names: string[];
  try {
    names = readdirSync(dirname(file));
  } catch {
    return;
  }
  for (const name of names) {
    if (!name.startsWith(prefix)) continue;
    const pid = Number(name.slice(prefix.length));
    if (Number.isInteger(pid) && pid !== process.pid && !processAlive(pid)) void rm(join(dirname(file), name), { force: true });
  }
}

export function formatBundleSummary(summary: BundleSummary): string {
  return (
    `bundle ${summary.file}: ${summary.artifacts} artifacts, ${summary.images} images (${summary.blobs} blobs), ` +
    `${formatBytes(summary.bytes)} in ${summary.seconds.toFixed(1)} s\n  id sha256:${summary.id}`
  );
}

/** A listr2 task for `make bundle`: a progress bar while it writes, the summary as its title. */
export function bundleTask(ctx: RunContext, file?: string): { title: string; task: (_: unknown, task: StageTask) => Promise<void> } {
  return {
    title: 'Bundle the cache for an air-gapped site',
    task: async (_, task) => {
      const meter = progressMeter(ctx.settings.interactive, (line) => (task.output = line));
      const summary = await writeBundle(ctx, file ?? defaultBundlePath(ctx), { onProgress: meter });
      task.title = formatBundleSummary(summary);
    },
  };
}
