// The fetch stage against a real HTTP server on 127.0.0.1 laid out like the upstream
// sites, with real faults: 404, 503, bodies cut short, stalls, corrupted bytes, Ctrl-C.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { ChecksumError } from '../tasks/lib/store/cache.ts';
import { DownloadError } from '../tasks/lib/store/download.ts';
import { runStages } from '../tasks/lib/run/engine.ts';
import { OfflineError, UserError } from '../tasks/lib/errors.ts';
import { fetchStage } from '../tasks/fetch.ts';
import { artifactKeys } from '../tasks/lib/inputs/lock.ts';
import { startFixtureServer, type FixtureServer } from './fixtures/http-server.ts';
import { buildUpstreamTree, type UpstreamTree } from './fixtures/upstream.ts';
import { listFiles, makeWorkspace, runCli, waitFor, workspaceArgs, type Workspace, loud } from './helpers.ts';

let tree: UpstreamTree;
let server: FixtureServer;
const treeDir = mkdtempSync(join(tmpdir(), 'corekube-upstream-'));
const workspaces: Workspace[] = [];

test.before(loud(async () => {
  tree = await buildUpstreamTree(treeDir, { qcow2SizeMiB: 64 });
  server = await startFixtureServer({ root: treeDir });
}));

test.after(async () => {
  await server.close();
  rmSync(treeDir, { recursive: true, force: true });
  for (const ws of workspaces) rmSync(ws.dir, { recursive: true, force: true });
});

test.before.each(() => {
  server.clearFaults();
  server.acceptRanges = true;
  server.requests.length = 0;
});

function workspace(): Workspace {
  const ws = makeWorkspace(tree, server.url);
  workspaces.push(ws);
  return ws;
}

const sha256 = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');
const path = (key: string) => tree.artifacts[key]!.servedPath;
const requestsFor = (key: string) => server.requests.filter((r) => r.path === path(key));

async function fetchIn(ws: Workspace, overrides = {}) {
  return runStages(ws.context(overrides), [fetchStage], { renderer: 'silent' });
}

async function fetchError(ws: Workspace, overrides = {}): Promise<Error> {
  try {
    await fetchIn(ws, overrides);
  } catch (error) {
    return error as Error;
  }
  assert.unreachable('fetch should have failed');
  throw new Error('unreachable');
}

function assertNothingPartial(ws: Workspace) {
  assert.equal(listFiles(join(ws.cacheDir, 'tmp')), [], 'no temporary file is left in cache/tmp');
}

test('a cold fetch downloads every artifact once, verified, into the cache and out/artifacts', async () => {
  const ws = workspace();
  const report = await fetchIn(ws);
  assert.equal(report.ran, ['fetch']);
  for (const key of artifactKeys) assert.is(requestsFor(key).length, 1, `${key} requested once`);
  const fcos = tree.artifacts['fcos-qemu']!;
  const image = join(ws.outDir, 'artifacts', `fedora-coreos-${tree.fcosRelease}-qemu.x86_64.qcow2`);
  assert.is(sha256(image), fcos.uncompressedSha256, 'the decompressed image is what the lock says');
  const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', image], { encoding: 'utf8' }));
  assert.is(info.format, 'qcow2');
  assert.is(sha256(join(ws.outDir, 'artifacts', 'kubeadm')), tree.artifacts.kubeadm!.sha256);
  const cached = listFiles(join(ws.cacheDir, 'sha256'));
  assert.ok(cached.includes(fcos.uncompressedSha256!), 'the cache is keyed by content');
  assert.is(statSync(image).ino, statSync(join(ws.cacheDir, 'sha256', fcos.uncompressedSha256!)).ino, 'out/ holds hardlinks');
  assert.is(statSync(image).mode & 0o222, 0, 'cache entries are read-only');
  assertNothingPartial(ws);
  const manifest = JSON.parse(readFileSync(join(ws.outDir, 'manifest.json'), 'utf8'));
  assert.is(manifest.stages.fetch.outputs[`artifacts/kubeadm`].sha256, tree.artifacts.kubeadm!.sha256);
});

test('a second run downloads nothing; a lost out/ is rebuilt from the cache without the network', async () => {
  const ws = workspace();
  await fetchIn(ws);
  server.requests.length = 0;
  const again = await fetchIn(ws);
  assert.equal(again.ran, []);
  assert.equal(again.fresh, ['fetch']);
  assert.is(server.requests.length, 0);
  rmSync(ws.outDir, { recursive: true });
  const rebuilt = await fetchIn(ws);
  assert.equal(rebuilt.ran, ['fetch']);
  assert.is(server.requests.length, 0, 'every artifact came from the cache');
  assert.is(sha256(join(ws.outDir, 'artifacts', 'kubectl')), tree.artifacts.kubectl!.sha256);
});

