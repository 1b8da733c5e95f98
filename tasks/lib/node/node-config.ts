// What each node is, rendered from cluster.yaml, the lock and the PKI as structured
// values, then serialized (YAML, TOML, keyfiles): the per-node files the Butane configs
// in fcc/ pull in with `contents.local`. Pure: no file system, no tools.
import { createHash } from 'node:crypto';
import { parseAllDocuments, stringify } from 'yaml';
import type { ClusterConfig, NodeConfig } from '../inputs/config.ts';
import { InputError } from '../errors.ts';
import type { Lock } from '../inputs/lock.ts';
import { cidrSize, formatIPv4, parseIPv4 } from '../inputs/net.ts';
import { stringifyToml, type TomlTable } from './toml.ts';

/** Where things are on a node; the units and scripts in fcc/ use the same paths. */
export const nodePaths = {
  disk: '/var/mnt/corekube',
  kubeadmConfig: '/etc/corekube/kubeadm.yaml',
  containerdConfig: '/etc/corekube/containerd.toml',
  clusterManifests: '/etc/corekube/manifests',
  admissionDir: '/etc/kubernetes/admission',
  criSocket: 'unix:///run/containerd/containerd.sock',
  kubeadmPatches: '/etc/corekube/kubeadm-patches',
  resolvConf: '/etc/corekube/resolv.conf',
  // FCOS's /usr is read-only: the kubelet and (below v1.36) the controller-manager get a
  // writable FlexVolume directory instead of /usr/libexec/kubernetes/… (kubernetes/kubeadm#3318).
  volumePluginDir: '/var/lib/kubelet/volumeplugins',
} as const;

/** kubeadm mounts the FlexVolume directory into the controller-manager up to v1.35 (gone in v1.36). */
export const lastMinorWithFlexVolumeMount = 35;

export const apiServerPort = 6443;

export interface NodeFile {
  name: string; // file name under out/files/NODE/
  content: string;
  secret?: boolean; // written 0600
}

/** Stable MAC addresses from the names (QEMU's 52:54:00 prefix): one per NIC. */
export function macAddress(cluster: string, node: string, nic: 'cluster' | 'user'): string {
  const hash = createHash('sha256').update(`${cluster}/${node}/${nic}`).digest();
  return ['52', '54', '00', ...[0, 1, 2].map((i) => hash[i]!.toString(16).padStart(2, '0'))].join(':');
}

export function controlPlane(config: ClusterConfig): NodeConfig {
  return config.nodes.find((n) => n.role === 'control-plane')!;
}

/** Every control plane, in cluster.yaml's order; the first is the one that runs `kubeadm init` on a fresh cluster. */
export function controlPlanes(config: ClusterConfig): NodeConfig[] {
  return config.nodes.filter((n) => n.role === 'control-plane');
}

/** host:port of the API server for every node: the virtual IP with three control planes, else the control plane's address. */
export function apiServerEndpoint(config: ClusterConfig): string {
  return `${config.controlPlane?.endpoint || controlPlane(config).ip}:${apiServerPort}`;
}

/**
 * /etc/corekube/control-plane.env, read by control-plane-up.sh: who initializes a fresh
 * cluster, who the peers are, and the endpoint. Shell-safe by construction (names are
 * DNS labels, addresses dotted quads).
 */
export function renderControlPlaneEnv(config: ClusterConfig, node: NodeConfig): string {
  const cps = controlPlanes(config);
  return [
    '# corekube: the control planes of this cluster (generated from cluster.yaml)',
    `COREKUBE_NODE_NAME=${node.name}`,
    `COREKUBE_NODE_IP=${node.ip}`,
    `COREKUBE_ENDPOINT=${config.controlPlane?.endpoint || node.ip}`,
    `COREKUBE_VIRTUAL_IP=${config.controlPlane?.virtualIp ? 'yes' : 'no'}`,
    `COREKUBE_INITIALIZER=${cps[0]!.name}`,
    `COREKUBE_CONTROL_PLANES="${cps.map((n) => `${n.name}=${n.ip}`).join(' ')}"`,
    '',
  ].join('\n');
}

