// The high-availability scenario of issue 19, for the real-cluster tier (real kubeadm,
// kubelet, etcd, API server and kube-vip in stand-in nodes): three control planes and one
// worker green; the control plane holding the virtual IP powered off; the API server
// answering again through the endpoint (measured: from the worker, whose kubelet talks to
// the endpoint, and from the host through the forwarder); a pod scheduled; the node booted
// again, blank; etcd back to three healthy members (make verify green). Returns what it
// measured. The tier's runner (test/cluster*.e2e.ts) provides the workspace, built from its
// real upstream with haNodes and haConfig, and its own ways to run the CLI and SSH.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { processRunning, runningQemu } from '../tasks/boot.ts';
import { kubeVipLease } from '../tasks/lib/node/kube-vip.ts';
import { apiServerUrl, pkiDir } from '../tasks/pki.ts';
import { apiClient, smokePod, type ApiClient } from '../tasks/verify.ts';
import type { Workspace } from './helpers.ts';

export const haEndpoint = '10.77.0.5';

/** cluster.yaml's nodes: three control planes, one worker. */
export function haNodes(cpMemory = '4GiB', workerMemory = '3GiB'): string[] {
  return [
    `{name: cp1, role: control-plane, ip: 10.77.0.10, cpus: 2, memory: ${cpMemory}}`,
    `{name: cp2, role: control-plane, ip: 10.77.0.11, cpus: 2, memory: ${cpMemory}}`,
    `{name: cp3, role: control-plane, ip: 10.77.0.12, cpus: 2, memory: ${cpMemory}}`,
    `{name: w1, role: worker, ip: 10.77.0.21, cpus: 2, memory: ${workerMemory}}`,
  ];
}

/** The rest of cluster.yaml: the endpoint, and host ports from a free block of 8 (the forwarder, 3 control planes, 4 SSH). */
export function haConfig(portBase: number): string[] {
  return [`controlPlane: {endpoint: ${haEndpoint}}`, `hostPorts: {apiServer: ${portBase}, sshBase: ${portBase + 4}}`];
}

export interface HaScenarioDeps {
  ws: Workspace;
  /** Runs the corekube CLI on the workspace (with the tier's stand-in environment). */
  cli(args: string[], env?: Record<string, string>): Promise<{ code: number | null; stdout: string; stderr: string }>;
  /** Runs a command on a node as core over its forwarded SSH port; its output. */
  ssh(node: string, command: string): string;
  log(line: string): void;
  /** Bounds, seconds (TCG is slow): for the failover, the pod, and the rejoin. */
  bounds?: { failover?: number; pod?: number; rejoin?: number };
}

export interface HaMeasurements {
  poweredOff: string;
  newHolder: string;
  /** From power-off until the worker reached the API server through the endpoint. */
  failoverViaEndpointSeconds: number;
  /** From power-off until the host reached it through 127.0.0.1 (the forwarder). */
  failoverFromHostSeconds: number;
  podRunningSeconds: number;
  /** From `boot` of the blank node until verify is green again (etcd three healthy members). */
  rejoinSeconds: number;
}

const seconds = (since: number) => Math.round((performance.now() - since) / 100) / 10;

