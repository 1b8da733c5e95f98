import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { loadConfig, mirrorUrl, parseConfig } from '../tasks/lib/inputs/config.ts';
import { InputError, UserError } from '../tasks/lib/errors.ts';
import { parseCidr, parseIPv4 } from '../tasks/lib/inputs/net.ts';

const dir = mkdtempSync(join(tmpdir(), 'corekube-config-'));
const keyFile = join(dir, 'id.pub');
writeFileSync(keyFile, 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx0ZXN0a2V5Zm9yY29yZWt1YmV0ZXN0c29ubHkxMjM0 test@corekube\n');
const configFile = join(dir, 'cluster.yaml');

const valid = `
name: demo
kubernetes:
  version: v1.35.7
nodes:
  - {name: cp1, role: control-plane, ip: 10.77.0.10, cpus: 2, memory: 4GiB}
  - {name: w1, role: worker, ip: 10.77.0.21, memory: 2048}
sshPublicKeyFile: id.pub
`;

function problemsOf(text: string): { path: string; expected: string; found: string }[] {
  try {
    parseConfig(configFile, text);
  } catch (error) {
    if (error instanceof InputError) return error.problems;
    throw error;
  }
  assert.unreachable('the config should have been refused');
  return [];
}

function problemAt(text: string, path: string): { expected: string; found: string } {
  const problems = problemsOf(text);
  const hit = problems.find((p) => p.path === path);
  assert.ok(hit, `expected a problem at ${path}, got ${JSON.stringify(problems)}`);
  return hit!;
}

test('a valid config parses into typed values with defaults', () => {
  const config = parseConfig(configFile, valid);
  assert.is(config.name, 'demo');
  assert.is(config.fcos.stream, 'stable');
  assert.is(config.fcos.arch, 'x86_64');
  assert.is(config.kubernetes.version, 'v1.35.7');
  assert.is(config.network.podCidr.text, '10.244.0.0/16');
  assert.equal(config.nodes[0], { name: 'cp1', role: 'control-plane', ip: '10.77.0.10', cpus: 2, memoryMiB: 4096 });
  assert.is(config.nodes[1]!.memoryMiB, 2048);
  assert.is(config.nodes[1]!.cpus, 2);
  assert.is(config.sshPublicKeyFile, keyFile, 'the key path is relative to the config file');
  assert.match(config.sshPublicKey, /^ssh-ed25519 /);
  assert.is(config.mirrors.downloads.kubernetes, 'https://dl.k8s.io');
});

const ha = `
name: demo
kubernetes:
  version: v1.35.7
nodes:
  - {name: cp1, role: control-plane, ip: 10.77.0.10}
  - {name: cp2, role: control-plane, ip: 10.77.0.11}
  - {name: cp3, role: control-plane, ip: 10.77.0.12}
  - {name: w1, role: worker, ip: 10.77.0.21, memory: 2048}
controlPlane:
  endpoint: 10.77.0.5
sshPublicKeyFile: id.pub
`;

test('three control planes behind controlPlane.endpoint; one control plane is its own endpoint', () => {
  const config = parseConfig(configFile, ha);
  assert.equal(config.controlPlane, { endpoint: '10.77.0.5', virtualIp: true });
  assert.equal(parseConfig(configFile, valid).controlPlane, { endpoint: '10.77.0.10', virtualIp: false });
});

test('three control planes: the API server ports (the forwarder, one per control plane) stay clear of the SSH ports', () => {
  assert.equal(parseConfig(configFile, ha).hostPorts, { apiServer: 6443, sshBase: 2222 });
  const clash = problemAt(`${ha}hostPorts: {apiServer: 2219}\n`, 'hostPorts.apiServer');
  assert.match(clash.expected, /a port \(with the ports 2220-2222 above it, one per control plane\) outside the SSH ports 2222-2225/);
  assert.is(parseConfig(configFile, `${ha}hostPorts: {apiServer: 2218}\n`).hostPorts.apiServer, 2218);
});

test('1 or 3 control planes: 2 and 4 are refused, saying why (etcd quorum)', () => {
  const two = ha.replace('  - {name: cp3, role: control-plane, ip: 10.77.0.12}\n', '');
  const p2 = problemAt(two, 'nodes');
  assert.match(p2.expected, /^1 or 3 nodes with role "control-plane": with 2, etcd needs both/);
  assert.match(p2.found, /^2 /);
  const four = ha.replace('  - {name: w1,', '  - {name: cp4, role: control-plane, ip: 10.77.0.13}\n  - {name: w1,');
  assert.match(problemAt(four, 'nodes').expected, /4 survive one failure, as 3 do/);
});

test('controlPlane.endpoint: required with three, refused with one, a free host address of the cluster network', () => {
  const without = ha.replace('controlPlane:\n  endpoint: 10.77.0.5\n', '');
  const missing = problemAt(without, 'controlPlane.endpoint');
  assert.match(missing.expected, /a free address in network\.nodeCidr for the virtual IP of the 3 control planes/);
  assert.is(missing.found, 'nothing');
  assert.match(problemAt(`${valid}controlPlane: {endpoint: 10.77.0.5}\n`, 'controlPlane.endpoint').expected, /nothing with one control plane/);
  const at = (endpoint: string) => problemAt(ha.replace('endpoint: 10.77.0.5', `endpoint: "${endpoint}"`), 'controlPlane.endpoint');
  assert.match(at('10.77.1.5').expected, /a host address inside network\.nodeCidr \(10\.77\.0\.0\/24\)/);
  assert.is(at('10.77.1.5').found, '"10.77.1.5"');
  assert.match(at('10.77.0.255').expected, /inside network\.nodeCidr/, 'the broadcast address');
  assert.match(at('10.77.0.11').expected, /an address no node uses \(it is cp2's\)/);
  assert.match(at('10.77.0.21').expected, /it is w1's/);
  assert.match(at('not-an-ip').expected, /an IPv4 address/);
  // Inside the cluster network is outside the pod and service ranges: those may not overlap it (checked above).
  assert.match(problemAt(`${ha}`.replace('endpoint: 10.77.0.5', 'endpoint: 10.77.0.5\n  vip: x'), 'controlPlane.vip').expected, /./);
});

test('host ports: defaults, and the API port may not collide with the SSH ports', () => {
  assert.equal(parseConfig(configFile, valid).hostPorts, { apiServer: 6443, sshBase: 2222 });
  assert.equal(parseConfig(configFile, `${valid}hostPorts: {apiServer: 7443, sshBase: 3000}\n`).hostPorts, { apiServer: 7443, sshBase: 3000 });
  assert.match(problemAt(`${valid}hostPorts: {apiServer: 2223}\n`, 'hostPorts.apiServer').expected, /outside the SSH ports 2222-2223/);
  assert.match(problemAt(`${valid}hostPorts: {sshBase: 80}\n`, 'hostPorts.sshBase').expected, /from 1024 to/);
});

test('the example config parses (with a key file substituted)', async () => {
  const { readFileSync } = await import('node:fs');
  const example = readFileSync(join(import.meta.dirname, '..', 'cluster.example.yaml'), 'utf8').replace(
    'sshPublicKeyFile: ~/.ssh/id_ed25519.pub',
    'sshPublicKeyFile: id.pub',
  );
  const config = parseConfig(configFile, example);
  assert.is(config.nodes.length, 2);
});

test('a minor version is accepted and normalized with a v', () => {
  const config = parseConfig(configFile, valid.replace('version: v1.35.7', 'version: "1.35"'));
  assert.is(config.kubernetes.version, 'v1.35');
});

test('unknown keys are refused, with a suggestion for a typo', () => {
  const hit = problemAt(valid.replace('name: demo', 'name: demo\nnodez: []'), 'nodez');
  assert.match(hit.expected, /did you mean "nodes"/);
  assert.match(hit.found, /unknown key "nodez"/);
  const nested = problemAt(valid.replace('cpus: 2, memory: 4GiB', 'cpu: 2, memory: 4GiB'), 'nodes[0].cpu');
  assert.match(nested.expected, /cpus/);
});

test('wrong types name the field, the expected and the found', () => {
  const hit = problemAt(valid.replace('cpus: 2, memory: 4GiB', 'cpus: two, memory: 4GiB'), 'nodes[0].cpus');
  assert.match(hit.expected, /whole number/);
  assert.is(hit.found, '"two"');
  const role = problemAt(valid.replace('role: worker', 'role: master'), 'nodes[1].role');
  assert.match(role.expected, /"control-plane", "worker"/);
  const nodes = problemAt(valid.replace(/nodes:\n(  - .*\n)+/, 'nodes: cp1\n'), 'nodes');
  assert.match(nodes.expected, /list/);
});

test('an IP outside the node CIDR is refused', () => {
  const hit = problemAt(valid.replace('10.77.0.21', '10.78.0.21'), 'nodes[1].ip');
  assert.match(hit.expected, /inside network.nodeCidr \(10\.77\.0\.0\/24\)/);
  assert.is(hit.found, '"10.78.0.21"');
  problemAt(valid.replace('10.77.0.21', '10.77.0.255'), 'nodes[1].ip'); // broadcast
  problemAt(valid.replace('10.77.0.21', '10.77.0.300'), 'nodes[1].ip');
});

test('duplicate node names and IPs are refused, naming the first use', () => {
  const names = problemAt(valid.replace('name: w1', 'name: cp1'), 'nodes[1].name');
  assert.match(names.expected, /not used by nodes\[0\]/);
  const ips = problemAt(valid.replace('10.77.0.21', '10.77.0.10'), 'nodes[1].ip');
  assert.match(ips.expected, /not used by nodes\[0\]/);
});

test('no control-plane node is refused', () => {
  const hit = problemAt(valid.replace('role: control-plane', 'role: worker'), 'nodes');
  assert.match(hit.expected, /control-plane/);
  assert.is(hit.found, 'none');
});

test('a control plane too small for kubeadm is refused', () => {
  problemAt(valid.replace('cpus: 2, memory: 4GiB', 'cpus: 1, memory: 4GiB'), 'nodes[0].cpus');
  const memory = problemAt(valid.replace('memory: 4GiB', 'memory: 1GiB'), 'nodes[0].memory');
  assert.match(memory.expected, /at least 2048 MiB/);
});

test('a missing key file is refused, naming the path', () => {
  const hit = problemAt(valid.replace('id.pub', 'missing.pub'), 'sshPublicKeyFile');
  assert.match(hit.found, /missing\.pub \(ENOENT\)/);
});

test('a private key in place of the public one is refused', () => {
  writeFileSync(join(dir, 'id'), '-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n');
  const hit = problemAt(valid.replace('id.pub', 'id'), 'sshPublicKeyFile');
  assert.match(hit.expected, /PUBLIC key/);
});

test('overlapping CIDRs and host bits are refused', () => {
  const overlap = problemAt(valid.replace('name: demo', 'name: demo\nnetwork: {podCidr: 10.77.0.0/16}'), 'network.podCidr');
  assert.match(overlap.expected, /does not overlap network.nodeCidr/);
  problemAt(valid.replace('name: demo', 'name: demo\nnetwork: {serviceCidr: 10.96.0.1/12}'), 'network.serviceCidr');
});

test('all problems are reported at once', () => {
  const problems = problemsOf(valid.replace('role: worker', 'role: boss').replace('10.77.0.10', '1.2.3.4').replace('id.pub', 'nope.pub'));
  assert.equal(problems.map((p) => p.path).sort(), ['nodes[0].ip', 'nodes[1].role', 'sshPublicKeyFile']);
});

test('a YAML syntax error names the line', () => {
  const problems = problemsOf('name: demo\nnodes: [\n');
  assert.match(problems[0]!.path, /line \d+/);
  assert.is(problems[0]!.expected, 'valid YAML');
});

test('the error message names the file, the path, the expected and the found', () => {
  try {
    parseConfig(configFile, valid.replace('10.77.0.21', '10.78.0.21'));
    assert.unreachable();
  } catch (error) {
    assert.instance(error, InputError);
    const message = (error as Error).message;
    assert.ok(message.startsWith(`${configFile}: 1 problem`), message);
    assert.match(message, /nodes\[1\]\.ip: expected a host address inside network\.nodeCidr \(10\.77\.0\.0\/24\), found "10\.78\.0\.21"/);
  }
});

test('mirrors: download bases and registries', () => {
  const config = parseConfig(
    configFile,
    `${valid}mirrors:\n  kubernetes: http://127.0.0.1:8080/k8s/\n  registries:\n    registry.k8s.io: {location: "127.0.0.1:5000", insecure: true}\n`,
  );
  assert.is(config.mirrors.downloads.kubernetes, 'http://127.0.0.1:8080/k8s');
  assert.equal(config.mirrors.registries['registry.k8s.io'], { location: '127.0.0.1:5000', insecure: true });
  assert.is(
    mirrorUrl('https://dl.k8s.io/release/v1.35.7/bin/linux/amd64/kubeadm', config.mirrors.downloads),
    'http://127.0.0.1:8080/k8s/release/v1.35.7/bin/linux/amd64/kubeadm',
  );
  assert.is(mirrorUrl('https://github.com/x/y', config.mirrors.downloads), 'https://github.com/x/y');
  assert.is(mirrorUrl('https://dl.k8s.io.evil/x', config.mirrors.downloads), 'https://dl.k8s.io.evil/x');
  problemAt(`${valid}mirrors:\n  kubernetes: ftp://x\n`, 'mirrors.kubernetes');
  problemAt(`${valid}mirrors:\n  registries:\n    registry.k8s.io: {location: "127.0.0.1:5000", insecure: yes please}\n`, 'mirrors.registries.registry.k8s.io.insecure');
});

test('mirrors.fedora reaches fedora.gpg; signatures: a site\'s own keys, fingerprints, or both', () => {
  const mirrored = parseConfig(configFile, `${valid}mirrors:\n  fedora: http://127.0.0.1:8080/fedora\n`);
  assert.is(mirrorUrl('https://fedoraproject.org/fedora.gpg', mirrored.mirrors.downloads), 'http://127.0.0.1:8080/fedora/fedora.gpg');
  assert.is(mirrorUrl('https://builds.coreos.fedoraproject.org/streams/stable.json', mirrored.mirrors.downloads), 'https://builds.coreos.fedoraproject.org/streams/stable.json');
  const config = parseConfig(
    configFile,
    `${valid}signatures:\n  fcos: {fingerprints: ["c6e7 f081 cf80 e131 4667  6e88 829b 6066 3164 5531"]}\n  runc: {keys: trust/runc.asc, fingerprints: [C9C370B246B09F6DBCFC744C34401015D1D2D386]}\n`,
  );
  assert.equal(config.signatures.openpgp.fcos, { fingerprints: ['C6E7F081CF80E13146676E88829B606631645531'] });
  assert.equal(config.signatures.openpgp.runc, { keys: join(dir, 'trust', 'runc.asc'), fingerprints: ['C9C370B246B09F6DBCFC744C34401015D1D2D386'] });
  assert.match(problemAt(`${valid}signatures:\n  butane: {}\n`, 'signatures.butane').expected, /keys .*fingerprints/);
  assert.match(problemAt(`${valid}signatures:\n  fcos: {fingerprints: [ABCD]}\n`, 'signatures.fcos.fingerprints[0]').expected, /40 hex digits/);
  problemAt(`${valid}signatures:\n  fcos: {fingerprints: []}\n`, 'signatures.fcos.fingerprints');
});

test('a Kubernetes version older than kubeadm v1beta4 (1.31) is refused, naming the field', () => {
  for (const old of ['v1.30.4', 'v1.29']) {
    try {
      parseConfig(configFile, valid.replace('version: v1.35.7', `version: ${old}`));
      assert.unreachable(`${old} accepted`);
    } catch (error) {
      assert.match((error as Error).message, new RegExp(`kubernetes\\.version: expected v1\\.31 or later .*found "${old.replace(/\./g, '\\.')}"`));
    }
  }
  assert.is(parseConfig(configFile, valid.replace('version: v1.35.7', 'version: v1.31.0')).kubernetes.version, 'v1.31.0');
});

test('a missing config file says how to make one', () => {
  try {
    loadConfig(join(dir, 'nope.yaml'));
    assert.unreachable();
  } catch (error) {
    assert.instance(error, UserError);
    assert.match((error as Error).message, /no such file.*cluster\.example\.yaml/);
  }
});

test('IPv4 and CIDR parsing', () => {
  assert.is(parseIPv4('10.0.0.1'), 167772161);
  assert.is(parseIPv4('10.0.0.256'), undefined);
  assert.is(parseIPv4('010.0.0.1'), undefined);
  assert.is(parseCidr('10.244.0.0/16')?.prefix, 16);
  assert.is(parseCidr('10.244.0.0/33'), undefined);
  assert.is(parseCidr('10.244.1.0/16'), undefined);
});

const openstackSection = `target: openstack
openstack:
  cloud: corp
  flavors: {controlPlane: m1.large, worker: m1.medium}
  adminCidr: 192.0.2.0/24
`;

test('target: qemu by default; an openstack section parsed into typed values', () => {
  const plain = parseConfig(configFile, valid);
  assert.is(plain.target, 'qemu');
  assert.is(plain.openstack, undefined);
  const config = parseConfig(configFile, `${valid}${openstackSection}  availabilityZone: az1\n  volumeType: ssd\n  floatingIp: {network: public, address: 203.0.113.7}\n`);
  assert.is(config.target, 'openstack');
  assert.equal(config.openstack, {
    cloud: 'corp',
    flavors: { 'control-plane': 'm1.large', worker: 'm1.medium' },
    availabilityZone: 'az1',
    adminCidr: parseCidr('192.0.2.0/24'),
    floatingIp: { network: 'public', address: '203.0.113.7' },
    volumeType: 'ssd',
  });
  const existing = parseConfig(configFile, `${valid}${openstackSection}  network: lab-net\n`);
  assert.is(existing.openstack?.network, 'lab-net');
  assert.is(existing.openstack?.floatingIp, undefined);
});

test('TARGET overrides the config; target openstack without the section is refused naming it', () => {
  assert.is(parseConfig(configFile, `${valid}${openstackSection}`, { target: 'qemu' }).target, 'qemu');
  assert.match(problemAt(`${valid}target: openstack\n`, 'openstack').expected, /openstack: section/);
  try {
    parseConfig(configFile, valid, { target: 'openstack' });
    assert.unreachable();
  } catch (error) {
    assert.match((error as Error).message, /openstack: expected an openstack: section .*TARGET=openstack/);
  }
});

test('openstack: bad values are refused with their field paths', () => {
  const hit = (extra: string, path: string) => problemAt(`${valid}${openstackSection}${extra}`, path);
  assert.match(problemAt(`${valid}target: aws\n`, 'target').expected, /"qemu", "openstack"/);
  assert.match(hit('  floatingIp: {network: public, address: 10.77.0.40}\n', 'openstack.floatingIp.address').expected, /outside network.nodeCidr/);
  assert.match(hit('  floatingIp: {address: 203.0.113.7}\n', 'openstack.floatingIp.network').found, /required/);
  hit('  floatingIp: {network: public, address: 203.0.113.300}\n', 'openstack.floatingIp.address');
  assert.match(hit('  flavours: {}\n', 'openstack.flavours').expected, /did you mean "flavors"/);
  assert.match(problemAt(`${valid}${openstackSection.replace('192.0.2.0/24', '0.0.0.0/0')}`, 'openstack.adminCidr').expected, /smaller than the whole Internet/);
  assert.match(problemAt(`${valid}${openstackSection.replace('192.0.2.0/24', '192.0.2.1/24')}`, 'openstack.adminCidr').expected, /no host bits/);
  assert.match(problemAt(`${valid}${openstackSection.replace('adminCidr: 192.0.2.0/24', 'region: x')}`, 'openstack.adminCidr').found, /required/);
  assert.match(problemAt(`${valid}${openstackSection.replace(', worker: m1.medium', '')}`, 'openstack.flavors.worker').found, /required/);
  assert.match(problemAt(`${valid}${openstackSection.replace('m1.large', '""')}`, 'openstack.flavors.controlPlane').expected, /flavor name/);
});

test('openstack: a password in cluster.yaml is refused, pointing at clouds.yaml', () => {
  const hit = problemAt(`${valid}${openstackSection}  password: hunter2\n`, 'openstack.password');
  assert.match(hit.expected, /no credentials in cluster\.yaml.*clouds\.yaml/);
  assert.not.match(JSON.stringify(problemsOf(`${valid}${openstackSection}  password: hunter2\n`)), /hunter2/);
});

test.after(() => rmSync(dir, { recursive: true, force: true }));
test('three control planes on target openstack are refused for now (the virtual IP needs allowed-address pairs)', () => {
  const hit = problemAt(`${ha}${openstackSection}`, 'controlPlane.endpoint');
  assert.match(hit.expected, /one control plane on target openstack/);
  assert.is(hit.found, '"10.77.0.5"');
  assert.is(parseConfig(configFile, `${valid}${openstackSection}`).controlPlane.virtualIp, false);
});

test.run();
