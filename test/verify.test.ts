// verify against a stand-in API server (test/fixtures/apiserver.ts): real TLS with the
// cluster CA from the pki stage, the admin client certificate required. A real cluster
// cannot run here (no KVM, no FCOS); the boot tests cover verify against nodes that
// never come up.
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { runStages } from '../tasks/lib/run/engine.ts';
import { adminGroup, pkiStage } from '../tasks/pki.ts';
import { verifyStage } from '../tasks/verify.ts';
import { startApiServer, type ApiServerFixture } from './fixtures/apiserver.ts';
import { buildUpstreamTree, type UpstreamTree } from './fixtures/upstream.ts';
import { freePortBlock, loud, makeWorkspace, type Workspace } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-verify-'));
let apiPort: number;
let tree: UpstreamTree;
let ws: Workspace;
const servers: ApiServerFixture[] = [];

test.before(loud(async () => {
  apiPort = await freePortBlock(2);
  tree = await buildUpstreamTree(join(work, 'upstream'), { qcow2SizeMiB: 1 });
  ws = makeWorkspace(tree, 'http://127.0.0.1:9', {
    nodes: ['{name: cp1, role: control-plane, ip: 10.77.0.10}', '{name: w1, role: worker, ip: 10.77.0.21, memory: 2GiB}'],
    images: [`registry.k8s.io/pause:3.10.1@sha256:${'c'.repeat(64)}`],
    extraConfig: [`hostPorts: {apiServer: ${apiPort}, sshBase: ${apiPort + 1}}`],
  });
  await runStages(ws.context(), [pkiStage], { renderer: 'silent' });
  mkdirSync(join(ws.outDir, 'logs'), { recursive: true });
  writeFileSync(join(ws.outDir, 'logs', 'w1.log'), 'boot line 1\nkubelet: node "w1" not ready: cni plugin not initialized\n');
  process.env.VERIFY_INTERVAL = '0.05';
}));
test.after(async () => {
  for (const server of servers) await server.close();
  rmSync(ws.dir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
});

async function apiServer(scenario: { readyAfter: number; neverReady?: string[]; dropNodeRequests?: number; failPodLists?: number }): Promise<ApiServerFixture> {
  const server = await startApiServer({
    port: apiPort,
    caCert: join(ws.outDir, 'pki', 'ca.crt'),
    caKey: join(ws.outDir, 'pki', 'ca.key'),
    work,
    scenario: { nodes: ['cp1', 'w1'], workers: ['w1'], adminGroup, ...scenario },
  });
  servers.push(server);
  return server;
}

/** verify against a stand-in API server playing `scenario`, until green; what it printed. */
async function verifyGreen(scenario: Parameters<typeof apiServer>[0]): Promise<{ server: ApiServerFixture; lines: string[] }> {
  const server = await apiServer(scenario);
  process.env.VERIFY_TIMEOUT = '20';
  const lines: string[] = [];
  const log = console.log;
  console.log = (line: string) => lines.push(line);
  try {
    await runStages(ws.context(), [verifyStage], { renderer: 'silent' });
  } finally {
    console.log = log;
    await server.close();
    servers.pop();
  }
  return { server, lines };
}

test('waits for the API server, then nodes, kube-system, the smoke pod on a worker and DNS; cleans up the smoke pod', async () => {
  const { server, lines } = await verifyGreen({ readyAfter: 3 });
  assert.match(lines.join('\n'), /cluster test verified/);
  assert.match(lines.join('\n'), /ok smoke pod: Running on w1/);
  assert.match(lines.join('\n'), /ok cluster DNS: coredns-7db6d8ff4d-x2x9q serving/);
  assert.ok(server.requests.filter((r) => r.path === '/readyz').length >= 4, 'it waited for /readyz');
  assert.ok(server.requests.every((r) => r.client === `corekube-admin (${adminGroup})`), 'every request with the admin client certificate');
  const [smoke] = [...server.pods.values()];
  assert.ok(smoke, 'a smoke pod was created');
  assert.is(smoke!.spec.spec.containers[0].image, 'registry.k8s.io/pause:3.10.1');
  assert.ok(smoke!.deleted, 'and deleted at the end');
});

test('a request that gets no answer after /readyz (an API server restarting or too slow) is "not ready yet", never a crash', async () => {
  const { server, lines } = await verifyGreen({ readyAfter: 0, dropNodeRequests: 2 });
  assert.match(lines.join('\n'), /cluster test verified/);
  assert.ok(server.requests.filter((r) => r.path === '/api/v1/nodes').length >= 3, 'it asked again after the dropped answers');
});

test('a list answered with an error Status (500 while the API server starts) is "not ready yet", never a crash', async () => {
  const { server, lines } = await verifyGreen({ readyAfter: 0, failPodLists: 2 });
  assert.match(lines.join('\n'), /cluster test verified/);
  assert.ok(server.requests.filter((r) => r.path === '/api/v1/namespaces/kube-system/pods').length >= 3, 'it asked again');
});

test('a request with no answer is reported as such when the bound is reached', async () => {
  const server = await apiServer({ readyAfter: 0, dropNodeRequests: 1_000_000 });
  process.env.VERIFY_TIMEOUT = '1';
  const error = await runStages(ws.context(), [verifyStage], { renderer: 'silent' }).then(() => undefined, (e: Error) => e);
  await server.close();
  servers.pop();
  assert.ok(error, 'verify failed');
  assert.match(error!.message, /FAIL nodes: GET \/api\/v1\/nodes: no answer \(.+\)/);
});

test('a node that never turns Ready fails verify within its bound, naming it, with its console tail', async () => {
  const server = await apiServer({ readyAfter: 0, neverReady: ['w1'] });
  process.env.VERIFY_TIMEOUT = '1';
  const error = await runStages(ws.context(), [verifyStage], { renderer: 'silent' }).then(() => undefined, (e: Error) => e);
  await server.close();
  servers.pop();
  assert.ok(error, 'verify failed');
  assert.match(error!.message, /not ready after 1s/);
  assert.match(error!.message, /FAIL nodes: w1 not Ready/);
  assert.match(error!.message, /ok {3}API server/);
  assert.match(error!.message, /w1's console \(out\/logs\/w1\.log\):\n.*cni plugin not initialized/s);
  assert.match(error!.message, /make ssh NODE=w1/);
  assert.ok([...server.pods.values()].every((p) => p.deleted), 'the smoke pod is removed even on failure');
});

test('an API server whose certificate is not from the cluster CA is not trusted', async () => {
  // A second CA, made like the first: the server's certificate chains to it, not to ours.
  const other = join(work, 'other-ca');
  mkdirSync(other, { recursive: true });
  const { execFileSync } = await import('node:child_process');
  execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', join(other, 'ca.key'), '-out', join(other, 'ca.crt'), '-days', '1', '-subj', '/CN=impostor'], { stdio: 'ignore' });
  const server = await startApiServer({ port: apiPort, caCert: join(other, 'ca.crt'), caKey: join(other, 'ca.key'), work, scenario: { nodes: ['cp1', 'w1'], workers: ['w1'], adminGroup, readyAfter: 0 } });
  servers.push(server);
  process.env.VERIFY_TIMEOUT = '1';
  const error = await runStages(ws.context(), [verifyStage], { renderer: 'silent' }).then(() => undefined, (e: Error) => e);
  assert.ok(error);
  assert.match(error!.message, /FAIL API server: no answer on https:\/\/127\.0\.0\.1:\d+: .*(certificate|self.signed)/i);
  assert.is(server.requests.length, 0, 'no request reached the impostor');
  assert.ok(readFileSync(join(ws.outDir, 'kubeconfig'), 'utf8').includes(`https://127.0.0.1:${apiPort}`));
});

test.run();
