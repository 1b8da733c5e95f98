// The virtual IP of three control planes: kube-vip as a static pod in ARP mode, with
// leader election on a Lease, so one control plane at a time answers ARP for
// controlPlane.endpoint and the next takes it over when that one stops renewing. Pure:
// the manifests are values, serialized here; the ignition stage writes them, and the
// control plane's boot script puts one of them into /etc/kubernetes/manifests.
//
// The shape follows kube-vip's own generator (kube-vip/kube-vip, pkg/kubevip/
// config_generator.go, generatePodSpec; env names from pkg/kubevip/config_envvar.go).
import { stringify } from 'yaml';
import type { ClusterConfig } from '../inputs/config.ts';

/**
 * The pinned kube-vip image. Like every image it is pinned in the lock by digest (pin
 * adds it to the images it resolves), copied into the layout and imported from the image
 * disk; the kubelet never pulls it.
 */
export const kubeVipImage = { name: 'ghcr.io/kube-vip/kube-vip', tag: 'v1.2.3' } as const;

/**
 * Images corekube renders itself (not in manifests/, not kubeadm's): pin and images treat
 * them like those in manifests/. kube-vip only where it runs (three control planes): one
 * control plane has no virtual IP, and its lock, cache and image disk carry no image it
 * never starts.
 */
export function renderedImages(config: Pick<ClusterConfig, 'controlPlane'>): { file: string; image: string }[] {
  return config.controlPlane?.virtualIp ? [{ file: 'tasks/lib/node/kube-vip.ts', image: `${kubeVipImage.name}:${kubeVipImage.tag}` }] : [];
}

/** Where the boot script finds the two variants on a control plane. */
export const kubeVipPaths = {
  init: '/etc/corekube/kube-vip/init.yaml',
  join: '/etc/corekube/kube-vip/join.yaml',
  manifest: '/etc/kubernetes/manifests/kube-vip.yaml',
} as const;

/** Lease timing (seconds): kube-vip's documented values for the control plane; failover within about leaseDuration + retryPeriod. */
export const kubeVipLease = { name: 'plndr-cp-lock', durationSeconds: 5, renewDeadlineSeconds: 3, retryPeriodSeconds: 1 } as const;

/**
 * The kube-vip static pod. `kubeconfig`: during the first `kubeadm init` (Kubernetes ≥
 * 1.29) admin.conf has no rights yet (its group is bound to cluster-admin by a
 * ClusterRoleBinding that init creates only once the API server is up, through the VIP
 * that kube-vip has not yet taken), so the initializing node's kube-vip reads
 * super-admin.conf (system:masters); every joining control plane uses admin.conf
 * (kube-vip/kube-vip#684; kube-vip's e2e uses super-admin.conf on the first node only).
 * The file is mounted where kube-vip looks by default, /etc/kubernetes/admin.conf, and
 * reached through the host alias "kubernetes" = 127.0.0.1: the local API server, never
 * the VIP it is about to hold (pkg/manager/manager.go).
 */
export function renderKubeVipManifest(config: ClusterConfig, kubeconfig: 'super-admin.conf' | 'admin.conf'): string {
  const env: { name: string; value?: string; valueFrom?: unknown }[] = [
    { name: 'vip_arp', value: 'true' },
    { name: 'port', value: '6443' },
    { name: 'vip_nodename', valueFrom: { fieldRef: { fieldPath: 'spec.nodeName' } } },
    // No vip_interface: kube-vip takes the interface of the default route, which corekube
    // puts on the cluster NIC (node-config.ts, clusterGateway); the NIC's name differs
    // between FCOS and the stand-in nodes, its route does not.
    { name: 'vip_subnet', value: '32' },
    { name: 'cp_enable', value: 'true' },
    { name: 'cp_namespace', value: 'kube-system' },
    { name: 'vip_leaderelection', value: 'true' },
    { name: 'vip_leasename', value: kubeVipLease.name },
    { name: 'vip_leaseduration', value: String(kubeVipLease.durationSeconds) },
    { name: 'vip_renewdeadline', value: String(kubeVipLease.renewDeadlineSeconds) },
    { name: 'vip_retryperiod', value: String(kubeVipLease.retryPeriodSeconds) },
    { name: 'address', value: config.controlPlane.endpoint },
  ];
  const pod = {
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: { name: 'kube-vip', namespace: 'kube-system', labels: { 'app.kubernetes.io/name': 'kube-vip', 'app.kubernetes.io/part-of': 'corekube' } },
    spec: {
      hostNetwork: true,
      // Under FCOS's enforcing SELinux a container_t process may not read
      // /etc/kubernetes (kubernetes_file_t): spc_t, as for kubeadm's own static pods.
      securityContext: { seLinuxOptions: { type: 'spc_t' } },
      hostAliases: [{ ip: '127.0.0.1', hostnames: ['kubernetes'] }],
      containers: [
        {
          name: 'kube-vip',
          image: `${kubeVipImage.name}:${kubeVipImage.tag}`,
          // Offline: the image comes from the image disk, never from a registry.
          imagePullPolicy: 'Never',
          args: ['manager'],
          env,
          securityContext: { capabilities: { add: ['NET_ADMIN', 'NET_RAW'], drop: ['ALL'] } },
          volumeMounts: [{ name: 'kubeconfig', mountPath: '/etc/kubernetes/admin.conf', readOnly: true }],
        },
      ],
      // type File: if the kubeconfig is not there yet the pod waits; left untyped, the
      // runtime would create a directory in its place and kubeadm could not write it.
      volumes: [{ name: 'kubeconfig', hostPath: { path: `/etc/kubernetes/${kubeconfig}`, type: 'File' } }],
    },
  };
  return `# corekube: kube-vip holds controlPlane.endpoint ${config.controlPlane.endpoint} on one control plane (${kubeconfig})\n${stringify(pod, { lineWidth: 0 })}`;
}

/** What a single control plane gets instead: no virtual IP (the boot script installs nothing). */
export function noVirtualIp(config: ClusterConfig): string {
  return `# corekube: one control plane, no virtual IP: the API server's endpoint is ${config.controlPlane.endpoint} itself\n`;
}
