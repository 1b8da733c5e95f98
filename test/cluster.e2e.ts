// The real-cluster tier (`make e2e`, never part of `make test`): upstream's own programs,
// built from source at the pinned versions (test/fixtures/upstream-build.ts) and served as
// upstream serves them (test/fixtures/real-upstream.ts), through corekube's whole pipeline
// from an empty workspace: `pin` against that upstream and no other network, then
// `cluster` (fetch … boot, verify) with one control plane and one worker, both stand-in
// nodes (test/fixtures/standin-node.ts: a Debian root with real systemd and the real
// Ignition; every program on it that corekube ships is the real one from the image disk),
// then `verify` again and `down`. Prints the time from boot to green and what took it.
//
//   node test/cluster.e2e.ts [v1.37.2 …]     (default: COREKUBE_E2E_VERSIONS, else v1.37.2 v1.35.4)
// A failure names the node, the unit and the last lines of its journal; the consoles stay
// in the kept workspace (printed). COREKUBE_E2E_KEEP=1 keeps the workspace on success too.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { stopCluster } from '../tasks/boot.ts';
import { apiServerUrl, pkiDir } from '../tasks/pki.ts';
import { apiClient, noAnswer, patient } from '../tasks/verify.ts';
import { bootTimeFile, sshArgs } from '../tasks/lib/node/qemu.ts';
import { consoleLog } from './fixtures/appliance.ts';
import { hostChecks, startRealUpstream } from './fixtures/real-upstream.ts';
import { trustConfig } from './fixtures/signing.ts';
import { buildStandInNode, standInNodeEnv, type StandInNode } from './fixtures/standin-node.ts';
import { provenKubernetes } from './fixtures/upstream-build.ts';
import { apiMarks, nodeReportCommand, parseNodeReport, renderTimeline, type NodeReport } from './fixtures/timeline.ts';
import { fixtureMirrors, freePortBlock, loud, makeWorkspace, runCli, workspaceArgs, type Workspace } from './helpers.ts';

const versions = process.argv.slice(2).filter((a) => a.startsWith('v')).length > 0
  ? process.argv.slice(2).filter((a) => a.startsWith('v'))
  : (process.env.COREKUBE_E2E_VERSIONS ?? provenKubernetes.join(' ')).split(/\s+/).filter(Boolean);
/** Under TCG on 2 shared cores a real control plane takes many minutes (see the README's tiers). */
const verifyTimeout = process.env.VERIFY_TIMEOUT ?? '5400';
const nodes = [
  `{name: cp1, role: control-plane, ip: 10.77.0.10, cpus: 2, memory: ${process.env.COREKUBE_E2E_CP_MEMORY ?? '6GiB'}}`,
  `{name: w1, role: worker, ip: 10.77.0.21, cpus: 2, memory: ${process.env.COREKUBE_E2E_WORKER_MEMORY ?? '3GiB'}}`,
];

let standIn: StandInNode;
const work = mkdtempSync(join(tmpdir(), 'corekube-e2e-'));
const sshKey = join(work, 'id_ed25519');

test.before(loud(async () => {
  standIn = await buildStandInNode();
  spawnSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'corekube-e2e', '-f', sshKey]);
}));

test.after(() => {
  if (process.env.COREKUBE_E2E_KEEP !== '1' && !failed) rmSync(work, { recursive: true, force: true });
  else console.log(`    (workspace kept: ${work})`);
});

let failed = false;

/** Runs a command on a node as core over its forwarded SSH port. */
function ssh(ws: Workspace, node: string, command: string): string {
  const config = ws.context().config;
  const target = config.nodes.find((n) => n.name === node)!;
  const r = spawnSync('ssh', ['-i', sshKey, '-o', 'BatchMode=yes', '-o', 'ConnectTimeout=20', ...sshArgs(config, target, [command])], { encoding: 'utf8', timeout: 120_000 });
  return r.status === 0 ? r.stdout : `(ssh ${node}: exit ${r.status}: ${(r.stderr ?? '').trim().slice(-400)})`;
}

/** What a human needs when the cluster did not form: failed units and the journal tails, per node. */
function explain(ws: Workspace): string {
  return ['cp1', 'w1']
    .map((node) => {
      const consoleTail = consoleLog(ws.outDir, node).replace(/\r/g, '').split('\n').slice(-40).join('\n');
      const remote = ssh(
        ws,
        node,
        "sudo systemctl --failed --no-pager; for u in corekube-control-plane corekube-join kubelet containerd corekube-images corekube-install; do echo \"── $u\"; sudo journalctl -b --no-pager -n 40 -u $u.service; done; sudo /usr/local/bin/crictl ps -a 2>&1 | head -30",
      );
      return `\n══ ${node}: console ${join(ws.outDir, 'logs', `${node}.log`)} (tail)\n${consoleTail}\n══ ${node}: over SSH\n${remote}`;
    })
    .join('\n');
}

