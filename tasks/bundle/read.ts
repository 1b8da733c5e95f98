// One read of a bundle, start to end, verifying as it streams: the manifest first, then
// each entry against it (name, place, size, sha256), the lock and config against the
// project's, the artifacts against the lock, the image index against the lock and the
// blobs against the images. It writes only into the staging directory it is given.
import { existsSync, readFileSync } from 'node:fs';
import { open, stat, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { refName } from '../images.ts';
import { UserError } from '../lib/errors.ts';
import { lockedArtifacts, parseLock, storedSha256, type Lock } from '../lib/inputs/lock.ts';
import { formatBytes } from '../lib/run/progress.ts';
import type { RunContext } from '../lib/run/stage.ts';
import { tarBlock, tarEntries, tarEntryProblem, tarFailure, type TarEntry } from '../lib/store/archive.ts';
import { ChecksumError, sha256Hasher } from '../lib/store/cache.ts';
import { BatchedWriter, readChunks } from '../lib/store/chunks.ts';
import type { Progress } from '../lib/store/download.ts';
import { blobPath, manifestMediaTypes, parseManifest, refOf, type OciIndex } from '../lib/store/oci.ts';
import { artifactPrefix, blobPrefix, bundleFormat, bundleLayout, configEntry, headEntries, lockEntry, manifestEntry, ociIndexEntry, ociLayoutEntry, sha256Hex, type BundleEntry, type BundleManifest } from './format.ts';

const hexPattern = /^[0-9a-f]{64}$/;
const maxSmallEntry = 16 << 20;

function bundleProblem(file: string, problem: string): UserError {
  return new UserError(
    `${file}: not a usable corekube bundle: ${problem}.\nNothing was added to the cache. Make the bundle with make bundle (corekube writes it; other tars are not read).`,
  );
}

/** The manifest's shape: fixed head entries, then content-addressed entries named by their sha256. */
function parseBundleManifest(file: string, bytes: Buffer): BundleManifest {
  let parsed: Partial<BundleManifest>;
  try {
    parsed = JSON.parse(bytes.toString('utf8')) as Partial<BundleManifest>;
  } catch (error) {
    throw bundleProblem(file, `its manifest ${manifestEntry} is not JSON (${(error as Error).message})`);
  }
  if (parsed.corekubeBundle !== bundleFormat) {
    throw bundleProblem(file, `expected bundle format ${bundleFormat}, found ${JSON.stringify(parsed.corekubeBundle)} (made by another corekube version?)`);
  }
  if (typeof parsed.cluster !== 'string' || !Array.isArray(parsed.entries)) throw bundleProblem(file, `${manifestEntry} lacks cluster or entries`);
  const paths = new Set<string>();
  parsed.entries.forEach((entry, i) => {
    const where = `${manifestEntry} entries[${i}]`;
    if (!entry || typeof entry.path !== 'string' || !Number.isSafeInteger(entry.size) || entry.size < 0 || !hexPattern.test(String(entry.sha256))) {
      throw bundleProblem(file, `${where}: expected {path, size, sha256}, found ${JSON.stringify(entry)}`);
    }
    if (i < headEntries.length) {
      if (entry.path !== headEntries[i]) throw bundleProblem(file, `${where}: expected ${headEntries[i]}, found ${entry.path}`);
      if (entry.size > maxSmallEntry) throw bundleProblem(file, `${where}: ${entry.path} of ${entry.size} bytes`);
    } else {
      const hex = entry.path.startsWith(artifactPrefix) ? entry.path.slice(artifactPrefix.length) : entry.path.startsWith(blobPrefix) ? entry.path.slice(blobPrefix.length) : undefined;
      if (hex === undefined) throw bundleProblem(file, `${where}: expected ${artifactPrefix}HEX or ${blobPrefix}HEX, found ${entry.path}`);
      if (hex !== entry.sha256) throw bundleProblem(file, `${where}: ${entry.path} is listed with sha256 ${entry.sha256}, not the one its name says`);
    }
    if (paths.has(entry.path)) throw bundleProblem(file, `${where}: ${entry.path} is listed twice`);
    paths.add(entry.path);
  });
  if (parsed.entries.length < headEntries.length) throw bundleProblem(file, `${manifestEntry} lists ${parsed.entries.length} entries, fewer than ${headEntries.join(', ')}`);
  return parsed as BundleManifest;
}

/** What differs between the project's lock and the bundle's, one line each. */
function lockDifferences(ours: Lock, theirs: Lock): string[] {
  const lines: string[] = [];
  const field = (name: string, a: string, b: string) => a !== b && lines.push(`  ${name}: yours ${a}, the bundle's ${b}`);
  field('fcos', `${ours.fcos.stream} ${ours.fcos.release} ${ours.fcos.arch}`, `${theirs.fcos.stream} ${theirs.fcos.release} ${theirs.fcos.arch}`);
  field('kubernetes.version', ours.kubernetes.version, theirs.kubernetes.version);
  for (const key of new Set([...lockedArtifacts(ours), ...lockedArtifacts(theirs)].map((a) => a.key))) {
    const sum = (lock: Lock) => (lock.artifacts[key] ? `sha256 ${storedSha256(lock.artifacts[key]).slice(0, 12)}…` : 'none');
    field(`artifacts.${key}`, sum(ours), sum(theirs));
  }
  const texts = (lock: Lock) => new Set(lock.images.map((i) => `${i.text}${i.layoutDigest !== i.digest ? ` (layout ${i.layoutDigest})` : ''}`));
  const [a, b] = [texts(ours), texts(theirs)];
  for (const image of a) if (!b.has(image)) lines.push(`  images: ${image} only in yours`);
  for (const image of b) if (!a.has(image)) lines.push(`  images: ${image} only in the bundle's`);
  if (lines.length === 0) lines.push('  the same pins, written differently (comments, order or spacing)');
  return lines;
}

function firstDifferentLine(ours: string, theirs: string): string {
  const a = ours.split('\n');
  const b = theirs.split('\n');
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    if (a[i] !== b[i]) return `  line ${i + 1}: yours ${JSON.stringify(a[i] ?? '(end of file)')}, the bundle's ${JSON.stringify(b[i] ?? '(end of file)')}`;
  }
  return '  (no line differs)';
}

