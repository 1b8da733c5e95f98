// bundle / unbundle: everything the lock needs from cache/, as one plain POSIX tar to
// carry into an air-gapped site, and back into a cache there. Actions, not stages: they
// have no stamp and `make cluster` never runs them.
//
// The archive, in this order (ustar, written by the streaming writer below, mode 0444,
// owner 0:0, mtime 0, so the same cache gives the same bytes):
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
import { chmod, mkdir, open, readFile, rename, rm, stat, writeFile, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { ChecksumError, processAlive, sha256Hasher } from './cache.ts';
import type { Progress } from './download.ts';
import { acquireRunLock } from './engine.ts';
import { UserError } from './errors.ts';
import { refName, storeDir } from './images.ts';
import { artifactKeys, parseLock, storedSha256, type Lock } from './lock.ts';
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
} from './oci.ts';
import { formatBytes, progressMeter } from './progress.ts';
import type { RunContext, StageTask } from './stage.ts';

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

// ---- ustar ----

const block = 512;
const chunkBytes = 4 << 20;
const padding = (size: number) => (block - (size % block)) % block;

function putString(header: Buffer, text: string, offset: number, length: number): void {
  const bytes = Buffer.from(text, 'utf8');
  if (bytes.length > length) throw new Error(`tar: "${text}" does not fit in ${length} bytes`);
  bytes.copy(header, offset);
}

function putOctal(header: Buffer, value: number, offset: number, length: number): void {
  header.write(`${value.toString(8).padStart(length - 1, '0')}\0`, offset, length, 'latin1');
}

export function tarHeader(name: string, size: number, mode: number): Buffer {
  const header = Buffer.alloc(block);
  putString(header, name, 0, 100);
  putOctal(header, mode, 100, 8);
  putOctal(header, 0, 108, 8); // uid
  putOctal(header, 0, 116, 8); // gid
  if (size < 8 ** 11) {
    putOctal(header, size, 124, 12);
  } else {
    // GNU base-256, which GNU tar and bsdtar read: sizes of 8 GiB and more.
    header[124] = 0x80;
    let rest = BigInt(size);
    for (let i = 135; i > 124; i--) {
      header[i] = Number(rest & 0xffn);
      rest >>= 8n;
    }
  }
  putOctal(header, 0, 136, 12); // mtime: fixed, the bundle is reproducible
  header.fill(0x20, 148, 156);
  header.write('0', 156, 'latin1'); // a regular file
  header.write('ustar\0' + '00', 257, 'latin1');
  let sum = 0;
  for (const byte of header) sum += byte;
  header.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 8, 'latin1');
  return header;
}

interface TarHeader {
  name: string;
  size: number;
  type: string;
}

function cString(buffer: Buffer, offset: number, length: number): string {
  const end = buffer.indexOf(0, offset);
  return buffer.toString('utf8', offset, end < 0 || end > offset + length ? offset + length : end);
}

/** A header block, or undefined for a zero block (end of archive); throws on a damaged one. */
function parseHeader(header: Buffer): TarHeader | undefined {
  if (header.every((byte) => byte === 0)) return undefined;
  let sum = 0;
  for (let i = 0; i < block; i++) sum += i >= 148 && i < 156 ? 0x20 : header[i]!;
  const stored = parseInt(cString(header, 148, 8).trim(), 8);
  if (stored !== sum) throw new TarFormatError('a tar header whose checksum does not match');
  let size: number;
  if (header[124]! & 0x80) {
    let value = 0n;
    for (let i = 125; i < 136; i++) value = (value << 8n) | BigInt(header[i]!);
    size = Number(value);
  } else {
    size = parseInt(cString(header, 124, 12).trim() || '0', 8);
  }
  if (!Number.isSafeInteger(size) || size < 0) throw new TarFormatError('a tar header with no valid size');
  let name = cString(header, 0, 100);
  const prefix = header.toString('latin1', 257, 262) === 'ustar' ? cString(header, 345, 155) : '';
  if (prefix) name = `${prefix}/${name}`;
  return { name, size, type: String.fromCharCode(header[156]!) };
}

class TarFormatError extends Error {
  /** Byte offset in the archive of the block at fault. */
  offset = 0;
}

interface Sink {
  write(chunk: Buffer): Promise<void> | void;
  end(): Promise<void> | void;
}

/** Where reading stopped when the bytes ran out. */
class TarTruncated extends Error {
  readonly atEntry: string | undefined;
  readonly got: number;
  readonly size: number;
  constructor(atEntry: string | undefined, got: number, size: number) {
    super('truncated');
    this.atEntry = atEntry;
    this.got = got;
    this.size = size;
  }
}

