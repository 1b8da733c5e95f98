// Fedora CoreOS specifics (docs/fcos.md): what a real FCOS node needs
// that a generic Linux would not (enforcing SELinux, a read-only /usr, kubeadm join's
// preflight, flannel on a two-NIC node, DNS with no upstream). Each fix is asserted on
// what the pipeline writes: the kubeadm configuration and patches parsed as kubeadm
// would, the flannel manifest as shipped on the image disk, and each node's Ignition
// config applied by the real Ignition to a scratch root, for Kubernetes v1.35 and v1.36.
import { mkdtempSync, readdirSync, readFileSync, rmSync, existsSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { parseAllDocuments } from 'yaml';
import { parseConfig, type ClusterConfig } from '../tasks/lib/inputs/config.ts';
import { InputError } from '../tasks/lib/errors.ts';
import { runStages } from '../tasks/lib/run/engine.ts';
import { ignitionStage } from '../tasks/ignition.ts';
import { parseLock, type Lock } from '../tasks/lib/inputs/lock.ts';
import { applyKubeadmOverrides, kubeadmDocuments, nodePaths, renderKubeadmPatches, renderNetwork, renderResolvConf, renderSelinuxConfig } from '../tasks/lib/node/node-config.ts';
import { pkiStage } from '../tasks/pki.ts';
import { applyIgnition } from './fixtures/ignition.ts';
import { buildUpstreamTree, type UpstreamTree } from './fixtures/upstream.ts';
import { listFiles, loud, makeWorkspace, projectRoot, type Workspace } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-fcos-'));
const keyFile = join(work, 'id.pub');
writeFileSync(keyFile, 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGNvcmVrdWJldGVzdGtleQ test@corekube\n');
const pki = { token: 'abcdef.0123456789abcdef', caHash: `sha256:${'a'.repeat(64)}` };
const digest = (c: string) => `sha256:${c.repeat(64)}`;
const pauseImage = `registry.k8s.io/pause:3.10.1@${digest('1')}`;

test.after(() => rmSync(work, { recursive: true, force: true }));

function config(version: string, extra = ''): ClusterConfig {
  return parseConfig(
    join(work, 'cluster.yaml'),
    `name: demo\nkubernetes: {version: ${version}}\nnodes:\n  - {name: cp1, role: control-plane, ip: 10.77.0.10}\n  - {name: w1, role: worker, ip: 10.77.0.21, memory: 2GiB}\nsshPublicKeyFile: id.pub\n${extra}`,
  );
}

function lock(version: string): Lock {
  const artifact = (name: string) => `  ${name}: {url: "https://example.invalid/${name}", sha256: "${'b'.repeat(64)}"}`;
  const artifacts = ['kubeadm', 'kubelet', 'kubectl', 'crictl', 'runc', 'cni-plugins', 'butane'].map(artifact);
  return parseLock(
    join(work, 'lock.yaml'),
    [
      'lockVersion: 1',
      'fcos: {stream: stable, release: 43.20260802.3.1, arch: x86_64}',
      `kubernetes: {version: ${version}}`,
      'artifacts:',
      `  fcos-qemu: {url: "https://example.invalid/fcos.qcow2.xz", sha256: "${'c'.repeat(64)}", uncompressedSha256: "${'d'.repeat(64)}"}`,
      `  containerd: {url: "https://example.invalid/containerd-2.1.4-linux-amd64.tar.gz", sha256: "${'e'.repeat(64)}"}`,
      ...artifacts,
      'images:',
      `  - ${pauseImage}`,
      '',
    ].join('\n'),
  );
}

const byKind = (docs: Record<string, unknown>[]) => Object.fromEntries(docs.map((d) => [d.kind as string, d as Record<string, any>]));

test('kubeadm v1.35: the controller-manager gets a writable FlexVolume directory (kubeadm mounts it DirectoryOrCreate; /usr is read-only)', () => {
  const c = config('v1.35.7');
  const docs = byKind(kubeadmDocuments(c, lock('v1.35.7'), c.nodes[0]!, pki));
  assert.equal(docs.ClusterConfiguration!.controllerManager.extraArgs, [{ name: 'flex-volume-plugin-dir', value: '/var/lib/kubelet/volumeplugins' }, { name: 'leader-elect', value: 'false' }]);
  assert.is(docs.KubeletConfiguration!.volumePluginDir, '/var/lib/kubelet/volumeplugins', 'kubelet and controller-manager agree');
  assert.not.ok(docs.KubeletConfiguration!.volumePluginDir.startsWith('/usr/'));
});

test('kubeadm v1.36: no FlexVolume flag (kubeadm no longer mounts the directory); the kubelet still gets a writable one', () => {
  const c = config('v1.36.3');
  const docs = byKind(kubeadmDocuments(c, lock('v1.36.3'), c.nodes[0]!, pki));
  assert.equal(docs.ClusterConfiguration!.controllerManager.extraArgs.map((a: { name: string }) => a.name), ['leader-elect']);
  assert.is(docs.KubeletConfiguration!.volumePluginDir, '/var/lib/kubelet/volumeplugins');
});

test('one control plane: the controller-manager and the scheduler run without leader election (no second candidate; a slow API server no longer makes them exit); three keep it', () => {
  const c = config('v1.37.2');
  const single = byKind(kubeadmDocuments(c, lock('v1.37.2'), c.nodes[0]!, pki)).ClusterConfiguration!;
  assert.equal(single.controllerManager.extraArgs, [{ name: 'leader-elect', value: 'false' }]);
  assert.equal(single.scheduler.extraArgs, [{ name: 'leader-elect', value: 'false' }]);
  const three = parseConfig(
    join(work, 'cluster.yaml'),
    'name: demo\nkubernetes: {version: v1.37.2}\ncontrolPlane: {endpoint: 10.77.0.5}\nnodes:\n' +
      ['cp1', 'cp2', 'cp3'].map((n, i) => `  - {name: ${n}, role: control-plane, ip: 10.77.0.1${i}}\n`).join('') +
      '  - {name: w1, role: worker, ip: 10.77.0.21, memory: 2GiB}\nsshPublicKeyFile: id.pub\n',
  );
  const first = byKind(kubeadmDocuments(three, lock('v1.37.2'), three.nodes[0]!, pki)).ClusterConfiguration!;
  assert.equal(first.controllerManager.extraArgs, []);
  assert.equal(first.scheduler.extraArgs, []);
});

test('the static pods run as spc_t: kubeadm reads patches named TARGET+strategic.yaml from the Init and Join patches directory', () => {
  for (const version of ['v1.35.7', 'v1.36.3']) {
    const c = config(version);
    const init = byKind(kubeadmDocuments(c, lock(version), c.nodes[0]!, pki));
    const join_ = byKind(kubeadmDocuments(c, lock(version), c.nodes[1]!, pki));
    assert.equal(init.InitConfiguration!.patches, { directory: nodePaths.kubeadmPatches });
    assert.equal(join_.JoinConfiguration!.patches, { directory: nodePaths.kubeadmPatches });
  }
  const patches = renderKubeadmPatches();
  assert.equal(patches.map((p) => p.target).sort(), ['etcd', 'kube-apiserver', 'kube-controller-manager', 'kube-scheduler']);
  // kubeadm's parseFilename (cmd/kubeadm/app/util/patches/patches.go): target, optional suffix, "+", patch type, .yaml|.json.
  const kubeadmName = /^(etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kubeletconfiguration)([^.+\n]*)?(\+)?(json|merge|strategic)?.*\.(json|yaml)$/;
  for (const patch of patches) {
    const match = kubeadmName.exec(patch.file);
    assert.ok(match, patch.file);
    assert.is(match![1], patch.target);
    assert.is(match![4], 'strategic');
    const docs = parseAllDocuments(patch.content).map((d) => d.toJS());
    assert.is(docs.length, 1, 'one patch per file');
    assert.equal(docs[0], { spec: { securityContext: { seLinuxOptions: { type: 'spc_t' } } } });
  }
});

test('a worker is given only its JoinConfiguration: no CA file for the FileAvailable preflight to trip on, discovery that outlasts a slow control plane', () => {
  const c = config('v1.35.7');
  const docs = kubeadmDocuments(c, lock('v1.35.7'), c.nodes[1]!, pki);
  assert.equal(docs.map((d) => d.kind), ['JoinConfiguration'], 'kubeadm join ignores every other kind');
  const join_ = docs[0] as Record<string, any>;
  assert.equal(join_.discovery.bootstrapToken.caCertHashes, [pki.caHash], 'the CA comes by discovery, pinned by its hash');
  assert.is(join_.discovery.file, undefined);
  assert.is(join_.controlPlane, undefined);
  assert.ok(parseDuration(join_.timeouts.discovery) >= 15 * 60, join_.timeouts.discovery);
});

function parseDuration(text: string): number {
  const match = /^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$/.exec(text);
  assert.ok(match, text);
  return Number(match![1] ?? 0) * 3600 + Number(match![2] ?? 0) * 60 + Number(match![3] ?? 0);
}

/**
 * kubeadm's v1beta4 `timeouts` and their defaults, in minutes: SetDefaults_Timeouts in
 * cmd/kubeadm/app/apis/kubeadm/v1beta4/defaults.go, values from cmd/kubeadm/app/constants.
 */
const kubeadmDefaultTimeouts: Record<string, number> = {
  controlPlaneComponentHealthCheck: 4,
  kubeletHealthCheck: 4,
  kubernetesAPICall: 1,
  etcdAPICall: 2,
  tlsBootstrap: 5,
  discovery: 5,
  upgradeManifests: 5,
};

/** A Go duration as kubeadm's configuration writes it (20m0s, 1h0m0s, 90s), in minutes. */
function goMinutes(text: string): number {
  const parts = [...text.matchAll(/(\d+(?:\.\d+)?)(h|m|s)/g)];
  assert.ok(parts.length > 0 && parts.map((p) => p[0]).join('') === text, `a Go duration: ${text}`);
  return parts.reduce((sum, [, n, unit]) => sum + Number(n) * { h: 60, m: 1, s: 1 / 60 }[unit as 'h' | 'm' | 's'], 0);
}

/** A systemd time span as the units write it (50min, 15s, 3h, 0), in minutes. */
function systemdMinutes(text: string): number {
  const parts = [...text.matchAll(/(\d+)\s*(h|min|s)?/g)];
  return parts.reduce((sum, [, n, unit]) => sum + Number(n) * (unit === 'h' ? 60 : unit === 's' ? 1 / 60 : unit === 'min' ? 1 : 1 / 60), 0);
}

/** The [Unit] and [Service] settings of a unit defined inline in a Butane file of fcc/. */
function unitSettings(bu: string, name: string): Record<string, string> {
  const doc = parseAllDocuments(readFileSync(join(projectRoot, 'fcc', bu), 'utf8'))[0]!.toJS();
  const unit = doc.systemd.units.find((u: any) => u.name === name);
  assert.ok(unit, `${bu} defines ${name}`);
  return Object.fromEntries(
    (unit.contents as string).split('\n').filter((l) => /^\w+=/.test(l)).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]),
  );
}