const cli = async (ws: Workspace, args: string[], env: Record<string, string> = {}) => {
  const started = performance.now();
  const result = await runCli([...args, ...workspaceArgs(ws)], { env: { ...standInNodeEnv(standIn), COREKUBE_ACCEL: process.env.COREKUBE_ACCEL ?? 'tcg', VERIFY_TIMEOUT: verifyTimeout, ...env } });
  const seconds = (performance.now() - started) / 1000;
  console.log(`    corekube ${args.join(' ')}: exit ${result.code} in ${seconds.toFixed(0)} s`);
  return { ...result, seconds };
};

for (const version of versions) {
  test(`Kubernetes ${version}: pin, cluster (1 control plane, 1 worker) until verify is green, down — all real upstream programs`, async () => {
    const dir = join(work, version);
    let up: Awaited<ReturnType<typeof startRealUpstream>> | undefined;
    let ws: Workspace | undefined;
    try {
      const started = performance.now();
      up = await startRealUpstream(dir, version);
      const cold = Object.entries(up.real.buildSeconds).map(([c, s]) => `${c} ${s} s`).join(', ');
      console.log(`    (upstream ${version}: ${up.real.builtNow > 0 ? `built now in ${up.real.builtNow} s` : 'all from the build cache'}; cold build times: ${cold}; served and seeded in ${((performance.now() - started) / 1000 - up.real.builtNow).toFixed(0)} s)`);
      const base = await freePortBlock(3);
      ws = makeWorkspace(up.tree, up.server.url, {
        nodes,
        registries: fixtureMirrors(up.registry.host),
        // The fixture upstream signs what it serves with the test's signers: pin trusts them.
        extraConfig: [`hostPorts: {apiServer: ${base}, sshBase: ${base + 1}}`, ...trustConfig(up.signer, dir, up.server.url)],
      });
      writeFileSync(join(ws.dir, 'id.pub'), readFileSync(`${sshKey}.pub`));
      // From an empty workspace: no lock until pin writes one.
      unlinkSync(ws.lockFile);

      const pin = await cli(ws, ['pin']);
      assert.is(pin.code, 0, `pin failed:\n${pin.stdout}\n${pin.stderr}`);
      const lock = readFileSync(ws.lockFile, 'utf8');
      for (const image of up.registry.images) assert.ok(lock.includes(`${image.name}:${image.tag}@`), `the lock pins ${image.name}:${image.tag}:\n${lock}`);

      // What kubeadm rejects shows here in seconds, not after a boot: the real kubeadm
      // validates each node's generated configuration on this machine first.
      const files = await cli(ws, ['ignition']);
      assert.is(files.code, 0, `ignition failed:\n${files.stdout}\n${files.stderr}`);
      for (const node of ['cp1', 'w1']) {
        const check = spawnSync(join(up.real.dirs.kubernetes, 'kubeadm'), ['config', 'validate', '--config', join(ws.outDir, 'files', node, 'kubeadm.yaml')], { encoding: 'utf8' });
        assert.is(check.status, 0, `kubeadm ${version} config validate rejects ${node}'s kubeadm.yaml:\n${check.stdout}${check.stderr}`);
      }
      await hostChecks(ws.outDir, up.real);

      const cluster = await cli(ws, ['cluster']);
      const green = Date.now() / 1000;
      if (cluster.code !== 0) {
        failed = true;
        assert.unreachable(`cluster failed (exit ${cluster.code}) after ${cluster.seconds.toFixed(0)} s:\n${cluster.stdout.slice(-4000)}\n${cluster.stderr.slice(-4000)}${explain(ws)}`);
      }
      const verify = await cli(ws, ['verify']);
      assert.is(verify.code, 0, `verify after cluster:\n${verify.stdout}\n${verify.stderr}`);
      const lookupImage = up.registry.images.find((i) => i.name === 'ghcr.io/flannel-io/flannel-cni-plugin')!;
      const dns = await dnsFromPod(ws, `${lookupImage.name}:${lookupImage.tag}`);
      console.log(`    (${version}: make cluster green in ${cluster.seconds.toFixed(0)} s, make verify again in ${verify.seconds.toFixed(0)} s; DNS from a pod on w1: ${dns})`);
      for (const line of await timeline(ws, green)) console.log(`    (${version} ${line})`);
    } catch (error) {
      failed = true;
      if (ws && error instanceof Error && !error.message.includes('══ cp1')) error.message += explain(ws);
      // How far each node got, and when.
      if (ws && existsSync(join(ws.outDir, bootTimeFile))) for (const line of await timeline(ws).catch(() => [])) console.log(`    (${version} ${line})`);
      throw error;
    } finally {
      if (ws) {
        const down = await cli(ws, ['down']).catch(() => undefined);
        if (down?.code !== 0) await stopCluster(ws.outDir, { timeoutMs: 0 }).catch(() => undefined);
      }
      await up?.close();
    }
  });
}