/** The project's lock or config must be absent or equal to the bundle's, unless replacing. */
export function checkProjectFile(target: string, bytes: Buffer, bundleFile: string, replace: boolean, describe: (ours: string) => string[]): void {
  if (replace) return;
  const ours = readFileSyncSafe(target);
  if (ours === undefined || ours.equals(bytes)) return;
  throw new UserError(
    `${target}: differs from the one in the bundle ${bundleFile}:\n${describe(ours.toString('utf8')).join('\n')}\n` +
      'Nothing was changed: the cache entries in the bundle are for its own lock and config. ' +
      `To use the bundle's, move yours aside, or run again with FORCE=1 (--force), which keeps yours as ${basename(target)}.orig.`,
  );
}

/** A file's bytes, or undefined where there is none (any other failure is reported). */
export function readFileSyncSafe(file: string): Buffer | undefined {
  try {
    return readFileSync(file);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new UserError(`${file}: cannot read it (${(error as NodeJS.ErrnoException).code ?? String(error)})`);
  }
}

interface ReadResult {
  manifest: BundleManifest;
  id: string;
  lock: Lock;
  lockBytes: Buffer;
  configBytes: Buffer;
  index: OciIndex;
  /** Entry path → staged file, for entries not yet in the cache. */
  staged: Map<string, string>;
  bytes: number;
}

interface ReadOptions {
  /** Where to write the entries the cache lacks; without it nothing is written. */
  staging?: string;
  replace: boolean;
  onProgress?: (progress: Progress) => void;
}

/**
 * Reads the bundle once, start to end, verifying as it streams: the manifest first, then
 * each entry against it (name, place, size, sha256), the lock and config against the
 * project's and the artifacts against the lock, the image index against the lock and
 * the blobs against the images. With `staging`, entries the cache lacks are written
 * there; nothing else is written anywhere.
 */
export async function readBundle(ctx: RunContext, file: string, options: ReadOptions): Promise<ReadResult> {
  const info = await stat(file).catch((error: NodeJS.ErrnoException) => {
    throw new UserError(`${file}: cannot read the bundle (${error.code ?? error.message}). Name it with FILE=path (make unbundle FILE=…).`);
  });
  if (!info.isFile()) throw new UserError(`${file}: not a file. Name the bundle with FILE=path (make unbundle FILE=…).`);
  return new BundleReading(ctx, file, info.size, options).run();
}