/** Every timeout kubeadm has, as if each expired in turn: the configuration's, else kubeadm's default. */
function kubeadmWorstCase(doc: Record<string, any>): number {
  return Object.entries(kubeadmDefaultTimeouts).reduce((sum, [key, fallback]) => sum + (doc.timeouts?.[key] ? goMinutes(doc.timeouts[key]) : fallback), 0);
}

test('the kubeadm units outlast kubeadm\'s own timeouts, and systemd retries a failed try: a worker forever, the control plane three times', () => {
  const c = config('v1.36.3');
  const init = byKind(kubeadmDocuments(c, lock('v1.36.3'), c.nodes[0]!, pki)).InitConfiguration!;
  const join_ = byKind(kubeadmDocuments(c, lock('v1.36.3'), c.nodes[1]!, pki)).JoinConfiguration!;
  assert.ok(Object.keys(init.timeouts).every((k) => k in kubeadmDefaultTimeouts), `every timeout corekube sets is one kubeadm has: ${Object.keys(init.timeouts)}`);
  assert.ok(Object.keys(join_.timeouts).every((k) => k in kubeadmDefaultTimeouts), `every timeout corekube sets is one kubeadm has: ${Object.keys(join_.timeouts)}`);

  const cp = unitSettings('control-plane.bu', 'corekube-control-plane.service');
  // control-plane-up.sh then waits up to 4 minutes for /readyz and applies the manifests (a minute, generously).
  const cpNeeds = kubeadmWorstCase(init) + 4 + 1;
  assert.ok(systemdMinutes(cp.TimeoutStartSec!) >= cpNeeds, `control plane: TimeoutStartSec=${cp.TimeoutStartSec} < ${cpNeeds} min that kubeadm init and the script may take`);
  const worker = unitSettings('worker.bu', 'corekube-join.service');
  const workerNeeds = kubeadmWorstCase(join_);
  assert.ok(systemdMinutes(worker.TimeoutStartSec!) >= workerNeeds, `worker: TimeoutStartSec=${worker.TimeoutStartSec} < ${workerNeeds} min that kubeadm join may take`);

  for (const [role, unit] of [['control plane', cp], ['worker', worker]] as const) {
    assert.is(unit.Type, 'oneshot', role);
    assert.is(unit.Restart, 'on-failure', `${role}: systemd runs a failed try again`);
    assert.ok(systemdMinutes(unit.RestartSec ?? '0') > 0, `${role}: a pause between tries`);
  }
  // systemd never gives up on a worker: no start rate limit at all.
  assert.is(worker.StartLimitIntervalSec, '0');
  // The control plane: StartLimitBurst tries, within a window that holds them all (or the limit would never be reached).
  const burst = Number(cp.StartLimitBurst);
  assert.ok(burst >= 2, `StartLimitBurst=${cp.StartLimitBurst}`);
  const tries = burst * (systemdMinutes(cp.TimeoutStartSec!) + systemdMinutes(cp.RestartSec!));
  assert.ok(systemdMinutes(cp.StartLimitIntervalSec!) >= tries, `StartLimitIntervalSec=${cp.StartLimitIntervalSec} holds ${burst} whole tries (${tries} min)`);
});

