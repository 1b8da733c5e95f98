// The cache proves its bytes at every use: a cache entry changed after it was stored (a
// bit flip with its mtime kept, so nothing but its bytes tells) is caught by the disk
// stage naming entry, expected and found digest and the repair; `fetch --force` and
// `images --force` move it to cache/corrupt/ and fetch it again; offline names it;
// `fsck` finds every one and `fsck --fix` lets a plain rebuild repair them.
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { CacheMismatchError } from '../tasks/lib/store/cache.ts';
import { diskStage } from '../tasks/disk.ts';
import { runStages } from '../tasks/lib/run/engine.ts';
import { OfflineError } from '../tasks/lib/errors.ts';
import { fetchStage } from '../tasks/fetch.ts';
import { imagesStage } from '../tasks/images.ts';
import { blobPath, findRef, imageBlobs, readIndex } from '../tasks/lib/store/oci.ts';
import { fixtureMirrors, flipByte, lockEntry, loud, makeWorkspace, runCli, startUpstream, workspaceArgs, type Upstream, type Workspace } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-cache-'));
const version = 'v1.35.7';
let up: Upstream;
let ws: Workspace;

test.before(loud(async () => {
  up = await startUpstream(work, version);
  ws = makeWorkspace(up.tree, up.server.url, { registries: fixtureMirrors(up.registry.host), images: up.registry.images.map((i) => lockEntry(i)) });
}));

