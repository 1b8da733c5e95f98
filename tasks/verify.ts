// verify: is the cluster up? With out/kubeconfig's client certificate (TLS, RBAC as
// cluster-admin), wait within a bound for the API server, every node Ready, every
// kube-system pod Running, a smoke pod from the layout running on a worker, and cluster
// DNS serving. Fails naming what is not ready, with the tail of the relevant console.
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { ClusterConfig } from './lib/inputs/config.ts';
import { isAbortError, UserError } from './lib/errors.ts';
import type { Lock } from './lib/inputs/lock.ts';
import { sandboxImage } from './lib/node/node-config.ts';
import { kubeVipLease } from './lib/node/kube-vip.ts';
import { apiServerUrl, pkiDir } from './pki.ts';
import { bootTimeFile, logsDir } from './lib/node/qemu.ts';
import type { RunContext, Stage } from './lib/run/stage.ts';

export const defaultVerifyTimeoutSeconds = 1200;

export interface ApiClient {
  get(path: string): Promise<{ status: number; body: string }>;
  post(path: string, body: unknown): Promise<{ status: number; body: string }>;
  delete(path: string): Promise<{ status: number; body: string }>;
}

/** A client for the API server with the admin certificate, trusting only the cluster CA. */
export async function apiClient(server: string, pki: { ca: string; cert: string; key: string }, signal?: AbortSignal): Promise<ApiClient> {
  const { default: got } = await import('got');
  const client = got.extend({
    prefixUrl: server,
    https: { certificateAuthority: pki.ca, certificate: pki.cert, key: pki.key },
    throwHttpErrors: false,
    retry: { limit: 0 },
    timeout: { request: 10_000 },
    signal,
  });
  const wrap = async (promise: Promise<{ statusCode: number; body: string }>) => {
    const response = await promise;
    return { status: response.statusCode, body: response.body };
  };
  const path = (p: string) => p.replace(/^\//, '');
  return {
    get: (p) => wrap(client.get(path(p))),
    post: (p, body) => wrap(client.post(path(p), { json: body })),
    delete: (p) => wrap(client.delete(path(p))),
  };
}

/** The status of a request that got no answer (a timeout, a refused or reset connection). */
export const noAnswer = 0;

/**
 * The same client, but a request that gets no answer resolves with status `noAnswer` and
 * the error's message as its body instead of throwing: an API server that is slow, restarting or
 * not yet listening is "not ready yet" for whoever waits on it. Cancellation still throws.
 */
export function patient(api: ApiClient): ApiClient {
  const settle = async (request: () => Promise<{ status: number; body: string }>) => {
    try {
      return await request();
    } catch (error) {
      if (isAbortError(error)) throw error;
      return { status: noAnswer, body: (error as Error).message };
    }
  };
  return {
    get: (p) => settle(() => api.get(p)),
    post: (p, body) => settle(() => api.post(p, body)),
    delete: (p) => settle(() => api.delete(p)),
  };
}

/** A failed request in a check's detail: "no answer (why)", else the status. */
function failure(reply: { status: number; body: string }): string {
  return reply.status === noAnswer ? `no answer (${reply.body})` : String(reply.status);
}

export interface CheckResult {
  name: string;
  ok: boolean;
  detail: string;
  /** The node whose console explains a failure, if one does. */
  node?: string;
}

interface NodeList { items: { metadata: { name: string }; status?: { conditions?: { type: string; status: string }[] } }[] }
interface PodList { items: { metadata: { name: string }; spec?: { nodeName?: string }; status?: { phase?: string; podIP?: string; conditions?: { type: string; status: string }[] } }[] }
interface Lease { spec?: { holderIdentity?: string; renewTime?: string } }

/** Nodes: every node of cluster.yaml registered and Ready. Pure, for the tests. */
export function judgeNodes(config: ClusterConfig, list: NodeList): CheckResult {
  const missing: string[] = [];
  const notReady: string[] = [];
  for (const node of config.nodes) {
    const found = list.items.find((item) => item.metadata.name === node.name);
    if (!found) missing.push(node.name);
    else if (!found.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True')) notReady.push(node.name);
  }
  const problems = [...missing.map((n) => `${n} not registered`), ...notReady.map((n) => `${n} not Ready`)];
  const culprit = missing[0] ?? notReady[0];
  return { name: 'nodes', ok: problems.length === 0, detail: problems.length ? problems.join(', ') : `${config.nodes.length} Ready`, ...(culprit ? { node: culprit } : {}) };
}

/** kube-system: at least one pod, each Running (or Succeeded). */
export function judgeSystemPods(list: PodList): CheckResult {
  const bad = list.items.filter((pod) => !['Running', 'Succeeded'].includes(pod.status?.phase ?? ''));
  if (list.items.length === 0) return { name: 'kube-system pods', ok: false, detail: 'none yet' };
  return {
    name: 'kube-system pods',
    ok: bad.length === 0,
    detail: bad.length ? bad.map((p) => `${p.metadata.name} ${p.status?.phase ?? 'Pending'}${p.spec?.nodeName ? ` on ${p.spec.nodeName}` : ''}`).join(', ') : `${list.items.length} Running`,
    ...(bad[0]?.spec?.nodeName ? { node: bad[0].spec.nodeName } : {}),
  };
}

/**
 * Three control planes: etcd has a healthy member on each. Each control plane's etcd
 * static pod must be Running and Ready: kubeadm's etcd pod is Ready when that member
 * answers its /readyz (connected to a quorum), so three Ready pods are three healthy
 * members. Pure, for the tests.
 */
export function judgeEtcd(config: ClusterConfig, list: PodList): CheckResult {
  const controlPlanes = config.nodes.filter((n) => n.role === 'control-plane');
  const unhealthy = controlPlanes.filter((node) => {
    const pod = list.items.find((p) => p.metadata.name === `etcd-${node.name}`);
    return !(pod?.status?.phase === 'Running' && pod.status.conditions?.some((c) => c.type === 'Ready' && c.status === 'True'));
  });
  return {
    name: 'etcd members',
    ok: unhealthy.length === 0,
    detail: unhealthy.length === 0 ? `${controlPlanes.length} of ${controlPlanes.length} healthy` : `not healthy: ${unhealthy.map((n) => `etcd-${n.name}`).join(', ')}`,
    ...(unhealthy[0] ? { node: unhealthy[0].name } : {}),
  };
}

/** Three control planes: kube-vip's lease names a control plane, which holds controlPlane.endpoint. Pure, for the tests. */
export function judgeVirtualIp(config: ClusterConfig, lease: Lease | undefined): CheckResult {
  const holder = lease?.spec?.holderIdentity;
  const controlPlanes = config.nodes.filter((n) => n.role === 'control-plane').map((n) => n.name);
  const ok = holder !== undefined && controlPlanes.includes(holder);
  return {
    name: 'virtual IP',
    ok,
    detail: ok ? `${config.controlPlane.endpoint} held by ${holder}` : `no control plane holds kube-vip's lease ${kubeVipLease.name} (holder: ${holder ?? 'none'})`,
    ...(ok ? {} : { node: controlPlanes[0]! }),
  };
}

/** The smoke pod: the pause image from the layout (never pulled), on a worker when there is one, restricted. */
export function smokePod(config: ClusterConfig, lock: Lock, name: string): unknown {
  const hasWorker = config.nodes.some((n) => n.role === 'worker');
  return {
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: { name, labels: { 'app.kubernetes.io/name': 'corekube-smoke' } },
    spec: {
      ...(hasWorker
        ? { affinity: { nodeAffinity: { requiredDuringSchedulingIgnoredDuringExecution: { nodeSelectorTerms: [{ matchExpressions: [{ key: 'node-role.kubernetes.io/control-plane', operator: 'DoesNotExist' }] }] } } } }
        : {}),
      securityContext: { runAsNonRoot: true, runAsUser: 65535, seccompProfile: { type: 'RuntimeDefault' } },
      containers: [{
        name: 'smoke',
        image: sandboxImage(lock),
        imagePullPolicy: 'Never',
        securityContext: { allowPrivilegeEscalation: false, capabilities: { drop: ['ALL'] } },
      }],
      terminationGracePeriodSeconds: 0,
    },
  };
}

/**
 * The items of a list the API server answered with 200; an empty list for anything else (an
 * error Status, a 403 while RBAC is still being set up, no answer): a not-ready cluster,
 * never a crash.
 */
function itemsOf<T extends { items: unknown[] }>(reply: { status: number; body: string }): T {
  const list = reply.status === 200 ? parse<T>(reply.body) : undefined;
  return (list && Array.isArray(list.items) ? list : { items: [] }) as T;
}

function parse<T>(body: string): T | undefined {
  try {
    return JSON.parse(body) as T;
  } catch {
    return undefined;
  }
}

/** One round of every check; the smoke pod is created once and judged on each round. */
export async function checkCluster(client: ApiClient, config: ClusterConfig, lock: Lock, smokeName: string, state: { smokeCreated: boolean }): Promise<CheckResult[]> {
  const api = patient(client);
  const controlPlane = config.nodes.find((n) => n.role === 'control-plane')!.name;
  const ready = await api.get('/readyz');
  if (ready.status === noAnswer) return [{ name: 'API server', ok: false, detail: `no answer on ${apiServerUrl(config)}: ${ready.body}`, node: controlPlane }];
  if (ready.status !== 200) return [{ name: 'API server', ok: false, detail: `/readyz answered ${ready.status}: ${ready.body.trim().split('\n').slice(-3).join('; ')}`, node: controlPlane }];
  const results: CheckResult[] = [{ name: 'API server', ok: true, detail: '/readyz ok' }];
  const nodes = await api.get('/api/v1/nodes');
  results.push(nodes.status === 200 ? judgeNodes(config, itemsOf<NodeList>(nodes)) : { name: 'nodes', ok: false, detail: `GET /api/v1/nodes: ${failure(nodes)}` });
  const pods = await api.get('/api/v1/namespaces/kube-system/pods');
  const podList = itemsOf<PodList>(pods);
  results.push(pods.status === 200 ? judgeSystemPods(podList) : { name: 'kube-system pods', ok: false, detail: `GET pods: ${failure(pods)}` });
  if (config.controlPlane?.virtualIp) {
    results.push(judgeEtcd(config, podList));
    const lease = await api.get(`/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/${kubeVipLease.name}`);
    results.push(judgeVirtualIp(config, lease.status === 200 ? parse<Lease>(lease.body) : undefined));
  }

  if (!state.smokeCreated) {
    const created = await api.post('/api/v1/namespaces/default/pods', smokePod(config, lock, smokeName));
    if (created.status === 201 || created.status === 409) state.smokeCreated = true;
    else results.push({ name: 'smoke pod', ok: false, detail: `create: ${failure(created)} ${created.status === noAnswer ? '' : created.body.slice(0, 200)}`.trim() });
  }
  if (state.smokeCreated) {
    const reply = await api.get(`/api/v1/namespaces/default/pods/${smokeName}`);
    const smoke = reply.status === 200 ? parse<PodList['items'][number]>(reply.body) : undefined;
    const phase = smoke?.status?.phase ?? (reply.status === 200 ? 'unknown' : failure(reply));
    const on = smoke?.spec?.nodeName;
    results.push({ name: 'smoke pod', ok: phase === 'Running', detail: `${phase}${on ? ` on ${on}` : ''}`, ...(on ? { node: on } : {}) });
  }

  // DNS: CoreDNS's ready plugin answers on :8181 only once it serves; reached through the API server.
  const coredns = podList.items.filter((p) => p.metadata.name.startsWith('coredns-') && p.status?.phase === 'Running');
  if (coredns.length === 0) {
    results.push({ name: 'cluster DNS', ok: false, detail: 'no CoreDNS pod running' });
  } else {
    const answer = await api.get(`/api/v1/namespaces/kube-system/pods/${coredns[0]!.metadata.name}:8181/proxy/ready`);
    results.push({ name: 'cluster DNS', ok: answer.status === 200, detail: answer.status === 200 ? `${coredns[0]!.metadata.name} serving` : `ready endpoint: ${failure(answer)}` });
  }
  return results;
}

export function logTail(outDir: string, node: string, lines = 20): string {
  const file = join(outDir, logsDir, `${node}.log`);
  if (!existsSync(file)) return `(no console log at ${file})`;
  const text = readFileSync(file, 'utf8').replace(/\r/g, '').trimEnd().split('\n').slice(-lines);
  return text.map((line) => `    ${line}`).join('\n');
}

export const verifyStage: Stage = {
  name: 'verify',
  title: 'Verify the cluster',
  summary: 'waits (bounded: VERIFY_TIMEOUT) for the API server, every node Ready, kube-system Running (three control planes: three healthy etcd members, the virtual IP held), a smoke pod on a worker, cluster DNS',
  needs: ['pki', 'boot'],
  tools: [],
  inputs: () => ({}),
  // A check, not a build: it runs every time.
  expired: () => 'verify always runs',
  outputs: () => [],
  async run(ctx, task) {
    const { outDir } = ctx.settings;
    const timeoutSeconds = Number(process.env.VERIFY_TIMEOUT || defaultVerifyTimeoutSeconds);
    if (!Number.isFinite(timeoutSeconds) || timeoutSeconds <= 0) throw new UserError(`VERIFY_TIMEOUT: expected seconds > 0, found "${process.env.VERIFY_TIMEOUT}"`);
    const intervalMs = Number(process.env.VERIFY_INTERVAL || 5) * 1000;
    if (!Number.isFinite(intervalMs) || intervalMs <= 0) throw new UserError(`VERIFY_INTERVAL: expected seconds > 0, found "${process.env.VERIFY_INTERVAL}"`);
    const read = (name: string) => readFileSync(join(outDir, pkiDir, name), 'utf8');
    const api = await apiClient(apiServerUrl(ctx.config), { ca: read('ca.crt'), cert: read('admin.crt'), key: read('admin.key') }, ctx.signal);
    const started = Date.now();
    const deadline = started + timeoutSeconds * 1000;
    const smokeName = `corekube-smoke-${randomBytes(3).toString('hex')}`;
    const state = { smokeCreated: false };
    let results: CheckResult[] = [];
    try {
      while (true) {
        results = await checkCluster(api, ctx.config, ctx.lock, smokeName, state);
        const waiting = results.filter((r) => !r.ok);
        const elapsed = Math.round((Date.now() - started) / 1000);
        task.output = waiting.length === 0 ? 'all green' : `${elapsed}s: waiting for ${waiting.map((r) => `${r.name} (${r.detail})`).join('; ')}`;
        if (waiting.length === 0) break;
        if (Date.now() >= deadline || ctx.signal.aborted) {
          const culprit = waiting.find((r) => r.node)?.node ?? ctx.config.nodes.find((n) => n.role === 'control-plane')!.name;
          throw new UserError(
            `the cluster is not ready after ${timeoutSeconds}s (VERIFY_TIMEOUT):\n` +
              results.map((r) => `  ${r.ok ? 'ok  ' : 'FAIL'} ${r.name}: ${r.detail}`).join('\n') +
              (ctx.config.target === 'openstack'
                ? `\n${culprit}'s console is on the cloud: openstack console log show ${ctx.config.name}-${culprit}\n` +
                  'Next: make ssh NODE=' + culprit + ' TARGET=openstack and journalctl -b, or make boot TARGET=openstack to rebuild the servers.'
                : `\nlast lines of ${culprit}'s console (out/${logsDir}/${culprit}.log):\n${logTail(outDir, culprit)}\n` +
                  'Next: make ssh NODE=' + culprit + ' and journalctl -b, or make down boot to start over.'),
          );
        }
        await sleep(Math.min(intervalMs, Math.max(0, deadline - Date.now())), undefined, { signal: ctx.signal }).catch(() => undefined);
      }
    } finally {
      if (state.smokeCreated) await api.delete(`/api/v1/namespaces/default/pods/${smokeName}`).catch(() => undefined);
    }
    const bootedAt = readBootTime(outDir);
    const since = bootedAt ? `, ${Math.round((Date.now() - bootedAt) / 1000)}s after make boot started` : '';
    console.log(`corekube: cluster ${ctx.config.name} verified (${Math.round((Date.now() - started) / 1000)}s of waiting${since}):\n${results.map((r) => `  ok ${r.name}: ${r.detail}`).join('\n')}`);
  },
};

function readBootTime(outDir: string): number | undefined {
  try {
    const time = Date.parse(readFileSync(join(outDir, bootTimeFile), 'utf8').trim());
    return Number.isNaN(time) ? undefined : time;
  } catch {
    return undefined;
  }
}