test('an override of a component\'s extraArgs adds to corekube\'s flags argument by argument (v1.35 keeps flex-volume-plugin-dir)', () => {
  const c = config('v1.35.7');
  const docs = kubeadmDocuments(c, lock('v1.35.7'), c.nodes[0]!, pki);
  const override = 'apiVersion: kubeadm.k8s.io/v1beta4\nkind: ClusterConfiguration\ncontrollerManager:\n  extraArgs:\n    - {name: leader-elect-lease-duration, value: 120s}\n';
  const merged = byKind(applyKubeadmOverrides(docs, 'fcc/kubeadm.yaml', override, c, lock('v1.35.7'))).ClusterConfiguration!;
  assert.equal(merged.controllerManager.extraArgs, [
    { name: 'flex-volume-plugin-dir', value: nodePaths.volumePluginDir },
    { name: 'leader-elect', value: 'false' },
    { name: 'leader-elect-lease-duration', value: '120s' },
  ]);
  // The same name: the override's value, once.
  const again = byKind(applyKubeadmOverrides(docs, 'fcc/kubeadm.yaml', 'apiVersion: kubeadm.k8s.io/v1beta4\nkind: ClusterConfiguration\ncontrollerManager:\n  extraArgs: [{name: flex-volume-plugin-dir, value: /var/lib/kubelet/other}]\n', c, lock('v1.35.7'))).ClusterConfiguration!;
  assert.equal(again.controllerManager.extraArgs, [{ name: 'leader-elect', value: 'false' }, { name: 'flex-volume-plugin-dir', value: '/var/lib/kubelet/other' }]);
  const apiServer = byKind(applyKubeadmOverrides(docs, 'fcc/kubeadm.yaml', 'apiVersion: kubeadm.k8s.io/v1beta4\nkind: ClusterConfiguration\napiServer:\n  extraArgs: [{name: audit-log-maxage, value: "7"}]\n', c, lock('v1.35.7'))).ClusterConfiguration!.apiServer;
  assert.equal(apiServer.extraArgs.map((a: { name: string }) => a.name), ['admission-control-config-file', 'audit-log-maxage'], 'the Pod Security admission config stays');
});

