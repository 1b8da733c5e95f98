// corekube's own units under real systemd: the stand-in node (test/fixtures/standin-node.ts,
// a Debian root file system laid out like FCOS, and an initramfs that runs the real
// Ignition from fw_cfg) booted by the unchanged boot code through the test-only
// COREKUBE_STANDIN_* override, under TCG. The image disk carries the distro's real
// containerd, shim, ctr and runc (test/fixtures/upstream.ts realRuntime), the fixture
// images and the boot scripts from fcc/scripts; kubeadm, kubelet and kubectl are stand-ins
// that record how they were started. Each node prints its state on the console once its
// units have settled (COREKUBE-NODE lines, test/fixtures/standin-node-report.sh); the tests
// read that, and log in over the forwarded SSH port with the key Ignition installed.
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { bootStage, stopCluster } from '../tasks/boot.ts';
import { runStages, selectStages } from '../tasks/lib/run/engine.ts';
import { macAddress } from '../tasks/lib/node/node-config.ts';
import { sshArgs, sshPort } from '../tasks/lib/node/qemu.ts';
import { stages } from '../tasks/stages.ts';
import { consoleLog } from './fixtures/appliance.ts';
import { buildStandInNode, readNodeReport, standInNodeEnv, type NodeReport, type StandInNode } from './fixtures/standin-node.ts';
import { clusterWorkspace, freePortBlock, loud, runCli, startUpstream, workspaceArgs, type Upstream, type Workspace } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-node-'));
const version = 'v1.35.7';
let up: Upstream;
let standIn: StandInNode;
const workspaces: Workspace[] = [];
/** Under TCG on 2 shared cores: a node's first boot to its report takes 1–3 minutes. */
const bootTimeoutMs = Number(process.env.COREKUBE_NODE_TIMEOUT ?? 900) * 1000;
const sshKey = join(work, 'id_ed25519');

test.before(loud(async () => {
  standIn = await buildStandInNode();
  if (standIn.builtSeconds > 0) console.log(`    (stand-in node built in ${standIn.builtSeconds.toFixed(0)} s; cached from now on)`);
  up = await startUpstream(work, version, { realRuntime: true });
  execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'corekube-node-test', '-f', sshKey]);
  Object.assign(process.env, standInNodeEnv(standIn));
}));