/**
 * The default route goes over the cluster NIC, so that kubeadm, the kubelet and flannel
 * all pick the cluster address (the user-mode NIC has the same 10.0.2.15 on every VM).
 * Its gateway need not exist: offline, nothing leaves the cluster anyway.
 */
export function clusterGateway(config: ClusterConfig): string {
  const { nodeCidr } = config.network;
  // Nor the virtual IP: traffic for the gateway would go to whichever control plane holds it.
  const used = new Set([...config.nodes.map((n) => n.ip), ...(config.controlPlane?.virtualIp ? [config.controlPlane.endpoint] : [])].map((ip) => parseIPv4(ip)));
  const first = nodeCidr.network + 1;
  const last = nodeCidr.network + cidrSize(nodeCidr) - 2;
  return formatIPv4(used.has(first) ? last : first);
}

export function renderHosts(config: ClusterConfig): string {
  const lines = ['127.0.0.1   localhost localhost.localdomain', '::1         localhost localhost.localdomain'];
  for (const node of config.nodes) lines.push(`${node.ip.padEnd(11)} ${node.name} ${node.name}.${config.name}.internal`);
  return `${lines.join('\n')}\n`;
}

/** NetworkManager keyfiles: the cluster NIC static (with the default route), the user NIC DHCP without one. */
export function renderNetwork(config: ClusterConfig, node: NodeConfig): { cluster: string; user: string } {
  const cluster = [
    '[connection]', 'id=corekube-cluster', 'type=ethernet', 'autoconnect=true', 'autoconnect-priority=100', '',
    '[ethernet]', `mac-address=${macAddress(config.name, node.name, 'cluster').toUpperCase()}`, '',
    '[ipv4]', 'method=manual', `address1=${node.ip}/${config.network.nodeCidr.prefix},${clusterGateway(config)}`,
    // Offline, the node has no resolver but the cluster's own: names of nodes are in /etc/hosts.
    ...(config.network.dnsServers.length > 0 ? [`dns=${config.network.dnsServers.join(';')};`] : []),
    'ignore-auto-dns=true', 'dns-search=', 'may-fail=false', '',
    '[ipv6]', 'method=disabled', '',
  ];
  const user = [
    '[connection]', 'id=corekube-host', 'type=ethernet', 'autoconnect=true', '',
    '[ethernet]', `mac-address=${macAddress(config.name, node.name, 'user').toUpperCase()}`, '',
    '[ipv4]', 'method=auto', 'never-default=true', 'ignore-auto-dns=true', '',
    '[ipv6]', 'method=disabled', '',
  ];
  return { cluster: cluster.join('\n'), user: user.join('\n') };
}

/** The pause image the kubelet and containerd must agree on: the lock's, never a pull. */
export function sandboxImage(lock: Lock): string {
  const pause = lock.images.find((i) => i.name === 'registry.k8s.io/pause');
  if (!pause) throw new Error('the lock has no registry.k8s.io/pause image (the images stage checks this)');
  return `${pause.name}:${pause.tag}`;
}

export function containerdMajor(lock: Lock): number {
  const match = /containerd-(\d+)\.\d+\.\d+/.exec(lock.artifacts.containerd.url);
  return match ? Number(match[1]) : 2;
}

/**
 * containerd's whole config (never a packaged default): systemd cgroups, our runc, the
 * sandbox image from the layout, CNI from /opt/cni/bin. Config version 3 for
 * containerd 2.x, version 2 for 1.x.
 */