async function until<T>(what: string, boundSeconds: number, probe: () => Promise<T | undefined>, intervalMs = 1000): Promise<T> {
  const deadline = performance.now() + boundSeconds * 1000;
  for (;;) {
    const value = await probe().catch(() => undefined);
    if (value !== undefined) return value;
    if (performance.now() > deadline) throw new Error(`HA scenario: ${what} not within ${boundSeconds} s`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

async function hostApi(ws: Workspace): Promise<ApiClient> {
  const read = (name: string) => readFileSync(join(ws.outDir, pkiDir, name), 'utf8');
  return apiClient(apiServerUrl(ws.context().config), { ca: read('ca.crt'), cert: read('admin.crt'), key: read('admin.key') });
}

export async function runHaScenario(deps: HaScenarioDeps): Promise<HaMeasurements> {
  const { ws, log } = deps;
  const bounds = { failover: 300, pod: 900, rejoin: 5400, ...deps.bounds };
  const config = ws.context().config;
  const lock = ws.context().lock;

  const cluster = await deps.cli(['cluster']);
  if (cluster.code !== 0) throw new Error(`HA scenario: make cluster failed (exit ${cluster.code}):\n${cluster.stdout.slice(-3000)}\n${cluster.stderr.slice(-3000)}`);
  log('three control planes and a worker green (etcd three healthy members, the virtual IP held)');

  const api = await hostApi(ws);
  const lease = JSON.parse((await api.get(`/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/${kubeVipLease.name}`)).body) as { spec?: { holderIdentity?: string } };
  const holder = lease.spec?.holderIdentity;
  if (!holder || !config.nodes.some((n) => n.name === holder && n.role === 'control-plane')) throw new Error(`HA scenario: no control plane holds the virtual IP (lease holder ${holder})`);

  // Power off the holder: its QEMU ends at once, as a machine losing power.
  const pid = runningQemu(join(ws.outDir, 'run', `${holder}.pid`));
  if (!pid) throw new Error(`HA scenario: ${holder}'s QEMU is not running`);
  const off = performance.now();
  process.kill(pid, 'SIGKILL');
  await until(`${holder} to stop`, 30, async () => (processRunning(pid) ? undefined : true), 50);
  log(`${holder} (holding ${haEndpoint}) powered off`);

  const probeEndpoint = "sudo /usr/local/bin/kubectl --kubeconfig /etc/kubernetes/kubelet.conf --request-timeout=3s get --raw /livez";
  const [failoverViaEndpointSeconds, failoverFromHostSeconds] = await Promise.all([
    until('the API server through the endpoint, from w1', bounds.failover, async () => (deps.ssh('w1', probeEndpoint).trim() === 'ok' ? seconds(off) : undefined), 500),
    until('the API server from the host', bounds.failover, async () => ((await api.get('/readyz')).status === 200 ? seconds(off) : undefined), 500),
  ]);
  const newHolder = await until('a new holder of the virtual IP', bounds.failover, async () => {
    const body = JSON.parse((await api.get(`/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/${kubeVipLease.name}`)).body) as { spec?: { holderIdentity?: string } };
    const now = body.spec?.holderIdentity;
    return now && now !== holder ? now : undefined;
  });
  log(`the API answers through ${haEndpoint} after ${failoverViaEndpointSeconds} s (from the host after ${failoverFromHostSeconds} s); ${newHolder} holds it`);

  const podName = `corekube-ha-${Date.now().toString(36)}`;
  const podStart = performance.now();
  const created = await api.post('/api/v1/namespaces/default/pods', smokePod(config, lock, podName));
  if (created.status !== 201) throw new Error(`HA scenario: creating a pod with ${holder} down: ${created.status} ${created.body.slice(0, 300)}`);
  const podRunningSeconds = await until('a pod Running with a control plane down', bounds.pod, async () => {
    const pod = JSON.parse((await api.get(`/api/v1/namespaces/default/pods/${podName}`)).body) as { status?: { phase?: string } };
    return pod.status?.phase === 'Running' ? seconds(podStart) : undefined;
  }, 2000);
  await api.delete(`/api/v1/namespaces/default/pods/${podName}`);
  log(`a pod was scheduled and Running in ${podRunningSeconds} s with ${holder} down`);

  // The node boots again, blank (every boot is a first boot), and must rejoin by itself.
  const rejoin = performance.now();
  const boot = await deps.cli(['boot']);
  if (boot.code !== 0) throw new Error(`HA scenario: boot of ${holder} again failed:\n${boot.stdout}\n${boot.stderr}`);
  const verify = await deps.cli(['verify'], { VERIFY_TIMEOUT: String(bounds.rejoin) });
  if (verify.code !== 0) throw new Error(`HA scenario: ${holder} did not rejoin (verify):\n${verify.stdout}\n${verify.stderr}`);
  const rejoinSeconds = seconds(rejoin);
  log(`${holder} rejoined blank; etcd three healthy members again after ${rejoinSeconds} s`);
  return { poweredOff: holder, newHolder, failoverViaEndpointSeconds, failoverFromHostSeconds, podRunningSeconds, rejoinSeconds };
}
