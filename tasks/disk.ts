// disk: the image disk every node mounts by label at boot. A staging tree (images/,
// bin/, cni/, manifests/, scripts/, MANIFEST.json) becomes an ext4 filesystem labelled
// "corekube" through `mkfs.ext4 -d`, without root, byte-identical for identical inputs,
// and is read back (debugfs, no mount) against its MANIFEST.json before it is kept.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, readdirSync, readFileSync, statSync, type Stats } from 'node:fs';
import { copyFile, link, mkdir, open, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { artifactRepair, blobRepair, CacheMismatchError, hashFile, type CacheProblem } from './lib/store/cache.ts';
import { UserError } from './lib/errors.ts';
import { imagesOutput, manifestFileDigests, manifestsDir, storeDir } from './images.ts';
import { storedSha256, type ArtifactKey } from './lib/inputs/lock.ts';
import { sha256Of } from './lib/store/oci.ts';
import type { RunContext, Stage } from './lib/run/stage.ts';
import { runTool, ToolError } from './lib/run/tool.ts';

export const diskOutput = 'image-disk.img';
export const diskLabel = 'corekube';
/** Every timestamp on the disk: a fixed instant, so equal inputs give equal bytes. */
export const diskEpoch = 1_700_000_000;
const blockSize = 4096;

export interface ManifestEntry {
  path: string; // relative to the disk root, like bin/kubelet
  size: number;
  sha256: string;
  mode: number;
}

export interface DiskManifest {
  label: string;
  files: ManifestEntry[];
}

export const diskStage: Stage = {
  name: 'disk',
  title: 'Build the image disk',
  summary: `writes out/${diskOutput} (ext4, label "${diskLabel}"): images, binaries, CNI plugins, manifests and boot scripts, reproducibly`,
  needs: ['fetch', 'images'],
  tools: ['mkfs.ext4', 'debugfs', 'resize2fs', 'tar'],
  inputs(ctx) {
    const inputs: Record<string, string> = { label: diskLabel, uuid: diskUuid(ctx.config.name), epoch: String(diskEpoch) };
    for (const [file, digest] of Object.entries(manifestFileDigests(manifestsDir(ctx)))) inputs[`manifests/${file}`] = digest;
    for (const [file, digest] of Object.entries(treeDigests(scriptsDir(ctx)))) inputs[`scripts/${file}`] = digest;
    return inputs;
  },
  outputs() {
    return [diskOutput];
  },
  async run(ctx, task) {
    const { outDir } = ctx.settings;
    const staging = join(outDir, `.disk-staging.${process.pid}`);
    const image = join(outDir, `.${diskOutput}.${process.pid}`);
    const manifestFile = join(outDir, `.disk-MANIFEST.${process.pid}.json`);
    const phases: DiskPhases = { staging: 0, hashing: 0, mkfs: 0, fixup: 0, readBack: 0 };
    const timed = async <T>(phase: keyof DiskPhases, work: Promise<T>): Promise<T> => {
      const started = performance.now();
      const result = await work;
      phases[phase] = (performance.now() - started) / 1000;
      return result;
    };
    await rm(staging, { recursive: true, force: true });
    try {
      task.output = 'staging the tree';
      const staged = await timed('staging', stageTree(ctx, staging));
      // mkfs.ext4 copies the tree while this process hashes what did not come from the
      // cache (for MANIFEST.json). MANIFEST.json goes in with the fix-up.
      task.output = 'mkfs.ext4, hashing the tree';
      const uuid = diskUuid(ctx.config.name);
      const [files] = await Promise.all([timed('hashing', describeTree(staging, staged.expected)), timed('mkfs', mkfsFromTree(staging, image, uuid, ctx.signal))]);
      if (staged.problems.length > 0) await throwCacheProblems(staged, staging);
      const manifest: DiskManifest = { label: diskLabel, files };
      const manifestText = `${JSON.stringify(manifest, null, 1)}\n`;
      await writeFile(manifestFile, manifestText);
      task.output = `fix-up: ${files.length} files, ${formatMiB(files.reduce((n, f) => n + f.size, 0))}`;
      await timed('fixup', (async () => finishFilesystem(image, [...(await allPaths(staging)), { path: '/MANIFEST.json', mode: 0o644, dir: false, source: manifestFile }], ctx.signal))());
      task.output = 'reading the disk back';
      // The read-back hashes what came from the cache (its digest is its name or the lock's:
      // the check at use) and compares the rest with the bytes hashed for MANIFEST.json.
      await timed(
        'readBack',
        verifyDisk(image, ctx.signal, { manifest, text: manifestText, tree: staging, hash: new Set(staged.expected.keys()) }).catch(async (error: unknown) => {
          // A damaged cache entry shows here first: name it (and every other) as the cache's fault.
          if (error instanceof DiskError) await throwCacheProblems(staged, staging);
          throw error;
        }),
      );
      await rename(image, join(outDir, diskOutput));
      diskPhases.set(ctx, phases);
      // What the stamp records for the disk is what the read-back proved: its label, UUID and
      // MANIFEST.json, whose every file was just read off the disk and hashed. Hashing the
      // image's bytes too would read it a third time (fsck reads the disk back instead).
      return { [diskOutput]: diskDigest(uuid, manifestText) };
    } finally {
      await rm(staging, { recursive: true, force: true });
      await rm(image, { force: true });
      await rm(manifestFile, { force: true });
    }
  },
};

/**
 * Seconds each part of a disk run took (hashing and mkfs run side by side), by the run's
 * context: the disk bench prints them beside mkfs.ext4 -d alone.
 */
export interface DiskPhases {
  staging: number;
  hashing: number;
  mkfs: number;
  /** debugfs writing MANIFEST.json and fixing every inode, then resize2fs -M. */
  fixup: number;
  readBack: number;
}
export const diskPhases = new WeakMap<RunContext, DiskPhases>();

/** The digest the stamp records for a disk: of its label, UUID and MANIFEST.json (see run). */
export function diskDigest(uuid: string, manifestText: string): string {
  return createHash('sha256').update(`corekube image disk\0${diskLabel}\0${uuid}\0`).update(manifestText).digest('hex');
}

/** fsck's check of a disk: read it back against its MANIFEST.json, and the digest of what it holds. */
export async function readDiskDigest(image: string, signal?: AbortSignal): Promise<string> {
  const stats = await runTool('debugfs', ['-R', 'stats', image], { signal });
  const uuid = /^Filesystem UUID:\s*(.*)$/m.exec(stats)?.[1]?.trim() ?? '';
  await verifyDisk(image, signal);
  const text = await runTool('debugfs', ['-R', 'cat /MANIFEST.json', image], { signal });
  return diskDigest(uuid, text);
}

export function scriptsDir(ctx: RunContext): string {
  return join(ctx.settings.root, 'fcc', 'scripts');
}

/** A fixed filesystem UUID per cluster (RFC 4122 layout, from a hash of the name). */
export function diskUuid(clusterName: string): string {
  const hex = createHash('sha256').update(`corekube image disk ${clusterName}`).digest('hex');
  const variant = ((parseInt(hex[16]!, 16) & 0x3) | 0x8).toString(16);
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-4${hex.slice(13, 16)}-${variant}${hex.slice(17, 20)}-${hex.slice(20, 32)}`;
}

function treeDigests(dir: string): Record<string, string> {
  if (!existsSync(dir)) return {};
  const files = (readdirSync(dir, { recursive: true }) as string[]).filter((f) => statSync(join(dir, f)).isFile()).sort();
  return Object.fromEntries(files.map((f) => [f, sha256Of(readFileSync(join(dir, f)))]));
}

const plainBinaries: { key: ArtifactKey; name: string }[] = [
  { key: 'kubeadm', name: 'kubeadm' },
  { key: 'kubelet', name: 'kubelet' },
  { key: 'kubectl', name: 'kubectl' },
  { key: 'runc', name: 'runc' },
];

/** What a staged file must hash to, and the cache entry it came from. */
interface Expectation {
  sha256: string;
  entry: string;
  what: string;
  repair: string;
}

interface Staged {
  expected: Map<string, Expectation>;
  problems: CacheProblem[];
}

/**
 * Lays out the disk's tree in `staging` (hardlinks where it can). What each binary and
 * each image blob must hash to is noted: MANIFEST.json takes those digests, and the
 * read-back hashes their bytes off the disk against them, which is the cache check
 * (each tarball is hashed as tar reads it).
 */
async function stageTree(ctx: RunContext, staging: string): Promise<Staged> {
  const { outDir } = ctx.settings;
  const entry = (key: ArtifactKey) => {
    const path = ctx.cache.entryPath(storedSha256(ctx.lock.artifacts[key]));
    if (!existsSync(path)) throw new UserError(`${key} is not in the cache (${path}): run make fetch first`);
    return path;
  };
  const artifact = (key: ArtifactKey): Expectation => ({ sha256: storedSha256(ctx.lock.artifacts[key]), entry: entry(key), what: `${key}, as the lock pins it`, repair: artifactRepair });
  const expected = new Map<string, Expectation>();
  const problems: CacheProblem[] = [];
  for (const dir of ['bin', 'cni', 'manifests', 'scripts']) await mkdir(join(staging, dir), { recursive: true });

  const images = join(outDir, imagesOutput);
  if (!existsSync(join(images, 'index.json'))) throw new UserError(`${images} has no image layout: run make images first`);
  await linkTree(images, join(staging, 'images'));
  const blobs = join(staging, 'images', 'blobs', 'sha256');
  for (const hex of existsSync(blobs) ? await readdir(blobs) : []) {
    expected.set(`images/blobs/sha256/${hex}`, { sha256: hex, entry: join(storeDir(ctx), 'blobs', 'sha256', hex), what: 'an image blob (its name is its sha256)', repair: blobRepair });
  }
  for (const { key, name } of plainBinaries) {
    await linkOrCopy(entry(key), join(staging, 'bin', name));
    expected.set(`bin/${name}`, artifact(key));
  }
  const untar = async (key: ArtifactKey, dir: string, extra: string[] = []) => {
    const want = artifact(key);
    const { sha256, failure } = await extractHashed(want.entry, join(staging, dir), extra, ctx.signal);
    if (sha256 !== want.sha256) problems.push({ ...want, expected: want.sha256, found: sha256 });
    else if (failure) throw failure;
  };
  await untar('crictl', 'bin');
  // containerd's release tarball holds bin/containerd, bin/ctr, bin/containerd-shim-runc-v2…
  await untar('containerd', 'bin', ['--strip-components=1']);
  await untar('cni-plugins', 'cni');
  if (existsSync(manifestsDir(ctx))) {
    for (const file of Object.keys(manifestFileDigests(manifestsDir(ctx)))) await linkOrCopy(join(manifestsDir(ctx), file), join(staging, 'manifests', file));
  }
  if (existsSync(scriptsDir(ctx))) await linkTree(scriptsDir(ctx), join(staging, 'scripts'));
  return { expected, problems };
}

/**
 * The cache check's slow path, when a tarball or the read-back failed: hashes every staged
 * file that came from the cache and throws every mismatch at once, naming the entries.
 */
async function throwCacheProblems({ expected, problems }: Staged, staging: string): Promise<void> {
  const all = [...problems];
  for (const [path, want] of expected) {
    const found = await hashFile(join(staging, path));
    if (found !== want.sha256) all.push({ ...want, expected: want.sha256, found });
  }
  if (all.length > 0) throw new CacheMismatchError(all);
}

/**
 * `tar -xz` of a cached tarball, fed through a hash on the way: the sha256 of its bytes
 * and, where tar failed, why (a tarball whose bytes changed may not even unpack: the
 * caller reports the mismatch first).
 */
function extractHashed(tarball: string, dir: string, extra: string[], signal: AbortSignal): Promise<{ sha256: string; failure?: ToolError }> {
  return new Promise((resolvePromise, reject) => {
    const args = ['-xzf', '-', '-C', dir, '--no-same-owner', ...extra];
    const child = spawn('tar', args, { stdio: ['pipe', 'ignore', 'pipe'], signal });
    const hash = createHash('sha256');
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (t: string) => (stderr += t));
    const input = createReadStream(tarball, { highWaterMark: 1 << 20 });
    input.on('data', (chunk) => hash.update(chunk as Buffer));
    input.on('error', reject);
    child.stdin.on('error', () => undefined); // tar stopping early shows in its exit code
    input.pipe(child.stdin);
    child.on('error', reject);
    child.on('close', (code) => {
      if (code === 0 && input.readableEnded) return resolvePromise({ sha256: hash.digest('hex') });
      input.destroy();
      const failure = new ToolError(`tar ${args.join(' ')} < ${tarball}`, code, stderr);
      hashFile(tarball).then((sha256) => resolvePromise({ sha256, failure }), reject);
    });
  });
}

async function linkOrCopy(source: string, target: string): Promise<void> {
  await mkdir(join(target, '..'), { recursive: true });
  await link(source, target).catch(async (error: NodeJS.ErrnoException) => {
    if (error.code !== 'EXDEV' && error.code !== 'EPERM' && error.code !== 'EMLINK') throw error;
    await copyFile(source, target);
  });
}

async function linkTree(source: string, target: string): Promise<void> {
  await mkdir(target, { recursive: true });
  for (const entry of await readdir(source, { withFileTypes: true })) {
    const from = join(source, entry.name);
    const to = join(target, entry.name);
    if (entry.isDirectory()) await linkTree(from, to);
    else if (entry.isFile()) await linkOrCopy(from, to);
  }
}

/** The mode a path gets on the disk: executables under bin/ and wherever they were executable. */
export function diskMode(path: string, info: Pick<Stats, 'mode' | 'isDirectory'>): number {
  if (info.isDirectory()) return 0o755;
  return path.startsWith('bin/') || path.startsWith('scripts/') || (info.mode & 0o111) !== 0 ? 0o755 : 0o644;
}

/**
 * MANIFEST.json's entries: each file's size, mode and sha256; for a file from the cache
 * the digest that names it (the read-back checks the bytes against it), for the rest
 * (unpacked from tarballs, manifests, scripts) the hash of the staged file.
 */
async function describeTree(root: string, known: ReadonlyMap<string, { sha256: string }> = new Map()): Promise<ManifestEntry[]> {
  const files: ManifestEntry[] = [];
  const walk = async (dir: string) => {
    for (const entry of (await readdir(dir, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : 1))) {
      const full = join(dir, entry.name);
      if (entry.isDirectory()) await walk(full);
      else if (entry.isFile()) {
        const path = relative(root, full);
        const info = await stat(full);
        files.push({ path, size: info.size, sha256: known.get(path)?.sha256 ?? (await hashFile(full)), mode: diskMode(path, info) });
      } else {
        throw new UserError(`${full}: only files and directories can go on the image disk`);
      }
    }
  };
  await walk(root);
  return files;
}

function formatMiB(bytes: number): string {
  return `${(bytes / (1 << 20)).toFixed(1)} MiB`;
}

interface DiskPath {
  path: string; // as on the disk: "/bin/kubelet"
  mode: number;
  dir: boolean;
  /** A file the fix-up writes into the filesystem (not in the tree mkfs copied). */
  source?: string;
}

/** Every path in the tree, directories included, as it will appear on the disk ("/…"). */
async function allPaths(root: string): Promise<DiskPath[]> {
  const paths: DiskPath[] = [];
  const walk = async (dir: string) => {
    for (const entry of await readdir(dir, { withFileTypes: true })) {
      const full = join(dir, entry.name);
      const path = relative(root, full);
      const info = await stat(full);
      paths.push({ path: `/${path}`, mode: diskMode(path, info), dir: entry.isDirectory() });
      if (entry.isDirectory()) await walk(full);
    }
  };
  await walk(root);
  return paths.sort((a, b) => (a.path < b.path ? -1 : 1));
}

/** debugfs wants times as YYYYMMDDHHMMSS. */
function debugfsTime(epoch: number): string {
  return new Date(epoch * 1000).toISOString().replace(/[-:T]/g, '').slice(0, 14);
}

const fakeTime = { E2FSPROGS_FAKE_TIME: String(diskEpoch) };

/**
 * mkfs.ext4 -d copies the tree; the fix-up pass then sets every inode's times, owner and
 * mode (mkfs copies atime and ctime from the source, which cannot be set there), and
 * resize2fs shrinks the filesystem to its content. All under a fake clock.
 */
export async function makeFilesystem(staging: string, image: string, uuid: string, signal?: AbortSignal): Promise<void> {
  await mkfsFromTree(staging, image, uuid, signal);
  await finishFilesystem(image, await allPaths(staging), signal);
}

/** mkfs.ext4 -d of the tree, generously sized (resize2fs -M trims it), with room for a few files more. */
export async function mkfsFromTree(staging: string, image: string, uuid: string, signal?: AbortSignal): Promise<void> {
  const paths = await allPaths(staging);
  let dataBlocks = 0;
  for (const { path, dir } of paths) if (!dir) dataBlocks += Math.ceil(statSync(join(staging, path)).size / blockSize) + 1;
  const inodes = paths.length + 64;
  // Generous at first (metadata, directories, extent blocks, MANIFEST.json); resize2fs -M trims it.
  const blocks = Math.ceil(dataBlocks * 1.1) + inodes + 4096;
  await rm(image, { force: true });
  await runTool(
    'mkfs.ext4',
    [
      '-q', '-F',
      '-L', diskLabel,
      '-U', uuid,
      '-E', `hash_seed=${uuid},root_owner=0:0`,
      '-b', String(blockSize),
      '-N', String(inodes),
      '-m', '0',
      '-O', '^has_journal,^resize_inode',
      '-d', staging,
      image,
      String(blocks),
    ],
    { env: fakeTime, signal },
  );
}

/** One debugfs session writes the extra files and fixes every inode's times, owner and mode; then resize2fs -M. */
export async function finishFilesystem(image: string, paths: readonly DiskPath[], signal?: AbortSignal): Promise<void> {
  const time = debugfsTime(diskEpoch);
  const commands: string[] = [];
  for (const { path, source } of paths) if (source) commands.push(`write "${source}" "${path}"`);
  const fix = (path: string, mode: number, dir: boolean) => {
    const quoted = `"${path}"`;
    for (const field of ['atime', 'ctime', 'mtime', 'crtime']) commands.push(`sif ${quoted} ${field} ${time}`);
    commands.push(`sif ${quoted} uid 0`, `sif ${quoted} gid 0`, `sif ${quoted} mode 0${((dir ? 0o040000 : 0o100000) | mode).toString(8)}`);
  };
  fix('/', 0o755, true);
  fix('/lost+found', 0o700, true);
  for (const { path, mode, dir } of paths) fix(path, mode, dir);
  const commandFile = `${image}.debugfs`;
  await writeFile(commandFile, `${commands.join('\n')}\n`);
  try {
    const output = await runTool('debugfs', ['-w', '-f', commandFile, image], { env: fakeTime, signal });
    const complaint = output.split('\n').find((line) => line && !line.startsWith('debugfs:') && !line.startsWith('Allocated inode:'));
    if (complaint) throw new Error(`debugfs fix-up of ${image}: ${complaint}`);
  } finally {
    await rm(commandFile, { force: true });
  }
  await runTool('resize2fs', ['-M', image], { env: fakeTime, signal });
}

/**
 * Reads the disk back without mounting: the label, MANIFEST.json, then every file it
 * lists, located by debugfs and read from the image's blocks (one pass). Given the
 * manifest just written, it is one debugfs session: MANIFEST.json is read back as the
 * first file (it must be those bytes), the label from `stats` after the last.
 */
export async function verifyDisk(
  image: string,
  signal?: AbortSignal,
  written?: { manifest: DiskManifest; text: string; tree: string; hash?: ReadonlySet<string> },
): Promise<DiskManifest> {
  let manifest: DiskManifest;
  let files: ManifestEntry[];
  if (written) {
    manifest = written.manifest;
    const text = Buffer.from(written.text);
    files = [{ path: 'MANIFEST.json', size: text.length, sha256: createHash('sha256').update(text).digest('hex'), mode: 0o644 }, ...manifest.files];
  } else {
    const manifestText = await runTool('debugfs', ['-R', 'cat /MANIFEST.json', image], { signal });
    try {
      manifest = JSON.parse(manifestText) as DiskManifest;
    } catch {
      throw new DiskError(image, 'a readable /MANIFEST.json', `${manifestText.length} bytes that are not JSON`);
    }
    files = manifest.files;
  }
  const reference = written
    ? (file: ManifestEntry) => (file.path === 'MANIFEST.json' ? Buffer.from(written.text) : written.hash?.has(file.path) ? undefined : readFileSync(join(written.tree, file.path)))
    : undefined;
  const { found, tail } = await hashFilesOnDisk(image, files, ['stats'], signal, reference);
  const label = /^Filesystem volume name:\s*(.*)$/m.exec(tail)?.[1]?.trim();
  if (label !== diskLabel) throw new DiskError(image, `label "${diskLabel}"`, `label "${label ?? ''}"`);
  for (const file of files) {
    const actual = found.get(file.path);
    if (!actual) throw new DiskError(image, `/${file.path} (listed in MANIFEST.json)`, 'no such file');
    if (actual.size !== file.size || actual.sha256 !== file.sha256) {
      throw new DiskError(image, `/${file.path}: ${file.size} bytes, sha256 ${file.sha256}`, `${actual.size} bytes, sha256 ${actual.sha256}`);
    }
  }
  return manifest;
}

export class DiskError extends UserError {
  constructor(image: string, expected: string, found: string) {
    super(`${image}: the image disk does not hold what it should\n  expected ${expected}\n  found    ${found}\nRebuild it: make disk FORCE=1`);
  }
}

/** Where a file's bytes lie in the image: its size and its extents, in filesystem blocks. */
interface FileExtents {
  size: number;
  /** Blocks [logical, logical + length) of the file are at physical…; unwritten extents and holes read as zeros. */
  extents: { logical: number; physical: number; length: number }[];
}

/**
 * Reads every file back off the disk without mounting and without debugfs copying the
 * bytes: one debugfs session names each file's size and extents (`stat`: libext2fs
 * resolves the path, the inode and its extent tree, as `cat` would), then this process
 * reads those blocks from the image in large reads and hashes each file, or, given
 * `reference` (the bytes it was made from, hashed for MANIFEST.json moments ago), compares
 * them: the same proof for a fraction of the CPU. `after`'s output comes back as `tail`.
 */
async function hashFilesOnDisk(
  image: string,
  files: ManifestEntry[],
  after: string[],
  signal?: AbortSignal,
  reference?: (file: ManifestEntry) => Buffer | undefined,
): Promise<{ found: Map<string, { size: number; sha256: string }>; tail: string }> {
  const { located, tail } = await locateFiles(image, files, after, signal);
  const blockBytes = Number(/^Block size:\s*(\d+)$/m.exec(tail)?.[1]);
  if (!Number.isSafeInteger(blockBytes) || blockBytes <= 0) throw new DiskError(image, 'a block size in debugfs stats', JSON.stringify(tail.slice(0, 200)));
  const results = new Map<string, { size: number; sha256: string }>();
  const handle = await open(image, 'r');
  try {
    const chunk = Buffer.allocUnsafe(readChunkBytes);
    for (const file of files) {
      signal?.throwIfAborted();
      const { size, extents } = located.get(file.path)!;
      const expected = reference?.(file);
      const hash = expected ? undefined : createHash('sha256');
      let differsAt: number | undefined;
      // The file's bytes in order, chunk by chunk: extents read from the image, gaps as zeros.
      for (let at = 0; at < size; ) {
        const length = Math.min(readChunkBytes, size - at);
        chunk.fill(0, 0, length);
        for (const extent of extents) {
          const from = Math.max(at, extent.logical * blockBytes);
          const to = Math.min(at + length, (extent.logical + extent.length) * blockBytes);
          if (from >= to) continue;
          const position = extent.physical * blockBytes + (from - extent.logical * blockBytes);
          const { bytesRead } = await handle.read(chunk, from - at, to - from, position);
          if (bytesRead !== to - from) throw new DiskError(image, `/${file.path}: ${size} bytes within the image`, `the image ends inside it`);
        }
        const bytes = chunk.subarray(0, length);
        if (hash) hash.update(bytes);
        else if (differsAt === undefined && (expected!.length < at + length || !bytes.equals(expected!.subarray(at, at + length)))) {
          differsAt = at + firstDifference(bytes, expected!.subarray(at, at + length));
        }
        at += length;
      }
      const sha256 = hash
        ? hash.digest('hex')
        : differsAt === undefined && expected!.length === file.size && size === file.size
          ? file.sha256
          : `(not the bytes it was made from, from byte ${differsAt ?? Math.min(size, expected!.length)})`;
      results.set(file.path, { size, sha256 });
    }
  } finally {
    await handle.close();
  }
  return { found: results, tail };
}

const readChunkBytes = 8 << 20;

function firstDifference(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return n;
}

/**
 * One `debugfs -f -` session: `stat "/path"` for each file (size, type and the extent
 * list, like `(0-9):8-17, (10-24[u]):19-33`), then `after`. A file that is not there, not
 * a regular file, or not stored in extents is reported as a DiskError.
 */
function locateFiles(image: string, files: ManifestEntry[], after: string[], signal?: AbortSignal): Promise<{ located: Map<string, FileExtents>; tail: string }> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn('debugfs', ['-f', '-', image], { stdio: ['pipe', 'pipe', 'pipe'], signal });
    const out: Buffer[] = [];
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => out.push(chunk));
    child.stderr.setEncoding('utf8').on('data', (text: string) => (stderr += text));
    child.on('error', reject);
    child.on('close', (code) => {
      if (code !== 0) return reject(new Error(`debugfs -f - ${image} exited with ${code}: ${stderr.trim()}`));
      // Each command's output starts with its echo, "debugfs: stat "/path"".
      const sections = Buffer.concat(out).toString('utf8').split(/^debugfs: /m).slice(1);
      const located = new Map<string, FileExtents>();
      try {
        files.forEach((file, i) => located.set(file.path, parseStat(image, file, sections[i] ?? '', stderr)));
      } catch (error) {
        return reject(error);
      }
      resolvePromise({ located, tail: sections.slice(files.length).join('') });
    });
    child.stdin.end([...files.map((f) => `stat "/${f.path}"`), ...after].map((c) => `${c}\n`).join(''));
  });
}

/** A file's size and extents from debugfs `stat` output. */
function parseStat(image: string, file: ManifestEntry, section: string, stderr = ''): FileExtents {
  const where = `/${file.path} (listed in MANIFEST.json)`;
  if (!section.startsWith(`stat "/${file.path}"\n`)) throw new DiskError(image, where, 'debugfs output out of step');
  const size = /\bSize: (\d+)/.exec(section)?.[1];
  if (size === undefined) {
    const missing = stderr.split('\n').find((line) => line.includes(file.path) || /File not found|not found by ext2_lookup/.test(line));
    throw new DiskError(image, where, missing?.trim() || 'no such file');
  }
  if (!/\bType: regular\b/.test(section)) throw new DiskError(image, where, `not a regular file (${/\bType: (\S+)/.exec(section)?.[1] ?? '?'})`);
  const list = /^EXTENTS:\n([^]*)$/m.exec(section);
  if (!list) throw new DiskError(image, `${where} stored in extents`, 'no extent list (inline data or block maps)');
  const extents: FileExtents['extents'] = [];
  for (const m of list[1]!.matchAll(/\((ETB\d+|\d+)(?:-(\d+))?(\[u\])?\):(\d+)(?:-(\d+))?/g)) {
    if (m[1]!.startsWith('ETB') || m[3]) continue; // an index block; an unwritten extent reads as zeros
    const logical = Number(m[1]);
    extents.push({ logical, physical: Number(m[4]), length: (m[2] === undefined ? logical : Number(m[2])) - logical + 1 });
  }
  return { size: Number(size), extents };
}