test('time spans: Go durations and systemd spans read as minutes', () => {
  assert.is(goMinutes('20m0s'), 20);
  assert.is(goMinutes('1h0m30s'), 60.5);
  assert.is(systemdMinutes('50min'), 50);
  assert.is(systemdMinutes('3h'), 180);
  assert.is(systemdMinutes('15s'), 0.25);
  assert.is(systemdMinutes('0'), 0);
});

test('DNS offline: the kubelet hands pods a resolv.conf that is never the systemd-resolved stub; with no upstream it names the node itself', () => {
  const c = config('v1.35.7');
  const docs = byKind(kubeadmDocuments(c, lock('v1.35.7'), c.nodes[0]!, pki));
  assert.is(docs.KubeletConfiguration!.resolvConf, '/etc/corekube/resolv.conf');
  for (const node of c.nodes) {
    const text = renderResolvConf(c, node);
    const servers = [...text.matchAll(/^nameserver (\S+)$/gm)].map((m) => m[1]);
    assert.equal(servers, [node.ip], 'exactly one nameserver (CoreDNS refuses to start with none): the node, where nothing serves DNS');
    assert.not.match(text, /^nameserver 127\./m);
  }
  // The node's own resolver list: no server at all, and nothing from DHCP on the host NIC.
  const keyfile = renderNetwork(c, c.nodes[0]!);
  assert.not.match(keyfile.cluster, /^dns=/m);
  assert.match(keyfile.cluster, /^ignore-auto-dns=true$/m);
  assert.match(keyfile.user, /^ignore-auto-dns=true$/m);
});