/**
 * A pod on the worker looks up kubernetes.default (busybox nslookup, from the flannel CNI
 * plugin's image, which the layout has): cluster DNS through kube-proxy's service rules
 * and flannel, from a pod. Returns the answer's address line.
 */
async function dnsFromPod(ws: Workspace, image: string): Promise<string> {
  const read = (name: string) => readFileSync(join(ws.outDir, pkiDir, name), 'utf8');
  const config = ws.context().config;
  // Like verify: a request the API server does not answer in time is "not yet", not a failure.
  const api = patient(await apiClient(apiServerUrl(config), { ca: read('ca.crt'), cert: read('admin.crt'), key: read('admin.key') }));
  const name = 'corekube-e2e-dns';
  const pause = () => new Promise((r) => setTimeout(r, 2000));
  const deadline = Date.now() + 600_000;
  for (;;) {
    const created = await api.post('/api/v1/namespaces/default/pods', {
      apiVersion: 'v1',
      kind: 'Pod',
      metadata: { name },
      spec: {
        nodeName: 'w1',
        restartPolicy: 'Never',
        securityContext: { runAsNonRoot: true, runAsUser: 65534, seccompProfile: { type: 'RuntimeDefault' } },
        containers: [{ name: 'lookup', image, imagePullPolicy: 'Never', command: ['/bin/nslookup', 'kubernetes.default.svc.cluster.local'], securityContext: { allowPrivilegeEscalation: false, capabilities: { drop: ['ALL'] } } }],
      },
    });
    // 409: an earlier try that got no answer did create it.
    if (created.status === 201 || created.status === 409) break;
    assert.ok(created.status === noAnswer && Date.now() < deadline, `create the DNS pod: ${created.status} ${created.body.slice(0, 300)}`);
    await pause();
  }
  for (;;) {
    const reply = await api.get(`/api/v1/namespaces/default/pods/${name}`);
    const phase = reply.status === 200 ? (JSON.parse(reply.body) as { status?: { phase?: string } }).status?.phase : undefined;
    if (phase === 'Succeeded' || phase === 'Failed' || Date.now() > deadline) {
      const logs = (await api.get(`/api/v1/namespaces/default/pods/${name}/log`)).body;
      await api.delete(`/api/v1/namespaces/default/pods/${name}`);
      assert.is(phase, 'Succeeded', `nslookup kubernetes.default from a pod on w1: ${phase ?? `no answer (${reply.status}: ${reply.body.slice(0, 200)})`}:\n${logs}`);
      return logs.trim().split('\n').filter((l) => /Address/.test(l)).pop() ?? logs.trim();
    }
    await pause();
  }
}

/** Where the time went from make boot to green, per node (test/fixtures/timeline.ts). */
async function timeline(ws: Workspace, green?: number): Promise<string[]> {
  const bootStarted = Date.parse(readFileSync(join(ws.outDir, bootTimeFile), 'utf8').trim()) / 1000;
  const reports: Record<string, NodeReport> = {};
  for (const node of ['cp1', 'w1']) reports[node] = parseNodeReport(ssh(ws, node, nodeReportCommand));
  const read = (name: string) => readFileSync(join(ws.outDir, pkiDir, name), 'utf8');
  const api = patient(await apiClient(apiServerUrl(ws.context().config), { ca: read('ca.crt'), cert: read('admin.crt'), key: read('admin.key') }));
  // A busy API server may not answer at once: a few tries, then what there is.
  const list = async (path: string) => {
    for (let attempt = 1; ; attempt++) {
      const reply = await api.get(path);
      if (reply.status === 200) return JSON.parse(reply.body);
      if (attempt === 6) return { items: [] };
      await new Promise((r) => setTimeout(r, 5000));
    }
  };
  const pods = [...(await list('/api/v1/namespaces/kube-system/pods')).items, ...(await list('/api/v1/namespaces/kube-flannel/pods')).items];
  return renderTimeline(bootStarted, reports, apiMarks(await list('/api/v1/nodes'), { items: pods }), green);
}

test.run();
