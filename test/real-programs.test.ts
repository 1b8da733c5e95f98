// The real kubeadm and containerd read what corekube generates, in seconds, on every
// `make test` where the real-cluster tier's builds are cached (test/fixtures/upstream-build.ts;
// `make e2e` makes them): a change to the kubeadm or containerd configuration is caught by
// the real program here, long before a boot. Without a cached build each check says
// "skipped: no real build cached".
//
// Per cached Kubernetes version: `kubeadm config validate` on every node's kubeadm.yaml
// (one control plane + worker, and three control planes), `kubeadm init --dry-run` on the
// first control plane's with corekube's patches; with a cached containerd and crictl, the
// real containerd loads the generated containerd.toml.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { ignitionStage } from '../tasks/ignition.ts';
import { runStages } from '../tasks/lib/run/engine.ts';
import { pkiStage } from '../tasks/pki.ts';
import { containerdLoadsConfig, kubeadmInitDryRun } from './fixtures/real-upstream.ts';
import { readFileSync } from 'node:fs';
import { parse } from 'yaml';
import { testedComponents } from '../tasks/pin/components.ts';
import { cachedBuilds, provenKubernetes, realComponents } from './fixtures/upstream-build.ts';
import { buildUpstreamTree } from './fixtures/upstream.ts';
import { kubeadmTags, loud, makeWorkspace, projectRoot, type Workspace } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-real-programs-'));
const kubernetes = cachedBuilds('kubernetes');
const containerd = cachedBuilds('containerd')[0];
const crictl = cachedBuilds('crictl')[0];
const skipped = 'skipped: no real build cached (make e2e builds upstream\'s programs into ~/.cache/corekube-test/upstream-build)';

test.after(() => rmSync(work, { recursive: true, force: true }));

const layouts = {
  'one control plane and a worker': { nodes: ['{name: cp1, role: control-plane, ip: 10.77.0.10}', '{name: w1, role: worker, ip: 10.77.0.21, memory: 2GiB}'], extraConfig: [] },
  'three control planes and a worker': {
    nodes: ['{name: cp1, role: control-plane, ip: 10.77.0.10}', '{name: cp2, role: control-plane, ip: 10.77.0.11}', '{name: cp3, role: control-plane, ip: 10.77.0.12}', '{name: w1, role: worker, ip: 10.77.0.21, memory: 2GiB}'],
    extraConfig: ['controlPlane: {endpoint: 10.77.0.5}'],
  },
};

/** pki and ignition for a layout at a Kubernetes version: out/files/NODE/ holds what each node gets. */
async function generated(version: string, layout: keyof typeof layouts): Promise<Workspace> {
  const tree = await buildUpstreamTree(join(work, `upstream-${version}`), { qcow2SizeMiB: 1, kubernetesVersion: version });
  const fake = (n: number) => `sha256:${String(n).repeat(64)}`;
  const images = [
    ...['kube-apiserver', 'kube-controller-manager', 'kube-scheduler', 'kube-proxy'].map((name, i) => `registry.k8s.io/${name}:${version}@${fake(i + 1)}`),
    ...Object.entries(kubeadmTags).map(([name, tag], i) => `${name}:${tag}@${fake(i + 5)}`),
    `ghcr.io/kube-vip/kube-vip:v1.2.3@${fake(8)}`,
  ];
  const ws = makeWorkspace(tree, 'http://127.0.0.1:9', { ...layouts[layout], images });
  await runStages(ws.context(), [pkiStage, ignitionStage], { renderer: 'silent' });
  return ws;
}

test('the defaults follow the proof: testedComponents are the versions the real tier runs, and cluster.example.yaml a Kubernetes release it ran', () => {
  const bare = (v: string) => v.replace(/^v/, '');
  assert.equal(
    { crictl: testedComponents.crictl, containerd: testedComponents.containerd, runc: testedComponents.runc, cniPlugins: testedComponents.cniPlugins },
    { crictl: bare(realComponents.crictl), containerd: bare(realComponents.containerd), runc: bare(realComponents.runc), cniPlugins: bare(realComponents.cniPlugins) },
  );
  const example = parse(readFileSync(join(projectRoot, 'cluster.example.yaml'), 'utf8'));
  assert.ok((provenKubernetes as readonly string[]).includes(example.kubernetes.version), `cluster.example.yaml names ${example.kubernetes.version}; the real tier runs ${provenKubernetes.join(', ')}`);
});

if (kubernetes.length === 0) {
  test.skip(`the real kubeadm validates corekube's kubeadm configuration: ${skipped}`, () => {});
  console.log(`    (real-programs: ${skipped})`);
}

for (const { version, dir } of kubernetes) {
  for (const layout of Object.keys(layouts) as (keyof typeof layouts)[]) {
    test(`kubeadm ${version} (the real one, built from source) accepts every node's kubeadm.yaml: ${layout}; init --dry-run renders the control plane with corekube's patches`, loud(async () => {
      const ws = await generated(version, layout);
      try {
        for (const node of ws.context().config.nodes) {
          const check = spawnSync(join(dir, 'kubeadm'), ['config', 'validate', '--config', join(ws.outDir, 'files', node.name, 'kubeadm.yaml')], { encoding: 'utf8', timeout: 60_000 });
          assert.is(check.status, 0, `kubeadm ${version} config validate rejects ${node.name}'s kubeadm.yaml:\n${check.stdout}${check.stderr}`);
        }
        kubeadmInitDryRun(join(ws.outDir, 'files', 'cp1'), join(dir, 'kubeadm'), version);
      } finally {
        rmSync(ws.dir, { recursive: true, force: true });
      }
    }));
  }
}

if (containerd && crictl && kubernetes[0]) {
  test(`containerd ${containerd.version} (the real one) starts with corekube's containerd.toml and loads CRI with its runc and systemd cgroups`, loud(async () => {
    const ws = await generated(kubernetes[0]!.version, 'one control plane and a worker');
    try {
      await containerdLoadsConfig(join(ws.outDir, 'files', 'cp1'), join(containerd.dir, 'bin'), join(crictl.dir, 'crictl'), containerd.version);
    } finally {
      rmSync(ws.dir, { recursive: true, force: true });
    }
  }));
} else {
  test.skip(`the real containerd loads corekube's containerd.toml: ${skipped}`, () => {});
}

test.run();