test.after(async () => {
  await up?.close();
  if (ws) rmSync(ws.dir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
});

const silent = { renderer: 'silent' } as const;
const sha256 = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');
const entry = (key: string) => join(ws.cacheDir, 'sha256', up.tree.artifacts[key]!.uncompressedSha256 ?? up.tree.artifacts[key]!.sha256);
const store = () => join(ws.cacheDir, 'oci');
/** The pause image's largest blob in cache/oci (a layer). */
function layerBlob(): string {
  const image = up.registry.images.find((i) => i.name === 'registry.k8s.io/pause')!;
  const digest = findRef(readIndex(store()), `${image.name}:${image.tag}`)!.digest;
  const blobs = imageBlobs(store(), digest).map((d) => blobPath(store(), d));
  return blobs.sort((a, b) => statSync(b).size - statSync(a).size)[0]!;
}


const corrupt = () => readdirSync(join(ws.cacheDir, 'corrupt')).sort();

test('a fresh build, then bit flips in an artifact, a tarball and an image blob: the disk stage refuses them by name', async () => {
  await runStages(ws.context(), [fetchStage, imagesStage, diskStage], silent);
  const blob = layerBlob();
  flipByte(entry('kubelet'));
  flipByte(entry('containerd'), 1000);
  flipByte(blob);
  const error = await runStages(ws.context({ force: true }), [diskStage], silent).then(() => undefined, (e: Error) => e);
  assert.instance(error, CacheMismatchError);
  const message = error!.message;
  const found = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');
  assert.match(message, `${entry('kubelet')}: kubelet, as the lock pins it\n    expected sha256 ${up.tree.artifacts.kubelet!.sha256}\n    found    sha256 ${found(entry('kubelet'))}\n    repair: make fetch FORCE=1`);
  assert.match(message, `${entry('containerd')}: containerd, as the lock pins it\n    expected sha256 ${up.tree.artifacts.containerd!.sha256}`);
  const hex = blob.split('/').pop()!;
  assert.match(message, `${blob}: an image blob (its name is its sha256)\n    expected sha256 ${hex}\n    found    sha256 ${found(blob)}\n    repair: make images FORCE=1`);
  assert.match(message, /make fsck FIX=1/);
});

test('fsck names every changed cache entry and the outputs that share its bytes, and exits non-zero', async () => {
  const result = await runCli([...workspaceArgs(ws), 'fsck']);
  assert.is(result.code, 1, result.stderr);
  assert.match(result.stdout, `DIFFERS cache/sha256/${up.tree.artifacts.kubelet!.sha256}: cache entry (named by its sha256)`);
  assert.match(result.stdout, `DIFFERS cache/sha256/${up.tree.artifacts.containerd!.sha256}`);
  assert.match(result.stdout, `DIFFERS cache/oci/blobs/sha256/${layerBlob().split('/').pop()}`);
  assert.match(result.stdout, /DIFFERS .*out\/artifacts\/kubelet: output of fetch \(sha256 in its stamp\)/);
  assert.match(result.stdout, /DIFFERS .*out\/artifacts\/containerd-[^:]*: output of fetch/);
  assert.match(result.stdout, /DIFFERS .*out\/images\/blobs\/sha256\/[0-9a-f]{64}: output of images/);
  assert.match(result.stdout, /: 6 differ: make fsck FIX=1/);
  assert.not.ok(existsSync(join(ws.cacheDir, 'corrupt')), 'without --fix nothing moves');
});

test('offline, fetch moves the bad entry aside and fails naming it', async () => {
  const error = await runStages(ws.context({ force: true, offline: true }), [fetchStage], silent).then(() => undefined, (e: Error) => e);
  assert.instance(error, OfflineError);
  assert.match(error!.message, new RegExp(`kubelet: sha256 ${up.tree.artifacts.kubelet!.sha256}\\n    the cached bytes had sha256 [0-9a-f]{64}: moved to .*cache/corrupt/\\d{8}T\\d{6}Z\\.sha256\\.${up.tree.artifacts.kubelet!.sha256}`));
  assert.match(error!.message, /containerd: sha256/);
  assert.is(corrupt().length, 2);
});

test('fetch --force downloads them again; images --force copies the blob again; the disk builds from the pinned bytes', async () => {
  const report = await runStages(ws.context({ force: true }), [fetchStage], silent);
  assert.equal(report.ran, ['fetch']);
  assert.is(sha256(entry('kubelet')), up.tree.artifacts.kubelet!.sha256);
  assert.is(sha256(join(ws.outDir, 'artifacts', 'kubelet')), up.tree.artifacts.kubelet!.sha256, 'out/artifacts links the good entry');
  const before = up.registry.requestCount();
  await runStages(ws.context({ force: true }), [imagesStage], silent);
  const blob = layerBlob();
  assert.is(sha256(blob), blob.split('/').pop());
  assert.ok(up.registry.requestCount() > before, 'the registry was asked again');
  assert.is(sha256(join(ws.outDir, 'images', 'blobs', 'sha256', blob.split('/').pop()!)), blob.split('/').pop(), 'out/images links the good blob');
  assert.is(corrupt().length, 3);
  assert.ok(corrupt().some((name) => /^\d{8}T\d{6}Z\.oci-blob\.[0-9a-f]{64}$/.test(name)), corrupt().join(' '));
  await runStages(ws.context({ force: true }), [diskStage], silent);
  const clean = await runCli([...workspaceArgs(ws), 'fsck']);
  assert.is(clean.code, 0, clean.stdout);
  assert.match(clean.stdout, /outputs checked .*: all match/);
});

test('fsck --fix moves a bad entry aside and unstamps what used it: a plain build repairs it', async () => {
  flipByte(entry('kubectl'));
  const fixed = await runCli([...workspaceArgs(ws), 'fsck', '--fix']);
  assert.is(fixed.code, 0, fixed.stdout + fixed.stderr);
  assert.match(fixed.stdout, /fixed: moved to corrupt\/\d{8}T\d{6}Z\.sha256\.[0-9a-f]{64} under cache\//);
  assert.match(fixed.stdout, /fixed: removed the fetch stamp/);
  const report = await runStages(ws.context(), [fetchStage, imagesStage, diskStage], silent);
  assert.ok(report.ran.includes('fetch'), report.ran.join(' '));
  assert.is(sha256(entry('kubectl')), up.tree.artifacts.kubectl!.sha256);
  const clean = await runCli([...workspaceArgs(ws), 'fsck']);
  assert.is(clean.code, 0, clean.stdout);
});

test.run();