test('OFFLINE from a warm cache works with the server stopped; a cold cache names what is missing', async () => {
  const ws = workspace();
  await fetchIn(ws);
  const offlineServer = await startFixtureServer({ root: treeDir });
  const cold = makeWorkspace(tree, offlineServer.url);
  workspaces.push(cold);
  await offlineServer.close();
  rmSync(ws.outDir, { recursive: true });
  const report = await fetchIn(ws, { offline: true });
  assert.equal(report.ran, ['fetch']);
  const error = await fetchError(cold, { offline: true });
  assert.instance(error, OfflineError);
  assert.match(error.message, /offline: 9 artifacts are not in the cache/);
  assert.match(error.message, /kubeadm: sha256 [0-9a-f]{64}\n    from https:\/\/dl\.k8s\.io\/release\//);
  assert.match(error.message, /make fetch/);
  assert.equal(listFiles(cold.outDir), [], 'nothing written to out/');
});

test('a corrupted file is refused naming URL, expected and found; nothing lands in the cache', async () => {
  const ws = workspace();
  server.setFault(path('kubelet'), { kind: 'corrupt' });
  const error = await fetchError(ws);
  assert.instance(error, ChecksumError);
  assert.match(error.message, new RegExp(`kubelet from ${server.url}/k8s/release/${tree.kubernetesVersion}/bin/linux/amd64/kubelet`));
  assert.match(error.message, new RegExp(`expected ${tree.artifacts.kubelet!.sha256}`));
  assert.match(error.message, /found    [0-9a-f]{64}/);
  assert.not.ok(listFiles(join(ws.cacheDir, 'sha256')).includes(tree.artifacts.kubelet!.sha256));
  assertNothingPartial(ws);
  assert.is(requestsFor('kubelet').length, 1, 'a checksum mismatch is not retried');
  assert.ok(listFiles(join(ws.cacheDir, 'sha256')).includes(tree.artifacts.kubeadm!.sha256), 'the good artifacts are kept');
});

test('a corrupted .xz image is refused and leaves nothing behind', async () => {
  const ws = workspace();
  server.setFault(path('fcos-qemu'), { kind: 'corrupt' });
  const error = await fetchError(ws);
  assert.instance(error, UserError);
  assert.match(error.message, /fcos-qemu|xz/);
  assert.not.ok(listFiles(join(ws.cacheDir, 'sha256')).includes(tree.artifacts['fcos-qemu']!.uncompressedSha256!));
  assertNothingPartial(ws);
});

test('a 404 fails at once, naming the URL and what to check', async () => {
  const ws = workspace();
  server.setFault(path('runc'), { kind: 'status', status: 404 });
  const error = await fetchError(ws);
  assert.instance(error, DownloadError);
  assert.match(error.message, /runc\.amd64: HTTP 404/);
  assert.match(error.message, /mirror/);
  assert.is(requestsFor('runc').length, 1, 'a 404 is not retried');
  assertNothingPartial(ws);
});

test('a 503 that recovers is retried with backoff', async () => {
  const ws = workspace();
  server.setFault(path('kubectl'), { kind: 'status', status: 503, times: 2 });
  await fetchIn(ws);
  assert.equal(requestsFor('kubectl').map((r) => r.status), [503, 503, 200]);
  assert.is(sha256(join(ws.outDir, 'artifacts', 'kubectl')), tree.artifacts.kubectl!.sha256);
});

test('a 503 that never recovers fails after the retries, saying so', async () => {
  const ws = workspace();
  server.setFault(path('kubectl'), { kind: 'status', status: 503 });
  const error = await fetchError(ws, { http: { retries: 2, stallTimeoutMs: 1500, backoffMs: 10 } });
  assert.match(error.message, /HTTP 503.*gave up after 3 attempts/);
  assert.is(requestsFor('kubectl').length, 3);
});

test('a body cut short is resumed with a Range request and verified whole', async () => {
  const ws = workspace();
  server.setFault(path('fcos-qemu'), { kind: 'truncate', afterBytes: 1_000_000, times: 1 });
  server.setFault(path('kubeadm'), { kind: 'reset', afterBytes: 50_000, times: 1 });
  await fetchIn(ws);
  const fcos = requestsFor('fcos-qemu');
  assert.is(fcos.length, 2);
  assert.match(fcos[1]!.range ?? '', /^bytes=\d+-$/, 'the second request resumes');
  assert.is(fcos[1]!.status, 206);
  assert.is(requestsFor('kubeadm')[1]?.status, 206);
  assert.is(sha256(join(ws.outDir, 'artifacts', `fedora-coreos-${tree.fcosRelease}-qemu.x86_64.qcow2`)), tree.artifacts['fcos-qemu']!.uncompressedSha256);
});

test('a server without Range support restarts from the beginning, still one pass for the consumer', async () => {
  const ws = workspace();
  server.acceptRanges = false;
  server.setFault(path('kubelet'), { kind: 'truncate', afterBytes: 100_000, times: 1 });
  await fetchIn(ws);
  assert.equal(requestsFor('kubelet').map((r) => r.status), [200, 200]);
  assert.is(sha256(join(ws.outDir, 'artifacts', 'kubelet')), tree.artifacts.kubelet!.sha256);
});

test('a stalled server is given up on after the stall timeout, then retried', async () => {
  const ws = workspace();
  server.setFault(path('crictl'), { kind: 'stall', afterBytes: 1000, times: 1 });
  await fetchIn(ws, { http: { retries: 2, stallTimeoutMs: 400, backoffMs: 10 } });
  // Given up on and retried: a second request (a hang would hit test/run.ts's per-file timeout).
  assert.is(requestsFor('crictl').length, 2);
  assert.is(sha256(join(ws.outDir, 'artifacts', `crictl-v1.37.0-linux-amd64.tar.gz`)), tree.artifacts.crictl!.sha256);
});

test('a server that stalls forever fails with a message naming the stall', async () => {
  const ws = workspace();
  server.setFault(path('crictl'), { kind: 'stall', afterBytes: 1000 });
  const error = await fetchError(ws, { http: { retries: 1, stallTimeoutMs: 300, backoffMs: 10 } });
  assert.match(error.message, /no data for 0\.3 s \(stalled\).*gave up after 2 attempts/);
  assertNothingPartial(ws);
});

test('CLI: Ctrl-C in the middle of a download stops cleanly; a rerun completes', async () => {
  const ws = workspace();
  server.setFault(path('fcos-qemu'), { kind: 'stall', afterBytes: 2_000_000 });
  const run = runCli([...workspaceArgs(ws), 'fetch'], {
    env: { COREKUBE_STALL_TIMEOUT: '30' },
    onStart: (child) => {
      const downloading = () => listFiles(join(ws.cacheDir, 'tmp')).some((f) => f.startsWith('fcos-qemu.'));
      void waitFor(downloading, 20_000, 'the image download to start').then(
        () => setTimeout(() => child.kill('SIGINT'), 300),
      );
    },
  });
  const result = await run;
  assert.is(result.code, 130, result.stderr);
  assert.match(result.stderr, /SIGINT: stopping/);
  assertNothingPartial(ws);
  assert.not.ok(listFiles(ws.outDir).includes('.corekube.lock'), 'the run lock is released');
  assert.is(listFiles(join(ws.outDir, '.stamps')).length, 0, 'no stamp for an interrupted stage');
  server.clearFaults();
  const rerun = await runCli([...workspaceArgs(ws), 'fetch']);
  assert.is(rerun.code, 0, rerun.stderr);
  assert.is(sha256(join(ws.outDir, 'artifacts', `fedora-coreos-${tree.fcosRelease}-qemu.x86_64.qcow2`)), tree.artifacts['fcos-qemu']!.uncompressedSha256);
});

test('CLI: a second run on the same tree is refused while the first works', async () => {
  const ws = workspace();
  server.setFault(path('fcos-qemu'), { kind: 'stall', afterBytes: 1000 });
  let first: ReturnType<typeof runCli> | undefined;
  let kill = () => {};
  first = runCli([...workspaceArgs(ws), 'fetch'], {
    env: { COREKUBE_STALL_TIMEOUT: '30' },
    onStart: (child) => (kill = () => child.kill('SIGINT')),
  });
  await waitFor(() => listFiles(ws.outDir).includes('.corekube.lock'), 20_000, 'the first run to take the lock');
  const second = await runCli([...workspaceArgs(ws), 'fetch']);
  assert.is(second.code, 6);
  assert.match(second.stderr, /another corekube run \(pid \d+, tasks: fetch/);
  kill();
  assert.is((await first).code, 130);
});

test('CLI: a bad cluster.yaml stops everything before anything is written', async () => {
  const ws = workspace();
  writeFileSync(ws.configFile, readFileSync(ws.configFile, 'utf8').replace('ip: 10.77.0.10', 'ip: 10.99.0.10'));
  const result = await runCli([...workspaceArgs(ws), 'fetch']);
  assert.is(result.code, 3);
  assert.match(result.stderr, /cluster\.yaml: 1 problem\n  nodes\[0\]\.ip: expected a host address inside network\.nodeCidr/);
  assert.equal(listFiles(ws.outDir), []);
  assert.equal(listFiles(ws.cacheDir), []);
  assert.is(server.requests.length, 0);
});

test('CLI: --dry-run says what would run and why, and runs nothing', async () => {
  const ws = workspace();
  const cold = await runCli([...workspaceArgs(ws), 'fetch', '--dry-run']);
  assert.is(cold.code, 0, cold.stderr);
  assert.match(cold.stdout, /fetch: would run\n  - never built \(no stamp\)/);
  assert.is(server.requests.length, 0);
  await fetchIn(ws);
  const warm = await runCli([...workspaceArgs(ws), 'fetch', '--dry-run']);
  assert.match(warm.stdout, /fetch: fresh \(inputs unchanged since /);
  writeFileSync(ws.lockFile, readFileSync(ws.lockFile, 'utf8').replace(tree.artifacts.runc!.sha256, 'f'.repeat(64)));
  const changed = await runCli([...workspaceArgs(ws), 'fetch', '--dry-run']);
  assert.match(changed.stdout, /input artifacts\.runc changed: runc\.amd64 sha256:[0-9a-f]{12}… → runc\.amd64 sha256:ffffffffffff…/);
});

test.run();