test('DNS with upstream resolvers (network.dnsServers): CoreDNS and the node forward to them', () => {
  const c = config('v1.35.7', 'network: {dnsServers: [192.0.2.53, 198.51.100.53]}\n');
  assert.equal(c.network.dnsServers, ['192.0.2.53', '198.51.100.53']);
  assert.equal([...renderResolvConf(c, c.nodes[1]!).matchAll(/^nameserver (\S+)$/gm)].map((m) => m[1]), ['192.0.2.53', '198.51.100.53']);
  assert.match(renderNetwork(c, c.nodes[1]!).cluster, /^dns=192\.0\.2\.53;198\.51\.100\.53;$/m);
});

function problems(extra: string): { path: string; expected: string; found: string }[] {
  try {
    config('v1.35.7', extra);
  } catch (error) {
    if (error instanceof InputError) return error.problems;
    throw error;
  }
  assert.unreachable(`accepted: ${extra}`);
  return [];
}

test('selinux and network.dnsServers: bad values refused naming the field', () => {
  assert.is(config('v1.35.7').selinux, 'enforcing', 'FCOS default');
  assert.is(config('v1.35.7', 'selinux: permissive\n').selinux, 'permissive');
  const disabled = problems('selinux: disabled\n');
  assert.equal(disabled.map((p) => p.path), ['selinux']);
  assert.match(disabled[0]!.expected, /enforcing.*permissive/);
  assert.equal(problems('network: {dnsServers: [127.0.0.53]}\n').map((p) => p.path), ['network.dnsServers[0]'], 'the stub resolver is a loop for CoreDNS');
  assert.equal(problems('network: {dnsServers: [10.96.0.10]}\n').map((p) => p.path), ['network.dnsServers[0]'], 'a resolver inside the service range is the cluster asking itself');
  assert.equal(problems('network: {dnsServers: [dns.example]}\n').map((p) => p.path), ['network.dnsServers[0]']);
  assert.equal(problems('network: {dnsServers: [192.0.2.1, 192.0.2.2, 192.0.2.3, 192.0.2.4]}\n').map((p) => p.path), ['network.dnsServers']);
});

test('selinux: /etc/selinux/config carries the mode cluster.yaml asks for', () => {
  assert.match(renderSelinuxConfig(config('v1.35.7')), /^SELINUX=enforcing$/m);
  const permissive = renderSelinuxConfig(config('v1.35.7', 'selinux: permissive\n'));
  assert.match(permissive, /^SELINUX=permissive$/m);
  assert.match(permissive, /^SELINUXTYPE=targeted$/m);
});

