// The content-addressed cache: cache/sha256/<hex> holds exactly the bytes whose sha256
// is <hex>. Entries are written under cache/tmp/, verified, made read-only and renamed
// into place, so an entry is never partial or wrong. Outputs in out/ are hardlinks.
import { createHash, type Hash } from 'node:crypto';
import { constants, existsSync } from 'node:fs';
import { chmod, copyFile, link, mkdir, readdir, rename, rm, stat, unlink } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { UserError } from './errors.ts';

export class ChecksumError extends UserError {
  constructor(what: string, expected: string, found: string, hint: string) {
    super(`${what}: sha256 mismatch\n  expected ${expected}\n  found    ${found}\n${hint}`);
    this.name = 'ChecksumError';
  }
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
