// fsck: hashes every cache entry against what names it (cache/sha256/HEX and the OCI
// blobs cache/oci/blobs/sha256/HEX are named by their sha256) and every output in out/
// against the sha256 its stage's stamp recorded; reports what differs. With fix, a bad
// cache entry is moved to cache/corrupt/ and a stage whose outputs differ loses its
// stamp, so the next build fetches and makes them again. Files shared by hardlink (out/
// artifacts and out/images link the cache) are read once.
import { existsSync } from 'node:fs';
import { readdir, readFile, rm, stat } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { hashFile, moveAside } from './lib/store/cache.ts';
import { acquireRunLock, readStamp, treeSha256, type Stamp } from './lib/run/engine.ts';
import { diskOutput, readDiskDigest } from './disk.ts';
import { imagesOutput } from './images.ts';
import { sha256Of } from './lib/store/oci.ts';
import { loadLock, lockedArtifacts, type Lock } from './lib/inputs/lock.ts';
import { parseEvidence, reverify, type SignatureRecord } from './lib/signatures/evidence.ts';
import { SignatureError } from './lib/signatures/openpgp.ts';
import type { RunSettings } from './lib/run/stage.ts';

export interface FsckFinding {
  path: string;
  kind: 'cache' | 'output' | 'signature';
  expected: string;
  found: string;
  /** For an output: the stage that made it. */
  stage?: string;
  /** With fix: what was done about it. */
  fixed?: string;
}

export interface FsckReport {
  cacheEntries: number;
  outputs: number;
  /** Signatures re-verified from their evidence in the cache, offline. */
  signatures: number;
  bytes: number;
  bad: FsckFinding[];
  /** Outputs a stamp names that are gone (made again by the next run of their stage). */
  missing: { path: string; stage: string }[];
}

const hexName = /^[0-9a-f]{64}$/;

export async function fsck(settings: RunSettings, options: { fix: boolean; signal?: AbortSignal }): Promise<FsckReport> {
  const lock = options.fix ? await acquireRunLock(settings, 'fsck --fix') : undefined;
  try {
    return await check(settings, options);
  } finally {
    await lock?.release();
  }
}

async function check(settings: RunSettings, options: { fix: boolean; signal?: AbortSignal }): Promise<FsckReport> {
  const report: FsckReport = { cacheEntries: 0, outputs: 0, signatures: 0, bytes: 0, bad: [], missing: [] };
  // One hash per inode: out/ links the cache, and a blob may sit in several layouts.
  const byInode = new Map<string, Promise<string>>();
  const hashOnce = async (path: string): Promise<string> => {
    const info = await stat(path);
    const key = `${info.dev}:${info.ino}`;
    let digest = byInode.get(key);
    if (!digest) {
      report.bytes += info.size;
      digest = hashFile(path);
      byInode.set(key, digest);
    }
    return digest;
  };
  const cacheDirs = [
    { dir: join(settings.cacheDir, 'sha256'), kind: 'sha256' },
    { dir: join(settings.cacheDir, 'oci', 'blobs', 'sha256'), kind: 'oci-blob' },
  ];
  for (const { dir, kind } of cacheDirs) {
    for (const name of existsSync(dir) ? (await readdir(dir)).sort() : []) {
      if (!hexName.test(name)) continue;
      options.signal?.throwIfAborted();
      const path = join(dir, name);
      report.cacheEntries++;
      const found = await hashOnce(path);
      if (found === name) continue;
      const finding: FsckFinding = { path, kind: 'cache', expected: name, found };
      if (options.fix) finding.fixed = `moved to ${relative(settings.cacheDir, await moveAside(settings.cacheDir, path, kind))} under cache/`;
      report.bad.push(finding);
    }
  }

  await checkSignatures(settings, report);

  const stampDir = join(settings.outDir, '.stamps');
  const stages = existsSync(stampDir) ? (await readdir(stampDir)).filter((f) => f.endsWith('.json')).map((f) => f.slice(0, -5)).sort() : [];
  for (const name of stages) {
    const stamp = await readStamp(settings, name);
    if (!stamp) continue;
    const before = report.bad.length;
    for (const [output, record] of Object.entries(stamp.outputs)) {
      options.signal?.throwIfAborted();
      const path = join(settings.outDir, output);
      if (!existsSync(path)) {
        report.missing.push({ path, stage: name });
        continue;
      }
      report.outputs++;
      for (const [file, expected, found] of await outputDigests(stamp, output, path, record.sha256, hashOnce)) {
        if (expected !== found) report.bad.push({ path: file, kind: 'output', stage: name, expected, found });
      }
    }
    if (options.fix && report.bad.length > before) {
      await rm(join(stampDir, `${name}.json`), { force: true });
      for (const finding of report.bad.slice(before)) finding.fixed = `removed the ${name} stamp: the next make ${name} makes it again`;
    }
  }
  return report;
}

/**
 * Every signature the lock records, verified again from its evidence in the cache against
 * the bytes the cache holds: no network, the trusted keys and roots kept with the evidence.
 */
