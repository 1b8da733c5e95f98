// make unbundle (and VERIFY=1: read, verify, write nothing): a verified read of the
// bundle, then its entries moved into the cache, its refs merged into cache/oci/index.json
// and its lock and config installed in the project.
import { existsSync } from 'node:fs';
import { chmod, mkdir, rename, rm, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { acquireRunLock } from '../lib/run/engine.ts';
import { formatBytes, progressMeter } from '../lib/run/progress.ts';
import type { RunContext, StageTask } from '../lib/run/stage.ts';
import { ociLayoutFile, readIndex, refOf, serializeIndex, withRef } from '../lib/store/oci.ts';
import { artifactPrefix, blobPrefix, type BundleOptions, type UnbundleOptions, type UnbundleSummary } from './format.ts';
import { checkProjectFile, readBundle, readFileSyncSafe } from './read.ts';

/**
 * Verifies the bundle while streaming it into cache/tmp, and only when all of it checks
 * out moves the entries into the cache (blobs before the index that names them), merges
 * the refs into cache/oci/index.json and installs the lock and config where the project
 * has none (or, with `replace`, where they differ). A damaged, truncated or foreign bundle
 * is refused with the cache and the project as they were.
 */
export async function unbundle(ctx: RunContext, file: string, options: UnbundleOptions = {}): Promise<UnbundleSummary> {
  const started = performance.now();
  const { settings, cache } = ctx;
  const runLock = await acquireRunLock(settings, 'unbundle');
  let staging: string | undefined;
  try {
    if (!options.verifyOnly) {
      await cache.removeStaleTemporaries();
      staging = await cache.temporaryPath('unbundle');
      await mkdir(staging);
    }
    const read = await readBundle(ctx, file, { ...(staging ? { staging } : {}), replace: options.replace ?? false, ...(options.onProgress ? { onProgress: options.onProgress } : {}) });
    const project: UnbundleSummary['project'] = [];
    if (!options.verifyOnly) {
      // Content-addressed entries first: each is whole and verified, so a crash part-way
      // leaves only extra valid entries. The index last, so no ref names a missing blob.
      const store = join(settings.cacheDir, 'oci');
      await mkdir(join(store, 'blobs', 'sha256'), { recursive: true });
      for (const [path, stagedFile] of read.staged) {
        if (path.startsWith(artifactPrefix)) {
          const hex = path.slice(artifactPrefix.length);
          if (!cache.has(hex)) await cache.commit(stagedFile, hex);
        } else {
          const target = join(store, 'blobs', 'sha256', path.slice(blobPrefix.length));
          if (existsSync(target)) continue;
          await chmod(stagedFile, 0o444);
          await rename(stagedFile, target);
        }
      }
      if (!existsSync(join(store, 'oci-layout'))) await replaceFile(join(store, 'oci-layout'), Buffer.from(ociLayoutFile));
      let storeIndex = readIndex(store);
      for (const descriptor of read.index.manifests) storeIndex = withRef(storeIndex, refOf(descriptor)!, descriptor);
      await replaceFile(join(store, 'index.json'), Buffer.from(serializeIndex(storeIndex)));
      for (const [target, bytes] of [
        [settings.lockFile, read.lockBytes],
        [settings.configFile, read.configBytes],
      ] as const) {
        project.push({ file: target, action: await installProjectFile(target, bytes, file, options.replace ?? false) });
      }
    }
    const entries = read.manifest.entries;
    return {
      file,
      id: read.id,
      cluster: read.manifest.cluster,
      bytes: read.bytes,
      entries: entries.length,
      artifacts: entries.filter((e) => e.path.startsWith(artifactPrefix)).length,
      images: read.lock.images.length,
      blobs: entries.filter((e) => e.path.startsWith(blobPrefix)).length,
      added: read.staged.size,
      project,
      verifyOnly: options.verifyOnly ?? false,
      seconds: (performance.now() - started) / 1000,
    };
  } finally {
    if (staging) await rm(staging, { recursive: true, force: true });
    await runLock.release();
  }
}

/** Reads and verifies a bundle completely, writing nothing (a check after copying it). */
export function verifyBundle(ctx: RunContext, file: string, options: BundleOptions = {}): Promise<UnbundleSummary> {
  return unbundle(ctx, file, { ...options, verifyOnly: true, replace: true });
}

async function installProjectFile(target: string, bytes: Buffer, bundleFile: string, replace: boolean): Promise<'installed' | 'unchanged' | 'replaced'> {
  const ours = readFileSyncSafe(target);
  if (ours?.equals(bytes)) return 'unchanged';
  if (ours !== undefined) {
    checkProjectFile(target, bytes, bundleFile, replace, () => ['  (it changed while the bundle was read)']);
    await writeFile(`${target}.orig`, ours);
  }
  await mkdir(dirname(target), { recursive: true });
  await replaceFile(target, bytes);
  return ours === undefined ? 'installed' : 'replaced';
}

async function replaceFile(file: string, content: Buffer): Promise<void> {
  const tmp = `${file}.tmp-${process.pid}`;
  await writeFile(tmp, content);
  await rename(tmp, file);
}

export function formatUnbundleSummary(summary: UnbundleSummary): string {
  const head = summary.verifyOnly
    ? `bundle ${summary.file}: verified, nothing written`
    : `unbundled ${summary.file}: ${summary.added} new cache entr${summary.added === 1 ? 'y' : 'ies'} of ${summary.artifacts + summary.blobs}`;
  const project = summary.project.map((p) => `\n  ${p.file}: ${p.action}${p.action === 'replaced' ? ` (yours kept as ${basename(p.file)}.orig)` : ''}`).join('');
  return `${head} (cluster ${summary.cluster}: ${summary.artifacts} artifacts, ${summary.images} images), ${formatBytes(summary.bytes)} in ${summary.seconds.toFixed(1)} s${project}\n  id sha256:${summary.id}`;
}

/** A listr2 task for `make unbundle FILE=…`. */
export function unbundleTask(ctx: RunContext, file: string, options: Omit<UnbundleOptions, 'onProgress'> = {}): { title: string; task: (_: unknown, task: StageTask) => Promise<void> } {
  return {
    title: `${options.verifyOnly ? 'Verify' : 'Unbundle'} ${file}`,
    task: async (_, task) => {
      const meter = progressMeter(ctx.settings.interactive, (line) => (task.output = line));
      const summary = await unbundle(ctx, file, { ...options, onProgress: meter });
      task.title = formatUnbundleSummary(summary);
    },
  };
}
