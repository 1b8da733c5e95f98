// The openstack planner alone (pure: desired resources + what exists → client calls):
// an existing network, a given floating IP, a stale image disk, an upload cut short,
// down's order, and the user-data limit at its exact edge.
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { parseCidr } from '../tasks/lib/inputs/net.ts';
import { checkUserData, emptyObserved, formatCall, openstackSshArgs, planDown, planUp, userDataLimit, type Desired, type Observed } from '../tasks/openstack.ts';

const dir = mkdtempSync(join(tmpdir(), 'corekube-osplan-'));
mkdirSync(join(dir, 'ignition'));

function desired(overrides: Partial<Desired['os']> = {}): Desired {
  const os = { cloud: 'corp', flavors: { 'control-plane': 'm1.large', worker: 'm1.medium' }, adminCidr: parseCidr('192.0.2.0/24')!, ...overrides } as Desired['os'];
  const node = (name: string, role: 'control-plane' | 'worker', ip: string) => {
    const userData = join(dir, 'ignition', `${name}.ign`);
    writeFileSync(userData, '{"ignition":{"version":"3.3.0"}}');
    return { node: { name, role, ip, cpus: 2, memoryMiB: 4096 }, server: `c-${name}`, port: `c-${name}`, volume: `c-${name}-disk`, mac: '52:54:00:00:00:01', flavor: os.flavors[role], userData, userDataSha: 'ign-' + name };
  };
  return {
    cluster: 'c',
    os,
    createNetwork: os.network === undefined,
    network: os.network ?? 'c-net',
    subnet: 'c-subnet',
    ...(os.network === undefined && os.floatingIp ? { router: 'c-router' } : {}),
    nodeCidr: '10.77.0.0/24',
    gateway: '10.77.0.1',
    securityGroup: 'c-nodes',
    fcosImage: { name: 'corekube-fcos-aaaa', file: '/x/fcos.qcow2', sha256: 'a'.repeat(64), diskFormat: 'qcow2', sizeBytes: 1 },
    diskImage: { name: 'corekube-disk-bbbb', file: '/x/disk.img', sha256: 'b'.repeat(64), diskFormat: 'raw', sizeBytes: 1 },
    volumeGiB: 1,
    nodes: [node('cp1', 'control-plane', '10.77.0.10'), node('w1', 'worker', '10.77.0.21')],
    controlPlane: 'c-cp1',
  };
}

const lines = (calls: ReturnType<typeof planUp>) => calls.map((c) => formatCall(c, undefined));

test('an existing network: no network, subnet or router is created; the ports go on it', () => {
  const calls = lines(planUp(desired({ network: 'lab-net', floatingIp: { network: 'public' } }), emptyObserved()));
  assert.not.ok(calls.some((l) => /network create|subnet create|router /.test(l)), calls.join('\n'));
  assert.ok(calls.some((l) => /port create --network lab-net --fixed-ip ip-address=10\.77\.0\.10 /.test(l)));
});

test('a given floating IP is attached and tagged, and down detaches it without releasing it', () => {
  const d = desired({ floatingIp: { network: 'public', address: '203.0.113.7' } });
  const calls = lines(planUp(d, emptyObserved()));
  assert.ok(calls.includes('openstack floating ip set --port c-cp1 203.0.113.7'), calls.join('\n'));
  assert.not.ok(calls.some((l) => l.includes('floating ip create')));
  const o: Observed = { ...emptyObserved(), floatingIps: [{ id: 'f1', address: '203.0.113.7', port: 'p1' }], ports: [{ id: 'p1', name: 'c-cp1' }] };
  assert.not.ok(lines(planUp(d, o)).some((l) => l.includes('floating ip')), 'already on the port');
  const down = lines(planDown(d, o));
  assert.ok(down.includes('openstack floating ip unset --port --tag c f1'), down.join('\n'));
  assert.not.ok(down.some((l) => l.includes('floating ip delete')));
});

