// fetch: every artifact in the lock into the content-addressed cache (hashed while it
// streams, verified before it lands), then hardlinked into out/artifacts/.
import { spawn } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { open, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import pLimit from 'p-limit';
import { ChecksumError, hashFile, moveAside, placeLink, removeQuietly, sameFile, sha256Hasher, type Cache } from './lib/store/cache.ts';
import { BatchedWriter } from './lib/store/chunks.ts';
import { mirrorUrl } from './lib/inputs/config.ts';
import { downloadChunks, type DownloadOptions } from './lib/store/download.ts';
import { OfflineError, UserError } from './lib/errors.ts';
import { artifactFileName, isXz, lockedArtifacts, storedSha256, type Artifact } from './lib/inputs/lock.ts';
import { formatRate, progressMeter } from './lib/run/progress.ts';
import { fanOut } from './lib/run/fan-out.ts';
import type { Stage, StageTask } from './lib/run/stage.ts';

export const artifactsDir = 'artifacts';

export function artifactOutput(artifact: Artifact): string {
  return join(artifactsDir, artifactFileName(artifact));
}

export const fetchStage: Stage = {
  name: 'fetch',
  title: 'Fetch FCOS and the Kubernetes binaries',
  summary: 'downloads every artifact in the lock into cache/, verified against its sha256, and links it into out/artifacts/',
  needs: [],
  tools: ['xz'],
  inputs(ctx) {
    return Object.fromEntries(
      lockedArtifacts(ctx.lock).map((artifact) => [`artifacts.${artifact.key}`, `${artifactFileName(artifact)} sha256:${storedSha256(artifact)}`]),
    );
  },
  outputs(ctx) {
    return lockedArtifacts(ctx.lock).map(artifactOutput);
  },
  async run(ctx, task) {
    const { cache, settings } = ctx;
    await cache.removeStaleTemporaries();
    const artifacts = lockedArtifacts(ctx.lock);
    // The cache proves its bytes before they are used again: an entry that no longer
    // hashes to the lock's sha256 (a bit flip, a disk error, a hand edit) is moved to
    // cache/corrupt/ and fetched again.
    const movedAside = new Map<string, { found: string; to: string }>();
    const checkLimit = pLimit(settings.jobs);
    await Promise.all(
      artifacts.map((artifact) =>
        checkLimit(async () => {
          const entry = cache.entryPath(storedSha256(artifact));
          if (!cache.has(storedSha256(artifact))) return;
          const found = await hashFile(entry);
          if (found !== storedSha256(artifact)) movedAside.set(artifact.key, { found, to: await moveAside(cache.dir, entry, 'sha256') });
        }),
      ),
    );
    const missing = artifacts.filter((a) => !cache.has(storedSha256(a)));
    if (settings.offline && missing.length > 0) throw offlineMissing(missing, movedAside);

    const fetchOne = async (artifact: Artifact, sub: StageTask): Promise<void> => {
      const bad = movedAside.get(artifact.key);
      const repaired = bad ? ` (the cached bytes had sha256 ${bad.found}, not the lock's: moved to ${bad.to}, fetched again)` : '';
      if (cache.has(storedSha256(artifact))) {
        sub.title = `${artifact.key}: in cache, checked`;
      } else {
        const started = performance.now();
        const meter = progressMeter(settings.interactive, (line) => (sub.output = line));
        await downloadToCache(cache, artifact, mirrorUrl(artifact.url, ctx.config.mirrors.downloads), {
          signal: ctx.signal,
          offline: settings.offline,
          http: settings.http,
          onProgress: meter,
          onRetry: (attempt, reason) => (sub.output = `retry ${attempt}/${settings.http.retries}: ${reason}`),
        });
        sub.title = `${artifact.key}: fetched, ${formatRate(meter.received, performance.now() - started)}${repaired}`;
      }
      const target = join(settings.outDir, artifactOutput(artifact));
      const entry = cache.entryPath(storedSha256(artifact));
      if (!(await sameFile(entry, target))) await placeLink(entry, target);
    };

    // listr2 shows one line per artifact; at most `jobs` download at once.
    await fanOut(task, artifacts, { jobs: settings.jobs, signal: ctx.signal, title: (a) => a.key, what: 'artifacts' }, fetchOne);
    await pruneStale(join(settings.outDir, artifactsDir), new Set(artifacts.map(artifactFileName)));
    return Object.fromEntries(artifacts.map((a) => [artifactOutput(a), storedSha256(a)]));
  },
};

function offlineMissing(missing: Artifact[], movedAside: ReadonlyMap<string, { found: string; to: string }> = new Map()): OfflineError {
  const list = missing
    .map((a) => {
      const bad = movedAside.get(a.key);
      const why = bad ? `\n    the cached bytes had sha256 ${bad.found}: moved to ${bad.to}` : '';
      return `  ${a.key}: sha256 ${storedSha256(a)}${why}\n    from ${a.url}`;
    })
    .join('\n');
  return new OfflineError(
    `offline: ${missing.length} artifact${missing.length === 1 ? ' is' : 's are'} not in the cache:\n${list}\n` +
      `Fetch ${missing.length === 1 ? 'it' : 'them'} on a machine with network (make fetch) and carry cache/ across.`,
  );
}

/** Removes files in out/artifacts/ that an older lock put there. */
async function pruneStale(dir: string, keep: Set<string>): Promise<void> {
  for (const name of await readdir(dir).catch(() => [] as string[])) {
    if (!keep.has(name)) await rm(join(dir, name), { force: true, recursive: true });
  }
}

/**
 * Downloads one artifact into the cache: one pass over the bytes, hashed as they
 * stream (and for .xz, decompressed by a multi-threaded xz and hashed again on the
 * way to disk), written under a temporary name, verified, then renamed into place.
 */
export async function downloadToCache(cache: Cache, artifact: Artifact, url: string, options: DownloadOptions): Promise<string> {
  const tmp = await cache.temporaryPath(artifact.key);
  try {
    const chunks = downloadChunks(url, options);
    if (isXz(artifact)) {
      const { compressedSha256, sha256 } = await writeXzDecompressed(chunks, tmp, options.signal).catch((error: unknown) => {
        if (!(error instanceof XzError)) throw error;
        throw new UserError(
          `${artifact.key} from ${url}: the download is not the .xz file the lock names (${error.message}).\n` +
            'The file was discarded; nothing was written to the cache. Check the mirror, or re-pin if upstream replaced the file.',
        );
      });
      verify(artifact, url, 'download', artifact.sha256, compressedSha256);
      verify(artifact, url, 'decompressed image', artifact.uncompressedSha256!, sha256);
    } else {
      const { sha256 } = await writeHashed(chunks, tmp);
      verify(artifact, url, 'download', artifact.sha256, sha256);
    }
    return await cache.commit(tmp, storedSha256(artifact));
  } finally {
    await removeQuietly(tmp);
  }
}

class XzError extends Error {}

function verify(artifact: Artifact, url: string, what: string, expected: string, found: string): void {
  if (expected !== found) {
    throw new ChecksumError(
      `${artifact.key} from ${url} (${what})`,
      expected,
      found,
      'The file was discarded; nothing was written to the cache. If the lock is right, the server or mirror ' +
        'serves other bytes than upstream published; if upstream replaced the file, re-pin the lock.',
    );
  }
}

function hashingTransform(onChunk: (chunk: Buffer) => void): Transform {
  return new Transform({
    transform(chunk: Buffer, _encoding, callback) {
      onChunk(chunk);
      callback(null, chunk);
    },
  });
}

/**
 * Writes chunks to a new file while hashing them: chunks are gathered into batches of a
 * few MiB and written with one writev while the next batch is hashed (a write stream
 * per chunk costs a third of the throughput on a fast link).
 */
async function writeHashed(chunks: AsyncIterable<Buffer>, path: string): Promise<{ sha256: string; size: number }> {
  const hash = sha256Hasher();
  let size = 0;
  const file = await open(path, 'wx');
  try {
    const writer = new BatchedWriter(file);
    for await (const chunk of chunks) {
      hash.update(chunk);
      size += chunk.length;
      await writer.push(chunk);
    }
    await writer.flush();
  } finally {
    await file.close();
  }
  return { sha256: hash.digest('hex'), size };
}

/**
 * Streams compressed chunks through `xz --decompress --threads=0` into `path`, hashing
 * both sides on the way: the output is never read back.
 */
export async function writeXzDecompressed(
  chunks: AsyncIterable<Buffer>,
  path: string,
  signal: AbortSignal,
): Promise<{ compressedSha256: string; sha256: string; size: number }> {
  const compressedHash = sha256Hasher();
  const hash = sha256Hasher();
  let size = 0;
  // A streaming child process, which zx's buffered output is not made for.
  const xz = spawn('xz', ['--decompress', '--stdout', '--threads=0'], { stdio: ['pipe', 'pipe', 'pipe'] });
  const killXz = () => xz.kill('SIGKILL');
  signal.addEventListener('abort', killXz, { once: true });
  let stderr = '';
  xz.stderr.setEncoding('utf8').on('data', (text: string) => (stderr += text));
  const exited = new Promise<number | null>((resolve, reject) => {
    xz.once('error', reject);
    xz.once('close', (code) => resolve(code));
  });
  const feeding = pipeline(
    chunks,
    hashingTransform((chunk) => compressedHash.update(chunk)),
    xz.stdin,
  );
  const writing = pipeline(
    xz.stdout,
    hashingTransform((chunk) => {
      hash.update(chunk);
      size += chunk.length;
    }),
    createWriteStream(path, { flags: 'wx', highWaterMark: 1 << 20 }),
  );
  try {
    const [fed, wrote, code] = await Promise.allSettled([feeding, writing, exited]);
    // xz's own failure explains a broken pipe on the feeding side: report it first.
    if (code.status === 'rejected') throw new UserError(`cannot run xz: ${String(code.reason)}`);
    if (code.value !== 0 && !signal.aborted) {
      throw new XzError(`xz: ${stderr.trim().replace(/^xz: \(stdin\): /, '') || `exit ${code.value}`}`);
    }
    if (fed.status === 'rejected') throw fed.reason;
    if (wrote.status === 'rejected') throw wrote.reason;
  } catch (error) {
    killXz();
    throw error;
  } finally {
    signal.removeEventListener('abort', killXz);
  }
  return { compressedSha256: compressedHash.digest('hex'), sha256: hash.digest('hex'), size };
}
