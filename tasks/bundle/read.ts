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
// checked against the name, so a damaged cache entry aborts the bundle.
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { chmod, mkdir, open, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { tarBlock, tarEntries, tarEntryProblem, tarFailure, tarLayout, writeTar, type TarEntry, type TarSource } from '../lib/store/archive.ts';
import { ChecksumError, processAlive, sha256Hasher } from '../lib/store/cache.ts';
import { BatchedWriter, readChunks } from '../lib/store/chunks.ts';
import type { Progress } from '../lib/store/download.ts';
import { acquireRunLock } from '../lib/run/engine.ts';
import { UserError } from '../lib/errors.ts';
import { refName, storeDir } from '../images.ts';
import { lockedArtifacts, parseLock, storedSha256, type Lock } from '../lib/inputs/lock.ts';
import {
  blobPath,
  findRef,
  imageBlobs,
  layoutHasImage,
  manifestMediaTypes,
  ociLayoutFile,
  parseManifest,
  readIndex,
  refOf,
  serializeIndex,
  withRef,
  type OciIndex,
} from '../lib/store/oci.ts';
import { formatBytes, progressMeter } from '../lib/run/progress.ts';
import type { RunContext, StageTask } from '../lib/run/stage.ts';

export const bundleFormat = 1;
export const manifestEntry = 'corekube-bundle.json';
export const lockEntry = 'corekube.lock.yaml';
export const configEntry = 'cluster.yaml';
export const ociLayoutEntry = 'cache/oci/oci-layout';
export const ociIndexEntry = 'cache/oci/index.json';
const artifactPrefix = 'cache/sha256/';
const blobPrefix = 'cache/oci/blobs/sha256/';
/** The small entries, always first after the manifest, in this order. */
const headEntries = [lockEntry, configEntry, ociLayoutEntry, ociIndexEntry] as const;
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

const sha256Hex = (bytes: Buffer | string) => sha256Hasher().update(bytes).digest('hex');

// ---- bundle ----

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

// ---- unbundle ----

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
function checkProjectFile(target: string, bytes: Buffer, bundleFile: string, replace: boolean, describe: (ours: string) => string[]): void {
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
function readFileSyncSafe(file: string): Buffer | undefined {
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
async function readBundle(ctx: RunContext, file: string, options: ReadOptions): Promise<ReadResult> {
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

// ---- for the CLI ----

export function formatBundleSummary(summary: BundleSummary): string {
  return (
    `bundle ${summary.file}: ${summary.artifacts} artifacts, ${summary.images} images (${summary.blobs} blobs), ` +
    `${formatBytes(summary.bytes)} in ${summary.seconds.toFixed(1)} s\n  id sha256:${summary.id}`
  );
}

export function formatUnbundleSummary(summary: UnbundleSummary): string {
  const head = summary.verifyOnly
    ? `bundle ${summary.file}: verified, nothing written`
    : `unbundled ${summary.file}: ${summary.added} new cache entr${summary.added === 1 ? 'y' : 'ies'} of ${summary.artifacts + summary.blobs}`;
  const project = summary.project.map((p) => `\n  ${p.file}: ${p.action}${p.action === 'replaced' ? ` (yours kept as ${basename(p.file)}.orig)` : ''}`).join('');
  return `${head} (cluster ${summary.cluster}: ${summary.artifacts} artifacts, ${summary.images} images), ${formatBytes(summary.bytes)} in ${summary.seconds.toFixed(1)} s${project}\n  id sha256:${summary.id}`;
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
