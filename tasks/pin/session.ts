// One pin run's link to upstream, shared by the resolvers: small documents (metadata,
// checksum files, version markers) as text or JSON, and downloads hashed into the cache,
// through the mirrors cluster.yaml names, with errors that say which input to check.
import { createWriteStream } from 'node:fs';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { isAbortError, UserError } from '../lib/errors.ts';
import { mirrorUrl, upstreamBases, type ClusterConfig, type DownloadFamily } from '../lib/inputs/config.ts';
import type { Artifact } from '../lib/inputs/lock.ts';
import type { RunContext } from '../lib/run/stage.ts';
import { ChecksumError, removeQuietly, sha256Hasher, type Cache } from '../lib/store/cache.ts';
import { downloadChunks, DownloadError, type DownloadOptions } from '../lib/store/download.ts';
import type { ArtifactNotes } from './lock-text.ts';

/** What one resolver contributes to the lock: its artifacts, with the note the lock prints above each (where its sha256 came from). */
export interface Pinned {
  artifacts: Artifact[];
  notes: ArtifactNotes;
}

export interface Session {
  ctx: RunContext;
  config: ClusterConfig;
  cache: Cache;
  signal: AbortSignal;
  download: DownloadOptions;
  progress: (line: string) => void;
}

/** Runs jobs side by side; on the first failure cancels the rest, waits for them, and throws it. */
export async function allOrNothing<T extends readonly unknown[]>(parent: AbortSignal, jobs: { [K in keyof T]: (signal: AbortSignal) => Promise<T[K]> }): Promise<T> {
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

export const firstLine = (text: string) => text.split('\n')[0] ?? text;

/** Where a download family comes from: the mirror from cluster.yaml, said in messages when it is one. */
export function mirrorNote(config: ClusterConfig, family: DownloadFamily): string {
  const base = config.mirrors.downloads[family];
  return base === upstreamBases[family] ? '' : ` (mirrors.${family} in ${config.file}: ${base})`;
}

export function familyOf(url: string): DownloadFamily {
  return (Object.keys(upstreamBases) as DownloadFamily[]).find((f) => url.startsWith(`${upstreamBases[f]}/`)) ?? 'github';
}

/** A small document (metadata, checksum file, version marker) as text. */
export async function fetchText(s: Session, upstreamUrl: string, what: string, hint: string): Promise<{ text: string; url: string }> {
  const { bytes, url } = await fetchBytes(s, upstreamUrl, what, hint);
  return { text: bytes.toString('utf8'), url };
}

/** A small document (a signature, a certificate) as bytes. */
export async function fetchBytes(s: Session, upstreamUrl: string, what: string, hint: string): Promise<{ bytes: Buffer; url: string }> {
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
  return { bytes: Buffer.concat(chunks), url };
}

export async function fetchJson(s: Session, upstreamUrl: string, what: string, hint: string): Promise<{ json: unknown; url: string }> {
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
export async function downloadToCacheHashed(
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