/**
 * Walks a tar stream once: `onEntry` gets each header and returns where its bytes go.
 * Ends at the end-of-archive marker (two zero blocks); bytes after it are ignored.
 */
async function walkTar(chunks: AsyncIterable<Buffer>, onEntry: (header: TarHeader) => Promise<Sink> | Sink): Promise<void> {
  const header = Buffer.alloc(block);
  let filled = 0;
  let zeros = 0;
  let current: { header: TarHeader; sink: Sink; remaining: number } | undefined;
  let skip = 0;
  let consumed = 0; // bytes of the archive before this chunk
  for await (const chunk of chunks) {
    let offset = 0;
    while (offset < chunk.length) {
      if (current) {
        const n = Math.min(current.remaining, chunk.length - offset);
        await current.sink.write(chunk.subarray(offset, offset + n));
        offset += n;
        current.remaining -= n;
        if (current.remaining === 0) {
          await current.sink.end();
          skip = padding(current.header.size);
          current = undefined;
        }
      } else if (skip > 0) {
        const n = Math.min(skip, chunk.length - offset);
        offset += n;
        skip -= n;
      } else {
        const n = Math.min(block - filled, chunk.length - offset);
        chunk.copy(header, filled, offset, offset + n);
        filled += n;
        offset += n;
        if (filled < block) continue;
        filled = 0;
        const at = consumed + offset - block;
        const fail = (message: string) => Object.assign(new TarFormatError(message), { offset: at });
        let parsed: TarHeader | undefined;
        try {
          parsed = parseHeader(header);
        } catch (error) {
          throw error instanceof TarFormatError ? fail(error.message) : error;
        }
        if (!parsed) {
          if (++zeros === 2) return;
          continue;
        }
        if (zeros > 0) throw fail('an entry after the end-of-archive marker');
        if (parsed.type !== '0' && parsed.type !== '\0') throw fail(`entry ${parsed.name} is not a regular file (tar type "${parsed.type}")`);
        const sink = await onEntry(parsed);
        if (parsed.size === 0) await sink.end();
        else current = { header: parsed, sink, remaining: parsed.size };
      }
    }
    consumed += chunk.length;
  }
  if (current) throw new TarTruncated(current.header.name, current.header.size - current.remaining, current.header.size);
  throw new TarTruncated(undefined, 0, 0);
}

/** A file's bytes in chunks of a few MiB, the next read already under way. */
async function* readChunks(file: string, signal?: AbortSignal): AsyncGenerator<Buffer> {
  const handle = await open(file, 'r');
  let next: Promise<{ bytesRead: number; buffer: Buffer }> | undefined;
  try {
    next = handle.read(Buffer.allocUnsafe(chunkBytes), 0, chunkBytes, null);
    for (;;) {
      const { bytesRead, buffer } = await next;
      next = undefined;
      if (bytesRead === 0) return;
      signal?.throwIfAborted();
      next = handle.read(Buffer.allocUnsafe(chunkBytes), 0, chunkBytes, null);
      yield buffer.subarray(0, bytesRead);
    }
  } finally {
    await next?.catch(() => undefined);
    await handle.close();
  }
}

/** Buffers gathered into writes of a few MiB, one write in flight while the next batch fills. */
class BatchedWriter {
  readonly #file: FileHandle;
  #batch: Buffer[] = [];
  #batchBytes = 0;
  #inFlight: Promise<void> = Promise.resolve();
  written = 0;

  constructor(file: FileHandle) {
    this.#file = file;
  }

  async push(chunk: Buffer): Promise<void> {
    this.#batch.push(chunk);
    this.#batchBytes += chunk.length;
    this.written += chunk.length;
    if (this.#batchBytes >= chunkBytes) await this.#send();
  }

  async flush(): Promise<void> {
    if (this.#batch.length > 0) await this.#send();
    await this.#inFlight;
  }

  async #send(): Promise<void> {
    const buffers = this.#batch;
    this.#batch = [];
    this.#batchBytes = 0;
    await this.#inFlight;
    this.#inFlight = this.#writeAll(buffers);
  }

  async #writeAll(buffers: Buffer[]): Promise<void> {
    let pending = buffers;
    while (pending.length > 0) {
      const { bytesWritten } = await this.#file.writev(pending);
      let skipBytes = bytesWritten;
      const rest: Buffer[] = [];
      for (const buffer of pending) {
        if (skipBytes >= buffer.length) skipBytes -= buffer.length;
        else {
          rest.push(skipBytes > 0 ? buffer.subarray(skipBytes) : buffer);
          skipBytes = 0;
        }
      }
      pending = rest;
    }
  }
}