export function renderContainerdConfig(lock: Lock): string {
  const cni = { bin_dir: '/opt/cni/bin', conf_dir: '/etc/cni/net.d' };
  const daemon = { root: '/var/lib/containerd', state: '/run/containerd', grpc: { address: '/run/containerd/containerd.sock' } };
  const runtimes = {
    default_runtime_name: 'runc',
    runtimes: { runc: { runtime_type: 'io.containerd.runc.v2', options: { BinaryName: '/usr/local/bin/runc', SystemdCgroup: true } } },
  };
  const config: TomlTable =
    containerdMajor(lock) >= 2
      ? {
          version: 3,
          ...daemon,
          plugins: {
            'io.containerd.cri.v1.images': {
              snapshotter: 'overlayfs',
              // Offline: every image comes from the image disk, none is ever pulled.
              pinned_images: { sandbox: sandboxImage(lock) },
            },
            'io.containerd.cri.v1.runtime': {
              enable_selinux: true,
              // containerd 2 takes a list of plugin directories (bin_dir is deprecated).
              cni: { bin_dirs: [cni.bin_dir], conf_dir: cni.conf_dir },
              containerd: runtimes,
            },
          },
        }
      : {
          version: 2,
          ...daemon,
          plugins: {
            'io.containerd.grpc.v1.cri': {
              sandbox_image: sandboxImage(lock),
              enable_selinux: true,
              cni,
              containerd: { snapshotter: 'overlayfs', ...runtimes },
            },
          },
        };
  return `# corekube: the whole containerd configuration (generated from cluster.yaml and the lock)\n${stringifyToml(config)}`;
}

/**
 * The resolv.conf the kubelet gives pods with dnsPolicy Default, CoreDNS among them
 * (KubeletConfiguration.resolvConf). Never systemd-resolved's stub (127.0.0.53, FCOS's
 * /etc/resolv.conf): inside CoreDNS's pod that address is CoreDNS itself, and its loop
 * plugin stops it. With no upstream resolvers (offline), the node's own address, where
 * nothing listens on port 53: CoreDNS starts (it needs one nameserver to forward to),
 * answers every cluster name itself, and an external name is refused at once (an ICMP
 * port-unreachable, SERVFAIL to the pod) instead of timing out.
 */
export function renderResolvConf(config: ClusterConfig, node: NodeConfig): string {
  const servers = config.network.dnsServers.length > 0 ? config.network.dnsServers : [node.ip];
  const why =
    config.network.dnsServers.length > 0
      ? '# corekube: the upstream resolvers from network.dnsServers in cluster.yaml.'
      : '# corekube: no upstream resolver (offline). The node itself, where nothing serves DNS: external names fail at once.';
  return `${why}
${servers.map((ip) => `nameserver ${ip}`).join('\n')}\n`;
}

/** /etc/selinux/config: cluster.yaml's mode; corekube-selinux.service applies it before containerd starts. */
export function renderSelinuxConfig(config: ClusterConfig): string {
  return `# corekube: selinux in cluster.yaml (${config.selinux === 'enforcing' ? "FCOS's default" : 'the escape hatch; the README says what it costs'})\nSELINUX=${config.selinux}\nSELINUXTYPE=targeted\n`;
}

/** kubeadm patch targets for its static pods (kubeadm's patches.go: TARGET[+PATCHTYPE].yaml). */
export const staticPodPatchTargets = ['etcd', 'kube-apiserver', 'kube-controller-manager', 'kube-scheduler'] as const;

/**
 * Strategic-merge patches that run kubeadm's four static pods as spc_t. Under FCOS's
 * enforcing SELinux an unprivileged container runs as container_t, which may not read
 * /etc/kubernetes (kubernetes_file_t) nor write the etcd data directory, so kubeadm init
 * times out (kubernetes/kubeadm#279); container-selinux grants spc_t what a host
 * component needs (admin_pattern(spc_t, kubernetes_file_t)). Relabelling the files
 * instead (Typhoon's chcon) cannot work with kubeadm: it writes the kubeconfigs the
 * pods read in the same run that starts them.
 */
export function renderKubeadmPatches(): { target: (typeof staticPodPatchTargets)[number]; file: string; content: string }[] {
  const patch = stringify({ spec: { securityContext: { seLinuxOptions: { type: 'spc_t' } } } });
  return staticPodPatchTargets.map((target) => ({
    target,
    file: `${target}+strategic.yaml`,
    content: `# corekube: ${target} runs as spc_t under SELinux (see README, Fedora CoreOS specifics)\n${patch}`,
  }));
}

