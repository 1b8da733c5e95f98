// A control plane that boots blank removes its stale etcd member before it joins:
// control-plane-up.sh's remove_stale_member against a real etcd (Debian's etcd-server) on
// 127.0.0.1, TLS with client certificates as kubeadm sets etcd up (an etcd CA, a server
// certificate, the health-check client certificate the boot script uses). The stale member
// is a learner whose peer URL is the rebooted node's (what a real one would be, minus the
// quorum a voting member would need); the first peer named is dead, the second answers.
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { freePortBlock, loud, projectRoot } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-rejoin-'));
const pki = join(work, 'pki');
const script = join(projectRoot, 'fcc', 'scripts', 'control-plane-up.sh');
let clientPort = 0;
let etcd: ChildProcess | undefined;

const openssl = (...args: string[]) => execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });

/** A CA, and a certificate it signs for NAME with EXTENSIONS. */
function makeCa(dir: string, name: string): void {
  openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-sha256', '-keyout', join(dir, 'ca.key'), '-out', join(dir, 'ca.crt'), '-days', '2', '-subj', `/CN=${name}`);
}
function issue(dir: string, base: string, subject: string, extensions: string): void {
  writeFileSync(join(work, `${base}.ext`), extensions);
  openssl('req', '-new', '-newkey', 'rsa:2048', '-nodes', '-keyout', join(dir, `${base}.key`), '-out', join(work, `${base}.csr`), '-subj', subject);
  openssl('x509', '-req', '-sha256', '-in', join(work, `${base}.csr`), '-CA', join(dir, 'ca.crt'), '-CAkey', join(dir, 'ca.key'), '-CAcreateserial', '-CAserial', join(work, `${base}.srl`), '-days', '2', '-extfile', join(work, `${base}.ext`), '-out', join(dir, `${base}.crt`));
}

function curlEtcd(path: string, body: string): string {
  return execFileSync('curl', ['--silent', '--show-error', '--fail', '--cacert', join(pki, 'etcd', 'ca.crt'), '--cert', join(pki, 'etcd', 'healthcheck-client.crt'), '--key', join(pki, 'etcd', 'healthcheck-client.key'), '-X', 'POST', '--data', body, `https://127.0.0.1:${clientPort}/v3/cluster/member/${path}`], { encoding: 'utf8' });
}

type Members = { members: { ID: string; name?: string; peerURLs: string[]; isLearner?: boolean }[] };
const members = (): Members['members'] => (JSON.parse(curlEtcd('list', '{}')) as Members).members;

/** The boot script's function, sourced as on a node, with this test's paths and ports. */
function removeStale(controlPlanes: string, pkiDir = pki, nodeIp = '10.77.0.10'): { code: number | null; stderr: string } {
  // As the unit runs it: bash with errexit and pipefail (the script sets them), no rc files.
  const result = spawnSync('bash', ['--norc', '--noprofile', '-c', `. "${script}" && remove_stale_member`], {
    encoding: 'utf8',
    env: {
      PATH: process.env.PATH,
      HOME: work,
      COREKUBE_PKI: pkiDir,
      COREKUBE_ETCD_PORT: String(clientPort),
      COREKUBE_NODE_NAME: 'cp1',
      COREKUBE_NODE_IP: nodeIp,
      COREKUBE_CONTROL_PLANES: controlPlanes,
    },
  });
  return { code: result.status, stderr: result.stderr };
}