/** One read of a bundle: what is known so far, and the steps, in the order the archive brings them. */
class BundleReading {
  readonly #ctx: RunContext;
  readonly #file: string;
  readonly #size: number;
  readonly #options: ReadOptions;
  readonly #store: string;
  readonly #progress: Progress;

  #manifest: BundleManifest | undefined;
  #manifestBytes: Buffer | undefined;
  #offsets: number[] = [];
  #total = 0;
  /** Index in the manifest of the entry expected next; -1: the manifest itself. */
  #next = -1;
  #lock: Lock | undefined;
  #lockBytes: Buffer | undefined;
  #configBytes: Buffer | undefined;
  #index: OciIndex | undefined;
  /** Image manifest digests (from the index) → their bytes, once read. */
  readonly #imageManifests = new Map<string, Buffer>();
  readonly #staged = new Map<string, string>();
  /** Artifact sha256 → its key in the lock, for messages. */
  readonly #artifactNames = new Map<string, string>();
  readonly #seen = new Set<string>();
  /** The entry whose bytes are being read, to say where a short file ends. */
  #current: { path: string; got: number; size: number } | undefined;

  constructor(ctx: RunContext, file: string, size: number, options: ReadOptions) {
    this.#ctx = ctx;
    this.#file = file;
    this.#size = size;
    this.#options = options;
    this.#store = join(ctx.settings.cacheDir, 'oci');
    this.#progress = { received: 0, total: size };
  }