export function renderPodSecurityAdmission(): string {
  return stringify({
    apiVersion: 'apiserver.config.k8s.io/v1',
    kind: 'AdmissionConfiguration',
    plugins: [
      {
        name: 'PodSecurity',
        configuration: {
          apiVersion: 'pod-security.admission.config.k8s.io/v1',
          kind: 'PodSecurityConfiguration',
          defaults: {
            enforce: 'baseline', 'enforce-version': 'latest',
            audit: 'restricted', 'audit-version': 'latest',
            warn: 'restricted', 'warn-version': 'latest',
          },
          exemptions: { usernames: [], runtimeClasses: [], namespaces: ['kube-system'] },
        },
      },
    ],
  });
}

/** flannel's ConfigMap, with the pod network from cluster.yaml (manifests/10-flannel.yaml mounts it). */
export function renderFlannelConfig(config: ClusterConfig): string {
  const cniConf = {
    name: 'cbr0',
    cniVersion: '0.3.1',
    plugins: [
      { type: 'flannel', delegate: { hairpinMode: true, isDefaultGateway: true } },
      { type: 'portmap', capabilities: { portMappings: true } },
    ],
  };
  const netConf = { Network: config.network.podCidr.text, EnableNFTables: false, Backend: { Type: 'vxlan' } };
  return stringify({
    apiVersion: 'v1',
    kind: 'ConfigMap',
    metadata: { name: 'kube-flannel-cfg', namespace: 'kube-flannel', labels: { app: 'flannel', 'k8s-app': 'flannel', tier: 'node' } },
    data: { 'cni-conf.json': `${JSON.stringify(cniConf, null, 2)}\n`, 'net-conf.json': `${JSON.stringify(netConf, null, 2)}\n` },
  });
}

export interface KubeadmInputs {
  token: string;
  caHash: string;
}

type Doc = Record<string, unknown>;

/** The Kubernetes minor of a version like "v1.35.7". */
export function kubernetesMinor(version: string): number {
  return Number(/^v?1\.(\d+)/.exec(version)?.[1] ?? NaN);
}

/**
 * kubeadm's configuration for a node (v1beta4, Kubernetes 1.31 and later), as documents.
 * A worker gets only its JoinConfiguration: `kubeadm join` ignores every other kind and
 * takes the kubelet's configuration from the cluster (what init uploaded).
 */
