// The FCOS OpenStack path of a node's Ignition, for real: corekube's own configs for an
// openstack cluster, each put on a config drive as Nova makes it (ISO9660, label
// config-2, openstack/latest/user_data) and read by the real Ignition with
// -platform=openstack (test/fixtures/configdrive.ts), then applied to a scratch root.
// The trees must be exactly those of the fw_cfg path (-platform=file), which
// ignition.test.ts checks file by file; the metadata service is never reachable.
import { createHash } from 'node:crypto';
import { lstatSync, mkdtempSync, readFileSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { parseAllDocuments } from 'yaml';
import { runStages } from '../tasks/lib/run/engine.ts';
import { ignitionStage } from '../tasks/ignition.ts';
import { checkUserData, desiredResources, userDataLimit } from '../tasks/openstack.ts';
import { pkiStage } from '../tasks/pki.ts';
import { applyFromConfigDrive, makeConfigDrive } from './fixtures/configdrive.ts';
import { applyIgnition } from './fixtures/ignition.ts';
import { buildUpstreamTree, type UpstreamTree } from './fixtures/upstream.ts';
import { listFiles, loud, makeWorkspace, projectImages, type Workspace } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-configdrive-'));
const version = 'v1.35.7';
let tree: UpstreamTree;
let ws: Workspace;

test.before(loud(async () => {
  tree = await buildUpstreamTree(join(work, 'upstream'), { qcow2SizeMiB: 1, kubernetesVersion: version });
  // The lock's images by made-up digests: the ignition stage reads only their names.
  const images = projectImages(version).map((i) => `${i.name}:${i.tag}@sha256:${createHash('sha256').update(`${i.name}:${i.tag}`).digest('hex')}`);
  ws = makeWorkspace(tree, 'http://127.0.0.1:9', {
    nodes: ['{name: cp1, role: control-plane, ip: 10.77.0.10}', '{name: w1, role: worker, ip: 10.77.0.21, memory: 2GiB}'],
    images,
    extraConfig: ['target: openstack', 'openstack: {cloud: test, flavors: {controlPlane: m1.large, worker: m1.medium}, adminCidr: 192.0.2.0/24, floatingIp: {network: public, address: 203.0.113.7}}'],
  });
  const os = tree.artifacts['fcos-openstack']!;
  const lock = readFileSync(ws.lockFile, 'utf8').replace(
    /^images:/m,
    `  fcos-openstack:\n    url: ${os.upstreamUrl}\n    sha256: ${os.sha256}\n    uncompressedSha256: ${os.uncompressedSha256}\nimages:`,
  );
  writeFileSync(ws.lockFile, lock);
  await runStages(ws.context(), [pkiStage, ignitionStage], { renderer: 'silent' });
}));

test.after(() => {
  if (ws) rmSync(ws.dir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
});

/** Every file's path, mode, owner and content (or link target), for comparing two applied roots. */
function describeTree(root: string): Record<string, string> {
  const out: Record<string, string> = {};
  // .ignition-result.json records when Ignition ran: it differs between any two runs.
  for (const path of listFiles(root).filter((p) => p !== 'etc/.ignition-result.json')) {
    const file = join(root, path);
    const info = lstatSync(file);
    // Ignition writes the preset's lines in Go's map order, which differs from run to run.
    const content = path.endsWith('.preset') ? readFileSync(file, 'utf8').split('\n').sort().join('\n') : readFileSync(file);
    const what = info.isSymbolicLink() ? `-> ${readlinkSync(file)}` : createHash('sha256').update(content).digest('hex');
    out[path] = `${(info.mode & 0o7777).toString(8)} ${info.uid}:${info.gid} ${what}`;
  }
  return out;
}

test('corekube\'s real configs fit Nova\'s user data limit', async () => {
  const ctx = ws.context();
  const desired = await desiredResources(ctx.config, ctx.lock, ws.outDir, { dryRun: true });
  checkUserData(desired);
  for (const node of ['cp1', 'w1']) {
    const size = readFileSync(join(ws.outDir, 'ignition', `${node}.ign`)).length;
    assert.ok(4 * Math.ceil(size / 3) <= userDataLimit, `${node}: ${size} bytes`);
  }
});

test('each node\'s Ignition from a config drive, read by the real Ignition (-platform=openstack), gives the fw_cfg path\'s tree', async () => {
  for (const node of ['cp1', 'w1']) {
    const ign = join(ws.outDir, 'ignition', `${node}.ign`);
    const bytes = readFileSync(ign);
    const drive = await makeConfigDrive(bytes, work);
    const fromDrive = await applyFromConfigDrive(drive, work);
    const fromFile = await applyIgnition(ign, work);
    // The exact bytes came off the drive: Ignition logs the SHA512 of the config it parsed.
    assert.match(fromDrive.fetchLog, new RegExp(`parsing config with SHA512: ${createHash('sha512').update(bytes).digest('hex')}`));
    assert.match(fromDrive.fetchLog, /op\(\d+\): \[finished\] mounting config drive/);
    assert.match(fromDrive.fetchLog, /fetch: fetch passed/);
    // Every attempt at the metadata service failed before leaving this network namespace.
    const attempts = fromDrive.fetchLog.split('\n').filter((l) => l.includes('169.254.169.254') && l.includes('GET error'));
    assert.ok(attempts.every((l) => /network is unreachable/.test(l)), attempts.join('\n'));
    const a = describeTree(fromDrive.root);
    const b = describeTree(fromFile.root);
    assert.ok(Object.keys(a).length > 20, `${node}: ${Object.keys(a).length} files applied`);
    assert.equal(a, b, `${node}: the same tree as the fw_cfg path`);
    assert.is(readFileSync(join(fromDrive.root, 'etc', 'hostname'), 'utf8'), `${node}\n`);
  }
});

test('the floating IP is in the API server certificate and in out/kubeconfig', () => {
  const [, cluster] = parseAllDocuments(readFileSync(join(ws.outDir, 'files', 'cp1', 'kubeadm.yaml'), 'utf8')).map((d) => d.toJS());
  assert.ok(cluster.apiServer.certSANs.includes('203.0.113.7'), JSON.stringify(cluster.apiServer.certSANs));
  assert.match(readFileSync(join(ws.outDir, 'kubeconfig'), 'utf8'), /server: https:\/\/203\.0\.113\.7:6443/);
});

test.run();