  async run(): Promise<ReadResult> {
    try {
      for await (const entry of tarEntries(this.#chunks())) await this.#entry(entry);
    } catch (error) {
      throw this.#explain(error);
    }
    return this.#finish();
  }

  async *#chunks(): AsyncGenerator<Buffer> {
    for await (const chunk of readChunks(this.#file, this.#ctx.signal)) {
      this.#progress.received += chunk.length;
      this.#options.onProgress?.(this.#progress);
      yield chunk;
    }
  }

  /** Each entry as tar-stream hands it over: checked against the manifest before its bytes are read. */
  async #entry(tar: TarEntry): Promise<void> {
    this.#ctx.signal.throwIfAborted();
    const manifest = this.#manifest;
    const entry = manifest?.entries[this.#next];
    const expected = !manifest ? { path: manifestEntry, offset: 0 } : entry ? { path: entry.path, offset: this.#offsets[this.#next]!, size: entry.size } : undefined;
    const problem = tarEntryProblem(tar, expected, this.#seen, (name) => this.#label(name, JSON.stringify(name)));
    if (problem) throw this.#problem(`${problem}${this.#next === -1 ? ' (its first entry: is it a bundle at all?)' : ''}`);
    this.#seen.add(tar.header.name);
    if (!manifest) {
      if (tar.header.size > maxSmallEntry) throw this.#problem(`its manifest is ${tar.header.size} bytes`);
      this.#readManifest(await this.#bytes(tar, manifestEntry));
      return;
    }
    const position = this.#next++;
    if (position < headEntries.length || this.#imageManifests.has(`sha256:${entry!.sha256}`)) {
      if (entry!.size > maxSmallEntry) throw this.#problem(`entry ${entry!.path} of ${entry!.size} bytes is too large for an image manifest`);
      await this.#smallEntry(entry!, await this.#bytes(tar, entry!.path));
    } else {
      await this.#contentEntry(entry!, tar, position);
    }
  }

  /** An entry's bytes in memory (the manifest and the small entries only). */
  async #bytes(tar: TarEntry, path: string): Promise<Buffer> {
    const parts: Buffer[] = [];
    this.#current = { path, got: 0, size: tar.header.size };
    for await (const chunk of tar) {
      parts.push(Buffer.from(chunk as Buffer));
      this.#current.got += (chunk as Buffer).length;
    }
    this.#current = undefined;
    return Buffer.concat(parts);
  }

  #readManifest(bytes: Buffer): void {
    this.#manifestBytes = bytes;
    this.#manifest = parseBundleManifest(this.#file, bytes);
    ({ offsets: this.#offsets, total: this.#total } = bundleLayout(bytes.length, this.#manifest.entries));
    this.#next = 0;
  }

  /** The lock, config, layout and index, and the image manifests: kept in memory, checked as they arrive. */
  async #smallEntry(entry: BundleEntry, bytes: Buffer): Promise<void> {
    this.#verify(entry, sha256Hex(bytes));
    if (entry.path === lockEntry) {
      this.#lockBytes = bytes;
      this.#lock = parseLock(`${this.#file}: ${lockEntry}`, bytes.toString('utf8'));
    } else if (entry.path === configEntry) {
      this.#configBytes = bytes;
      this.#afterHead();
    } else if (entry.path === ociLayoutEntry) {
      if (!/"imageLayoutVersion"/.test(bytes.toString('utf8'))) throw this.#problem(`${ociLayoutEntry} is not an OCI layout file`);
    } else if (entry.path === ociIndexEntry) {
      this.#index = checkBundleIndex(this.#file, bytes, this.#lock!, this.#manifest!);
      for (const descriptor of this.#index.manifests) this.#imageManifests.set(descriptor.digest, Buffer.alloc(0));
    } else {
      this.#imageManifests.set(`sha256:${entry.sha256}`, bytes);
      if (this.#stagingFor(entry)) {
        const stagedFile = join(this.#options.staging!, basename(entry.path));
        await writeFile(stagedFile, bytes, { flag: 'wx' });
        this.#staged.set(entry.path, stagedFile);
      }
    }
  }

  /** Checks that need only the manifest, the lock and the config: before any big entry is read. */
  #afterHead(): void {
    this.#checkArtifactsAgainstLock();
    this.#checkProjectFiles();
    this.#checkLength();
  }

  /** The bundle holds exactly the artifacts its lock names. */
  #checkArtifactsAgainstLock(): void {
    const wanted = new Map<string, string>();
    for (const artifact of lockedArtifacts(this.#lock!)) wanted.set(storedSha256(artifact), artifact.key);
    // Each signature's evidence and the bytes it covers (bundle/write.ts adds them).
    const lock = this.#lock!;
    for (const [subject, record] of [...Object.entries(lock.signatures?.artifacts ?? {}), ...Object.entries(lock.signatures?.images ?? {})]) {
      if (!record.evidence) continue;
      if (!wanted.has(record.evidence)) wanted.set(record.evidence, `the signature of ${subject}`);
      const signed = lock.artifacts[subject as 'butane']?.sha256;
      if (signed && !wanted.has(signed)) wanted.set(signed, `${subject} as signed`);
    }
    for (const [hex, key] of wanted) this.#artifactNames.set(hex, key);
    const present = new Set(this.#manifest!.entries.filter((e) => e.path.startsWith(artifactPrefix)).map((e) => e.sha256));
    const lacking = [...wanted].filter(([hex]) => !present.has(hex)).map(([hex, key]) => `  artifact ${key}: sha256 ${hex}`);
    const extra = [...present].filter((hex) => !wanted.has(hex)).map((hex) => `  ${artifactPrefix}${hex}: not an artifact of the bundle's lock`);
    if (lacking.length + extra.length > 0) throw this.#problem(`its entries do not match its lock:\n${[...lacking, ...extra].join('\n')}`);
  }

  /** The project's own lock and config, compared before anything lands. */
  #checkProjectFiles(): void {
    const { settings } = this.#ctx;
    const lock = this.#lock!;
    const config = this.#configBytes!;
    checkProjectFile(settings.lockFile, this.#lockBytes!, this.#file, this.#options.replace, (ours) => {
      try {
        return lockDifferences(parseLock(settings.lockFile, ours), lock);
      } catch (error) {
        return [`  yours does not parse: ${(error as Error).message.split('\n')[0]}`];
      }
    });
    checkProjectFile(settings.configFile, config, this.#file, this.#options.replace, (ours) => [firstDifferentLine(ours, config.toString('utf8'))]);
  }

  /** A short file is told at once, with what it lacks, rather than after reading all of it. */
  #checkLength(): void {
    if (this.#size >= this.#total) return;
    const entries = this.#manifest!.entries;
    const cut = this.#offsets.findIndex((offset, i) => offset + tarBlock + entries[i]!.size > this.#size);
    const first = cut < 0 ? entries.length : cut;
    const entry = entries[first];
    const headerEnd = this.#offsets[first]! + tarBlock;
    const inside = entry && this.#size > headerEnd ? `  cut short: ${this.#label(entry.path)} (${this.#size - headerEnd} of ${entry.size} bytes)\n` : '';
    throw this.#truncated(this.#size, `${inside}${this.#missingFrom(inside ? first + 1 : first)}`);
  }

  /** An artifact or a blob: hashed as it streams and, where the cache lacks it, written to staging. */
  async #contentEntry(entry: BundleEntry, tar: TarEntry, position: number): Promise<void> {
    const hash = sha256Hasher();
    this.#current = { path: entry.path, got: 0, size: entry.size };
    if (!this.#stagingFor(entry)) {
      for await (const chunk of tar) {
        hash.update(chunk as Buffer);
        this.#current.got += (chunk as Buffer).length;
      }
    } else {
      const stagedFile = join(this.#options.staging!, String(position));
      const handle = await open(stagedFile, 'wx', 0o644);
      try {
        const writer = new BatchedWriter(handle);
        for await (const chunk of tar) {
          hash.update(chunk as Buffer);
          this.#current.got += (chunk as Buffer).length;
          await writer.push(chunk as Buffer);
        }
        await writer.flush();
      } finally {
        await handle.close();
      }
      this.#staged.set(entry.path, stagedFile);
    }
    this.#current = undefined;
    this.#verify(entry, hash.digest('hex'));
  }

  /** Whether this entry is to be written: when staging, and the cache lacks it. */
  #stagingFor(entry: BundleEntry): boolean {
    if (!this.#options.staging) return false;
    const target = entry.path.startsWith(artifactPrefix) ? this.#ctx.cache.entryPath(entry.sha256) : blobPath(this.#store, `sha256:${entry.sha256}`);
    return !existsSync(target);
  }

  #verify(entry: BundleEntry, found: string): void {
    if (found === entry.sha256) return;
    throw new ChecksumError(
      `${this.#file}: entry ${this.#label(entry.path)}`,
      entry.sha256,
      found,
      'The bundle is damaged (or was changed) there. Nothing was added to the cache. Copy it again from its source, or make a new one there with make bundle.',
    );
  }

  /** After the last entry: nothing missing, and every blob each image needs present (the image manifests are read by now). */
  #finish(): ReadResult {
    const manifest = this.#manifest;
    if (!manifest) throw this.#problem('it is an empty archive');
    if (this.#next < manifest.entries.length || this.#progress.received < this.#total) throw this.#truncated(this.#progress.received, this.#missingFrom(this.#next));
    const blobsPresent = new Set(manifest.entries.filter((e) => e.path.startsWith(blobPrefix)).map((e) => `sha256:${e.sha256}`));
    const needed = new Set<string>();
    for (const descriptor of this.#index!.manifests) {
      const bytes = this.#imageManifests.get(descriptor.digest);
      if (!bytes || bytes.length === 0) throw this.#problem(`image ${refOf(descriptor)}: its manifest ${descriptor.digest} is not in the bundle`);
      const image = parseManifest(bytes, `${this.#file}: ${descriptor.digest}`);
      for (const digest of [descriptor.digest, image.config.digest, ...image.layers.map((l) => l.digest)]) {
        needed.add(digest);
        if (!blobsPresent.has(digest)) throw this.#problem(`image ${refOf(descriptor)}: blob ${digest} is not in the bundle`);
      }
    }
    const unneeded = [...blobsPresent].filter((d) => !needed.has(d));
    if (unneeded.length > 0) throw this.#problem(`blobs no image of its lock uses: ${unneeded.slice(0, 3).join(', ')}`);
    return {
      manifest,
      id: sha256Hex(this.#manifestBytes!),
      lock: this.#lock!,
      lockBytes: this.#lockBytes!,
      configBytes: this.#configBytes!,
      index: this.#index!,
      staged: this.#staged,
      bytes: this.#progress.received,
    };
  }

  /** tar-stream's failures in the bundle's terms: where the bytes ran out, or which header is damaged. */
  #explain(error: unknown): unknown {
    if (!(error instanceof Error) || error instanceof UserError) return error;
    const failure = tarFailure(error);
    if (failure === 'truncated') {
      if (!this.#manifest) return this.#truncated(this.#progress.received, `  cut short: the manifest ${manifestEntry}; nothing can be verified`);
      const current = this.#current;
      const inside = current ? `  cut short: ${this.#label(current.path)} (${current.got} of ${current.size} bytes)\n` : '';
      return this.#truncated(this.#progress.received, `${inside}${this.#missingFrom(this.#next)}`);
    }
    if (failure === 'bad header') {
      const at = this.#next === -1 ? 0 : (this.#offsets[this.#next] ?? this.#total - 2 * tarBlock);
      const where = this.#next === -1 ? ' (its first header: is it a bundle at all?)' : '';
      return this.#problem(`a damaged tar header at byte ${at} (${error.message.replace(/\.$/, '')})${where}`);
    }
    return error;
  }

  /** An entry's path for a message, with the artifact it holds where the lock names one: "cache/sha256/… (kubelet)". */
  #label(path: string, shown = path): string {
    const hex = path.startsWith(artifactPrefix) ? path.slice(artifactPrefix.length) : undefined;
    const key = hex ? this.#artifactNames.get(hex) : undefined;
    return key ? `${shown} (${key})` : shown;
  }

  #problem(problem: string): UserError {
    return bundleProblem(this.#file, problem);
  }

  #truncated(got: number, detail: string): UserError {
    return new UserError(
      `${this.#file}: the bundle is truncated: ${got} bytes, expected ${this.#total || 'more'}.\n${detail}\n` +
        'Nothing was added to the cache. Copy the whole file again (compare its size with the original).',
    );
  }

  /** What a short bundle lacks from entry `first` on. */
  #missingFrom(first: number): string {
    if (!this.#manifest) return `  missing: the manifest ${manifestEntry} and everything after it`;
    const rest = this.#manifest.entries.slice(first);
    if (rest.length === 0) return '  missing: the end-of-archive marker';
    const bytes = rest.reduce((n, e) => n + e.size, 0);
    const names = rest.slice(0, 8).map((e) => `    ${this.#label(e.path)}`);
    if (rest.length > 8) names.push(`    and ${rest.length - 8} more`);
    return `  missing ${rest.length} entr${rest.length === 1 ? 'y' : 'ies'} (${formatBytes(bytes)}):\n${names.join('\n')}`;
  }
}

/** The bundle's index: exactly one ref per image of its lock, at the lock's layout digest. */
function checkBundleIndex(file: string, bytes: Buffer, lock: Lock, manifest: BundleManifest): OciIndex {
  let index: OciIndex;
  try {
    index = JSON.parse(bytes.toString('utf8')) as OciIndex;
  } catch {
    throw bundleProblem(file, `${ociIndexEntry} is not JSON`);
  }
  if (index.schemaVersion !== 2 || !Array.isArray(index.manifests)) throw bundleProblem(file, `${ociIndexEntry} is not an OCI image index`);
  const problems: string[] = [];
  const sizes = new Map(manifest.entries.map((e) => [e.path, e.size]));
  for (const image of lock.images) {
    const found = index.manifests.filter((d) => refOf(d) === refName(image));
    if (found.length !== 1 || found[0]!.digest !== image.layoutDigest) {
      problems.push(`  ${refName(image)}: expected ${image.layoutDigest}, found ${found.map((d) => d.digest).join(', ') || 'no ref'}`);
    }
  }
  for (const descriptor of index.manifests) {
    if (!lock.images.some((image) => refName(image) === refOf(descriptor))) problems.push(`  ${refOf(descriptor) ?? descriptor.digest}: not an image of the lock`);
    else if (!manifestMediaTypes.has(descriptor.mediaType)) problems.push(`  ${refOf(descriptor)}: media type ${descriptor.mediaType}`);
    else if (sizes.get(`${blobPrefix}${descriptor.digest.slice('sha256:'.length)}`) !== descriptor.size) problems.push(`  ${refOf(descriptor)}: size ${descriptor.size} differs from its blob's`);
  }
  if (problems.length > 0) throw bundleProblem(file, `its image index does not match its lock:\n${problems.join('\n')}`);
  return index;
}