test.after(async () => {
  for (const ws of workspaces) await stopCluster(ws.outDir, { timeoutMs: 0 }).catch(() => undefined);
  await up?.close();
  for (const ws of workspaces) rmSync(ws.dir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
});

/**
 * The API server port and one SSH port per node, from a block below the kernel's ephemeral
 * range: ports the kernel hands out (port 0, outgoing connections of tests running beside
 * this one) would be free now and taken by the time QEMU binds them.
 */
async function freePorts(nodes: number): Promise<{ apiServer: number; sshBase: number }> {
  const base = await freePortBlock(nodes + 1);
  return { apiServer: base, sshBase: base + 1 };
}

function workspace(nodes: string[], ports: { apiServer: number; sshBase: number }): Workspace {
  const ws = clusterWorkspace(up, nodes, ports);
  writeFileSync(join(ws.dir, 'id.pub'), readFileSync(`${sshKey}.pub`));
  workspaces.push(ws);
  return ws;
}

const build = (ws: Workspace, goals: string[]) =>
  runStages(ws.context({ http: { retries: 1, stallTimeoutMs: 5000, backoffMs: 20 } }), selectStages(stages, goals), { renderer: 'silent' });
const log = (ws: Workspace, node: string) => consoleLog(ws.outDir, node);
const sha256 = (data: Buffer | string) => createHash('sha256').update(data).digest('hex');

/** Runs a command on a node as core over the forwarded SSH port (the key Ignition installed). */
function ssh(ws: Workspace, node: string, command: string): { code: number | null; stdout: string; stderr: string } {
  const config = ws.context().config;
  const target = config.nodes.find((n) => n.name === node)!;
  const result = spawnSync('ssh', ['-i', sshKey, '-o', 'BatchMode=yes', '-o', 'ConnectTimeout=20', ...sshArgs(config, target, [command])], { encoding: 'utf8', timeout: 120_000 });
  return { code: result.status, stdout: result.stdout ?? '', stderr: result.stderr ?? '' };
}

/** What a human wants when a node did not come up: the console's tail and, if SSH answers, systemd's view. */
function explain(ws: Workspace, node: string): string {
  const tail = log(ws, node).replace(/\r/g, '').split('\n').slice(-60).join('\n');
  let remote = '';
  try {
    const r = ssh(ws, node, "sudo systemctl --failed --no-pager; sudo journalctl -b --no-pager -n 80 -u 'corekube-*' -u containerd -u kubelet");
    remote = r.code === 0 ? r.stdout : `(ssh: exit ${r.code}: ${r.stderr.trim().slice(0, 300)})`;
  } catch (error) {
    remote = `(ssh: ${(error as Error).message})`;
  }
  return `\n── ${node}: last lines of ${join(ws.outDir, 'logs', `${node}.log`)}\n${tail}\n── ${node}: over SSH\n${remote}`;
}

/** Runs a node's checks; a failing one carries the node's console tail and systemd's view (fetched only then). */
function onNode(ws: Workspace, node: string, checks: () => void): void {
  try {
    checks();
  } catch (error) {
    if (error instanceof Error) error.message += explain(ws, node);
    throw error;
  }
}

/** Waits (polling the console, no sleeps as synchronisation) until every node printed its report. */
async function waitForReports(ws: Workspace, nodes: string[]): Promise<Map<string, NodeReport>> {
  const deadline = Date.now() + bootTimeoutMs;
  for (;;) {
    const reports = new Map(nodes.map((node) => [node, readNodeReport(log(ws, node))]));
    const failedInitrd = nodes.find((node) => reports.get(node)!.initrd.some((line) => line.startsWith('fail ')));
    if (failedInitrd) throw new Error(`${failedInitrd}: the initramfs failed${explain(ws, failedInitrd)}`);
    if (nodes.every((node) => reports.get(node)!.done)) return reports;
    if (Date.now() > deadline) {
      const late = nodes.filter((node) => !reports.get(node)!.done);
      throw new Error(`no report from ${late.join(', ')} within ${bootTimeoutMs / 1000} s${late.map((node) => explain(ws, node)).join('')}`);
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}

const values = (report: NodeReport, key: string) => report.lines.get(key) ?? [];
const one = (report: NodeReport, key: string) => values(report, key)[0] ?? '';

let pair: Workspace;
let reports: Map<string, NodeReport>;
let bootSeconds = 0;

test('two stand-in nodes boot through the real Ignition and systemd; every node prints its report', async () => {
  pair = workspace(['{name: cp1, role: control-plane, ip: 10.77.0.10, memory: 2GiB}', '{name: w1, role: worker, ip: 10.77.0.21, memory: 1536MiB}'], await freePorts(2));
  await build(pair, ['disk', 'ignition']);
  const started = Date.now();
  // The first kubeadm init and the first kubeadm join fail halfway (the stand-in's
  // fail-once, test/fixtures/upstream.ts): systemd retries each unit, which resets and tries again.
  // A wider device timeout than systemd's 90 s: on a host busy with other emulated guests,
  // udev has been seen to take longer than that to name the image disk by its label.
  const append = process.env.COREKUBE_STANDIN_APPEND;
  process.env.COREKUBE_STANDIN_APPEND = `${append} corekube.standin.kubeadm=fail-once systemd.default_device_timeout_sec=300`;
  try {
    await build(pair, ['boot']);
  } finally {
    process.env.COREKUBE_STANDIN_APPEND = append;
  }
  reports = await waitForReports(pair, ['cp1', 'w1']);
  bootSeconds = (Date.now() - started) / 1000;
  console.log(`    (2 stand-in nodes from QEMU start to their reports in ${bootSeconds.toFixed(0)} s under TCG)`);
});

test('Ignition ran in the initramfs from fw_cfg and systemd applied its preset at first boot', () => {
  for (const node of ['cp1', 'w1']) onNode(pair, node, () => {
    const report = reports.get(node)!;
    for (const stage of ['fetch-offline', 'files']) assert.ok(report.initrd.some((l) => l.startsWith(`ignition ${stage} ok`)), `${node}: ignition ${stage}`);
    assert.is(one(report, 'hostname'), node, `the hostname Ignition wrote`);
    const preset = one(report, 'preset');
    const role = node === 'cp1' ? 'corekube-control-plane.service' : 'corekube-join.service';
    for (const unit of ['var-mnt-corekube.mount', 'corekube-install.service', 'containerd.service', 'corekube-images.service', 'kubelet.service', role]) {
      assert.match(preset, `enable ${unit}`, `${node}: preset`);
      // Enabled by systemd's first-boot preset-all (Ignition writes only the preset).
      assert.is(report.units.get(unit)?.UnitFileState, 'enabled', `${node}: ${unit} enabled`);
    }
  });
});

test('every corekube unit reached its state: the image disk read-only, the binaries installed, containerd with corekube\'s config, the images imported', () => {
  for (const node of ['cp1', 'w1']) onNode(pair, node, () => {
    const report = reports.get(node)!;
    const unit = (name: string) => report.units.get(name) ?? {};
    assert.equal(values(report, 'failed').map((l) => l.trim()), [''], `${node}: failed units`);
    assert.is(unit('var-mnt-corekube.mount').ActiveState, 'active', `${node}: mount`);
    assert.match(one(report, 'mount'), /^\/dev\/vd\w+ ext4 ro[,\s]/, `${node}: mounted read-only`);
    for (const name of ['corekube-install.service', 'corekube-images.service', node === 'cp1' ? 'corekube-control-plane.service' : 'corekube-join.service']) {
      assert.equal([unit(name).ActiveState, unit(name).Result, unit(name).ExecMainStatus], ['active', 'success', '0'], `${node}: ${name}`);
    }
    // The kubeadm unit failed once (fail-once) and systemd ran it again.
    assert.is(unit(node === 'cp1' ? 'corekube-control-plane.service' : 'corekube-join.service').NRestarts, '1', `${node}: restarts`);
    assert.equal(one(report, 'local-bin').trim().split(' ').sort(), ['containerd', 'containerd-shim-runc-v2', 'crictl', 'ctr', 'kubeadm', 'kubectl', 'kubelet', 'runc']);
    assert.equal(one(report, 'cni-bin').trim().split(' ').sort(), ['bridge', 'host-local', 'loopback', 'portmap']);
    assert.equal([unit('containerd.service').ActiveState, unit('containerd.service').SubState], ['active', 'running'], `${node}: containerd`);
    assert.is(one(report, 'containerd-cmdline').trim(), '/usr/local/bin/containerd --config /etc/corekube/containerd.toml');
    assert.match(one(report, 'containerd-version'), /^1\.6\./, 'the distro\'s containerd from the image disk');
    assert.equal([unit('kubelet.service').ActiveState, unit('kubelet.service').SubState], ['active', 'running'], `${node}: kubelet`);
    for (const masked of ['zincati.service', 'rpm-ostree-countme.timer', 'rpm-ostree-countme.service', 'docker.service', 'docker.socket']) {
      assert.ok(values(report, 'unit-file').includes(`${masked} enabled=masked active=inactive`), `${node}: ${masked}: ${values(report, 'unit-file').join('; ')}`);
    }
    assert.not.match(log(pair, node), /COREKUBE-STANDIN stub-ran/, `${node}: a masked FCOS unit ran`);
  });
});

test('containerd lists exactly the lock\'s image names (tag and digest refs), every one pinned', () => {
  const index = JSON.parse(readFileSync(join(pair.outDir, 'images', 'index.json'), 'utf8')) as { manifests: { annotations?: Record<string, string> }[] };
  const expected = index.manifests.map((m) => m.annotations?.['org.opencontainers.image.ref.name']).filter((n): n is string => !!n).sort();
  assert.ok(expected.some((n) => n.includes('@sha256:')) && expected.some((n) => /:[\w.-]+$/.test(n) && !n.includes('@')), 'the layout has tag and digest refs');
  const manifests = new Set(index.manifests.map((m) => (m as { digest?: string }).digest)).size;
  for (const node of ['cp1', 'w1']) {
    const images = values(reports.get(node)!, 'image');
    // containerd's CRI plugin adds one reference per image named by its image ID (the
    // config's digest, `sha256:…`): the kubelet's name for it. Every other name is the lock's.
    const ids = images.filter((line) => /^sha256:[0-9a-f]{64} /.test(line));
    const names = images.filter((line) => !ids.includes(line)).map((line) => line.split(' ')[0]!).sort();
    assert.equal(names, expected, `${node}: ctr -n k8s.io images ls`);
    assert.ok(ids.length >= 1 && ids.length <= manifests, `${node}: ${ids.length} image IDs for ${manifests} images`);
    for (const line of images) assert.match(line, /io\.cri-containerd\.pinned=pinned/, `${node}: ${line}`);
  }
});

test('kubelet started with kubeadm\'s drop-in; a kubeadm init and a kubeadm join that failed halfway are retried by systemd after kubeadm reset, the cluster CA kept', () => {
  for (const node of ['cp1', 'w1']) onNode(pair, node, () => {
    const records = values(reports.get(node)!, 'record');
    const kubelet = records.filter((r) => r.startsWith('kubelet argv '));
    assert.ok(kubelet.length >= 1, `${node}: kubelet never started`);
    assert.is(kubelet[0], 'kubelet argv --bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf --kubeconfig=/etc/kubernetes/kubelet.conf --config=/var/lib/kubelet/config.yaml');
    const kubeadm = records.filter((r) => r.startsWith('kubeadm argv '));
    const config = sha256(readFileSync(join(pair.outDir, 'files', node, 'kubeadm.yaml')));
    if (node === 'cp1') {
      const init = 'kubeadm argv init --config /etc/corekube/kubeadm.yaml --skip-token-print';
      // The retry reset what the failed try left (its preflight would refuse the manifests), then ran init again.
      assert.equal(kubeadm, [init, 'kubeadm argv reset --force', init]);
      assert.ok(records.includes('kubeadm failed-once init'), records.join('\n'));
      assert.not.ok(records.some((r) => r.startsWith('kubeadm preflight')), records.join('\n'));
      // Both inits signed with the cluster CA made at build time, though kubeadm reset empties /etc/kubernetes/pki.
      const ca = ['crt', 'key'].map((ext) => `kubeadm pki ca.${ext} sha256=${sha256(readFileSync(join(pair.outDir, 'pki', `ca.${ext}`)))}`);
      assert.equal(records.filter((r) => r.startsWith('kubeadm pki ')), [...ca, ...ca], records.join('\n'));
      assert.ok(records.includes(`kubeadm file /etc/corekube/kubeadm.yaml sha256=${config} kinds=InitConfiguration,ClusterConfiguration,KubeletConfiguration,`), records.join('\n'));
      // control-plane-up.sh then waited for /readyz and applied the CNI's config and manifests/.
      assert.ok(records.includes('kubectl argv --kubeconfig /etc/kubernetes/admin.conf apply -f /etc/corekube/manifests/'), records.join('\n'));
      assert.ok(records.some((r) => /^kubectl argv --kubeconfig \/etc\/kubernetes\/admin\.conf apply -f \/var\/mnt\/corekube\/manifests\/.*flannel.*\.yaml$/.test(r)), records.join('\n'));
    } else {
      // The stand-in applies kubeadm join's FileAvailable preflight, which an Ignition-written
      // ca.crt, or the one a failed try fetched by discovery, would fail: reset between the tries.
      const joinArgv = 'kubeadm argv join --config /etc/corekube/kubeadm.yaml';
      assert.equal(kubeadm, [joinArgv, 'kubeadm argv reset --force', joinArgv]);
      assert.ok(records.includes('kubeadm failed-once join'), records.join('\n'));
      assert.not.ok(records.some((r) => r.startsWith('kubeadm preflight')), records.join('\n'));
      assert.ok(records.includes(`kubeadm file /etc/corekube/kubeadm.yaml sha256=${config} kinds=JoinConfiguration,`), records.join('\n'));
    }
  });
});

test('NetworkManager brought the cluster NIC up from the keyfile (by MAC, static IP); the nodes ping each other; no default route on the user NIC', () => {
  const config = pair.context().config;
  for (const node of config.nodes) onNode(pair, node.name, () => {
    const report = reports.get(node.name)!;
    const mac = macAddress(config.name, node.name, 'cluster');
    const link = values(report, 'link').find((l) => l.split(' ')[1] === mac);
    assert.ok(link, `${node.name}: no NIC with ${mac}: ${values(report, 'link').join('; ')}`);
    const device = link!.split(' ')[0]!;
    assert.is(link!.split(' ').slice(2).join(' ').trim(), `${node.ip}/24`, `${node.name}: cluster address`);
    assert.ok(values(report, 'nm-active').includes(`corekube-cluster:${device}:activated`), `${node.name}: ${values(report, 'nm-active').join('; ')}`);
    const userDevice = values(report, 'link').find((l) => l.split(' ')[1] === macAddress(config.name, node.name, 'user'))!.split(' ')[0]!;
    assert.ok(values(report, 'nm-active').includes(`corekube-host:${userDevice}:activated`), `${node.name}: the user NIC by DHCP: ${values(report, 'nm-active').join('; ')}`);
    const routes = values(report, 'default-route');
    assert.ok(routes.length > 0 && routes.every((r) => r.includes(` dev ${device} `) || r.endsWith(` dev ${device}`)), `${node.name}: default routes ${routes.join('; ')}`);
    const peers = config.nodes.filter((n) => n.name !== node.name);
    assert.equal(values(report, 'ping'), peers.map((peer) => `${peer.ip} from ${node.ip} yes`), `${node.name}: ping`);
  });
});

test('SSH on the forwarded port takes the key from Ignition; core runs ctr through sudo', () => {
  const config = pair.context().config;
  assert.is(sshPort(config, config.nodes[1]!), config.hostPorts.sshBase + 1);
  for (const node of ['cp1', 'w1']) {
    const result = ssh(pair, node, 'hostname; sudo ctr -n k8s.io images ls -q | wc -l');
    assert.is(result.code, 0, `${node}: ${result.stderr}`);
    const [host, count] = result.stdout.trim().split('\n');
    assert.is(host, node);
    assert.is(Number(count), values(reports.get(node)!, 'image').length);
  }
});

test('make down powers the nodes off', async () => {
  const report = await stopCluster(pair.outDir, { timeoutMs: 90_000 });
  assert.equal(report.killed, [], `still up after 90 s: ${report.killed.join(', ')}`);
});

test('an image disk that lacks a binary: corekube-install fails with its message on the console, and make verify names it', async () => {
  const ws = workspace(['{name: solo, role: control-plane, ip: 10.77.0.10, memory: 2GiB}'], await freePorts(1));
  await build(ws, ['disk', 'ignition']);
  // The disk the node mounts lacks bin/kubeadm (removed after the disk stage wrote it):
  // boot alone, or the disk stage would see its output changed and rebuild it.
  execFileSync('debugfs', ['-w', '-R', 'rm /bin/kubeadm', join(ws.outDir, 'image-disk.img')], { stdio: 'ignore' });
  await runStages(ws.context(), [bootStage], { renderer: 'silent' });
  const report = (await waitForReports(ws, ['solo'])).get('solo')!;
  const message = 'corekube: /var/mnt/corekube/bin/kubeadm is missing from the image disk (rebuild it: make disk)';
  assert.match(one(report, 'failed'), /corekube-install\.service/, explain(ws, 'solo'));
  assert.ok(values(report, 'journal').includes(`corekube-install.service ${message}`), values(report, 'journal').join('\n'));
  assert.equal([report.units.get('corekube-install.service')?.Result, report.units.get('corekube-install.service')?.ExecMainStatus], ['exit-code', '1']);
  // Nothing that needs the install ran.
  for (const unit of ['containerd.service', 'corekube-images.service', 'corekube-control-plane.service']) {
    assert.is(report.units.get(unit)?.ActiveState, 'inactive', `${unit}: ${JSON.stringify(report.units.get(unit))}`);
  }
  // --only (make verify ONLY=1): the tampered disk must not be rebuilt under the running node.
  const verify = await runCli(['verify', '--only', ...workspaceArgs(ws)], { env: { VERIFY_TIMEOUT: '3' } });
  const said = verify.stderr + verify.stdout;
  assert.is.not(verify.code, 0, said);
  assert.match(said, /last lines of solo's console/);
  assert.ok(said.includes(`corekube-install.service ${message}`), said);
  await stopCluster(ws.outDir, { timeoutMs: 0 });
});

test('no image disk (a blank drive in its place): corekube-install says so on the console, and make verify names it', async () => {
  const ws = workspace(['{name: solo, role: control-plane, ip: 10.77.0.10, memory: 2GiB}'], await freePorts(1));
  await build(ws, ['disk', 'ignition']);
  // The drive is there, but nothing on it is labelled corekube: the mount waits for the
  // label in vain (systemd's 90 s device timeout) and fails.
  const disk = join(ws.outDir, 'image-disk.img');
  writeFileSync(disk, Buffer.alloc(1 << 20));
  await runStages(ws.context(), [bootStage], { renderer: 'silent' });
  const report = (await waitForReports(ws, ['solo'])).get('solo')!;
  const message = 'corekube: no image disk: nothing labelled corekube is mounted on /var/mnt/corekube (the node needs out/image-disk.img as its second drive: make disk boot)';
  assert.match(one(report, 'failed'), /corekube-install\.service/, explain(ws, 'solo'));
  assert.ok(values(report, 'journal').includes(`corekube-install.service ${message}`), values(report, 'journal').join('\n'));
  for (const unit of ['containerd.service', 'corekube-images.service', 'corekube-control-plane.service']) {
    assert.is(report.units.get(unit)?.ActiveState, 'inactive', `${unit}: ${JSON.stringify(report.units.get(unit))}`);
  }
  const verify = await runCli(['verify', '--only', ...workspaceArgs(ws)], { env: { VERIFY_TIMEOUT: '3' } });
  const said = verify.stderr + verify.stdout;
  assert.is.not(verify.code, 0, said);
  assert.ok(said.includes(`corekube-install.service ${message}`), said);
  await stopCluster(ws.outDir, { timeoutMs: 0 });
});

test.run();
