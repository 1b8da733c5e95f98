// The openstack target against a real Keystone and a real Glance (Debian's packages, on
// 127.0.0.1) with the real `openstack` client, and a recorder standing in for Nova,
// Neutron and Cinder (test/fixtures/openstack-standin.ts: they cannot run here, see the
// README). From nothing, a rerun that creates nothing, `make boot` rebuilding every
// server, a quota failure halfway then a resume, down (and PURGE), user data too large
// refused before any request, DRY_RUN printing every call.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { runStages } from '../tasks/lib/run/engine.ts';
import { macAddress } from '../tasks/lib/node/node-config.ts';
import { openstackBootStage, openstackModes, planUp, emptyObserved, desiredResources, type UpMode } from '../tasks/openstack.ts';
import { RunContext, type RunSettings } from '../tasks/lib/run/stage.ts';
import { cloudAvailable, startCloud, type Cloud } from './fixtures/openstack.ts';
import { cliPath, loud, projectRoot, runCli } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-openstack-'));
let cloud: Cloud;
const sha256 = (data: Buffer | string) => createHash('sha256').update(data).digest('hex');

// One small real qcow2 stands in for the FCOS openstack image (its sha256 is in the lock).
const qcow2 = join(work, 'fcos-openstack.qcow2');
execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', qcow2, '64M']);
const qcow2Sha = sha256(readFileSync(qcow2));
const release = '43.20260802.3.1';
const osFile = `fedora-coreos-${release}-openstack.x86_64.qcow2`;

function lockText(): string {
  const fake = (n: string) => sha256(n);
  const keys = ['kubeadm', 'kubelet', 'kubectl', 'crictl', 'containerd', 'runc', 'cni-plugins', 'butane'];
  return [
    'lockVersion: 1',
    `fcos: {stream: stable, release: ${release}, arch: x86_64}`,
    'kubernetes: {version: v1.35.7}',
    'artifacts:',
    `  fcos-qemu: {url: "https://builds.coreos.fedoraproject.org/prod/streams/stable/builds/${release}/x86_64/fedora-coreos-${release}-qemu.x86_64.qcow2.xz", sha256: ${fake('q')}, uncompressedSha256: ${fake('qu')}}`,
    ...keys.map((k) => `  ${k}: {url: "https://example.invalid/${k}", sha256: ${fake(k)}}`),
    `  fcos-openstack: {url: "https://builds.coreos.fedoraproject.org/prod/streams/stable/builds/${release}/x86_64/${osFile}.xz", sha256: ${fake('o')}, uncompressedSha256: ${qcow2Sha}}`,
    'images: []',
    '',
  ].join('\n');
}

interface Ws {
  dir: string;
  name: string;
  config: string;
  settings: RunSettings;
  ignition(node: string): string;
}