test('flannel as shipped: every container privileged (spc_t), flanneld pinned to the node address, in a privileged namespace', () => {
  const docs = parseAllDocuments(readFileSync(join(projectRoot, 'manifests', '10-flannel.yaml'), 'utf8')).map((d) => d.toJS());
  const daemonSet = docs.find((d) => d.kind === 'DaemonSet');
  const spec = daemonSet.spec.template.spec;
  const containers = [...spec.initContainers, ...spec.containers];
  assert.equal(containers.map((c: any) => c.name), ['install-cni-plugin', 'install-cni', 'kube-flannel']);
  for (const container of containers) assert.is(container.securityContext?.privileged, true, `${container.name} privileged`);
  const flanneld = spec.containers[0];
  assert.ok(flanneld.args.includes('--iface=$(NODE_IP)'), flanneld.args.join(' '));
  assert.equal(flanneld.env.find((e: any) => e.name === 'NODE_IP').valueFrom, { fieldRef: { fieldPath: 'status.hostIP' } });
  assert.is(spec.hostNetwork, true, 'status.hostIP is the kubelet node-ip, the cluster address');
  const namespace = docs.find((d) => d.kind === 'Namespace');
  assert.is(namespace.metadata.labels['pod-security.kubernetes.io/enforce'], 'privileged');
  // The flannel image's CNI configuration is installed by flannel's own installer: its image
  // need not carry cp (upstream changed this in v0.28.6; `command: [cp]` here was the old shape).
  const installCni = spec.initContainers.find((c: any) => c.name === 'install-cni');
  assert.equal(installCni.command, ['/opt/bin/install-conf'], 'install-cni runs /opt/bin/install-conf, not cp');
});

/**
 * Upstream's kube-flannel.yml with exactly corekube's documented changes (the header of
 * manifests/10-flannel.yaml): the ConfigMap generated instead, images never pulled, every
 * container privileged, flanneld on the node's cluster address.
 */
function withCorekubeChanges(upstream: any[]): any[] {
  const docs = structuredClone(upstream).filter((d: any) => d.kind !== 'ConfigMap');
  const daemonSet = docs.find((d: any) => d.kind === 'DaemonSet');
  const spec = daemonSet.spec.template.spec;
  for (const container of [...spec.initContainers, ...spec.containers]) {
    container.imagePullPolicy = 'Never';
    container.securityContext = { privileged: true };
  }
  const flanneld = spec.containers.find((c: any) => c.name === 'kube-flannel');
  flanneld.args.push('--iface=$(NODE_IP)');
  flanneld.env.unshift({ name: 'NODE_IP', valueFrom: { fieldRef: { fieldPath: 'status.hostIP' } } });
  return docs;
}

test('flannel follows upstream kube-flannel.yml at the pinned tag, with only corekube\'s documented changes', () => {
  const shipped = readFileSync(join(projectRoot, 'manifests', '10-flannel.yaml'), 'utf8');
  const tag = /kube-flannel\.yml at tag (v\d+\.\d+\.\d+) /.exec(shipped)?.[1];
  assert.ok(tag, 'the header names the upstream tag it follows');
  const samples = join(projectRoot, 'test', 'fixtures', 'upstream-samples');
  assert.ok(existsSync(join(samples, `kube-flannel-${tag}.yml`)), `upstream's kube-flannel.yml at ${tag} is kept in test/fixtures/upstream-samples`);
  const upstream = parseAllDocuments(readFileSync(join(samples, `kube-flannel-${tag}.yml`), 'utf8')).map((d) => d.toJS()).filter(Boolean);
  const ours = parseAllDocuments(shipped).map((d) => d.toJS()).filter(Boolean);
  // Object for object, in upstream's order; within each, field for field (key order aside).
  assert.equal(ours.map((d: any) => `${d.kind}/${d.metadata.name}`), withCorekubeChanges(upstream).map((d: any) => `${d.kind}/${d.metadata.name}`));
  const expected = withCorekubeChanges(upstream);
  ours.forEach((doc: any, i: number) => assert.equal(doc, expected[i], `${doc.kind}/${doc.metadata.name}`));
  // The images the lock pins are the ones upstream names for that tag.
  const images = (docs: any[]) => docs.flatMap((d: any) => (d.kind === 'DaemonSet' ? [...d.spec.template.spec.initContainers, ...d.spec.template.spec.containers].map((c: any) => c.image) : []));
  assert.equal(images(ours), images(upstream));
  assert.ok(images(ours).includes(`ghcr.io/flannel-io/flannel:${tag}`));
});

// The whole path for v1.36, SELinux permissive, upstream DNS: pki + ignition stages, then the real Ignition.
let tree: UpstreamTree;
let ws: Workspace;
const roots: Record<string, string> = {};

