// The bundle's tar layer: tar-stream (mafintosh/tar-stream) writes and parses the tar
// format; this file holds it to the one shape corekube writes, because a bundle arrives
// from another machine and its reader parses untrusted bytes. Every entry is a plain
// regular file (owner 0:0, time 0, no user or group name) at the offset the caller
// expects, with the name and size it expects: no links, devices or directories, no PAX or
// GNU long-name headers (which could rename an entry behind its plain header), no name
// twice, no path outside the tree.
import type { FileHandle } from 'node:fs/promises';
import { extract, pack, type Header, type Pack } from 'tar-stream';
import { BatchedWriter } from './chunks.ts';

/** A tar block: each header is one, each entry's bytes are padded to whole ones. */
export const tarBlock = 512;
const block = tarBlock;
const padding = (size: number) => (block - (size % block)) % block;

/** Byte offset of each entry's header and the archive's total size (end marker included), for entries of these sizes. */
export function tarLayout(sizes: readonly number[]): { offsets: number[]; total: number } {
  let offset = 0;
  const offsets: number[] = [];
  for (const size of sizes) {
    offsets.push(offset);
    offset += block + size + padding(size);
  }
  return { offsets, total: offset + 2 * block };
}

// ---- writing ----

/** One entry to write: its name, size and mode, and its bytes (read only when its turn comes). */
export interface TarSource {
  name: string;
  size: number;
  mode: number;
  chunks: () => Iterable<Buffer> | AsyncIterable<Buffer>;
}

/**
 * Writes the entries, in order, as one tar into `handle`: tar-stream packs them while
 * this side writes what it produces in batches. A source that throws (a damaged cache
 * entry) stops it with that error; the caller removes the partial file.
 */
export async function writeTar(handle: FileHandle, sources: readonly TarSource[], options: { signal: AbortSignal; onWritten?: (bytes: number) => void }): Promise<void> {
  const archive = pack();
  let failure: unknown;
  const packing = (async () => {
    for (const source of sources) {
      options.signal.throwIfAborted();
      await packEntry(archive, regularFile(source.name, source.size, source.mode), source.chunks());
    }
    archive.finalize();
  })().catch((error: unknown) => {
    failure = error;
    archive.destroy(error as Error);
  });
  const out = new BatchedWriter(handle);
  try {
    for await (const chunk of archive) {
      await out.push(chunk as Buffer);
      options.onWritten?.((chunk as Buffer).length);
    }
    await out.flush();
  } catch (error) {
    archive.destroy(error as Error);
    throw failure ?? error;
  } finally {
    await packing;
  }
  if (failure) throw failure;
}

/** Every entry's header: a regular file, owner 0:0, no user or group name, time 0, so the same input gives the same bytes. */
function regularFile(name: string, size: number, mode: number): Header {
  return { name, size, mode, type: 'file', uid: 0, gid: 0, uname: '', gname: '', mtime: new Date(0), linkname: '', devmajor: 0, devminor: 0 };
}

/** Appends one entry: its header, then its bytes as they come, waiting while the archive's reader is behind. */
async function packEntry(archive: Pack, header: Header, chunks: Iterable<Buffer> | AsyncIterable<Buffer>): Promise<void> {
  let settle: (error?: Error | null) => void = () => undefined;
  const done = new Promise<void>((resolve, reject) => (settle = (error) => (error ? reject(error) : resolve())));
  done.catch(() => undefined); // awaited below; a failure before then surfaces through the archive
  const sink = archive.entry(header, settle);
  sink.on('error', () => undefined); // reported through `done` and the archive, not as an uncaught event
  for await (const chunk of chunks) {
    if (!sink.write(chunk)) await drained(sink as unknown as Emitter);
    if (sink.destroyed) break;
  }
  if (!sink.destroyed) sink.end(null);
  await done;
}

interface Emitter {
  readonly destroyed: boolean;
  once(event: 'drain' | 'close', listener: () => void): unknown;
  off(event: 'drain' | 'close', listener: () => void): unknown;
}

/** Resolves when a stream wants more (or is gone, so a writer never waits for a drain that cannot come). */
function drained(stream: Emitter): Promise<void> {
  if (stream.destroyed) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      stream.off('drain', done);
      stream.off('close', done);
      resolve();
    };
    stream.once('drain', done);
    stream.once('close', done);
  });
}