export function kubeadmDocuments(config: ClusterConfig, lock: Lock, node: NodeConfig, pki: KubeadmInputs): Doc[] {
  const endpoint = apiServerEndpoint(config);
  const workers = config.nodes.some((n) => n.role === 'worker');
  const nodeRegistration = {
    name: node.name,
    criSocket: nodePaths.criSocket,
    kubeletExtraArgs: [{ name: 'node-ip', value: node.ip }],
    // Offline: an image missing from the node is an error, never a pull.
    imagePullPolicy: 'Never',
    ...(node.role === 'control-plane' && !workers ? { taints: [] } : {}),
  };
  // The static pods run as spc_t (renderKubeadmPatches); a control plane joining later would need the same.
  const patches = { directory: nodePaths.kubeadmPatches };
  if (node.role === 'worker') {
    return [
      {
        apiVersion: 'kubeadm.k8s.io/v1beta4',
        kind: 'JoinConfiguration',
        discovery: { bootstrapToken: { apiServerEndpoint: endpoint, token: pki.token, caCertHashes: [pki.caHash] } },
        nodeRegistration,
        patches,
        // Discovery retries until the control plane answers: one join, even when the control
        // plane boots slowly (TCG), instead of a failed join, a reset and another try.
        timeouts: { discovery: '20m0s', tlsBootstrap: '10m0s' },
      },
    ];
  }
  // With three control planes, every one but the first joins the cluster the first one made.
  if (node.name !== controlPlanes(config)[0]!.name) return controlPlaneJoinDocuments(config, node, pki);
  const kubelet: Doc = {
    apiVersion: 'kubelet.config.k8s.io/v1beta1',
    kind: 'KubeletConfiguration',
    cgroupDriver: 'systemd',
    containerRuntimeEndpoint: nodePaths.criSocket,
    authentication: { anonymous: { enabled: false }, webhook: { enabled: true }, x509: { clientCAFile: '/etc/kubernetes/pki/ca.crt' } },
    authorization: { mode: 'Webhook' },
    // Not systemd-resolved's stub: see renderResolvConf. The same path on every node, each its own content.
    resolvConf: nodePaths.resolvConf,
    volumePluginDir: nodePaths.volumePluginDir,
    // Images are labelled pinned at import; garbage collection skips them.
    imageGCHighThresholdPercent: 85,
    imageGCLowThresholdPercent: 80,
  };
  const flexVolumeMount = kubernetesMinor(lock.kubernetes.version) <= lastMinorWithFlexVolumeMount;
  return [
    {
      apiVersion: 'kubeadm.k8s.io/v1beta4',
      kind: 'InitConfiguration',
      bootstrapTokens: [
        { token: pki.token, ttl: '24h0m0s', usages: ['signing', 'authentication'], groups: ['system:bootstrappers:kubeadm:default-node-token'] },
      ],
      localAPIEndpoint: { advertiseAddress: node.ip, bindPort: apiServerPort },
      nodeRegistration,
      patches,
      // kubeadm's 4-minute defaults are short for a first boot under TCG. kubernetesAPICall
      // bounds the calls kubeadm retries against a live API server (the admin.conf
      // ClusterRoleBinding, the bootstrap token, the config upload; 1 min by default): a
      // healthy API server answers each in milliseconds, so a longer bound costs nothing,
      // while an API server still busy with its first start (cold caches, slow disks, TCG)
      // otherwise fails init and costs a reset and another try.
      timeouts: { controlPlaneComponentHealthCheck: '10m0s', kubeletHealthCheck: '10m0s', kubernetesAPICall: '5m0s' },
    },
    {
      apiVersion: 'kubeadm.k8s.io/v1beta4',
      kind: 'ClusterConfiguration',
      clusterName: config.name,
      kubernetesVersion: lock.kubernetes.version,
      controlPlaneEndpoint: endpoint,
      certificatesDir: '/etc/kubernetes/pki',
      imageRepository: 'registry.k8s.io',
      networking: { podSubnet: config.network.podCidr.text, serviceSubnet: config.network.serviceCidr.text, dnsDomain: 'cluster.local' },
      apiServer: {
        certSANs: ['127.0.0.1', 'localhost', ...apiServerSANs(config), ...openstackSANs(config)],
        extraArgs: [{ name: 'admission-control-config-file', value: `${nodePaths.admissionDir}/pod-security.yaml` }],
        extraVolumes: [{ name: 'admission', hostPath: nodePaths.admissionDir, mountPath: nodePaths.admissionDir, readOnly: true, pathType: 'Directory' }],
      },
      controllerManager: {
        extraArgs: [
          // kubeadm mounts this directory (DirectoryOrCreate) into the controller-manager; its
          // default under /usr cannot be created on FCOS, and the controller-manager never starts.
          ...(flexVolumeMount ? [{ name: 'flex-volume-plugin-dir', value: nodePaths.volumePluginDir }] : []),
          ...singleControlPlaneArgs(config),
        ],
      },
      scheduler: { extraArgs: singleControlPlaneArgs(config) },
    },
    kubelet,
  ];
}

/**
 * One control plane: the controller-manager and the scheduler run without leader election.
 * With no second candidate there is nothing to elect, and a leader that cannot renew its
 * lease within the renew deadline (10 s) exits: on a slow or busy node (the real kubeadm
 * v1.37 cluster under TCG: "Failed to renew lease … context deadline exceeded", then
 * CrashLoopBackOff, the worker's pods never created) that is a control plane that stops
 * controlling. Three control planes keep kubeadm's default, leader election on.
 */
function singleControlPlaneArgs(config: ClusterConfig): { name: string; value: string }[] {
  return config.controlPlane?.virtualIp ? [] : [{ name: 'leader-elect', value: 'false' }];
}

/**
 * The API server certificate's names: every control plane (any of them may answer), and
 * the virtual IP (kubeadm adds controlPlaneEndpoint too; said here so the list is whole).
 */
function apiServerSANs(config: ClusterConfig): string[] {
  const cps = controlPlanes(config);
  return [...(config.controlPlane?.virtualIp ? [config.controlPlane.endpoint] : []), ...cps.map((n) => n.ip), ...cps.map((n) => n.name)];
}