/** Byte offset of each entry's header, and the archive's total size, for a manifest. */
export function bundleLayout(manifestSize: number, entries: readonly BundleEntry[]): { offsets: number[]; total: number } {
  let offset = block + manifestSize + padding(manifestSize);
  const offsets: number[] = [];
  for (const entry of entries) {
    offsets.push(offset);
    offset += block + entry.size + padding(entry.size);
  }
  return { offsets, total: offset + 2 * block };
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
  for (const key of artifactKeys) {
    const hex = storedSha256(lock.artifacts[key]);
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
      const out = new BatchedWriter(handle);
      const progress = { received: 0, total };
      const advance = (bytes: number) => {
        progress.received += bytes;
        options.onProgress?.(progress);
      };
      const put = async (chunk: Buffer) => {
        await out.push(chunk);
        advance(chunk.length);
      };
      await put(tarHeader(manifestEntry, manifestBytes.length, 0o444));
      await put(manifestBytes);
      await put(Buffer.alloc(padding(manifestBytes.length)));
      for (const source of sources) {
        ctx.signal.throwIfAborted();
        const { entry } = source;
        await put(tarHeader(entry.path, entry.size, source.data ? 0o644 : 0o444));
        if (source.data) {
          await put(source.data);
        } else {
          const hash = sha256Hasher();
          let size = 0;
          for await (const chunk of readChunks(source.file!, ctx.signal)) {
            hash.update(chunk);
            size += chunk.length;
            if (size > entry.size) break;
            await put(chunk);
          }
          if (size !== entry.size) throw new UserError(`${source.what} changed while it was being bundled (${entry.size} bytes, then ${size}); run make bundle again`);
          const found = hash.digest('hex');
          if (found !== entry.sha256) {
            throw new ChecksumError(
              source.what,
              entry.sha256,
              found,
              `The cache entry is damaged (disk fault?) and no bundle was written. Delete it (rm -f ${source.file}) and run make fetch images, then make bundle.`,
            );
          }
        }
        await put(Buffer.alloc(padding(entry.size)));
      }
      await put(Buffer.alloc(2 * block));
      await out.flush();
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
  for (const key of artifactKeys) {
    field(`artifacts.${key}`, `sha256 ${storedSha256(ours.artifacts[key]).slice(0, 12)}…`, `sha256 ${storedSha256(theirs.artifacts[key]).slice(0, 12)}…`);
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

/**
 * Reads the bundle once, start to end, verifying as it streams: the manifest first, then
 * each entry against it (name, order, size, sha256), the lock and config against the
 * project's and the artifacts against the lock, the image index against the lock and
 * the blobs against the images. With `staging`, entries the cache lacks are written
 * there; nothing else is written anywhere.
 */
async function readBundle(
  ctx: RunContext,
  file: string,
  options: { staging?: string; replace: boolean; onProgress?: (progress: Progress) => void },
): Promise<ReadResult> {
  const info = await stat(file).catch((error: NodeJS.ErrnoException) => {
    throw new UserError(`${file}: cannot read the bundle (${error.code ?? error.message}). Name it with FILE=path (make unbundle FILE=…).`);
  });
  if (!info.isFile()) throw new UserError(`${file}: not a file. Name the bundle with FILE=path (make unbundle FILE=…).`);
  const { settings, cache } = ctx;
  const store = join(settings.cacheDir, 'oci');

  let manifest: BundleManifest | undefined;
  let manifestBytes: Buffer | undefined;
  let offsets: number[] = [];
  let total = 0;
  let next = -1; // index of the entry expected next: -1 the manifest
  let lock: Lock | undefined;
  let lockBytes: Buffer | undefined;
  let configBytes: Buffer | undefined;
  let index: OciIndex | undefined;
  const manifestBlobs = new Map<string, Buffer>(); // image manifest digests → bytes, once read
  const staged = new Map<string, string>();
  const artifactNames = new Map<string, string>(); // hex → artifact key, for messages
  const progress = { received: 0, total: info.size };

  const label = (path: string) => {
    const hex = path.startsWith(artifactPrefix) ? path.slice(artifactPrefix.length) : undefined;
    const key = hex ? artifactNames.get(hex) : undefined;
    return key ? `${path} (${key})` : path;
  };
  const truncated = (got: number, detail: string) =>
    new UserError(
      `${file}: the bundle is truncated: ${got} bytes, expected ${total || 'more'}.\n${detail}\n` +
        'Nothing was added to the cache. Copy the whole file again (compare its size with the original).',
    );
  const missingFrom = (first: number) => {
    if (!manifest) return `  missing: the manifest ${manifestEntry} and everything after it`;
    const rest = manifest.entries.slice(first);
    const bytes = rest.reduce((n, e) => n + e.size, 0);
    const names = rest.slice(0, 8).map((e) => `    ${label(e.path)}`);
    if (rest.length > 8) names.push(`    and ${rest.length - 8} more`);
    return rest.length === 0 ? '  missing: the end-of-archive marker' : `  missing ${rest.length} entr${rest.length === 1 ? 'y' : 'ies'} (${formatBytes(bytes)}):\n${names.join('\n')}`;
  };

  /** Checks that need only the manifest, the lock and the config: before any big entry is read. */
  const afterHead = () => {
    const m = manifest!;
    const wanted = new Map<string, string>();
    for (const key of artifactKeys) wanted.set(storedSha256(lock!.artifacts[key]), key);
    for (const [hex, key] of wanted) artifactNames.set(hex, key);
    const present = new Set(m.entries.filter((e) => e.path.startsWith(artifactPrefix)).map((e) => e.sha256));
    const lacking = [...wanted].filter(([hex]) => !present.has(hex)).map(([hex, key]) => `  artifact ${key}: sha256 ${hex}`);
    const extra = [...present].filter((hex) => !wanted.has(hex)).map((hex) => `  ${artifactPrefix}${hex}: not an artifact of the bundle's lock`);
    if (lacking.length + extra.length > 0) {
      throw bundleProblem(file, `its entries do not match its lock:\n${[...lacking, ...extra].join('\n')}`);
    }
    // The project's own files, compared before anything lands.
    checkProjectFile(settings.lockFile, lockBytes!, file, options.replace, (ours) => {
      try {
        return lockDifferences(parseLock(settings.lockFile, ours), lock!);
      } catch (error) {
        return [`  yours does not parse: ${(error as Error).message.split('\n')[0]}`];
      }
    });
    checkProjectFile(settings.configFile, configBytes!, file, options.replace, (ours) => [firstDifferentLine(ours, configBytes!.toString('utf8'))]);
    if (info.size < total) {
      // Say at once what a short file lacks, rather than after reading all of it.
      const cut = offsets.findIndex((offset, i) => offset + block + m.entries[i]!.size > info.size);
      const first = cut < 0 ? m.entries.length : cut;
      const entry = m.entries[first];
      const inside = entry && info.size > offsets[first]! + block ? `  cut short: ${label(entry.path)} (${info.size - offsets[first]! - block} of ${entry.size} bytes)\n` : '';
      throw truncated(info.size, `${inside}${missingFrom(inside ? first + 1 : first)}`);
    }
  };

  const memorySink = (done: (bytes: Buffer) => void | Promise<void>): Sink => {
    const parts: Buffer[] = [];
    return { write: (chunk) => void parts.push(Buffer.from(chunk)), end: () => done(Buffer.concat(parts)) };
  };

  const verify = (entry: BundleEntry, found: string) => {
    if (found !== entry.sha256) {
      throw new ChecksumError(
        `${file}: entry ${label(entry.path)}`,
        entry.sha256,
        found,
        'The bundle is damaged (or was changed) there. Nothing was added to the cache. Copy it again from its source, or make a new one there with make bundle.',
      );
    }
  };

  const onEntry = async (header: TarHeader): Promise<Sink> => {
    ctx.signal.throwIfAborted();
    if (next === -1) {
      if (header.name !== manifestEntry) throw bundleProblem(file, `its first entry is ${header.name}, not the manifest ${manifestEntry}`);
      if (header.size > maxSmallEntry) throw bundleProblem(file, `its manifest is ${header.size} bytes`);
      return memorySink((bytes) => {
        manifestBytes = bytes;
        manifest = parseBundleManifest(file, bytes);
        ({ offsets, total } = bundleLayout(bytes.length, manifest.entries));
        next = 0;
      });
    }
    const m = manifest!;
    const entry = m.entries[next];
    if (!entry || header.name !== entry.path) {
      throw bundleProblem(file, `expected ${entry ? `entry ${entry.path}` : 'the end of the archive'} at byte ${offsets[next] ?? total - 2 * block}, found ${header.name}`);
    }
    if (header.size !== entry.size) throw bundleProblem(file, `entry ${entry.path} has ${header.size} bytes, the manifest says ${entry.size}`);
    const position = next++;

    if (position < headEntries.length || manifestBlobs.has(`sha256:${entry.sha256}`)) {
      // Small entries are kept in memory: the lock, config, layout and index, image manifests.
      return memorySink(async (bytes) => {
        verify(entry, sha256Hex(bytes));
        if (entry.path === lockEntry) {
          lockBytes = bytes;
          lock = parseLock(`${file}: ${lockEntry}`, bytes.toString('utf8'));
        } else if (entry.path === configEntry) {
          configBytes = bytes;
          afterHead();
        } else if (entry.path === ociLayoutEntry) {
          if (!/"imageLayoutVersion"/.test(bytes.toString('utf8'))) throw bundleProblem(file, `${ociLayoutEntry} is not an OCI layout file`);
        } else if (entry.path === ociIndexEntry) {
          index = checkBundleIndex(file, bytes, lock!, m);
          for (const descriptor of index.manifests) manifestBlobs.set(descriptor.digest, Buffer.alloc(0));
        } else {
          manifestBlobs.set(`sha256:${entry.sha256}`, bytes);
          await stage(entry, [bytes]);
        }
      });
    }

    const hash = sha256Hasher();
    const target = entryTarget(entry);
    if (!options.staging || existsSync(target)) {
      return { write: (chunk) => void hash.update(chunk), end: () => verify(entry, hash.digest('hex')) };
    }
    const stagedFile = join(options.staging, String(position));
    const handle = await open(stagedFile, 'wx', 0o644);
    const writer = new BatchedWriter(handle);
    return {
      write: async (chunk) => {
        hash.update(chunk);
        await writer.push(chunk);
      },
      end: async () => {
        try {
          await writer.flush();
        } finally {
          await handle.close();
        }
        verify(entry, hash.digest('hex'));
        staged.set(entry.path, stagedFile);
      },
    };
  };

  const entryTarget = (entry: BundleEntry) =>
    entry.path.startsWith(artifactPrefix) ? cache.entryPath(entry.sha256) : blobPath(store, `sha256:${entry.sha256}`);
  const stage = async (entry: BundleEntry, parts: Buffer[]) => {
    if (!options.staging || existsSync(entryTarget(entry))) return;
    const stagedFile = join(options.staging, basename(entry.path));
    await writeFile(stagedFile, parts, { flag: 'wx' });
    staged.set(entry.path, stagedFile);
  };

  async function* counted(): AsyncGenerator<Buffer> {
    for await (const chunk of readChunks(file, ctx.signal)) {
      progress.received += chunk.length;
      options.onProgress?.(progress);
      yield chunk;
    }
  }

  try {
    await walkTar(counted(), onEntry);
  } catch (error) {
    if (error instanceof TarTruncated) {
      if (next === -1 || !manifest) throw truncated(progress.received, `  cut short: the manifest ${manifestEntry}; nothing can be verified`);
      const inside = error.atEntry ? `  cut short: ${label(error.atEntry)} (${error.got} of ${error.size} bytes)\n` : '';
      throw truncated(progress.received, `${inside}${missingFrom(next)}`);
    }
    if (error instanceof TarFormatError) {
      throw bundleProblem(file, `${error.message} at byte ${error.offset}${next === -1 ? ' (its first header: is it a bundle at all?)' : ''}`);
    }
    throw error;
  }
  if (!manifest) throw bundleProblem(file, 'it is an empty archive');
  if (next < manifest.entries.length) throw truncated(progress.received, missingFrom(next));

  // Every blob each image needs is in the bundle (the image manifests are read by now).
  const blobsPresent = new Set(manifest.entries.filter((e) => e.path.startsWith(blobPrefix)).map((e) => `sha256:${e.sha256}`));
  const needed = new Set<string>();
  for (const descriptor of index!.manifests) {
    const bytes = manifestBlobs.get(descriptor.digest);
    if (!bytes || bytes.length === 0) throw bundleProblem(file, `image ${refOf(descriptor)}: its manifest ${descriptor.digest} is not in the bundle`);
    const image = parseManifest(bytes, `${file}: ${descriptor.digest}`);
    for (const digest of [descriptor.digest, image.config.digest, ...image.layers.map((l) => l.digest)]) {
      needed.add(digest);
      if (!blobsPresent.has(digest)) throw bundleProblem(file, `image ${refOf(descriptor)}: blob ${digest} is not in the bundle`);
    }
  }
  const unneeded = [...blobsPresent].filter((d) => !needed.has(d));
  if (unneeded.length > 0) throw bundleProblem(file, `blobs no image of its lock uses: ${unneeded.slice(0, 3).join(', ')}`);

  return { manifest, id: sha256Hex(manifestBytes!), lock: lock!, lockBytes: lockBytes!, configBytes: configBytes!, index: index!, staged, bytes: progress.received };
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
