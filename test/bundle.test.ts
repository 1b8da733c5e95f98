// Bundles for air-gapped sites, with real components: a cache warmed by fetch and images
// from the fixture server and registry, bundled, read back by GNU tar, unbundled into an
// empty cache with every fixture server stopped and a plain TCP listener on their ports
// counting connection attempts, then built from offline. Damaged, truncated and
// conflicting bundles are refused with the cache and the project left as they were, and so
// are hostile ones (links, devices, paths leaving the tree, PAX renames, a name twice).
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync, writeSync, copyFileSync } from 'node:fs';
import { type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { bundleLayout, manifestEntry, type BundleManifest, type BundleSummary } from '../tasks/bundle/format.ts';
import { unbundle, verifyBundle } from '../tasks/bundle/unbundle.ts';
import { writeBundle } from '../tasks/bundle/write.ts';
import { ChecksumError } from '../tasks/lib/store/cache.ts';
import { diskStage } from '../tasks/disk.ts';
import { runStages } from '../tasks/lib/run/engine.ts';
import { UserError } from '../tasks/lib/errors.ts';
import { fetchStage } from '../tasks/fetch.ts';
import { ignitionStage } from '../tasks/ignition.ts';
import { imagesStage } from '../tasks/images.ts';
import { artifactKeys } from '../tasks/lib/inputs/lock.ts';
import { pkiStage } from '../tasks/pki.ts';
import { startFixtureServer, type FixtureServer } from './fixtures/http-server.ts';
import { startRegistry, type RegistryFixture } from './fixtures/registry.ts';
import { buildUpstreamTree, type UpstreamTree } from './fixtures/upstream.ts';
import { countConnectionsOn, fixtureMirrors, flipByte, listFiles, lockEntry, loud, makeWorkspace, projectImages, runCli, workspaceArgs, type Workspace, type WorkspaceOptions } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-bundle-'));
const version = 'v1.35.7';
let tree: UpstreamTree;
let server: FixtureServer;
let registry: RegistryFixture;
const workspaces: Workspace[] = [];
/** Stand-ins bound to the fixture ports once the servers are stopped: any connection is a network access. */
const listeners: Server[] = [];
let connectionsSeen = () => 0;

test.before(loud(async () => {
  tree = await buildUpstreamTree(join(work, 'upstream'), { qcow2SizeMiB: 2, kubernetesVersion: version });
  server = await startFixtureServer({ root: join(work, 'upstream') });
  registry = await startRegistry({ images: projectImages(version), work });
}));

test.after(async () => {
  for (const listener of listeners) await new Promise((resolve) => listener.close(resolve));
  await server?.close();
  await registry?.close();
  for (const ws of workspaces) rmSync(ws.dir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
});

function workspace(options: WorkspaceOptions = {}): Workspace {
  const ws = makeWorkspace(tree, server.url, {
    registries: fixtureMirrors(registry.host),
    images: registry.images.map((i) => lockEntry(i)),
    ...options,
  });
  workspaces.push(ws);
  return ws;
}

/** Stops every fixture server and listens on their ports instead, counting connections. */
async function stopServersAndListen(): Promise<void> {
  if (listeners.length > 0) return;
  const ports = [server.port, Number(registry.host.split(':')[1])];
  await server.close();
  await registry.stop();
  const counting = await countConnectionsOn(ports);
  listeners.push(...counting.listeners);
  connectionsSeen = counting.connections;
}

const sha256 = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');
const silent = { renderer: 'silent' } as const;

/** GNU tar's view of the archive: each entry's name, size and header block. */
function tarListing(file: string): { name: string; size: number; block: number }[] {
  return execFileSync('tar', ['-tvRf', file], { encoding: 'utf8' })
    .trim()
    .split('\n')
    .filter((line) => !line.includes('** Block of NULs **') && !line.includes('End of File'))
    .map((line) => {
      const match = /^block (\d+): \S+ \S+\s+(\d+) \S+ \S+ (.+)$/.exec(line);
      if (!match) throw new Error(`unexpected tar -tvR line: ${line}`);
      return { block: Number(match[1]), size: Number(match[2]), name: match[3]! };
    });
}

async function refusal(job: () => Promise<unknown>): Promise<Error> {
  try {
    await job();
  } catch (error) {
    if (process.env.SHOW_ERRORS) console.log(`\n--- ${(error as Error).name}\n${(error as Error).message}`);
    return error as Error;
  }
  throw new Error('expected a refusal, but it succeeded');
}

/** What a cache holds, file by file with its content digest, to compare before and after. */
function snapshot(dir: string): string[] {
  return listFiles(dir).map((path) => `${path} ${sha256(join(dir, path))}`);
}

let warm: Workspace;
let bundleFile: string;
let summary: BundleSummary;
let manifest: BundleManifest;

test('make bundle: one tar, the manifest first, every entry the lock needs, readable by GNU tar', async () => {
  warm = workspace();
  await runStages(warm.context(), [fetchStage, imagesStage], silent);
  summary = await writeBundle(warm.context());
  bundleFile = join(warm.outDir, 'corekube-bundle-test.tar');
  assert.is(summary.file, bundleFile);
  assert.is(statSync(bundleFile).size, summary.bytes);
  assert.equal(listFiles(warm.outDir).filter((f) => f.includes('.tmp')), [], 'no temporary file left in out/');

  const listing = tarListing(bundleFile);
  assert.is(listing[0]!.name, manifestEntry);
  const manifestBytes = execFileSync('tar', ['-xOf', bundleFile, manifestEntry]);
  assert.is(createHash('sha256').update(manifestBytes).digest('hex'), summary.id, 'the id is the manifest digest');
  manifest = JSON.parse(manifestBytes.toString()) as BundleManifest;
  assert.equal(listing.slice(1).map((e) => [e.name, e.size]), manifest.entries.map((e) => [e.path, e.size]), 'tar sees the manifest entries, in order');
  assert.is(bundleLayout(manifestBytes.length, manifest.entries).total, summary.bytes);

  const paths = manifest.entries.map((e) => e.path);
  assert.equal(paths.slice(0, 4), ['corekube.lock.yaml', 'cluster.yaml', 'cache/oci/oci-layout', 'cache/oci/index.json']);
  const fcos = tree.artifacts['fcos-qemu']!;
  assert.ok(paths.includes(`cache/sha256/${fcos.uncompressedSha256}`), 'the FCOS image as the cache keeps it: decompressed');
  for (const key of artifactKeys.filter((k) => k !== 'fcos-qemu')) assert.ok(paths.includes(`cache/sha256/${tree.artifacts[key]!.sha256}`), key);
  // Exactly the blobs of the lock's images: those out/images holds.
  const blobs = paths.filter((p) => p.startsWith('cache/oci/blobs/')).map((p) => p.split('/').pop()).sort();
  assert.equal(blobs, listFiles(join(warm.outDir, 'images', 'blobs', 'sha256')));
  assert.is(summary.artifacts, 9);
  assert.is(summary.images, registry.images.length);

  // Extracted by GNU tar, every entry has the size and sha256 the manifest says.
  const extracted = mkdtempSync(join(work, 'extract-'));
  execFileSync('tar', ['-xf', bundleFile, '-C', extracted]);
  for (const entry of manifest.entries) assert.is(sha256(join(extracted, entry.path)), entry.sha256, entry.path);
  assert.equal(readFileSync(join(extracted, 'corekube.lock.yaml')), readFileSync(warm.lockFile));

  // The same cache gives the same bytes.
  const again = await writeBundle(warm.context(), join(work, 'again.tar'));
  assert.is(sha256(join(work, 'again.tar')), sha256(bundleFile));
  assert.is(again.id, summary.id);
});

test('a damaged cache entry stops the bundle, naming the entry; no bundle and no temporary file are left', async () => {
  const cacheDir = join(work, 'damaged-cache');
  execFileSync('cp', ['-a', warm.cacheDir, cacheDir]);
  const kubelet = join(cacheDir, 'sha256', tree.artifacts.kubelet!.sha256);
  chmodSync(kubelet, 0o644);
  const fd = openSync(kubelet, 'r+');
  writeSync(fd, Buffer.from('X'), 0, 1, 100);
  closeSync(fd);
  const out = join(work, 'damaged-out');
  const error = await refusal(() => writeBundle(warm.context({ cacheDir }), join(out, 'damaged.tar')));
  assert.instance(error, ChecksumError);
  assert.match(error.message, new RegExp(`cache entry ${kubelet.replace(/[.]/g, '\\.')} \\(artifact kubelet\\)`));
  assert.match(error.message, /no bundle was written/);
  assert.match(error.message, /make fsck FIX=1/, 'the repair');
  assert.equal(listFiles(out), [], 'neither the bundle nor its temporary file');
});

test('a cache that lacks what the lock needs is not bundled: names each missing artifact and image, writes nothing', async () => {
  const cold = workspace();
  const error = await refusal(() => writeBundle(cold.context()));
  assert.instance(error, UserError);
  assert.match(error.message, /cannot bundle: the cache \(.*\) lacks what .*corekube\.lock\.yaml needs/);
  assert.match(error.message, /artifact kubelet: sha256 [0-9a-f]{64} \(make fetch\)/);
  assert.match(error.message, /image registry\.k8s\.io\/pause:3\.10\.1@sha256:[0-9a-f]{64} \(make images\)/);
  assert.equal(listFiles(cold.outDir), []);
});

test('servers stopped: unbundle into an EMPTY cache, then fetch and images offline from it', async () => {
  await stopServersAndListen();
  const site = workspace();
  rmSync(site.configFile); // installed from the bundle; the lock is there already, identical
  assert.equal(listFiles(site.cacheDir), []);
  const result = await unbundle(site.context(), bundleFile);
  assert.is(result.id, summary.id, 'both sides name the same bundle');
  assert.is(result.added, summary.artifacts + summary.blobs);
  assert.equal(result.project.map((p) => p.action), ['unchanged', 'installed']);
  assert.equal(readFileSync(site.configFile), readFileSync(warm.configFile));
  assert.equal(listFiles(join(site.cacheDir, 'tmp')), [], 'nothing left in cache/tmp');
  for (const entry of manifest.entries.slice(4)) {
    const file = join(site.cacheDir, entry.path.slice('cache/'.length));
    assert.is(sha256(file), entry.sha256, entry.path);
    assert.is(statSync(file).mode & 0o222, 0, `${entry.path} is read-only`);
  }

  const report = await runStages(site.context({ offline: true }), [fetchStage, imagesStage], silent);
  assert.equal(report.ran.sort(), ['fetch', 'images']);
  assert.is(sha256(join(site.outDir, 'artifacts', 'kubelet')), tree.artifacts.kubelet!.sha256);
  assert.equal(readFileSync(join(site.outDir, 'images', 'index.json')), readFileSync(join(warm.outDir, 'images', 'index.json')));
  assert.equal(listFiles(join(site.outDir, 'images')), listFiles(join(warm.outDir, 'images')));

  // Again: nothing new, nothing changed.
  const before = snapshot(site.cacheDir);
  const again = await unbundle(site.context(), bundleFile);
  assert.is(again.added, 0);
  assert.equal(again.project.map((p) => p.action), ['unchanged', 'unchanged']);
  assert.equal(snapshot(site.cacheDir), before);
  assert.is(connectionsSeen(), 0, 'no connection to any fixture port');
});

test('a bundle with one flipped byte inside an entry is refused, naming the entry and both sha256; cache and project untouched', async () => {
  await stopServersAndListen();
  const listing = tarListing(bundleFile);
  const kubelet = `cache/sha256/${tree.artifacts.kubelet!.sha256}`;
  const layer = manifest.entries.at(-1)!.path;
  for (const path of [kubelet, layer]) {
    const entry = listing.find((e) => e.name === path)!;
    const tampered = join(work, 'tampered.tar');
    copyFileSync(bundleFile, tampered);
    const at = (entry.block + 1) * 512 + Math.floor(entry.size / 2);
    flipByte(tampered, at);

    const site = workspace();
    rmSync(site.lockFile);
    rmSync(site.configFile);
    const error = await refusal(() => unbundle(site.context(), tampered));
    assert.instance(error, ChecksumError);
    const expected = manifest.entries.find((e) => e.path === path)!.sha256;
    assert.match(error.message, `entry ${path}`);
    assert.match(error.message, new RegExp(`expected ${expected}\\n  found    (?!${expected})[0-9a-f]{64}`));
    assert.match(error.message, /Nothing was added to the cache/);
    assert.equal(listFiles(site.cacheDir), [], 'the cache is as it was: empty');
    assert.not.ok(existsSync(site.lockFile) || existsSync(site.configFile), 'no lock or config installed');

    // A warm cache that holds the entry already is not spared the check either.
    const before = snapshot(warm.cacheDir);
    const again = await refusal(() => unbundle(warm.context(), tampered));
    assert.instance(again, ChecksumError);
    assert.equal(snapshot(warm.cacheDir), before);
    assert.instance(await refusal(() => verifyBundle(warm.context(), tampered)), ChecksumError);
  }
  assert.is(connectionsSeen(), 0);
});

test('a truncated bundle is refused naming what is cut short and what is missing; cache untouched', async () => {
  const listing = tarListing(bundleFile);
  const cases: { size: number; expect: RegExp[] }[] = [];
  // Half-way: inside some entry, with entries after it.
  const half = Math.floor(summary.bytes / 2);
  const cut = listing.filter((e) => (e.block + 1) * 512 < half).at(-1)!;
  cases.push({
    size: half,
    expect: [
      new RegExp(`truncated: ${half} bytes, expected ${summary.bytes}`),
      new RegExp(`cut short: ${cut.name.replace(/[.]/g, '\\.')}[^\\n]*\\(\\d+ of ${cut.size} bytes\\)`),
      /missing \d+ entr(y|ies) \([\d.]+ (B|KiB|MiB)\):/,
      /Copy the whole file again/,
    ],
  });
  // Only the end-of-archive marker gone.
  cases.push({ size: summary.bytes - 1024, expect: [/missing: the end-of-archive marker/] });
  // Inside the manifest: nothing can be checked.
  cases.push({ size: 700, expect: [/cut short: the manifest corekube-bundle\.json/] });
  for (const { size, expect } of cases) {
    const short = join(work, 'short.tar');
    copyFileSync(bundleFile, short);
    truncateSync(short, size);
    const site = workspace();
    const error = await refusal(() => unbundle(site.context(), short));
    assert.instance(error, UserError);
    for (const pattern of expect) assert.match(error.message, pattern);
    assert.equal(listFiles(site.cacheDir), [], `cut at ${size}: the cache is as it was`);
  }
  // Something that is not a bundle at all.
  const junk = join(work, 'junk.tar');
  writeFileSync(junk, Buffer.alloc(4096, 7));
  assert.match((await refusal(() => unbundle(workspace().context(), junk))).message, /not a usable corekube bundle: .*is it a bundle at all/);
});

/** A ustar header as any tar writer could make it (type, link name and size as given): the raw material of hostile bundles. */
function rawHeader(name: string, size: number, type = '0', linkname = ''): Buffer {
  const header = Buffer.alloc(512);
  header.write(name, 0, 100, 'utf8');
  header.write('0000444\0', 100, 'latin1');
  header.write('0000000\0', 108, 'latin1');
  header.write('0000000\0', 116, 'latin1');
  header.write(`${size.toString(8).padStart(11, '0')}\0`, 124, 'latin1');
  header.write('00000000000\0', 136, 'latin1');
  header.fill(0x20, 148, 156);
  header.write(type, 156, 'latin1');
  header.write(linkname, 157, 100, 'utf8');
  header.write('ustar\0' + '00', 257, 'latin1');
  let sum = 0;
  for (const byte of header) sum += byte;
  header.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 'latin1');
  return header;
}

/** Bytes padded to whole tar blocks. */
const padded = (bytes: Buffer) => Buffer.concat([bytes, Buffer.alloc((512 - (bytes.length % 512)) % 512)]);

/** A PAX extended header (type x) carrying these records, as GNU tar --format=pax writes one. */
function paxHeader(records: Record<string, string>): Buffer {
  const body = Buffer.from(
    Object.entries(records)
      .map(([key, value]) => {
        const line = ` ${key}=${value}\n`;
        let length = line.length + 1;
        while (`${length}${line}`.length !== length) length++;
        return `${length}${line}`;
      })
      .join(''),
  );
  return Buffer.concat([rawHeader('PaxHeaders.0/entry', body.length, 'x'), padded(body)]);
}

test('a hostile bundle is refused before any of it lands, naming the entry: path traversal, links, a device, a name twice, a size past the end, a PAX rename', async () => {
  const original = readFileSync(bundleFile);
  const listing = tarListing(bundleFile);
  const kubeletPath = `cache/sha256/${tree.artifacts.kubelet!.sha256}`;
  const at = (name: string) => listing.find((e) => e.name === name)!;
  const kubelet = at(kubeletPath);
  const header = kubelet.block * 512; // where the kubelet's header starts
  const extent = 512 + padded(Buffer.alloc(kubelet.size)).length; // header and bytes
  // Each hostile header keeps the archive's length: a shorter file is refused as truncated first.
  const following = listing[listing.indexOf(kubelet) + 1]!.name;
  const last = listing.at(-1)!;
  const splice = (offset: number, remove: number, ...insert: Buffer[]) => Buffer.concat([original.subarray(0, offset), ...insert, original.subarray(offset + remove)]);
  const quoted = (name: string) => JSON.stringify(name).replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');

  const cases: { name: string; bytes: Buffer; expect: RegExp }[] = [
    { name: 'a relative path out of the tree', bytes: splice(header, 512, rawHeader('../../corekube-escape', kubelet.size)), expect: new RegExp(`entry ${quoted('../../corekube-escape')} at byte ${header}: a path outside the bundle's tree`) },
    { name: 'a ../ inside a cache path', bytes: splice(header, 512, rawHeader('cache/sha256/../../../corekube-escape', kubelet.size)), expect: new RegExp(`entry ${quoted('cache/sha256/../../../corekube-escape')} at byte ${header}: a path outside`) },
    { name: 'an absolute path', bytes: splice(header, 512, rawHeader('/tmp/corekube-escape', kubelet.size)), expect: new RegExp(`entry ${quoted('/tmp/corekube-escape')} at byte ${header}: a path outside`) },
    { name: 'a symlink in place of an artifact', bytes: splice(header, 512, rawHeader(kubeletPath, 0, '2', '/etc/passwd')), expect: new RegExp(`entry ${quoted(kubeletPath)} \\(kubelet\\) at byte ${header} is a symbolic link to "/etc/passwd", not a regular file`) },
    { name: 'a hard link in place of an artifact', bytes: splice(header, 512, rawHeader(kubeletPath, 0, '1', 'corekube.lock.yaml')), expect: new RegExp(`entry ${quoted(kubeletPath)} \\(kubelet\\) at byte ${header} is a hard link to "corekube.lock.yaml", not a regular file`) },
    { name: 'a character device', bytes: splice(header, 512, rawHeader(kubeletPath, 0, '3')), expect: new RegExp(`entry ${quoted(kubeletPath)} \\(kubelet\\) at byte ${header} is a character device, not a regular file`) },
    { name: 'the same entry twice', bytes: splice(header + extent, 0, original.subarray(header, header + extent)), expect: new RegExp(`entry ${quoted(kubeletPath)} \\(kubelet\\) appears a second time, at byte ${header + extent}`) },
    {
      name: 'a size field past the end of the file',
      bytes: splice(last.block * 512, 512, rawHeader(last.name, last.size + (64 << 20))),
      expect: new RegExp(`entry ${quoted(last.name)} has ${last.size + (64 << 20)} bytes in its tar header, the manifest says ${last.size}`),
    },
    {
      name: 'a manifest whose size field runs past the end of the file',
      bytes: Buffer.concat([rawHeader(manifestEntry, 1 << 20), original.subarray(512, 1024)]),
      expect: /truncated: 1024 bytes[^]*cut short: the manifest corekube-bundle\.json/,
    },
    {
      name: 'a PAX header renaming an entry out of the tree',
      bytes: splice(header, 0, paxHeader({ path: '../../corekube-escape' })),
      expect: new RegExp(`entry ${quoted('../../corekube-escape')} at byte ${header + 1024} comes with a PAX extended header \\(path=\\.\\./\\.\\./corekube-escape\\)`),
    },
    {
      name: 'a PAX header renaming an entry to the next one',
      bytes: splice(header, 0, paxHeader({ path: following })),
      expect: new RegExp(`entry ${quoted(following)}( \\(\\S+\\))? at byte ${header + 1024} comes with a PAX extended header`),
    },
    {
      name: 'a GNU long-name header',
      bytes: splice(header, 0, rawHeader('././@LongLink', kubeletPath.length + 1, 'L'), padded(Buffer.from(`${kubeletPath}\0`))),
      expect: new RegExp(`entry ${quoted(kubeletPath)} \\(kubelet\\) at byte ${header + 1024}, where ${kubeletPath} was expected at byte ${header}: an extra header`),
    },
  ];
  const hostile = join(work, 'hostile.tar');
  for (const { name, bytes, expect } of cases) {
    writeFileSync(hostile, bytes);
    const site = workspace();
    rmSync(site.lockFile);
    rmSync(site.configFile);
    const error = await refusal(() => unbundle(site.context(), hostile));
    assert.instance(error, UserError, name);
    assert.match(error.message, expect, name);
    assert.match(error.message, /Nothing was added to the cache/, name);
    assert.equal(listFiles(site.cacheDir), [], `${name}: the cache is as it was (empty), cache/tmp cleaned`);
    assert.not.ok(existsSync(site.lockFile) || existsSync(site.configFile), `${name}: no lock or config installed`);
    // A warm cache is left exactly as it was.
    const before = snapshot(warm.cacheDir);
    assert.match((await refusal(() => unbundle(warm.context(), hostile))).message, expect, name);
    assert.equal(snapshot(warm.cacheDir), before, `${name}: the warm cache is as it was`);
  }
});

test('a project lock or config that differs is refused before anything lands, naming the difference; --force replaces, keeping the old', async () => {
  const site = workspace({ extraConfig: ['# this site has its own notes'] });
  const error = await refusal(() => unbundle(site.context(), bundleFile));
  assert.match(error.message, /cluster\.yaml: differs from the one in the bundle/);
  assert.match(error.message, /line \d+: yours "# this site has its own notes", the bundle's "\(end of file\)"|line \d+: yours "# this site/);
  assert.match(error.message, /FORCE=1/);
  assert.equal(listFiles(site.cacheDir), []);

  const lockSite = workspace();
  writeFileSync(lockSite.lockFile, readFileSync(lockSite.lockFile, 'utf8').replace(tree.artifacts.kubeadm!.sha256, 'a'.repeat(64)));
  const lockError = await refusal(() => unbundle(lockSite.context(), bundleFile));
  assert.match(lockError.message, /corekube\.lock\.yaml: differs from the one in the bundle/);
  assert.match(lockError.message, /artifacts\.kubeadm: yours sha256 aaaaaaaaaaaa…, the bundle's sha256 [0-9a-f]{12}…/);
  assert.equal(listFiles(lockSite.cacheDir), []);

  const config = readFileSync(site.configFile);
  const replaced = await unbundle(site.context(), bundleFile, { replace: true });
  assert.equal(replaced.project.map((p) => p.action), ['unchanged', 'replaced']);
  assert.equal(readFileSync(`${site.configFile}.orig`), config);
  assert.equal(readFileSync(site.configFile), readFileSync(warm.configFile));
});

test('offline proof: from a warm cache with every server stopped, fetch→images→pki→disk→ignition succeed with and without --offline, and nothing connects', async () => {
  await stopServersAndListen();
  for (const offline of [true, false]) {
    const outDir = join(work, `out-offline-${offline}`);
    const report = await runStages(warm.context({ offline, outDir }), [fetchStage, imagesStage, pkiStage, diskStage, ignitionStage], silent);
    assert.equal([...report.ran].sort(), ['disk', 'fetch', 'ignition', 'images', 'pki'], `offline=${offline}`);
    assert.ok(statSync(join(outDir, 'image-disk.img')).size > 0);
    assert.ok(existsSync(join(outDir, 'ignition', 'cp1.ign')));
  }
  assert.is(connectionsSeen(), 0, 'no connection to the fixture server or the registry ports');
});

test('control: the stand-in listeners do see a connection when something does reach for the network', async () => {
  await stopServersAndListen();
  const before = connectionsSeen();
  const cold = workspace();
  const error = await refusal(() => runStages(cold.context({ http: { retries: 0, stallTimeoutMs: 1500, backoffMs: 1 } }), [fetchStage], silent));
  assert.instance(error, UserError);
  assert.ok(connectionsSeen() > before, `a cold fetch connected ${connectionsSeen() - before} times`);
});

test('through the CLI: unbundle --file, then an offline build; a missing --file is a usage error', async () => {
  const site = workspace();
  const before = connectionsSeen();
  const usage = await runCli(['unbundle', ...workspaceArgs(site)]);
  assert.is(usage.code, 2);
  assert.match(usage.stderr, /make unbundle FILE=/);
  const unpacked = await runCli(['unbundle', '--file', bundleFile, ...workspaceArgs(site)]);
  assert.is(unpacked.code, 0, unpacked.stderr);
  const built = await runCli(['--offline', 'fetch', 'images', ...workspaceArgs(site)]);
  assert.is(built.code, 0, built.stderr);
  assert.ok(existsSync(join(site.outDir, 'images', 'index.json')));
  assert.is(connectionsSeen(), before, 'offline means no connection');
});

test.run();