/**
 * `kubeadm join --control-plane` for a control plane: the shared CAs and the
 * service-account key are already in /etc/kubernetes/pki (from Ignition), so no
 * certificateKey and no --upload-certs secret; kubeadm makes this node's own certificates
 * from them. Every control plane of an HA cluster gets it (kubeadm-join.yaml): the first
 * one too, because a control plane that reboots comes back blank and must join the
 * cluster the other two kept.
 */
export function controlPlaneJoinDocuments(config: ClusterConfig, node: NodeConfig, pki: KubeadmInputs): Doc[] {
  const workers = config.nodes.some((n) => n.role === 'worker');
  return [
    {
      apiVersion: 'kubeadm.k8s.io/v1beta4',
      kind: 'JoinConfiguration',
      discovery: { bootstrapToken: { apiServerEndpoint: apiServerEndpoint(config), token: pki.token, caCertHashes: [pki.caHash] } },
      nodeRegistration: {
        name: node.name,
        criSocket: nodePaths.criSocket,
        kubeletExtraArgs: [{ name: 'node-ip', value: node.ip }],
        imagePullPolicy: 'Never',
        ...(!workers ? { taints: [] } : {}),
      },
      controlPlane: { localAPIEndpoint: { advertiseAddress: node.ip, bindPort: apiServerPort } },
      patches: { directory: nodePaths.kubeadmPatches },
      // Slow first boots (TCG), and kubeadm's etcd calls wait while another control plane's
      // learner is promoted (etcd admits one learner at a time).
      timeouts: { discovery: '20m0s', tlsBootstrap: '10m0s', controlPlaneComponentHealthCheck: '10m0s', kubeletHealthCheck: '10m0s', etcdAPICall: '10m0s', kubernetesAPICall: '5m0s' },
    },
  ];
}

/** target openstack: the API server's floating IP, where cluster.yaml names it, is in its certificate. */
function openstackSANs(config: ClusterConfig): string[] {
  const address = config.target === 'openstack' ? config.openstack?.floatingIp?.address : undefined;
  return address ? [address] : [];
}

/** Settings that cluster.yaml owns: an override in fcc/kubeadm.yaml may not say otherwise. */
function ownedSettings(config: ClusterConfig, lock: Lock): { kind: string; path: string[]; value: unknown; source: string }[] {
  return [
    { kind: 'ClusterConfiguration', path: ['networking', 'podSubnet'], value: config.network.podCidr.text, source: 'network.podCidr' },
    { kind: 'ClusterConfiguration', path: ['networking', 'serviceSubnet'], value: config.network.serviceCidr.text, source: 'network.serviceCidr' },
    { kind: 'ClusterConfiguration', path: ['kubernetesVersion'], value: lock.kubernetes.version, source: 'kubernetes.version (as pinned in the lock)' },
    { kind: 'ClusterConfiguration', path: ['clusterName'], value: config.name, source: 'name' },
    { kind: 'ClusterConfiguration', path: ['controlPlaneEndpoint'], value: apiServerEndpoint(config), source: config.controlPlane?.virtualIp ? 'controlPlane.endpoint' : 'the control-plane node ip' },
    { kind: 'KubeletConfiguration', path: ['cgroupDriver'], value: 'systemd', source: 'corekube (containerd runs with systemd cgroups)' },
    { kind: 'KubeletConfiguration', path: ['authentication', 'anonymous', 'enabled'], value: false, source: 'corekube (no anonymous kubelet access)' },
    { kind: 'KubeletConfiguration', path: ['authorization', 'mode'], value: 'Webhook', source: 'corekube (kubelet authorization through the API server)' },
    { kind: 'KubeletConfiguration', path: ['resolvConf'], value: nodePaths.resolvConf, source: 'corekube (offline DNS; upstream resolvers are network.dnsServers)' },
    { kind: 'KubeletConfiguration', path: ['volumePluginDir'], value: nodePaths.volumePluginDir, source: "corekube (FCOS's /usr is read-only)" },
    { kind: 'InitConfiguration', path: ['patches', 'directory'], value: nodePaths.kubeadmPatches, source: 'corekube (the static pods run as spc_t under SELinux)' },
  ];
}

