// The QEMU command line and the verify judgements, directly; the port check against a
// real listener. The boot itself runs in boot.test.ts (a real QEMU, a stand-in appliance).
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { checkPortsFree, standInFromEnv } from '../tasks/boot.ts';
import { loadConfig } from '../tasks/lib/inputs/config.ts';
import { parseLock } from '../tasks/lib/inputs/lock.ts';
import { macAddress } from '../tasks/lib/node/node-config.ts';
import { nodePaths, publishedPorts, qemuArgs, socketDir, sshArgs, sshPort } from '../tasks/lib/node/qemu.ts';
import { judgeEtcd, judgeNodes, judgeSystemPods, judgeVirtualIp, smokePod } from '../tasks/verify.ts';
import { freePortBlock } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-qemu-'));
test.after(() => rmSync(work, { recursive: true, force: true }));

writeFileSync(join(work, 'key.pub'), 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGNvcmVrdWJldGVzdGtleQ test@corekube\n');
writeFileSync(
  join(work, 'cluster.yaml'),
  [
    'name: demo',
    'kubernetes: {version: v1.35.7}',
    'nodes:',
    '  - {name: cp1, role: control-plane, ip: 10.77.0.10, cpus: 2, memory: 4GiB}',
    '  - {name: w1, role: worker, ip: 10.77.0.21, memory: 2GiB}',
    '  - {name: w2, role: worker, ip: 10.77.0.22, cpus: 3, memory: 2GiB}',
    'hostPorts: {apiServer: 16443, sshBase: 12222}',
    'sshPublicKeyFile: key.pub',
    '',
  ].join('\n'),
);
const config = loadConfig(join(work, 'cluster.yaml'));
const [cp1, w1, w2] = config.nodes as [typeof config.nodes[0], typeof config.nodes[0], typeof config.nodes[0]];
const outDir = join(work, 'out,dir');
const paths = (node: typeof cp1) => nodePaths(outDir, node, { image: join(outDir, 'artifacts', 'fcos.qcow2'), ignition: join(outDir, 'ignition', `${node.name}.ign`), disk: join(outDir, 'image-disk.img') });
const option = (args: string[], name: string) => args.filter((_, i) => args[i - 1] === name);

test('a node boots FCOS with -snapshot, Ignition on fw_cfg, the image disk read-only, its CPUs and memory', () => {
  const args = qemuArgs({ config, node: w2, paths: paths(w2), accel: 'tcg' });
  assert.ok(args.includes('-snapshot'), 'every boot is a first boot');
  assert.equal(option(args, '-drive'), [`if=virtio,file=${join(work, 'out,,dir', 'artifacts', 'fcos.qcow2')},format=qcow2`, `if=virtio,file=${join(work, 'out,,dir', 'image-disk.img')},format=raw,readonly=on`]);
  assert.equal(option(args, '-fw_cfg'), [`name=opt/com.coreos/config,file=${join(work, 'out,,dir', 'ignition', 'w2.ign')}`]);
  assert.equal(option(args, '-smp'), ['3']);
  assert.equal(option(args, '-m'), ['2048']);
  assert.equal(option(args, '-machine'), ['q35,accel=tcg']);
  assert.equal(option(args, '-cpu'), ['max']);
  assert.equal(option(qemuArgs({ config, node: w2, paths: paths(w2), accel: 'kvm' }), '-machine'), ['q35,accel=kvm']);
  assert.ok(args.includes('-daemonize') && option(args, '-pidfile')[0] === join(outDir, 'run', 'w2.pid'));
  assert.equal(option(args, '-serial'), [`file:${join(work, 'out,,dir', 'logs', 'w2.log')}`]);
  assert.not.ok(args.includes('-kernel'));
});

test('three control planes: each publishes its API server on a port of its own above hostPorts.apiServer, where the forwarder listens', () => {
  const file = join(work, 'ha.yaml');
  writeFileSync(file, [
    'name: demo',
    'kubernetes: {version: v1.35.7}',
    'nodes:',
    '  - {name: cp1, role: control-plane, ip: 10.77.0.10}',
    '  - {name: cp2, role: control-plane, ip: 10.77.0.11}',
    '  - {name: w1, role: worker, ip: 10.77.0.21, memory: 2GiB}',
    '  - {name: cp3, role: control-plane, ip: 10.77.0.12}',
    'controlPlane: {endpoint: 10.77.0.5}',
    'hostPorts: {apiServer: 16443, sshBase: 12222}',
    'sshPublicKeyFile: key.pub',
    '',
  ].join('\n'));
  const ha = loadConfig(file);
  const host = (name: string) => option(qemuArgs({ config: ha, node: ha.nodes.find((n) => n.name === name)!, paths: paths(ha.nodes.find((n) => n.name === name)!), accel: 'tcg' }), '-netdev')[1];
  assert.is(host('cp1'), 'user,id=host,restrict=on,hostfwd=tcp:127.0.0.1:12222-:22,hostfwd=tcp:127.0.0.1:16444-:6443');
  assert.is(host('cp2'), 'user,id=host,restrict=on,hostfwd=tcp:127.0.0.1:12223-:22,hostfwd=tcp:127.0.0.1:16445-:6443');
  assert.is(host('cp3'), 'user,id=host,restrict=on,hostfwd=tcp:127.0.0.1:12225-:22,hostfwd=tcp:127.0.0.1:16446-:6443');
  assert.is(host('w1'), 'user,id=host,restrict=on,hostfwd=tcp:127.0.0.1:12224-:22');
  const ports = publishedPorts(ha);
  assert.equal(ports.map((p) => p.port), [16443, 16444, 16445, 16446, 12222, 12223, 12224, 12225]);
  assert.match(ports[0]!.what, /forwarded to a live control plane of cp1, cp2, cp3/);
});

test('networking: the cluster NIC on the switch, the host NIC restricted with SSH (and on the control plane the API server) on 127.0.0.1 only', () => {
  const cpArgs = qemuArgs({ config, node: cp1, paths: paths(cp1), accel: 'tcg' });
  const netdevs = option(cpArgs, '-netdev');
  assert.is(netdevs[0], `vde,id=cluster,sock=${socketDir(outDir)}/switch`);
  assert.is(netdevs[1], 'user,id=host,restrict=on,hostfwd=tcp:127.0.0.1:12222-:22,hostfwd=tcp:127.0.0.1:16443-:6443');
  assert.equal(option(cpArgs, '-device'), [`virtio-net-pci,netdev=cluster,mac=${macAddress('demo', 'cp1', 'cluster')}`, `virtio-net-pci,netdev=host,mac=${macAddress('demo', 'cp1', 'user')}`]);
  const workerNet = option(qemuArgs({ config, node: w1, paths: paths(w1), accel: 'tcg' }), '-netdev')[1]!;
  assert.is(workerNet, 'user,id=host,restrict=on,hostfwd=tcp:127.0.0.1:12223-:22');
  assert.not.match(cpArgs.join(' '), /mcast|0\.0\.0\.0|bridge|tap/);
  assert.equal([sshPort(config, cp1), sshPort(config, w1), sshPort(config, w2)], [12222, 12223, 12224]);
  assert.equal(publishedPorts(config).map((p) => p.port), [16443, 12222, 12223, 12224]);
  assert.equal(sshArgs(config, w1, ['uptime']).slice(-2), ['core@127.0.0.1', 'uptime']);
  assert.equal(option(sshArgs(config, w1), '-p'), ['12223']);
});

test('MACs are derived from cluster and node names: stable, distinct, locally administered QEMU range', () => {
  const macs = config.nodes.flatMap((n) => [macAddress('demo', n.name, 'cluster'), macAddress('demo', n.name, 'user')]);
  assert.is(new Set(macs).size, macs.length);
  for (const mac of macs) assert.match(mac, /^52:54:00(:[0-9a-f]{2}){3}$/);
  assert.is(macAddress('demo', 'cp1', 'cluster'), macAddress('demo', 'cp1', 'cluster'));
  assert.is.not(macAddress('other', 'cp1', 'cluster'), macAddress('demo', 'cp1', 'cluster'));
});

test('sockets fit in sun_path however deep out/ is', () => {
  const deep = join(work, 'a'.repeat(150), 'out');
  const dir = socketDir(deep);
  assert.ok(`${dir}/switch/ctl`.length < 100, dir);
  assert.is.not(socketDir(deep), socketDir(outDir), 'one per tree');
});

test('a stand-in kernel replaces the FCOS drive and gets the node facts on its command line; nothing else changes', () => {
  const standIn = { kernel: '/k/vmlinuz', initrd: '/k/initrd.gz', append: 'corekube.mode=poweroff' };
  const args = qemuArgs({ config, node: w1, paths: paths(w1), accel: 'tcg', standIn });
  const real = qemuArgs({ config, node: w1, paths: paths(w1), accel: 'tcg' });
  assert.equal(option(args, '-kernel'), ['/k/vmlinuz']);
  const append = option(args, '-append')[0]!;
  assert.match(append, /corekube\.ip=10\.77\.0\.21\/24 corekube\.peers=10\.77\.0\.10,10\.77\.0\.22 /);
  assert.match(append, /corekube\.mode=poweroff$/);
  const strip = (a: string[]) => a.filter((x, i) => !['-kernel', '-initrd', '-append', '-drive'].includes(x) && !['-kernel', '-initrd', '-append'].includes(a[i - 1]!) && !x.includes('format=qcow2'));
  assert.equal(strip(args), strip(real));
});

test('a stand-in OS disk (test-only) takes the FCOS drive line, under -snapshot, booted by the stand-in kernel', () => {
  const standIn = { kernel: '/k/vmlinuz', initrd: '/k/initrd.gz', disk: '/k/root,1.qcow2' };
  const args = qemuArgs({ config, node: w1, paths: paths(w1), accel: 'tcg', standIn });
  const real = qemuArgs({ config, node: w1, paths: paths(w1), accel: 'tcg' });
  const drives = option(args, '-drive');
  assert.equal(drives[0], 'if=virtio,file=/k/root,,1.qcow2,format=qcow2');
  assert.equal(option(real, '-drive')[0], `if=virtio,file=${paths(w1).image.replaceAll(',', ',,')},format=qcow2`);
  assert.equal(drives.slice(1), option(real, '-drive').slice(1), 'the image disk as for FCOS');
  assert.ok(args.includes('-snapshot'));
  assert.equal(option(args, '-initrd'), ['/k/initrd.gz']);
  assert.equal(standInFromEnv({ COREKUBE_STANDIN_KERNEL: '/k', COREKUBE_STANDIN_INITRD: '/i', COREKUBE_STANDIN_DISK: '/d' }), { kernel: '/k', initrd: '/i', append: undefined, disk: '/d' });
  assert.equal(standInFromEnv({}), undefined);
  assert.throws(() => standInFromEnv({ COREKUBE_STANDIN_DISK: '/d' }), /COREKUBE_STANDIN_KERNEL is not/);
});

test('a port already taken on 127.0.0.1 is named with the config field that chose it', async () => {
  // A block of four ports free a moment ago (SSH for cp1, w1, w2; the API server), the
  // second one then taken here: no guess about what else this machine is running.
  const base = await freePortBlock(4);
  const ports = { apiServer: base + 3, sshBase: base };
  const server: Server = createServer();
  await new Promise<void>((resolve) => server.listen({ host: '127.0.0.1', port: base + 1 }, resolve));
  try {
    const error = await checkPortsFree({ ...config, hostPorts: ports }).then(() => undefined, (e: Error) => e);
    assert.ok(error, 'refused');
    assert.match(error!.message, new RegExp(`127\\.0\\.0\\.1:${base + 1} \\(SSH to w1, from hostPorts\\.sshBase in .*cluster\\.yaml\\) is already in use`));
  } finally {
    await new Promise((resolve) => server.close(resolve));
  }
  await checkPortsFree({ ...config, hostPorts: ports });
});

const lock = parseLock('lock', [
  'lockVersion: 1',
  'fcos: {stream: stable, release: "43.20260802.3.1", arch: x86_64}',
  'kubernetes: {version: v1.35.7}',
  'artifacts:',
  ...['fcos-qemu', 'kubeadm', 'kubelet', 'kubectl', 'crictl', 'containerd', 'runc', 'cni-plugins', 'butane'].map(
    (k) => `  ${k}: {url: "https://example.invalid/${k === 'fcos-qemu' ? 'f.qcow2.xz' : k === 'containerd' ? 'containerd-2.1.4-linux-amd64.tar.gz' : k}", sha256: "${'a'.repeat(64)}"${k === 'fcos-qemu' ? `, uncompressedSha256: "${'b'.repeat(64)}"` : ''}}`,
  ),
  'images:',
  `  - registry.k8s.io/pause:3.10.1@sha256:${'c'.repeat(64)}`,
  '',
].join('\n'));

test('verify: nodes must all be registered and Ready; kube-system pods Running', () => {
  const ready = (name: string, status = 'True') => ({ metadata: { name }, status: { conditions: [{ type: 'Ready', status }] } });
  assert.equal(judgeNodes(config, { items: [ready('cp1'), ready('w1'), ready('w2')] }), { name: 'nodes', ok: true, detail: '3 Ready' });
  const partial = judgeNodes(config, { items: [ready('cp1'), ready('w1', 'False')] });
  assert.equal(partial, { name: 'nodes', ok: false, detail: 'w2 not registered, w1 not Ready', node: 'w2' });
  assert.is(judgeSystemPods({ items: [] }).ok, false);
  const pods = judgeSystemPods({ items: [{ metadata: { name: 'etcd-cp1' }, status: { phase: 'Running' } }, { metadata: { name: 'coredns-1' }, spec: { nodeName: 'w1' }, status: { phase: 'Pending' } }] });
  assert.equal(pods, { name: 'kube-system pods', ok: false, detail: 'coredns-1 Pending on w1', node: 'w1' });
});

test('verify, three control planes: an etcd member Ready on each, and a control plane holding the virtual IP', () => {
  const ha = { ...config, nodes: [{ ...cp1 }, { ...cp1, name: 'cp2', ip: '10.77.0.11' }, { ...cp1, name: 'cp3', ip: '10.77.0.12' }, w1], controlPlane: { endpoint: '10.77.0.5', virtualIp: true } };
  const etcd = (name: string, ready = 'True', phase = 'Running') => ({ metadata: { name: `etcd-${name}` }, status: { phase, conditions: [{ type: 'Ready', status: ready }] } });
  assert.equal(judgeEtcd(ha, { items: [etcd('cp1'), etcd('cp2'), etcd('cp3')] }), { name: 'etcd members', ok: true, detail: '3 of 3 healthy' });
  assert.equal(judgeEtcd(ha, { items: [etcd('cp1'), etcd('cp2', 'False')] }), { name: 'etcd members', ok: false, detail: 'not healthy: etcd-cp2, etcd-cp3', node: 'cp2' });
  assert.equal(judgeVirtualIp(ha, { spec: { holderIdentity: 'cp3' } }), { name: 'virtual IP', ok: true, detail: '10.77.0.5 held by cp3' });
  assert.equal(judgeVirtualIp(ha, undefined).ok, false);
  assert.match(judgeVirtualIp(ha, { spec: { holderIdentity: 'w1' } }).detail, /no control plane holds kube-vip's lease plndr-cp-lock \(holder: w1\)/);
});

test('verify: the smoke pod runs the layout pause image, never pulled, on a worker, within the restricted Pod Security level', () => {
  const pod = smokePod(config, lock, 'smoke') as any;
  const container = pod.spec.containers[0];
  assert.is(container.image, 'registry.k8s.io/pause:3.10.1');
  assert.is(container.imagePullPolicy, 'Never');
  assert.equal(container.securityContext, { allowPrivilegeEscalation: false, capabilities: { drop: ['ALL'] } });
  assert.equal(pod.spec.securityContext, { runAsNonRoot: true, runAsUser: 65535, seccompProfile: { type: 'RuntimeDefault' } });
  assert.is(pod.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator, 'DoesNotExist');
  const single = { ...config, nodes: [cp1] };
  assert.is((smokePod(single, lock, 'smoke') as any).spec.affinity, undefined, 'a one-node cluster runs it on the control plane');
});

mkdirSync(outDir, { recursive: true });
test.run();
