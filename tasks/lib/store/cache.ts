// The content-addressed cache: cache/sha256/<hex> holds exactly the bytes whose sha256
// is <hex>. Entries are written under cache/tmp/, verified, made read-only and renamed
// into place, so an entry is never partial or wrong. Outputs in out/ are hardlinks.
import { createHash, type Hash } from 'node:crypto';
import { constants, createReadStream, existsSync } from 'node:fs';
import { chmod, copyFile, link, mkdir, readdir, rename, rm, stat, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { UserError } from '../errors.ts';

export class ChecksumError extends UserError {
  constructor(what: string, expected: string, found: string, hint: string) {
    super(`${what}: sha256 mismatch\n  expected ${expected}\n  found    ${found}\n${hint}`);
    this.name = 'ChecksumError';
  }
}

/** A cache entry whose bytes no longer hash to what names them (the lock's sha256, a blob's digest). */
export interface CacheProblem {
  entry: string; // its path
  what: string; // e.g. "kubelet (artifact in the lock)" or "blob of registry.k8s.io/pause:3.10.1"
  expected: string;
  found: string;
  repair: string; // the command that repairs it
}

export const artifactRepair = 'make fetch FORCE=1 (moves the entry to cache/corrupt/ and downloads it again)';
export const blobRepair = 'make images FORCE=1 (moves the blob to cache/corrupt/ and copies the image again)';

/** The cache changed after it was stored (a bit flip, a disk error, a hand edit): the stage refuses to use it. */
export class CacheMismatchError extends UserError {
  readonly problems: CacheProblem[];
  constructor(problems: CacheProblem[]) {
    const lines = problems.map((p) => `  ${p.entry}: ${p.what}\n    expected sha256 ${p.expected}\n    found    sha256 ${p.found}\n    repair: ${p.repair}`);
    super(
      `the cache no longer holds the bytes that name ${problems.length === 1 ? 'this entry' : 'these entries'} (changed after it was stored):\n${lines.join('\n')}\n` +
        'make fsck checks every cache entry and output; make fsck FIX=1 moves the bad ones aside so the next build fetches them again.',
    );
    this.name = 'CacheMismatchError';
    this.problems = problems;
  }
}

/** sha256 of a file's bytes, read once. */
export async function hashFile(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 })) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/**
 * Moves a bad cache entry to cache/corrupt/ (never deletes it: it is evidence), under a
 * name that says what it was and when: `20261130T134501Z.sha256.HEX`. Returns the new path.
 */
export async function moveAside(cacheDir: string, entry: string, kind: string, now = new Date()): Promise<string> {
  const dir = join(cacheDir, 'corrupt');
  await mkdir(dir, { recursive: true });
  const stampText = now.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
  let target = join(dir, `${stampText}.${kind}.${basename(entry)}`);
  for (let n = 2; existsSync(target); n++) target = join(dir, `${stampText}.${kind}.${basename(entry)}.${n}`);
  await rename(entry, target);
  return target;
}

export class Cache {
  readonly dir: string;

  constructor(dir: string) {
    this.dir = dir;
  }

  entryPath(sha256: string): string {
    return join(this.dir, 'sha256', sha256);
  }

  has(sha256: string): boolean {
    return existsSync(this.entryPath(sha256));
  }

  /** A fresh temporary path, named so that a later run can tell whose it was. */
  async temporaryPath(label: string): Promise<string> {
    const tmp = join(this.dir, 'tmp');
    await mkdir(tmp, { recursive: true });
    return join(tmp, `${label.replace(/[^\w.-]/g, '_')}.${process.pid}.${Math.random().toString(36).slice(2, 10)}`);
  }

  /**
   * Verifies a finished temporary file against the expected digest(s) and moves it into
   * the cache. On a mismatch the file is deleted and a ChecksumError raised.
   */
  async commit(tmpPath: string, sha256: string): Promise<string> {
    const target = this.entryPath(sha256);
    await mkdir(dirname(target), { recursive: true });
    await chmod(tmpPath, 0o444);
    await rename(tmpPath, target);
    return target;
  }

  /** Removes temporary files left by runs that are gone (killed, power cut). */
  async removeStaleTemporaries(): Promise<void> {
    const tmp = join(this.dir, 'tmp');
    let names: string[];
    try {
      names = await readdir(tmp);
    } catch {
      return;
    }
    for (const name of names) {
      const pid = Number(name.split('.').at(-2));
      if (Number.isInteger(pid) && pid !== process.pid && !processAlive(pid)) await rm(join(tmp, name), { force: true, recursive: true });
    }
  }
}

export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Places a cache entry at `target` as a hardlink (a copy across filesystems), atomically. */
export async function placeLink(source: string, target: string): Promise<void> {
  await mkdir(dirname(target), { recursive: true });
  const tmp = `${target}.tmp-${process.pid}`;
  await rm(tmp, { force: true });
  try {
    await link(source, tmp);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code !== 'EXDEV' && code !== 'EPERM' && code !== 'EMLINK') throw error;
    await copyFile(source, tmp, constants.COPYFILE_FICLONE);
  }
  await rename(tmp, target);
}

/** True when `target` is already a hardlink of `source`. */
export async function sameFile(source: string, target: string): Promise<boolean> {
  try {
    const [a, b] = await Promise.all([stat(source), stat(target)]);
    return a.ino === b.ino && a.dev === b.dev;
  } catch {
    return false;
  }
}

export function sha256Hasher(): Hash {
  return createHash('sha256');
}

export async function removeQuietly(path: string): Promise<void> {
  await unlink(path).catch(() => undefined);
}
