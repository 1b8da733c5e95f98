// The ignition stage end to end on a 3-node cluster: configs accepted by the real
// ignition-validate and applied by the real Ignition to scratch roots, units checked by
// systemd-analyze, boot scripts by shellcheck, the image import script run against a
// real containerd, and bad input refused with nothing half-written.
import { execFileSync, spawnSync } from 'node:child_process';
import { cpSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { parseAllDocuments } from 'yaml';
import { runStages } from '../tasks/lib/run/engine.ts';
import { ignitionStage } from '../tasks/ignition.ts';
import { imagesStage } from '../tasks/images.ts';
import { pkiStage } from '../tasks/pki.ts';
import { startContainerd } from './fixtures/containerd.ts';
import { applyIgnition } from './fixtures/ignition.ts';
import { startRegistry, type RegistryFixture } from './fixtures/registry.ts';
import { buildUpstreamTree, type UpstreamTree } from './fixtures/upstream.ts';
import { fixtureMirrors, listFiles, lockEntry, loud, makeWorkspace, projectImages, projectRoot, runCli, workspaceArgs, type Workspace, type WorkspaceOptions } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-ignition-'));
const version = 'v1.35.7';
const threeNodes = [
  '{name: cp1, role: control-plane, ip: 10.77.0.10}',
  '{name: w1, role: worker, ip: 10.77.0.21, memory: 2GiB}',
  '{name: w2, role: worker, ip: 10.77.0.22, memory: 2GiB}',
];
let tree: UpstreamTree;
let registry: RegistryFixture;
const workspaces: Workspace[] = [];

test.before(loud(async () => {
  tree = await buildUpstreamTree(join(work, 'upstream'), { qcow2SizeMiB: 1, kubernetesVersion: version });
  // The kubeadm set for the version, and every image manifests/ names: the lock must cover them.
  registry = await startRegistry({
    images: projectImages(version),
    work,
  });
}));
test.after(async () => {
  await registry?.close();
  for (const ws of workspaces) rmSync(ws.dir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
});

function workspace(options: WorkspaceOptions = {}): Workspace {
  const ws = makeWorkspace(tree, 'http://127.0.0.1:9', {
    nodes: threeNodes,
    registries: fixtureMirrors(registry.host),
    images: registry.images.map((i) => lockEntry(i)),
    ...options,
  });
  workspaces.push(ws);
  return ws;
}

const build = (ws: Workspace, overrides = {}) => runStages(ws.context(overrides), [pkiStage, ignitionStage], { renderer: 'silent' });
const mode = (file: string) => statSync(file).mode & 0o777;

let ws: Workspace;
const roots: Record<string, string> = {};

test('every node gets a config that ignition-validate accepts', async () => {
  ws = workspace();
  await build(ws);
  for (const node of ['cp1', 'w1', 'w2']) {
    const file = join(ws.outDir, 'ignition', `${node}.ign`);
    assert.is(mode(file), 0o600, 'the config holds the token: 0600');
    const config = JSON.parse(readFileSync(file, 'utf8'));
    assert.is(config.ignition.version, '3.3.0');
    execFileSync('ignition-validate', [file]);
  }
  assert.equal(readdirSync(join(ws.outDir, 'files')).sort(), ['cp1', 'w1', 'w2']);
});

test('the real Ignition applies each config: units, masks, drop-ins, files and modes, the SSH key', async () => {
  for (const node of ['cp1', 'w1']) roots[node] = (await applyIgnition(join(ws.outDir, 'ignition', `${node}.ign`), work)).root;
  for (const [node, root] of Object.entries(roots)) {
    const etc = join(root, 'etc');
    assert.is(readFileSync(join(etc, 'hostname'), 'utf8'), `${node}\n`);
    assert.match(readFileSync(join(etc, 'hosts'), 'utf8'), /10\.77\.0\.22 +w2 /);
    const preset = readFileSync(join(etc, 'systemd', 'system-preset', '20-ignition.preset'), 'utf8');
    for (const unit of ['var-mnt-corekube.mount', 'corekube-install.service', 'containerd.service', 'corekube-images.service', 'kubelet.service']) {
      assert.ok(existsSync(join(etc, 'systemd', 'system', unit)), `${node}: ${unit}`);
      assert.match(preset, `enable ${unit}`);
    }
    for (const masked of ['zincati.service', 'rpm-ostree-countme.timer', 'docker.service', 'docker.socket']) {
      assert.is(readlinkSync(join(etc, 'systemd', 'system', masked)), '/dev/null', `${node}: ${masked} masked`);
    }
    assert.match(readFileSync(join(etc, 'systemd', 'system', 'kubelet.service.d', '10-kubeadm.conf'), 'utf8'), /KUBELET_KUBEADM_ARGS/);
    assert.is(mode(join(etc, 'corekube', 'kubeadm.yaml')), 0o600);
    assert.is(mode(join(etc, 'NetworkManager', 'system-connections', 'corekube-cluster.nmconnection')), 0o600);
    assert.match(readFileSync(join(etc, 'NetworkManager', 'system-connections', 'corekube-cluster.nmconnection'), 'utf8'), new RegExp(`address1=10\\.77\\.0\\.${node === 'cp1' ? 10 : 21}/24,10\\.77\\.0\\.1`));
    const keyFile = join(root, 'var', 'home', 'core', '.ssh', 'authorized_keys.d', 'corekube');
    assert.match(readFileSync(keyFile, 'utf8'), /^ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGNvcmVrdWJldGVzdGtleQ test@corekube/);
    assert.is(mode(keyFile), 0o600);
    for (const path of [keyFile, join(root, 'var', 'home', 'core', '.ssh'), join(root, 'var', 'home', 'core', '.ssh', 'authorized_keys.d')]) {
      assert.is(statSync(path).uid, 1000, `${path} belongs to core, or sshd ignores it`);
    }
    assert.is(mode(join(root, 'var', 'home', 'core', '.ssh')), 0o700);
    assert.match(readFileSync(join(etc, 'corekube', 'containerd.toml'), 'utf8'), /sandbox = "registry\.k8s\.io\/pause:3\.10\.1"/);
  }
  const cpEtc = join(roots.cp1!, 'etc');
  assert.is(readFileSync(join(cpEtc, 'kubernetes', 'pki', 'ca.crt'), 'utf8'), readFileSync(join(ws.outDir, 'pki', 'ca.crt'), 'utf8'));
  assert.is(mode(join(cpEtc, 'kubernetes', 'pki', 'ca.key')), 0o600);
  assert.is(readFileSync(join(cpEtc, 'kubernetes', 'pki', 'ca.key'), 'utf8'), readFileSync(join(ws.outDir, 'pki', 'ca.key'), 'utf8'));
  assert.ok(existsSync(join(cpEtc, 'systemd', 'system', 'corekube-control-plane.service')));
  assert.ok(existsSync(join(cpEtc, 'kubernetes', 'admission', 'pod-security.yaml')));
  const [init, cluster] = parseAllDocuments(readFileSync(join(cpEtc, 'corekube', 'kubeadm.yaml'), 'utf8')).map((d) => d.toJS());
  assert.is(init.kind, 'InitConfiguration');
  assert.is(init.bootstrapTokens[0].token, readFileSync(join(ws.outDir, 'pki', 'bootstrap-token'), 'utf8').trim());
  assert.is(cluster.networking.podSubnet, '10.244.0.0/16');
  assert.is(cluster.kubernetesVersion, version);
  assert.ok(cluster.apiServer.certSANs.includes('127.0.0.1'), 'the host reaches the API server on 127.0.0.1');
});

test('a worker holds neither the CA certificate (kubeadm join refuses an existing one) nor its key, and no control-plane unit', () => {
  const root = roots.w1!;
  const everything = listFiles(root);
  assert.not.ok(everything.some((f) => f.endsWith('ca.key') || f.endsWith('ca.crt')), everything.filter((f) => f.includes('pki')).join(', '));
  assert.not.ok(existsSync(join(root, 'etc', 'kubernetes', 'pki')), 'kubeadm join creates /etc/kubernetes/pki itself');
  assert.not.ok(readFileSync(join(ws.outDir, 'ignition', 'w1.ign'), 'utf8').includes('PRIVATE KEY'));
  assert.not.ok(listFiles(join(ws.outDir, 'files', 'w1')).includes('ca.key'));
  assert.ok(existsSync(join(root, 'etc', 'systemd', 'system', 'corekube-join.service')));
  const [join_] = parseAllDocuments(readFileSync(join(root, 'etc', 'corekube', 'kubeadm.yaml'), 'utf8')).map((d) => d.toJS());
  assert.is(join_.kind, 'JoinConfiguration');
  assert.is(join_.discovery.bootstrapToken.apiServerEndpoint, '10.77.0.10:6443');
  assert.equal(join_.discovery.bootstrapToken.caCertHashes, [readFileSync(join(ws.outDir, 'pki', 'ca-cert-hash'), 'utf8').trim()]);
});

test('three control planes: each holds the shared CAs and keys, its join configuration and kube-vip for the endpoint; the worker none of them', async () => {
  const haWs = workspace({
    nodes: ['{name: cp1, role: control-plane, ip: 10.77.0.10}', '{name: cp2, role: control-plane, ip: 10.77.0.11}', '{name: cp3, role: control-plane, ip: 10.77.0.12}', '{name: w1, role: worker, ip: 10.77.0.21, memory: 2GiB}'],
    extraConfig: ['controlPlane: {endpoint: 10.77.0.5}'],
  });
  await build(haWs);
  const pki = (name: string) => readFileSync(join(haWs.outDir, 'pki', name), 'utf8');
  const shared: [string, string, number][] = [
    ['kubernetes/pki/ca.crt', 'ca.crt', 0o644], ['kubernetes/pki/ca.key', 'ca.key', 0o600],
    ['kubernetes/pki/front-proxy-ca.crt', 'front-proxy-ca.crt', 0o644], ['kubernetes/pki/front-proxy-ca.key', 'front-proxy-ca.key', 0o600],
    ['kubernetes/pki/etcd/ca.crt', 'etcd-ca.crt', 0o644], ['kubernetes/pki/etcd/ca.key', 'etcd-ca.key', 0o600],
    ['kubernetes/pki/sa.key', 'sa.key', 0o600], ['kubernetes/pki/sa.pub', 'sa.pub', 0o644],
  ];
  const endpoint = '10.77.0.5:6443';
  for (const node of ['cp1', 'cp2', 'cp3']) {
    execFileSync('ignition-validate', [join(haWs.outDir, 'ignition', `${node}.ign`)]);
    const { root } = await applyIgnition(join(haWs.outDir, 'ignition', `${node}.ign`), work);
    const etc = join(root, 'etc');
    for (const [path, source, fileMode] of shared) {
      assert.is(readFileSync(join(etc, path), 'utf8'), pki(source), `${node}: ${path} is the build's ${source}`);
      assert.is(mode(join(etc, path)), fileMode, `${node}: ${path} mode`);
    }
    const [joinDoc, ...rest] = parseAllDocuments(readFileSync(join(etc, 'corekube', 'kubeadm-join.yaml'), 'utf8')).map((d) => d.toJS());
    assert.is(rest.length, 0);
    assert.is(joinDoc.kind, 'JoinConfiguration');
    assert.is(joinDoc.discovery.bootstrapToken.apiServerEndpoint, endpoint);
    assert.equal(joinDoc.controlPlane, { localAPIEndpoint: { advertiseAddress: { cp1: '10.77.0.10', cp2: '10.77.0.11', cp3: '10.77.0.12' }[node], bindPort: 6443 } });
    assert.not.ok('certificateKey' in joinDoc.controlPlane, 'no --upload-certs secret: the shared files are on the node');
    const first = parseAllDocuments(readFileSync(join(etc, 'corekube', 'kubeadm.yaml'), 'utf8')).map((d) => d.toJS());
    if (node === 'cp1') {
      assert.equal(first.map((d) => d.kind), ['InitConfiguration', 'ClusterConfiguration', 'KubeletConfiguration']);
      assert.is(first[1].controlPlaneEndpoint, endpoint);
      for (const san of ['10.77.0.5', '10.77.0.10', '10.77.0.11', '10.77.0.12', 'cp2']) assert.ok(first[1].apiServer.certSANs.includes(san), san);
    } else {
      assert.equal(first, [joinDoc], `${node}: joins the cluster cp1 makes`);
    }
    const env = readFileSync(join(etc, 'corekube', 'control-plane.env'), 'utf8');
    assert.match(env, `COREKUBE_NODE_NAME=${node}\n`);
    assert.match(env, 'COREKUBE_ENDPOINT=10.77.0.5\nCOREKUBE_VIRTUAL_IP=yes\nCOREKUBE_INITIALIZER=cp1\nCOREKUBE_CONTROL_PLANES="cp1=10.77.0.10 cp2=10.77.0.11 cp3=10.77.0.12"\n');
    for (const [variant, kubeconfig] of [['init', 'super-admin.conf'], ['join', 'admin.conf']]) {
      const pod = parseAllDocuments(readFileSync(join(etc, 'corekube', 'kube-vip', `${variant}.yaml`), 'utf8'))[0]!.toJS();
      assert.is(pod.kind, 'Pod');
      assert.is(pod.spec.hostNetwork, true);
      assert.equal(pod.spec.volumes, [{ name: 'kubeconfig', hostPath: { path: `/etc/kubernetes/${kubeconfig}`, type: 'File' } }]);
      const env = Object.fromEntries(pod.spec.containers[0].env.filter((e: { value?: string }) => e.value !== undefined).map((e: { name: string; value: string }) => [e.name, e.value]));
      assert.is(env.address, '10.77.0.5');
      assert.is(env.vip_arp, 'true');
      assert.is(env.cp_enable, 'true');
      assert.is(env.vip_leaderelection, 'true');
      assert.match(pod.spec.containers[0].image, /^ghcr\.io\/kube-vip\/kube-vip:v/);
      assert.is(pod.spec.containers[0].imagePullPolicy, 'Never');
      assert.is(pod.spec.securityContext.seLinuxOptions.type, 'spc_t');
    }
  }
  const { root } = await applyIgnition(join(haWs.outDir, 'ignition', 'w1.ign'), work);
  const everything = listFiles(root);
  assert.not.ok(everything.some((f) => /\/pki\/|\.key$|sa\.pub|kube-vip|kubeadm-join|control-plane\.env/.test(f)), everything.filter((f) => f.includes('kubernetes') || f.includes('corekube')).join(', '));
  const text = readFileSync(join(haWs.outDir, 'ignition', 'w1.ign'), 'utf8');
  assert.not.ok(text.includes('PRIVATE KEY'), 'no private key of any kind in a worker\'s config');
  assert.is(parseAllDocuments(readFileSync(join(root, 'etc', 'corekube', 'kubeadm.yaml'), 'utf8'))[0]!.toJS().discovery.bootstrapToken.apiServerEndpoint, endpoint);
});

test('systemd-analyze verifies the units; shellcheck passes every boot script', () => {
  const units = join(roots.cp1!, 'etc', 'systemd', 'system');
  const files = readdirSync(units).filter((f) => /\.(service|mount)$/.test(f) && !lstatSync(join(units, f)).isSymbolicLink()).map((f) => join(units, f));
  assert.ok(files.length >= 6);
  const result = spawnSync('systemd-analyze', ['verify', '--man=no', '--generators=no', ...files], { encoding: 'utf8' });
  // On this host the binaries and the mount's device do not exist (they come from the
  // image disk at boot); anything else systemd-analyze says is a defect in a unit.
  // Lines about the host's own units (whatever this machine has installed) are not ours.
  const ours = new Set(files.map((f) => f.split('/').pop()!));
  const hostUnit = (line: string) => {
    const unit = /^([\w@.\\-]+\.(?:service|mount|socket|target|timer|path|slice|scope)):/.exec(line.trim())?.[1];
    return unit !== undefined && !ours.has(unit);
  };
  const complaints = `${result.stdout}${result.stderr}`
    .split('\n')
    .filter((line) => line.trim() && !hostUnit(line) && !/is not executable: No such file or directory|Command .* is not executable|Failed to prepare filename|var-mnt-corekube\.mount: Failed to|Unit .* not found|Failed to create .*: Invalid argument|Failed to load unit file|Load error/i.test(line));
  assert.equal(complaints, []);
  execFileSync('shellcheck', readdirSync(join(projectRoot, 'fcc', 'scripts')).map((f) => join(projectRoot, 'fcc', 'scripts', f)));
});

test('the boot-time import script loads out/images into a real containerd under the names the kubelet asks for, pinned', async () => {
  const images = workspace();
  await runStages(images.context({ http: { retries: 1, stallTimeoutMs: 1500, backoffMs: 20 } }), [imagesStage], { renderer: 'silent' });
  const disk = join(work, 'disk');
  mkdirSync(disk);
  cpSync(join(images.outDir, 'images'), join(disk, 'images'), { recursive: true });
  const containerd = await startContainerd({ work });
  try {
    const result = spawnSync(join(projectRoot, 'fcc', 'scripts', 'import-images.sh'), [], {
      env: { ...process.env, COREKUBE_DISK: disk, COREKUBE_CTR: 'ctr', CONTAINERD_ADDRESS: containerd.socket },
      encoding: 'utf8',
    });
    assert.is(result.status, 0, result.stderr);
    const listed = await containerd.images();
    const pinned = listed.filter((i) => i.labels['io.cri-containerd.pinned'] === 'pinned').map((i) => i.name);
    for (const image of registry.images) {
      assert.ok(pinned.includes(`${image.name}:${image.tag}`), `${image.name}:${image.tag} imported and pinned`);
      assert.ok(pinned.includes(`${image.name}@${image.digest}`), `${image.name}@digest imported and pinned`);
    }
    assert.match(result.stdout, `imported and pinned ${listed.filter((i) => !i.name.startsWith('sha256:')).length} image names`);
  } finally {
    await containerd.close();
  }
});

/** A project root with a copy of fcc/ and manifests/ to break. */
function brokenProject(edit: (fcc: string) => void): string {
  const root = mkdtempSync(join(work, 'project-'));
  cpSync(join(projectRoot, 'fcc'), join(root, 'fcc'), { recursive: true });
  cpSync(join(projectRoot, 'manifests'), join(root, 'manifests'), { recursive: true });
  edit(join(root, 'fcc'));
  return root;
}

async function failure(ws: Workspace, overrides = {}): Promise<Error> {
  try {
    await build(ws, overrides);
  } catch (error) {
    return error as Error;
  }
  throw new Error('the build succeeded where it should have failed');
}

function assertNothingHalfWritten(ws: Workspace) {
  const leftovers = [...listFiles(join(ws.outDir, 'ignition')), ...listFiles(join(ws.outDir, 'files'))].filter((f) => f.startsWith('.') || f.includes('/.'));
  assert.equal(leftovers, []);
  assert.equal(listFiles(join(ws.outDir, 'ignition')), []);
}

test('an fcc file using a Butane feature the built-in translator lacks: the field is named', async () => {
  const root = brokenProject((fcc) => {
    writeFileSync(join(fcc, 'worker.bu'), `${readFileSync(join(fcc, 'worker.bu'), 'utf8')}storage:\n  luks:\n    - name: data\n      device: /dev/vdb\n`);
  });
  const broken = workspace();
  const error = await failure(broken, { root });
  assert.match(error.message, /worker\.bu/);
  assert.match(error.message, /storage\.luks/);
  assertNothingHalfWritten(broken);
});

test('a kubeadm override that contradicts cluster.yaml names the file, the field and both values', async () => {
  const root = brokenProject((fcc) => {
    writeFileSync(join(fcc, 'kubeadm.yaml'), 'apiVersion: kubeadm.k8s.io/v1beta4\nkind: ClusterConfiguration\nnetworking:\n  podSubnet: 10.32.0.0/12\n');
  });
  const broken = workspace();
  const error = await failure(broken, { root });
  assert.match(error.message, /fcc\/kubeadm\.yaml/);
  assert.match(error.message, /ClusterConfiguration\.networking\.podSubnet: expected "10\.244\.0\.0\/16" \(from network\.podCidr/);
  assert.match(error.message, /found +"10\.32\.0\.0\/12"/);
  assertNothingHalfWritten(broken);
});

test('a kubeadm override that only adds settings is merged', async () => {
  const root = brokenProject((fcc) => {
    writeFileSync(join(fcc, 'kubeadm.yaml'), 'apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nmaxPods: 50\n');
  });
  const merged = workspace();
  await build(merged, { root });
  // kubeadm init uploads the kubelet's configuration for the whole cluster; join ignores any in its file.
  const docs = parseAllDocuments(readFileSync(join(merged.outDir, 'files', 'cp1', 'kubeadm.yaml'), 'utf8')).map((d) => d.toJS());
  const kubelet = docs.find((d) => d.kind === 'KubeletConfiguration');
  assert.is(kubelet.maxPods, 50);
  assert.is(kubelet.cgroupDriver, 'systemd');
  const workerDocs = parseAllDocuments(readFileSync(join(merged.outDir, 'files', 'w1', 'kubeadm.yaml'), 'utf8')).map((d) => d.toJS());
  assert.equal(workerDocs.map((d) => d.kind), ['JoinConfiguration']);
});

test('a node IP clash and a missing SSH key file are config errors; nothing is written', async () => {
  const clash = workspace({ nodes: [...threeNodes.slice(0, 2), '{name: w2, role: worker, ip: 10.77.0.21}'] });
  const result = await runCli(['ignition', ...workspaceArgs(clash)]);
  assert.is(result.code, 3, result.stderr);
  assert.match(result.stderr, /nodes\[2\]\.ip: expected an address not used by nodes\[1\]/);
  assert.not.ok(existsSync(clash.outDir));
  const noKey = workspace();
  rmSync(join(noKey.dir, 'id.pub'));
  const missing = await runCli(['ignition', ...workspaceArgs(noKey)]);
  assert.is(missing.code, 3);
  assert.match(missing.stderr, /sshPublicKeyFile/);
  assert.not.ok(existsSync(noKey.outDir));
});

test.run();
