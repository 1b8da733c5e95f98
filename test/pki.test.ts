// The pki stage with the real openssl: a CA made once and kept, keys 0600, the admin
// client certificate for a group bound to cluster-admin, the kubeadm join hash checked
// against the openssl pipeline kubeadm's documentation gives, renewal, a broken CA.
import { execFileSync, execSync, spawnSync } from 'node:child_process';
import { createPublicKey, X509Certificate } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { parse } from 'yaml';
import { runStages } from '../tasks/lib/run/engine.ts';
import { adminGroup, certificateBackdateHours, opensslTime, pkiStage } from '../tasks/pki.ts';
import { buildUpstreamTree, type UpstreamTree } from './fixtures/upstream.ts';
import { loud, makeWorkspace, projectRoot, type Workspace } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-pki-'));
let tree: UpstreamTree;
const workspaces: Workspace[] = [];

test.before(loud(async () => {
  tree = await buildUpstreamTree(join(work, 'upstream'), { qcow2SizeMiB: 1 });
}));
test.after(() => {
  for (const ws of workspaces) rmSync(ws.dir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
});

function workspace(extraConfig: string[] = []): Workspace {
  const ws = makeWorkspace(tree, 'http://127.0.0.1:9', { extraConfig });
  workspaces.push(ws);
  return ws;
}
const pki = (ws: Workspace, overrides = {}) => runStages(ws.context(overrides), [pkiStage], { renderer: 'silent' });
const mode = (file: string) => statSync(file).mode & 0o777;
const day = 86_400_000;

let ws: Workspace;

test('makes a 10-year CA, an admin client certificate, a token and the host kubeconfig, secrets 0600', async () => {
  ws = workspace(['hostPorts: {apiServer: 16443}']);
  await pki(ws);
  const dir = join(ws.outDir, 'pki');
  assert.is(mode(dir), 0o700);
  for (const secret of ['ca.key', 'admin.key', 'bootstrap-token']) assert.is(mode(join(dir, secret)), 0o600, secret);
  assert.is(mode(join(ws.outDir, 'kubeconfig')), 0o600);

  const ca = new X509Certificate(readFileSync(join(dir, 'ca.crt')));
  assert.ok(ca.ca);
  const years = (Date.parse(ca.validTo) - Date.parse(ca.validFrom)) / day / 365;
  assert.ok(years > 9.9 && years < 10.1, `${years} years`);
  const admin = new X509Certificate(readFileSync(join(dir, 'admin.crt')));
  assert.ok(admin.checkIssued(ca) && admin.verify(ca.publicKey));
  assert.not.ok(admin.ca);
  assert.match(admin.subject, `O=${adminGroup}`);
  assert.equal(admin.keyUsage, ['1.3.6.1.5.5.7.3.2'], 'client authentication only');

  assert.match(readFileSync(join(dir, 'bootstrap-token'), 'utf8'), /^[a-z0-9]{6}\.[a-z0-9]{16}\n$/);
  // kubeadm's documented way to compute --discovery-token-ca-cert-hash.
  const expected = execSync(
    `openssl x509 -pubkey -in ${join(dir, 'ca.crt')} | openssl rsa -pubin -outform der 2>/dev/null | openssl dgst -sha256 -hex | sed 's/^.* //'`,
  ).toString().trim();
  assert.is(readFileSync(join(dir, 'ca-cert-hash'), 'utf8').trim(), `sha256:${expected}`);

  const kubeconfig = parse(readFileSync(join(ws.outDir, 'kubeconfig'), 'utf8'));
  assert.is(kubeconfig.clusters[0].cluster.server, 'https://127.0.0.1:16443');
  assert.is(Buffer.from(kubeconfig.clusters[0].cluster['certificate-authority-data'], 'base64').toString(), readFileSync(join(dir, 'ca.crt'), 'utf8'));
  assert.is(Buffer.from(kubeconfig.users[0].user['client-key-data'], 'base64').toString(), readFileSync(join(dir, 'admin.key'), 'utf8'));
  assert.is(kubeconfig['current-context'], kubeconfig.contexts[0].name);
  // The key really is the certificate's: openssl signs with one and checks with the other.
  const message = join(work, 'message');
  writeFileSync(message, 'corekube');
  execFileSync('openssl', ['dgst', '-sha256', '-sign', join(dir, 'admin.key'), '-out', `${message}.sig`, message]);
  execFileSync('sh', ['-c', `openssl x509 -pubkey -noout -in ${join(dir, 'admin.crt')} > ${message}.pub`]);
  execFileSync('openssl', ['dgst', '-sha256', '-verify', `${message}.pub`, '-signature', `${message}.sig`, message]);
});

test('the CA and the admin certificate start a day before the build: a node whose clock is hours behind the host accepts them', () => {
  const dir = join(ws.outDir, 'pki');
  const hour = 3_600_000;
  const built = Date.now();
  for (const name of ['ca.crt', 'admin.crt']) {
    const cert = new X509Certificate(readFileSync(join(dir, name)));
    const backdate = (built - Date.parse(cert.validFrom)) / hour;
    // The stage ran moments ago: NotBefore is certificateBackdateHours before that.
    assert.ok(backdate >= certificateBackdateHours && backdate < certificateBackdateHours + 0.5, `${name}: NotBefore ${cert.validFrom}, ${backdate.toFixed(2)} h before now`);
  }
  // The chain as a node checks it, at the node's clock: 14 h behind (a bare-metal RTC kept in
  // local time, read as UTC) and 23 h behind pass; a day and more fails as "not yet valid".
  const verifyAt = (hoursBehind: number) =>
    spawnSync('openssl', ['verify', '-attime', String(Math.floor((built - hoursBehind * hour) / 1000)), '-CAfile', join(dir, 'ca.crt'), join(dir, 'admin.crt')], { encoding: 'utf8' });
  for (const behind of [0, 14, 23]) {
    const result = verifyAt(behind);
    assert.is(result.status, 0, `${behind} h behind: ${result.stdout}${result.stderr}`);
  }
  const early = verifyAt(certificateBackdateHours + 1);
  assert.is.not(early.status, 0);
  assert.match(early.stdout + early.stderr, /certificate is not yet valid/);
  // Both keep their length from now on: ten years for the CA.
  const ca = new X509Certificate(readFileSync(join(dir, 'ca.crt')));
  assert.ok(Math.abs(Date.parse(ca.validTo) - (built + 3650 * day)) < hour, ca.validTo);
});

test('opensslTime: the GeneralizedTime openssl ca -startdate takes', () => {
  assert.is(opensslTime(new Date('2026-12-07T01:02:03.456Z')), '20261207010203Z');
});

test('the CA and the token survive a forced rebuild and a make clean', async () => {
  const dir = join(ws.outDir, 'pki');
  const before = ['ca.crt', 'ca.key', 'bootstrap-token'].map((f) => readFileSync(join(dir, f), 'utf8'));
  await pki(ws, { force: true });
  assert.equal(['ca.crt', 'ca.key', 'bootstrap-token'].map((f) => readFileSync(join(dir, f), 'utf8')), before);
  // `make clean` in a tree of its own: everything in out/ goes but the CA and kubeconfig.
  const tree = join(work, 'clean');
  mkdirSync(join(tree, 'out', 'pki'), { recursive: true });
  mkdirSync(join(tree, 'out', 'images'), { recursive: true });
  writeFileSync(join(tree, 'out', 'pki', 'ca.key'), 'key');
  writeFileSync(join(tree, 'out', 'kubeconfig'), 'config');
  writeFileSync(join(tree, 'out', 'image-disk.img'), 'disk');
  execFileSync('make', ['-s', '-C', tree, '-f', join(projectRoot, 'Makefile'), 'clean']);
  assert.ok(existsSync(join(tree, 'out', 'pki', 'ca.key')));
  assert.ok(existsSync(join(tree, 'out', 'kubeconfig')));
  assert.not.ok(existsSync(join(tree, 'out', 'image-disk.img')));
  assert.not.ok(existsSync(join(tree, 'out', 'images')));
  execFileSync('make', ['-s', '-C', tree, '-f', join(projectRoot, 'Makefile'), 'clean-pki']);
  assert.not.ok(existsSync(join(tree, 'out', 'pki')));
});

test('the shared control-plane PKI: front-proxy and etcd CAs and the service-account key pair, made once, keys 0600', async () => {
  const dir = join(ws.outDir, 'pki');
  for (const key of ['front-proxy-ca.key', 'etcd-ca.key', 'sa.key']) assert.is(mode(join(dir, key)), 0o600, key);
  const cluster = new X509Certificate(readFileSync(join(dir, 'ca.crt')));
  for (const [cert, key] of [['front-proxy-ca.crt', 'front-proxy-ca.key'], ['etcd-ca.crt', 'etcd-ca.key']] as const) {
    const ca = new X509Certificate(readFileSync(join(dir, cert)));
    assert.ok(ca.ca, `${cert} is a CA`);
    assert.ok(ca.verify(ca.publicKey), `${cert} is self-signed`);
    assert.not.ok(ca.checkIssued(cluster) && ca.verify(cluster.publicKey), `${cert} is not the cluster CA's`);
    assert.is(ca.publicKey.export({ type: 'spki', format: 'der' }).toString('hex'), createPublicKey(readFileSync(join(dir, key))).export({ type: 'spki', format: 'der' }).toString('hex'), `${key} is ${cert}'s key`);
  }
  assert.match(readFileSync(join(dir, 'sa.pub'), 'utf8'), /^-----BEGIN PUBLIC KEY-----\n/);
  assert.is(createPublicKey(readFileSync(join(dir, 'sa.key'))).export({ type: 'spki', format: 'pem' }), readFileSync(join(dir, 'sa.pub'), 'utf8'));
  const names = ['front-proxy-ca.crt', 'front-proxy-ca.key', 'etcd-ca.crt', 'etcd-ca.key', 'sa.key', 'sa.pub'];
  const before = names.map((f) => readFileSync(join(dir, f), 'utf8'));
  await pki(ws, { force: true });
  assert.equal(names.map((f) => readFileSync(join(dir, f), 'utf8')), before, 'kept across a forced rebuild');
});

test('an admin certificate about to expire is renewed by the next build; the CA stays', async () => {
  const dir = join(ws.outDir, 'pki');
  const ca = readFileSync(join(dir, 'ca.crt'), 'utf8');
  execFileSync('openssl', ['req', '-new', '-key', join(dir, 'admin.key'), '-subj', `/O=${adminGroup}/CN=old`, '-out', join(work, 'old.csr')]);
  execFileSync('openssl', ['x509', '-req', '-in', join(work, 'old.csr'), '-CA', join(dir, 'ca.crt'), '-CAkey', join(dir, 'ca.key'), '-CAcreateserial', '-CAserial', join(work, 'srl'), '-days', '3', '-out', join(dir, 'admin.crt')]);
  const report = await pki(ws);
  assert.equal(report.ran, ['pki'], 'the expiring certificate made the stage stale');
  const renewed = new X509Certificate(readFileSync(join(dir, 'admin.crt')));
  assert.ok(Date.parse(renewed.validTo) - Date.now() > 300 * day);
  assert.is(readFileSync(join(dir, 'ca.crt'), 'utf8'), ca);
  assert.equal((await pki(ws)).ran, [], 'then fresh');
});

test('a CA key that does not match its certificate stops the build and says how to start over', async () => {
  const other = workspace();
  await pki(other);
  execFileSync('openssl', ['genrsa', '-out', join(other.outDir, 'pki', 'ca.key'), '2048'], { stdio: 'ignore' });
  try {
    await pki(other, { force: true });
    assert.unreachable('a broken CA was accepted');
  } catch (error) {
    assert.match((error as Error).message, /pki\/ca\.key is not the key of .*pki\/ca\.crt: the CA is broken/);
    assert.match((error as Error).message, /make clean-pki/);
  }
});

test.run();