function getPath(doc: Doc, path: string[]): unknown {
  let value: unknown = doc;
  for (const key of path) value = value !== null && typeof value === 'object' ? (value as Doc)[key] : undefined;
  return value;
}

type Arg = { name: string; value: string };
const isArgList = (value: unknown): value is Arg[] => Array.isArray(value) && value.every((a) => a !== null && typeof a === 'object' && typeof (a as Arg).name === 'string');

/**
 * Merges an override into a kubeadm document: mappings key by key; kubeadm's v1beta4
 * argument lists (extraArgs, kubeletExtraArgs: [{name, value}]) argument by argument, an
 * override replacing the argument of the same name and adding the others, so an override's
 * flag never drops one corekube sets (below v1.36, the controller-manager's
 * flex-volume-plugin-dir); any other list is replaced whole.
 */
function deepMerge(base: Doc, patch: Doc): Doc {
  const out: Doc = { ...base };
  for (const [key, value] of Object.entries(patch)) {
    const current = out[key];
    if (isArgList(value) && isArgList(current)) {
      out[key] = [...current.filter((a) => !value.some((b) => b.name === a.name)), ...value];
    } else {
      out[key] =
        value !== null && typeof value === 'object' && !Array.isArray(value) && current !== null && typeof current === 'object' && !Array.isArray(current)
          ? deepMerge(current as Doc, value as Doc)
          : value;
    }
  }
  return out;
}

/**
 * Applies the user's kubeadm overrides (fcc/kubeadm.yaml: documents by kind, merged
 * into ours) and refuses any that contradicts cluster.yaml, naming file, field and value.
 */
export function applyKubeadmOverrides(docs: Doc[], overrideFile: string, overrideText: string | undefined, config: ClusterConfig, lock: Lock): Doc[] {
  if (!overrideText) return docs;
  const patches = parseAllDocuments(overrideText).map((d, index) => {
    if (d.errors.length > 0) throw new InputError(overrideFile, [{ path: `document ${index + 1}`, expected: 'valid YAML', found: d.errors[0]!.message }]);
    return d.toJS() as Doc | null;
  });
  const problems: { path: string; expected: string; found: string }[] = [];
  const known = new Set(['InitConfiguration', 'ClusterConfiguration', 'JoinConfiguration', 'KubeletConfiguration', 'KubeProxyConfiguration']);
  patches.forEach((patch, index) => {
    if (!patch) return;
    const kind = String(patch.kind ?? '');
    if (!known.has(kind)) {
      problems.push({ path: `document ${index + 1}.kind`, expected: [...known].join(', '), found: JSON.stringify(patch.kind) });
      return;
    }
    for (const owned of ownedSettings(config, lock).filter((o) => o.kind === kind)) {
      const value = getPath(patch, owned.path);
      if (value !== undefined && value !== owned.value) {
        problems.push({
          path: `${kind}.${owned.path.join('.')}`,
          expected: `${JSON.stringify(owned.value)} (from ${owned.source} in ${config.file}; change it there)`,
          found: JSON.stringify(value),
        });
      }
    }
  });
  if (problems.length > 0) throw new InputError(overrideFile, problems, 'fcc/kubeadm.yaml may add kubeadm settings, not contradict cluster.yaml.');
  const result = docs.map((doc) => patches.filter((p) => p?.kind === doc.kind).reduce<Doc>((acc, p) => deepMerge(acc, p!), doc));
  const missing = patches.filter((p) => p && !docs.some((d) => d.kind === p.kind));
  // kube-proxy's settings are cluster-wide: they go with kubeadm init only.
  const clusterWide = docs.some((d) => d.kind === 'ClusterConfiguration') ? (missing as Doc[]).filter((p) => p.kind === 'KubeProxyConfiguration') : [];
  return [...result, ...clusterWide];
}

export function stringifyDocuments(docs: Doc[]): string {
  return docs.map((d) => stringify(d, { lineWidth: 0 })).join('---\n');
}