test('an image disk from another build: the server goes, the volume is made again; an upload cut short is deleted first', () => {
  const d = desired();
  const o: Observed = {
    ...emptyObserved(),
    images: [
      { id: 'i1', name: 'corekube-fcos-aaaa', status: 'active', tags: ['c'] },
      { id: 'i2', name: 'corekube-disk-bbbb', status: 'queued', tags: ['c'] },
    ],
    servers: [{ id: 's1', name: 'c-cp1', status: 'active', properties: { 'corekube-ignition': 'ign-cp1' } }],
    volumes: [{ id: 'v1', name: 'c-cp1-disk', status: 'in-use', properties: { 'corekube-cluster': 'c', 'corekube-disk': 'old' }, attachedTo: ['s1'] }],
  };
  const calls = lines(planUp(d, o));
  const at = (pattern: RegExp) => calls.findIndex((l) => pattern.test(l));
  assert.ok(at(/image delete i2/) >= 0 && at(/image delete i2/) < at(/image create --disk-format raw/), calls.join('\n'));
  assert.not.ok(calls.some((l) => /image create --disk-format qcow2/.test(l)), 'the active FCOS image is reused');
  assert.ok(at(/server delete --wait s1/) < at(/volume delete v1/));
  assert.ok(at(/volume delete v1/) < at(/volume create .* c-cp1-disk/));
  assert.ok(at(/volume create .* c-cp1-disk/) < at(/server create .* c-cp1/));
});

test('down: servers first, then floating IPs, ports, volumes, the router, subnet, network, group; images only with purge', () => {
  const o: Observed = {
    ...emptyObserved(),
    images: [{ id: 'i1', name: 'corekube-fcos-aaaa', status: 'active', tags: ['c'] }],
    networks: [{ id: 'n1', name: 'c-net' }],
    subnets: [{ id: 'sn1', name: 'c-subnet' }],
    routers: [{ id: 'r1', name: 'c-router', gateway: true, interfaces: true }],
    securityGroups: [{ id: 'g1', name: 'c-nodes' }],
    ports: [{ id: 'p1', name: 'c-cp1' }],
    floatingIps: [{ id: 'f1', address: '203.0.113.9', port: 'p1' }],
    volumes: [{ id: 'v1', name: 'c-cp1-disk', status: 'in-use', properties: {}, attachedTo: ['s1'] }],
    servers: [{ id: 's1', name: 'c-cp1', status: 'active', properties: {} }],
  };
  const verbs = planDown(desired({ floatingIp: { network: 'public' } }), o).map((c) => c.args.slice(0, c.args[0] === 'security' || c.args[0] === 'floating' ? 3 : 2).join(' '));
  assert.equal(verbs, ['server delete', 'floating ip delete', 'port delete', 'volume delete', 'router unset', 'router remove', 'router delete', 'subnet delete', 'network delete', 'security group delete']);
  assert.ok(planDown(desired(), o, { purge: true }).some((c) => c.args.join(' ') === 'image delete i1'));
});

test('user data: exactly at the limit passes, one byte over is refused', () => {
  const d = desired();
  // The largest size whose base64 (4 bytes per 3, padded) fits in 65535: 49149 bytes → 65532.
  const largest = 3 * Math.floor(userDataLimit / 4);
  assert.is(largest, 49149);
  writeFileSync(d.nodes[1]!.userData, Buffer.alloc(largest, 'a'));
  checkUserData(d);
  writeFileSync(d.nodes[1]!.userData, Buffer.alloc(largest + 1, 'a'));
  assert.throws(() => checkUserData(d), /w1: .* in base64/);
});

test('make ssh on the cloud: the control plane by its floating IP, the others through it', () => {
  const config = { openstack: { floatingIp: { network: 'public', address: '203.0.113.7' } } } as unknown as Parameters<typeof openstackSshArgs>[0];
  const cp = { name: 'cp1', role: 'control-plane', ip: '10.77.0.10', cpus: 2, memoryMiB: 4096 } as const;
  const w1 = { name: 'w1', role: 'worker', ip: '10.77.0.21', cpus: 2, memoryMiB: 2048 } as const;
  assert.equal(openstackSshArgs(config, cp).slice(-1), ['core@203.0.113.7']);
  assert.equal(openstackSshArgs(config, w1, ['uptime']).slice(-4), ['-J', 'core@203.0.113.7', 'core@10.77.0.21', 'uptime']);
});

test.after(() => rmSync(dir, { recursive: true, force: true }));
test.run();