async function checkSignatures(settings: RunSettings, report: FsckReport): Promise<void> {
  if (!existsSync(settings.lockFile)) return;
  let lock: Lock;
  try {
    lock = loadLock(settings.lockFile);
  } catch {
    return; // Every stage that reads the lock says what is wrong with it.
  }
  const records: [string, SignatureRecord, string][] = [
    ...lockedArtifacts(lock).flatMap((a): [string, SignatureRecord, string][] => (lock.signatures?.artifacts[a.key] ? [[a.key, lock.signatures.artifacts[a.key]!, a.sha256]] : [])),
    ...lock.images.flatMap((i): [string, SignatureRecord, string][] => {
      const record = lock.signatures?.images[`${i.name}:${i.tag}`];
      return record ? [[`image ${i.name}:${i.tag}`, record, i.digest]] : [];
    }),
  ];
  const cacheDir = join(settings.cacheDir, 'sha256');
  for (const [subject, record, pinned] of records) {
    if (record.method === 'none' || !record.evidence) continue;
    report.signatures++;
    const evidenceFile = join(cacheDir, record.evidence);
    const bad = (expected: string, found: string) => report.bad.push({ path: evidenceFile, kind: 'signature', expected: `${subject}: ${expected}`, found });
    if (!existsSync(evidenceFile)) {
      bad(`its signature's evidence (sha256 ${record.evidence}) in the cache`, 'nothing: make pin again online, or unbundle a bundle that has it');
      continue;
    }
    try {
      const evidence = parseEvidence(evidenceFile, await readFile(evidenceFile, 'utf8'));
      const names = evidence.cosign ? evidence.cosign.digest : evidence.sha256;
      if (names !== pinned) {
        bad(`evidence for what the lock pins (${pinned})`, `evidence for ${names}`);
        continue;
      }
      const signed = join(cacheDir, evidence.sha256);
      const signer = await reverify(evidence, evidence.cosign || !existsSync(signed) ? undefined : signed);
      if (signer !== record.signer) bad(`a signature by ${record.signer}`, `one by ${signer}`);
    } catch (error) {
      if (error instanceof SignatureError) bad(error.expected, error.found);
      else bad('evidence that re-verifies', (error as Error).message);
    }
  }
}

/** [file, expected, found] for one output: its whole-tree sha256, or for the image layout its index and every blob against its name. */
async function outputDigests(
  stamp: Stamp,
  output: string,
  path: string,
  recorded: string,
  hashOnce: (path: string) => Promise<string>,
): Promise<[string, string, string][]> {
  if (stamp.stage === 'images' && output === imagesOutput) {
    // The images stage records the digest of index.json: blobs are named by theirs.
    const index = join(path, 'index.json');
    const results: [string, string, string][] = [[index, recorded, sha256Of(await readFile(index)).slice('sha256:'.length)]];
    const blobs = join(path, 'blobs', 'sha256');
    for (const hex of existsSync(blobs) ? (await readdir(blobs)).sort() : []) results.push([join(blobs, hex), hex, await hashOnce(join(blobs, hex))]);
    return results;
  }
  if (stamp.stage === 'disk' && output === diskOutput) return [[path, recorded, await readDiskDigest(path)]];
  const info = await stat(path);
  return [[path, recorded, info.isDirectory() ? await treeSha256(path) : await hashOnce(path)]];
}

/** The report as lines for a person, and whether it is clean. */
export function formatFsck(report: FsckReport, settings: RunSettings): string {
  const lines: string[] = [];
  const show = (path: string) => {
    const fromCache = relative(settings.cacheDir, path);
    return fromCache.startsWith('..') ? path : join('cache', fromCache);
  };
  for (const bad of report.bad) {
    if (bad.kind === 'signature') {
      lines.push(`REFUSED signature of ${bad.expected.split(':')[0]}: expected ${bad.expected.slice(bad.expected.indexOf(':') + 2)}; found ${bad.found}`);
      continue;
    }
    const what = bad.kind === 'cache' ? 'cache entry (named by its sha256)' : `output of ${bad.stage} (${bad.stage === 'disk' ? 'its content, read back, against' : 'sha256 in'} its stamp)`;
    lines.push(`DIFFERS ${show(bad.path)}: ${what}\n  expected sha256 ${bad.expected}\n  found    sha256 ${bad.found}${bad.fixed ? `\n  fixed: ${bad.fixed}` : ''}`);
  }
  for (const { path, stage } of report.missing) lines.push(`missing ${path} (an output of ${stage}: the next make ${stage} makes it again)`);
  const size = `${(report.bytes / 1e6).toFixed(1)} MB read`;
  lines.push(
    `fsck: ${report.cacheEntries} cache entries, ${report.signatures} signatures and ${report.outputs} outputs checked (${size}): ` +
      (report.bad.length === 0 ? 'all match' : `${report.bad.length} differ${report.bad.every((b) => b.fixed) ? ', all moved aside or unstamped' : ': make fsck FIX=1 moves bad cache entries to cache/corrupt/ and unstamps the outputs, so the next build makes them again'}`),
  );
  return lines.join('\n');
}