test('v1.36, permissive, upstream DNS: the real Ignition writes what FCOS reads, where it reads it', loud(async () => {
  tree = await buildUpstreamTree(join(work, 'upstream'), { qcow2SizeMiB: 1, kubernetesVersion: 'v1.36.3' });
  ws = makeWorkspace(tree, 'http://127.0.0.1:9', {
    nodes: ['{name: cp1, role: control-plane, ip: 10.77.0.10}', '{name: w1, role: worker, ip: 10.77.0.21, memory: 2GiB}'],
    images: [pauseImage],
    extraConfig: ['selinux: permissive', 'network: {dnsServers: [192.0.2.53]}'],
  });
  await runStages(ws.context(), [pkiStage, ignitionStage], { renderer: 'silent' });
  for (const node of ['cp1', 'w1']) roots[node] = (await applyIgnition(join(ws.outDir, 'ignition', `${node}.ign`), work)).root;
  for (const [node, root] of Object.entries(roots)) {
    const etc = join(root, 'etc');
    assert.is(readFileSync(join(etc, 'systemd', 'network', '50-flannel.link'), 'utf8'), '[Match]\nOriginalName=flannel*\n\n[Link]\nMACAddressPolicy=none\n', node);
    assert.match(readFileSync(join(etc, 'NetworkManager', 'conf.d', 'corekube-cni.conf'), 'utf8'), /^unmanaged-devices=interface-name:cni0;interface-name:flannel\*;interface-name:veth\*$/m);
    assert.match(readFileSync(join(etc, 'selinux', 'config'), 'utf8'), /^SELINUX=permissive$/m);
    const unit = readFileSync(join(etc, 'systemd', 'system', 'corekube-selinux.service'), 'utf8');
    assert.match(unit, /^EnvironmentFile=\/etc\/selinux\/config$/m);
    assert.match(unit, /^ExecStart=\/usr\/sbin\/setenforce \$\{SELINUX\}$/m);
    assert.match(unit, /^Before=containerd\.service/m);
    assert.match(readFileSync(join(etc, 'systemd', 'system-preset', '20-ignition.preset'), 'utf8'), /^enable corekube-selinux\.service$/m);
    assert.equal(readdirSync(join(etc, 'corekube', 'kubeadm-patches')).sort(), ['etcd+strategic.yaml', 'kube-apiserver+strategic.yaml', 'kube-controller-manager+strategic.yaml', 'kube-scheduler+strategic.yaml']);
    assert.equal(parseAllDocuments(readFileSync(join(etc, 'corekube', 'kubeadm-patches', 'etcd+strategic.yaml'), 'utf8'))[0]!.toJS(), { spec: { securityContext: { seLinuxOptions: { type: 'spc_t' } } } });
    assert.match(readFileSync(join(etc, 'corekube', 'resolv.conf'), 'utf8'), /^nameserver 192\.0\.2\.53$/m);
  }
  const [init, cluster, kubelet] = parseAllDocuments(readFileSync(join(roots.cp1!, 'etc', 'corekube', 'kubeadm.yaml'), 'utf8')).map((d) => d.toJS());
  assert.is(init.patches.directory, '/etc/corekube/kubeadm-patches');
  assert.is(cluster.kubernetesVersion, 'v1.36.3');
  assert.equal(cluster.controllerManager.extraArgs, [{ name: 'leader-elect', value: 'false' }]);
  assert.is(kubelet.resolvConf, '/etc/corekube/resolv.conf');
  assert.ok(existsSync(join(roots.cp1!, 'etc', 'kubernetes', 'pki', 'ca.crt')));
  assert.not.ok(listFiles(roots.w1!).some((f) => f.includes('kubernetes/pki')), 'no CA on the worker');
}));

test('enforcing by default: /etc/selinux/config says so; the patches and the mode are in every node config', async () => {
  const enforcing = makeWorkspace(tree, 'http://127.0.0.1:9', { images: [pauseImage] });
  try {
    await runStages(enforcing.context(), [pkiStage, ignitionStage], { renderer: 'silent' });
    const root = (await applyIgnition(join(enforcing.outDir, 'ignition', 'cp1.ign'), work)).root;
    assert.match(readFileSync(join(root, 'etc', 'selinux', 'config'), 'utf8'), /^SELINUX=enforcing$/m);
    assert.match(readFileSync(join(root, 'etc', 'corekube', 'resolv.conf'), 'utf8'), /^nameserver 10\.77\.0\.10$/m);
  } finally {
    rmSync(enforcing.dir, { recursive: true, force: true });
    rmSync(ws.dir, { recursive: true, force: true });
  }
});

test.run();