// ---- reading ----

/** One parsed entry: its header as tar-stream reports it (after any PAX or GNU long-name header), the offset of its own header, its bytes. */
export interface TarEntry extends AsyncIterable<unknown> {
  header: Header;
  offset: number;
}

/**
 * The entries of a tar stream, parsed by tar-stream while `chunks` feed it (at most a
 * few chunks ahead of the reader). Each entry's bytes must be read to the end before
 * the next entry comes. Leaving early stops the feeding.
 */
export async function* tarEntries(chunks: AsyncIterable<Buffer>): AsyncGenerator<TarEntry> {
  const extractor = extract();
  extractor.on('error', () => undefined); // reported through the iteration below, not as an uncaught event
  const feeding = (async () => {
    for await (const chunk of chunks) {
      if (extractor.destroyed) return;
      if (!extractor.write(chunk)) await drained(extractor as unknown as Emitter);
    }
    extractor.end(null);
  })().catch((error: unknown) => extractor.destroy(error as Error));
  try {
    for await (const entry of extractor) yield entry as TarEntry;
  } finally {
    extractor.destroy();
    await feeding;
  }
}

/**
 * What a failure of tarEntries means, by what tar-stream says: the input ended inside a
 * header or an entry's bytes, or a header does not parse (a bad checksum, an unknown
 * format, a header too large). Anything else (I/O, Ctrl-C) is not the archive's fault.
 */
export function tarFailure(error: unknown): 'truncated' | 'bad header' | undefined {
  if (!(error instanceof Error)) return undefined;
  if (error.message === 'Unexpected end of data') return 'truncated';
  if (/^(Invalid tar header|Invalid header|Header exceeds max size)/.test(error.message)) return 'bad header';
  return undefined;
}

const tarTypeNames: Record<string, string> = {
  link: 'a hard link',
  symlink: 'a symbolic link',
  directory: 'a directory',
  'block-device': 'a block device',
  'character-device': 'a character device',
  fifo: 'a FIFO',
  'contiguous-file': 'a contiguous file (tar type 7)',
};

/** A name that would land outside the directory it is extracted into (or nowhere). */
function escapingPath(name: string): boolean {
  return name === '' || name.startsWith('/') || name.includes('\\') || name.includes('\0') || name.split('/').includes('..');
}

/**
 * The checks on a tar header before any of its bytes are read: what tar-stream parsed
 * must be exactly the plain entry expected at this offset (`expected` undefined: the end
 * of the archive). Returns the problem, naming the entry (through `describe`), or undefined.
 */
export function tarEntryProblem(
  entry: TarEntry,
  expected: { path: string; offset: number; size?: number } | undefined,
  seen: ReadonlySet<string>,
  describe: (name: string) => string = JSON.stringify,
): string | undefined {
  const { header, offset } = entry;
  const name = describe(header.name);
  const pax = header.pax as Record<string, string> | null | undefined;
  if (pax) {
    const fields = Object.entries(pax).map(([key, value]) => `${key}=${value}`).join(', ');
    return `entry ${name} at byte ${offset} comes with a PAX extended header (${fields}), which could rename it; corekube writes none`;
  }
  if (escapingPath(header.name)) return `entry ${name} at byte ${offset}: a path outside the bundle's tree (absolute, or with ..)`;
  if (header.type !== 'file') {
    const what = tarTypeNames[header.type] ?? `tar type ${String(header.type)}`;
    return `entry ${name} at byte ${offset} is ${what}${header.linkname ? ` to ${JSON.stringify(header.linkname)}` : ''}, not a regular file`;
  }
  if (seen.has(header.name)) return `entry ${name} appears a second time, at byte ${offset}`;
  if (!expected) return `expected the end of the archive, found entry ${name} at byte ${offset}`;
  if (offset !== expected.offset) {
    return `entry ${name} at byte ${offset}, where ${expected.path} was expected at byte ${expected.offset}: an extra header (GNU long name or other) before it`;
  }
  if (header.name !== expected.path) return `expected entry ${expected.path} at byte ${expected.offset}, found ${name}`;
  if (expected.size !== undefined && header.size !== expected.size) {
    return `entry ${name} has ${header.size} bytes in its tar header, the manifest says ${expected.size}`;
  }
  return undefined;
}