/** A tree with cluster.yaml (target openstack), the lock, and out/ as ignition and disk leave it. */
function workspace(name: string, openstack: string, nodes = ['{name: cp1, role: control-plane, ip: 10.77.0.10}', '{name: w1, role: worker, ip: 10.77.0.21, memory: 2GiB}']): Ws {
  const dir = mkdtempSync(join(work, `${name}-`));
  writeFileSync(join(dir, 'id.pub'), 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGNvcmVrdWJldGVzdGtleQ test@corekube\n');
  const config = join(dir, 'cluster.yaml');
  writeFileSync(config, [`name: ${name}`, 'target: openstack', 'kubernetes: {version: v1.35.7}', 'nodes:', ...nodes.map((n) => `  - ${n}`), 'sshPublicKeyFile: id.pub', `openstack: ${openstack}`, ''].join('\n'));
  writeFileSync(join(dir, 'lock.yaml'), lockText());
  const out = join(dir, 'out');
  mkdirSync(join(out, 'ignition'), { recursive: true });
  mkdirSync(join(out, 'artifacts'), { recursive: true });
  writeFileSync(join(out, 'artifacts', osFile), readFileSync(qcow2));
  writeFileSync(join(out, 'image-disk.img'), Buffer.alloc(256 * 1024, name));
  for (const node of ['cp1', 'w1']) {
    writeFileSync(join(out, 'ignition', `${node}.ign`), JSON.stringify({ ignition: { version: '3.3.0' }, storage: { files: [{ path: '/etc/hostname', contents: { source: `data:,${node}` }, mode: 420 }] } }));
  }
  const settings: RunSettings = {
    root: projectRoot,
    outDir: out,
    cacheDir: join(dir, 'cache'),
    configFile: config,
    lockFile: join(dir, 'lock.yaml'),
    offline: false,
    force: false,
    jobs: 2,
    http: { retries: 1, stallTimeoutMs: 1000, backoffMs: 10 },
    interactive: false,
  };
  return { dir, name, config, settings, ignition: (node) => join(out, 'ignition', `${node}.ign`) };
}

const cliArgs = (ws: Ws) => ['--config', ws.config, '--lock', ws.settings.lockFile, '--out', ws.settings.outDir, '--cache', ws.settings.cacheDir, '--renderer', 'simple'];

async function up(ws: Ws, mode: UpMode): Promise<void> {
  const ctx = new RunContext(ws.settings, new AbortController().signal);
  openstackModes.set(ctx, mode);
  await runStages(ctx, [openstackBootStage], { renderer: 'silent' });
}

async function upError(ws: Ws, mode: UpMode): Promise<Error> {
  try {
    await up(ws, mode);
  } catch (error) {
    return error as Error;
  }
  throw new Error('up succeeded where it should have failed');
}

const mutations = () => cloud.standIn.requests.filter((r) => r.method !== 'GET');
const glanceWrites = () => cloud.glanceRequests.filter((line) => !line.startsWith('GET '));
const tagged = (collection: string, tag: string) => cloud.standIn.state[collection]!.filter((i) => (i.tags as string[]).includes(tag));
const volumesOf = (name: string) => cloud.standIn.state.volumes!.filter((v) => (v.metadata as Record<string, string>)['corekube-cluster'] === name);
const resetRecords = () => {
  cloud.standIn.requests.length = 0;
  cloud.glanceRequests.length = 0;
  cloud.keystoneRequests.length = 0;
};

test.before(loud(async () => {
  const missing = cloudAvailable();
  if (missing) throw new Error(`the openstack tests need Keystone, Glance and the client: ${missing}`);
  cloud = await startCloud(work);
  process.env.OS_CLIENT_CONFIG_FILE = cloud.cloudsYaml;
  delete process.env.OS_CLOUD;
}));

test.after(async () => {
  await cloud?.close();
  rmSync(work, { recursive: true, force: true });
});

const demoOpenstack = '{cloud: test, flavors: {controlPlane: m1.large, worker: m1.medium}, adminCidr: 192.0.2.0/24, floatingIp: {network: public}}';

test('user data over Nova\'s 64 KiB (after base64) is refused before any request, naming the node', async () => {
  const ws = workspace('big', demoOpenstack);
  writeFileSync(ws.ignition('w1'), JSON.stringify({ ignition: { version: '3.3.0' }, padding: 'x'.repeat(50_000) }));
  resetRecords();
  const result = await runCli([...cliArgs(ws), '--only', 'boot'], { env: { OS_CLIENT_CONFIG_FILE: cloud.cloudsYaml } });
  assert.is(result.code, 3, result.stderr);
  assert.match(result.stderr, /at most 65535 bytes of user data after base64/);
  assert.match(result.stderr, /w1: .*w1\.ign is 500\d\d bytes, 6\d{4} in base64/);
  assert.not.match(result.stderr, /cp1:/);
  assert.equal([cloud.standIn.requests, cloud.keystoneRequests, cloud.glanceRequests], [[], [], []], 'no request reached any service');
});

test('DRY_RUN prints every call from nothing and makes none', async () => {
  const ws = workspace('dry', demoOpenstack);
  resetRecords();
  const result = await runCli([...cliArgs(ws), '--only', '--dry-run', 'boot'], { env: { OS_CLIENT_CONFIG_FILE: cloud.cloudsYaml } });
  assert.is(result.code, 0, result.stderr);
  const lines = result.stdout.split('\n').map((l) => l.trim()).filter((l) => l.startsWith('openstack --'));
  for (const wanted of [
    /image create --disk-format qcow2 .* corekube-fcos-/,
    /image create --disk-format raw .* corekube-disk-/,
    /network create --tag dry dry-net/,
    /subnet create --network dry-net --subnet-range 10\.77\.0\.0\/24 --gateway 10\.77\.0\.1 --no-dhcp/,
    /security group rule create .*--dst-port 22 --remote-ip 192\.0\.2\.0\/24 dry-nodes/,
    new RegExp(`port create .*--fixed-ip ip-address=10\\.77\\.0\\.21 --mac-address ${macAddress('dry', 'w1', 'cluster')}`),
    /volume create --image corekube-disk-\S+ --size 1 .* dry-cp1-disk/,
    /server create .*--user-data \S+\/ignition\/cp1\.ign --use-config-drive .*--tag dry --wait dry-cp1/,
    /server add volume dry-w1 dry-w1-disk/,
    /floating ip create --port dry-cp1 --tag dry public/,
  ]) {
    assert.ok(lines.some((l) => wanted.test(l)), `${wanted} in:\n${lines.join('\n')}`);
  }
  assert.ok(lines.every((l) => l.startsWith('openstack --os-cloud test ')), 'every call names the cloud');
  assert.equal([cloud.standIn.requests, cloud.keystoneRequests, cloud.glanceRequests], [[], [], []], 'nothing was asked');
});

let demo: Ws;

test('from nothing: images uploaded once, network, group, ports, volumes, servers with their Ignition, a floating IP: all tagged', async () => {
  demo = workspace('demo', demoOpenstack);
  resetRecords();
  await up(demo, 'up');
  const images = await cloud.images();
  const fcos = images.filter((i) => i.name === `corekube-fcos-${qcow2Sha.slice(0, 16)}`);
  const disk = images.filter((i) => i.name.startsWith('corekube-disk-'));
  assert.is(fcos.length, 1, JSON.stringify(images));
  assert.is(disk.length, 1);
  assert.is(fcos[0]!.status, 'active');
  assert.ok(fcos[0]!.tags.includes('demo') && disk[0]!.tags.includes('demo'));
  const state = cloud.standIn.state;
  assert.equal(tagged('networks', 'demo').map((n) => n.name), ['demo-net']);
  const [subnet] = tagged('subnets', 'demo');
  assert.equal([subnet!.name, subnet!.cidr, subnet!.gateway_ip, subnet!.enable_dhcp], ['demo-subnet', '10.77.0.0/24', '10.77.0.1', false]);
  const [router] = tagged('routers', 'demo');
  assert.is((router!.external_gateway_info as { network_id: string }).network_id, state.networks!.find((n) => n.name === 'public')!.id);
  const [group] = tagged('security-groups', 'demo');
  const rules = state['security-group-rules']!.filter((r) => r.security_group_id === group!.id);
  assert.equal(
    rules.map((r) => `${r.direction} ${r.protocol} ${r.port_range_min ?? ''} ${r.remote_ip_prefix ?? ''} ${r.remote_group_id === group!.id ? 'group' : ''}`).sort(),
    ['ingress null   group', 'ingress tcp 22 192.0.2.0/24 ', 'ingress tcp 6443 192.0.2.0/24 '].sort(),
  );
  const ports = tagged('ports', 'demo');
  assert.equal(ports.map((p) => p.name).sort(), ['demo-cp1', 'demo-w1']);
  for (const [node, ip] of [['cp1', '10.77.0.10'], ['w1', '10.77.0.21']] as const) {
    const port = ports.find((p) => p.name === `demo-${node}`)!;
    assert.is(port.mac_address, macAddress('demo', node, 'cluster'), 'the MAC the keyfile names');
    assert.is((port.fixed_ips as { ip_address: string }[])[0]!.ip_address, ip);
    assert.equal(port.security_groups, [group!.id]);
    const server = state.servers!.find((s) => s.name === `demo-${node}`)!;
    assert.is(Buffer.from(server.user_data as string, 'base64').toString(), readFileSync(demo.ignition(node), 'utf8'), 'the node\'s Ignition, byte for byte');
    assert.is(server.config_drive, 'True');
    assert.equal(server.tags, ['demo']);
    assert.is((server.metadata as Record<string, string>)['corekube-ignition'], sha256(readFileSync(demo.ignition(node))).slice(0, 16));
    assert.is(port.device_id, server.id);
    const volume = volumesOf('demo').find((v) => v.name === `demo-${node}-disk`)!;
    assert.is(volume.readonly, true, 'read-only');
    assert.equal((volume.attachments as { server_id: string }[]).map((a) => a.server_id), [server.id]);
    assert.is(volume.imageRef, disk[0]!.id);
  }
  const fips = tagged('floatingips', 'demo');
  assert.is(fips.length, 1);
  assert.is(fips[0]!.port_id, ports.find((p) => p.name === 'demo-cp1')!.id);
  assert.is(state.servers!.length, 2);
  const upState = JSON.parse(readFileSync(join(demo.settings.outDir, 'openstack', 'up.json'), 'utf8'));
  assert.is(upState.apiServer, `https://${fips[0]!.floating_ip_address as string}:6443`);
});

test('a rerun creates nothing: every resource is found by its tag or name', async () => {
  resetRecords();
  await up(demo, 'up');
  assert.equal(mutations().map((r) => `${r.method} ${r.service}${r.path}`), []);
  assert.equal(glanceWrites(), [], 'no image uploaded again');
  assert.is(cloud.standIn.state.servers!.length, 2);
});

test('make boot rebuilds every server from the FCOS image (first boot again); a changed Ignition gets a new server', async () => {
  const before = cloud.standIn.state.servers!.map((s) => s.id).sort();
  resetRecords();
  await up(demo, 'boot');
  const rebuilds = mutations().filter((r) => r.path.endsWith('/action') && (r.body as { rebuild?: unknown }).rebuild);
  assert.is(rebuilds.length, 2, JSON.stringify(mutations().map((r) => `${r.method} ${r.path}`)));
  assert.equal(cloud.standIn.state.servers!.map((s) => s.id).sort(), before, 'the same servers');
  writeFileSync(demo.ignition('w1'), JSON.stringify({ ignition: { version: '3.3.0' }, storage: { files: [{ path: '/etc/hostname', contents: { source: 'data:,w1-changed' }, mode: 420 }] } }));
  resetRecords();
  await up(demo, 'up');
  assert.equal(mutations().map((r) => `${r.method} ${r.service}${r.path.replace(/[0-9a-f-]{36}/g, 'ID')}`), ['DELETE compute/servers/ID', 'POST compute/servers', 'POST compute/servers/ID/os-volume_attachments']);
  const w1 = cloud.standIn.state.servers!.find((s) => s.name === 'demo-w1')!;
  assert.match(Buffer.from(w1.user_data as string, 'base64').toString(), /w1-changed/);
});

test('a quota failure halfway names the resource; the rerun resumes and creates nothing twice', async () => {
  const ws = workspace('half', '{cloud: test, flavors: {controlPlane: m1.large, worker: m1.medium}, adminCidr: 192.0.2.0/24}');
  cloud.standIn.inject({
    match: (r) => r.method === 'POST' && r.path === '/volumes' && (r.body as { volume: { name: string } }).volume.name === 'half-w1-disk',
    status: 413,
    body: { overLimit: { code: 413, message: 'VolumeLimitExceeded: Maximum number of volumes allowed (1) exceeded for quota \'volumes\'.', retryAfter: '0' } },
  });
  resetRecords();
  const error = await upError(ws, 'up');
  cloud.standIn.inject(undefined);
  assert.match(error.message, /refused volume half-w1-disk \(quota or capacity\): .*VolumeLimitExceeded/);
  assert.match(error.message, /openstack --os-cloud test volume create .* half-w1-disk -f json/);
  assert.equal(cloud.standIn.state.servers!.filter((s) => String(s.name).startsWith('half-')).map((s) => s.name), ['half-cp1'], 'stopped at the failure');
  resetRecords();
  await up(ws, 'up');
  const created = mutations().filter((r) => r.method === 'POST' && !r.path.includes('/action') && !r.path.includes('os-volume_attachments')).map((r) => `${r.service}${r.path}`);
  assert.equal(created, ['volume/volumes', 'compute/servers'], 'only what was missing');
  assert.equal(glanceWrites(), [], 'the images the first run uploaded are reused');
  for (const [collection, count] of [['networks', 1], ['subnets', 1], ['ports', 2], ['security-groups', 1]] as const) {
    assert.is(tagged(collection, 'half').length, count, collection);
  }
  assert.is(volumesOf('half').length, 2);
  assert.is(cloud.standIn.state.servers!.filter((s) => String(s.name).startsWith('half-')).length, 2);
});

test('down deletes exactly what up created (the images stay); PURGE=1 removes them too; nothing tagged is left', async () => {
  const others = cloud.standIn.state.servers!.filter((s) => String(s.name).startsWith('half-')).length;
  const result = await runCli(['down', ...cliArgs(demo)], { env: { OS_CLIENT_CONFIG_FILE: cloud.cloudsYaml } });
  assert.is(result.code, 0, result.stderr);
  for (const collection of ['networks', 'subnets', 'routers', 'security-groups', 'ports', 'floatingips', 'servers']) {
    assert.equal(tagged(collection, 'demo'), [], collection);
  }
  assert.equal(volumesOf('demo'), []);
  assert.is(cloud.standIn.state.servers!.filter((s) => String(s.name).startsWith('half-')).length, others, 'another cluster is untouched');
  assert.ok((await cloud.images()).some((i) => i.tags.includes('demo')), 'images are kept without PURGE');
  const purge = await runCli(['down', '--purge', ...cliArgs(demo)], { env: { OS_CLIENT_CONFIG_FILE: cloud.cloudsYaml } });
  assert.is(purge.code, 0, purge.stderr);
  assert.equal((await cloud.images()).filter((i) => i.tags.includes('demo')), []);
  const again = await runCli(['down', ...cliArgs(demo)], { env: { OS_CLIENT_CONFIG_FILE: cloud.cloudsYaml } });
  assert.match(again.stdout, /nothing tagged demo is left on the cloud/);
});

test('the plan is pure: the same inputs and an empty cloud give the same calls', async () => {
  const ws = workspace('pure', demoOpenstack);
  const ctx = new RunContext(ws.settings, new AbortController().signal);
  const d = await desiredResources(ctx.config, ctx.lock, ws.settings.outDir);
  assert.equal(planUp(d, emptyObserved()), planUp(d, emptyObserved()));
  assert.ok(cliPath.endsWith('cli.ts'));
});

test.run();