test.before(loud(async () => {
  mkdirSync(join(pki, 'etcd'), { recursive: true });
  const etcdPki = join(pki, 'etcd');
  makeCa(etcdPki, 'etcd-ca');
  issue(etcdPki, 'server', '/CN=cp2', 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n');
  // kubeadm's health-check client: CN kube-etcd-healthcheck-client, client auth only.
  issue(etcdPki, 'healthcheck-client', '/CN=kube-etcd-healthcheck-client', 'extendedKeyUsage=clientAuth\n');
  const base = await freePortBlock(2);
  clientPort = base;
  const peer = `http://127.0.0.1:${base + 1}`;
  etcd = spawn('etcd', [
    '--name', 'cp2', '--data-dir', join(work, 'data'),
    '--listen-client-urls', `https://127.0.0.1:${clientPort}`, '--advertise-client-urls', `https://127.0.0.1:${clientPort}`,
    '--listen-peer-urls', peer, '--initial-advertise-peer-urls', peer, '--initial-cluster', `cp2=${peer}`,
    '--client-cert-auth', '--trusted-ca-file', join(etcdPki, 'ca.crt'), '--cert-file', join(etcdPki, 'server.crt'), '--key-file', join(etcdPki, 'server.key'),
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  etcd.stderr!.on('data', (chunk) => (log += chunk.toString()));
  const deadline = Date.now() + 60_000;
  for (;;) {
    try {
      if (members().length === 1) break;
    } catch {
      // not serving yet
    }
    if (etcd.exitCode !== null || Date.now() > deadline) throw new Error(`etcd did not serve on 127.0.0.1:${clientPort}:\n${log.slice(-2000)}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}));

test.after(() => {
  etcd?.kill('SIGKILL');
  rmSync(work, { recursive: true, force: true });
});

test('the rebooted node\'s stale member is found by its peer URL and removed through the peer that answers', () => {
  const added = JSON.parse(curlEtcd('add', JSON.stringify({ peerURLs: ['https://10.77.0.10:2380'], isLearner: true }))) as { member: { ID: string } };
  assert.ok(members().some((m) => m.peerURLs[0] === 'https://10.77.0.10:2380'), 'the stale member is there');
  // cp3 (127.0.0.3) does not answer; cp2 does.
  const result = removeStale('cp3=127.0.0.3 cp1=10.77.0.10 cp2=127.0.0.1');
  assert.is(result.code, 0, result.stderr);
  assert.match(result.stderr, `removed the stale etcd member ${BigInt(added.member.ID).toString()} (https://10.77.0.10:2380) through 127.0.0.1`);
  assert.equal(members().map((m) => m.name), ['cp2'], 'only the healthy member is left');
});

test('nothing stale (a first join, or already removed): nothing to do', () => {
  const result = removeStale('cp1=10.77.0.10 cp2=127.0.0.1');
  assert.is(result.code, 0, result.stderr);
  assert.match(result.stderr, 'etcd (through 127.0.0.1) has no member at https://10.77.0.10:2380: nothing stale to remove');
  assert.is(members().length, 1);
});

test('no healthy member answers (no quorum, or none up): it fails, naming the peers it asked', () => {
  const result = removeStale('cp1=10.77.0.10 cp2=127.0.0.2 cp3=127.0.0.3');
  assert.is(result.code, 1);
  assert.match(result.stderr, 'no healthy etcd member answered on any of: 127.0.0.2 127.0.0.3 ');
});

test('a client certificate from another CA is refused by etcd: the member stays', () => {
  // Another peer URL than the first test's: etcd derives a member's ID from its peer URLs
  // and the second it was added (computeMemberID), and refuses an ID it removed (as "member
  // not found"), so the same URL within the same second would fail for etcd's own reason.
  curlEtcd('add', JSON.stringify({ peerURLs: ['https://10.77.0.11:2380'], isLearner: true }));
  const other = join(work, 'other');
  mkdirSync(join(other, 'etcd'), { recursive: true });
  makeCa(join(other, 'etcd'), 'another-ca');
  issue(join(other, 'etcd'), 'healthcheck-client', '/CN=kube-etcd-healthcheck-client', 'extendedKeyUsage=clientAuth\n');
  execFileSync('cp', [join(pki, 'etcd', 'ca.crt'), join(other, 'etcd', 'ca.crt')]);
  const result = removeStale('cp1=10.77.0.11 cp2=127.0.0.1', other, '10.77.0.11');
  assert.is(result.code, 1);
  assert.ok(members().some((m) => m.peerURLs[0] === 'https://10.77.0.11:2380'));
  assert.ok(existsSync(join(other, 'etcd', 'healthcheck-client.crt')));
});

test.run();
