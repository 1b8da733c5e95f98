// cluster.yaml: what the user wants. Parsed once into typed values; every problem is
// reported with its field path, and nothing runs on a bad config.
import { readFileSync, statSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, isAbsolute, resolve } from 'node:path';
import { InputError, UserError, ExitCode } from '../errors.ts';
import { fieldPath, parseYaml, Reader } from './fields.ts';
import type { SignatureSettings } from '../signatures/trust.ts';
import { parseSignatureSettings, signatureConfigKeys } from './signature-config.ts';
import { cidrContains, cidrsOverlap, isHostAddress, parseCidr, parseIPv4, type Cidr } from './net.ts';

export const fcosStreams = ['stable', 'testing', 'next'] as const;
export const architectures = ['x86_64', 'aarch64'] as const;
export const nodeRoles = ['control-plane', 'worker'] as const;
/** FCOS boots enforcing; `permissive` is the documented escape hatch (docs/fcos.md). */
export const selinuxModes = ['enforcing', 'permissive'] as const;
export type SelinuxMode = (typeof selinuxModes)[number];
/** Where the nodes run: local QEMU VMs (the default) or servers on an OpenStack cloud. */
export const targets = ['qemu', 'openstack'] as const;
export type Target = (typeof targets)[number];
export type Architecture = (typeof architectures)[number];
export type NodeRole = (typeof nodeRoles)[number];

/** Where each download family lives upstream; `mirrors` in cluster.yaml replaces these bases. */
export const upstreamBases = {
  fcos: 'https://builds.coreos.fedoraproject.org',
  kubernetes: 'https://dl.k8s.io',
  github: 'https://github.com',
  fedora: 'https://fedoraproject.org',
} as const;
export type DownloadFamily = keyof typeof upstreamBases;

export interface NodeConfig {
  name: string;
  role: NodeRole;
  ip: string;
  cpus: number;
  memoryMiB: number;
}

export interface RegistryMirror {
  location: string; // host[:port][/path]
  insecure: boolean;
}

/**
 * The `openstack:` section: where on the cloud the cluster goes. Credentials never live
 * here: the cloud is a clouds.yaml entry (or OS_CLOUD), read by the openstack client.
 */
export interface OpenstackConfig {
  /** The clouds.yaml entry; undefined: OS_CLOUD at run time. */
  cloud?: string;
  /** An existing network (name or ID) with a subnet for network.nodeCidr; undefined: corekube creates NAME-net and NAME-subnet. */
  network?: string;
  flavors: Record<NodeRole, string>;
  availabilityZone?: string;
  /** SSH (22) and the API server (6443) are open from this range only; everything else only inside the cluster network. */
  adminCidr: Cidr;
  /** A floating IP for the API server, from this external network; `address`: an existing one (put into the API server's certificate). */
  floatingIp?: { network: string; address?: string };
  /** Cinder volume type for the per-node image disk volumes; undefined: the cloud's default. */
  volumeType?: string;
}

export interface ClusterConfig {
  file: string;
  name: string;
  /** Where the nodes run (`target`, or TARGET=/--target, which wins). */
  target: Target;
  /** Present when cluster.yaml has an `openstack:` section (required for target openstack). */
  openstack?: OpenstackConfig;
  fcos: { stream: (typeof fcosStreams)[number]; arch: Architecture; release?: string };
  kubernetes: { version: string };
  /** dnsServers: resolvers beyond the cluster that CoreDNS and the nodes may ask; none by default (offline). */
  network: { nodeCidr: Cidr; podCidr: Cidr; serviceCidr: Cidr; dnsServers: string[] };
  nodes: NodeConfig[];
  /**
   * The API server's address for every node and for out/kubeconfig's cluster side: with
   * three control planes a virtual IP (controlPlane.endpoint) that kube-vip moves to a
   * live one; with one control plane, that node's own address.
   */
  controlPlane: { endpoint: string; virtualIp: boolean };
  selinux: SelinuxMode;
  /** Ports on 127.0.0.1 forwarded into the VMs: the API server, and SSH from sshBase upwards (one per node, in order). */
  hostPorts: { apiServer: number; sshBase: number };
  sshPublicKeyFile: string;
  sshPublicKey: string;
  mirrors: { downloads: Record<DownloadFamily, string>; registries: Record<string, RegistryMirror> };
  /** Whom pin trusts to have signed each source, where not upstream's signer (`signatures:`). */
  signatures: SignatureSettings;
}

/** The Go/Kubernetes name of an architecture, as used in download URLs and image indexes. */
export function goArch(arch: Architecture): 'amd64' | 'arm64' {
  return arch === 'x86_64' ? 'amd64' : 'arm64';
}

/**
 * Every key cluster.yaml may hold, as the parser reads it (it takes each mapping's keys
 * from here, so nothing else can accept a key): a nested object is a mapping, a
 * one-element array a list of such mappings, `HOST` a key the user chooses (a registry
 * host). The configuration reference (docs/configuration.md) lists exactly the leaves
 * of this tree, as `configKeyPaths()` spells them; test/docs.test.ts holds it to that.
 */
export const configKeys = {
  name: true,
  target: true,
  openstack: {
    cloud: true,
    network: true,
    flavors: { controlPlane: true, worker: true },
    availabilityZone: true,
    adminCidr: true,
    floatingIp: { network: true, address: true },
    volumeType: true,
  },
  fcos: { stream: true, arch: true, release: true },
  kubernetes: { version: true },
  network: { nodeCidr: true, podCidr: true, serviceCidr: true, dnsServers: true },
  nodes: [{ name: true, role: true, ip: true, cpus: true, memory: true }],
  controlPlane: { endpoint: true },
  hostPorts: { apiServer: true, sshBase: true },
  sshPublicKeyFile: true,
  mirrors: {
    fcos: true,
    kubernetes: true,
    github: true,
    fedora: true,
    registries: { HOST: { location: true, insecure: true } },
  },
  selinux: true,
  signatures: signatureConfigKeys,
} as const satisfies KeyTree & { mirrors: Record<DownloadFamily, true> & { registries: KeyTree } };

interface KeyTree {
  readonly [key: string]: true | KeyTree | readonly [KeyTree];
}

/** The keys of one mapping of `configKeys`. */
function keysOf(tree: KeyTree | readonly [KeyTree]): string[] {
  return Object.keys(Array.isArray(tree) ? tree[0] : tree);
}

/** Every leaf of `configKeys` as a path: `fcos.stream`, `nodes[].ip`, `mirrors.registries.HOST.location`. */
export function configKeyPaths(tree: KeyTree = configKeys, prefix = ''): string[] {
  return Object.entries(tree).flatMap(([key, value]) => {
    const path = prefix ? `${prefix}.${key}` : key;
    if (value === true) return [path];
    if (Array.isArray(value)) return configKeyPaths((value as readonly [KeyTree])[0], `${path}[]`);
    return configKeyPaths(value as KeyTree, path);
  });
}

export const defaultConfigFile = 'cluster.yaml';
/** The oldest Kubernetes minor corekube builds: kubeadm v1beta4 configuration arrived in 1.31. */
export const minimumKubernetesMinor = 31;

export function loadConfig(file: string, options: { target?: Target } = {}): ClusterConfig {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new UserError(
      code === 'ENOENT'
        ? `${file}: no such file. Copy the example (cp cluster.example.yaml cluster.yaml) or name another with CONFIG=path.`
        : `${file}: cannot read it (${code ?? String(error)})`,
      ExitCode.config,
    );
  }
  return parseConfig(file, text, options);
}

const dnsLabel = /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/;
const kubernetesVersion = /^v?\d+\.\d+(\.\d+)?$/;
const fcosRelease = /^\d+\.\d{8}\.\d+\.\d+$/;
const registryHost = /^[a-z0-9.-]+(:\d+)?$/;
const registryLocation = /^[a-z0-9.-]+(:\d+)?(\/[a-z0-9._/-]+)?$/;

/** Pure: text in, typed config out. Reads only the SSH public key file it names. */
export function parseConfig(file: string, text: string, options: { target?: Target } = {}): ClusterConfig {
  const r = new Reader(file);
  const root = r.object(parseYaml(file, text) ?? {}, '', keysOf(configKeys));
  if (!root) throw new InputError(file, r.problems);

  const name = r.string(r.required(root, 'name', '', 'a cluster name'), 'name', 'a DNS label (a-z, 0-9, -)', dnsLabel);

  const fcosIn = root.fcos === undefined ? {} : r.object(root.fcos, 'fcos', keysOf(configKeys.fcos));
  const stream = r.oneOf(fcosIn?.stream ?? 'stable', 'fcos.stream', fcosStreams);
  const arch = r.oneOf(fcosIn?.arch ?? 'x86_64', 'fcos.arch', architectures);
  const release =
    fcosIn?.release === undefined
      ? undefined
      : r.string(fcosIn.release, 'fcos.release', 'an FCOS release like "43.20260802.3.1"', fcosRelease);

  const kubeIn = r.object(r.required(root, 'kubernetes', '', 'a mapping with version'), 'kubernetes', keysOf(configKeys.kubernetes));
  const versionText = kubeIn
    ? r.string(
        r.required(kubeIn, 'version', 'kubernetes', 'a Kubernetes version'),
        'kubernetes.version',
        'a Kubernetes version like "v1.35.7" (or a minor like "v1.35")',
        kubernetesVersion,
      )
    : undefined;
  // kubeadm's v1beta4 configuration (what the ignition stage writes) needs 1.31; 2.x minors would be a new API.
  const minor = versionText ? /^v?1\.(\d+)/.exec(versionText)?.[1] : undefined;
  if (versionText && (!minor || Number(minor) < minimumKubernetesMinor)) {
    r.problem('kubernetes.version', `v1.${minimumKubernetesMinor} or later (corekube writes kubeadm's v1beta4 configuration)`, JSON.stringify(versionText));
  }

  const netIn =
    root.network === undefined ? {} : r.object(root.network, 'network', keysOf(configKeys.network));
  const cidr = (key: string, fallback: string): Cidr | undefined => {
    const value = netIn?.[key] ?? fallback;
    const parsed = typeof value === 'string' ? parseCidr(value) : undefined;
    if (!parsed) r.problem(`network.${key}`, 'an IPv4 CIDR with no host bits set, like "10.77.0.0/24"', JSON.stringify(value));
    return parsed;
  };
  const nodeCidr = cidr('nodeCidr', '10.77.0.0/24');
  const podCidr = cidr('podCidr', '10.244.0.0/16');
  const serviceCidr = cidr('serviceCidr', '10.96.0.0/12');
  const ranges: [string, Cidr | undefined][] = [
    ['nodeCidr', nodeCidr],
    ['podCidr', podCidr],
    ['serviceCidr', serviceCidr],
  ];
  for (let i = 0; i < ranges.length; i++) {
    for (let j = i + 1; j < ranges.length; j++) {
      const [aName, a] = ranges[i]!;
      const [bName, b] = ranges[j]!;
      if (a && b && cidrsOverlap(a, b)) {
        r.problem(`network.${bName}`, `a range that does not overlap network.${aName} (${a.text})`, b.text);
      }
    }
  }

  const dnsServers = parseDnsServers(r, netIn?.dnsServers, ranges);
  const nodes = parseNodes(r, root.nodes, nodeCidr);
  const controlPlane = parseControlPlane(r, root.controlPlane, nodes, ranges);
  const selinux = r.oneOf(root.selinux ?? 'enforcing', 'selinux', selinuxModes);

  const portsIn = root.hostPorts === undefined ? {} : r.object(root.hostPorts, 'hostPorts', keysOf(configKeys.hostPorts));
  const apiServerPort = r.integer(portsIn?.apiServer ?? 6443, 'hostPorts.apiServer', 1024, 65535);
  const sshBase = r.integer(portsIn?.sshBase ?? 2222, 'hostPorts.sshBase', 1024, 65535 - Math.max(0, nodes.length - 1));
  // With three control planes the API server takes apiServer and one port per control plane above it.
  const apiPorts = controlPlane?.virtualIp ? 1 + nodes.filter((n) => n.role === 'control-plane').length : 1;
  if (apiServerPort !== undefined && apiServerPort + apiPorts - 1 > 65535) {
    r.problem('hostPorts.apiServer', `a port at most ${65536 - apiPorts} (the ${apiPorts - 1} control planes take the ports above it)`, String(apiServerPort));
  }
  if (apiServerPort !== undefined && sshBase !== undefined && apiServerPort < sshBase + nodes.length && sshBase < apiServerPort + apiPorts) {
    const taken = apiPorts > 1 ? ` (with the ports ${apiServerPort + 1}-${apiServerPort + apiPorts - 1} above it, one per control plane)` : '';
    r.problem('hostPorts.apiServer', `a port${taken} outside the SSH ports ${sshBase}-${sshBase + nodes.length - 1}`, String(apiServerPort));
  }

  const keyPath = r.string(
    r.required(root, 'sshPublicKeyFile', '', 'the path of an SSH public key file'),
    'sshPublicKeyFile',
    'the path of an SSH public key file',
  );
  let sshPublicKeyFile = '';
  let sshPublicKey = '';
  if (keyPath) {
    sshPublicKeyFile = resolveUserPath(keyPath, dirname(resolve(file)));
    sshPublicKey = readPublicKey(r, sshPublicKeyFile);
  }

  const mirrors = parseMirrors(r, root.mirrors);
  const signatures = parseSignatureSettings(r, root.signatures, dirname(resolve(file)));

  const configured = root.target === undefined ? 'qemu' : r.oneOf(root.target, 'target', targets);
  const target = options.target ?? configured;
  const openstack = root.openstack === undefined ? undefined : parseOpenstack(r, root.openstack, nodeCidr);
  if (target === 'openstack' && root.openstack === undefined) {
    r.problem(
      'openstack',
      `an openstack: section (cloud, flavors, adminCidr…) for target openstack${options.target ? ' (TARGET=openstack)' : ''}`,
      'nothing (see cluster.example.yaml)',
    );
  }

  if (target === 'openstack' && controlPlane?.virtualIp) {
    // Neutron's port security drops traffic for an address the port does not own: the
    // virtual IP needs an allowed-address pair on each control plane's port, not made yet.
    r.problem('controlPlane.endpoint', 'one control plane on target openstack (three behind a virtual IP run on qemu only, for now)', JSON.stringify(controlPlane.endpoint));
  }

  r.check();
  return {
    file,
    name: name!,
    target: target!,
    ...(openstack ? { openstack } : {}),
    fcos: { stream: stream!, arch: arch!, ...(release ? { release } : {}) },
    kubernetes: { version: versionText!.startsWith('v') ? versionText! : `v${versionText}` },
    network: { nodeCidr: nodeCidr!, podCidr: podCidr!, serviceCidr: serviceCidr!, dnsServers },
    nodes,
    controlPlane: controlPlane ?? { endpoint: '', virtualIp: false },
    selinux: selinux!,
    hostPorts: { apiServer: apiServerPort!, sshBase: sshBase! },
    sshPublicKeyFile,
    sshPublicKey,
    mirrors,
    signatures,
  };
}

/** Upstream resolvers (IPv4) outside the cluster's own ranges; an empty list means none at all. */
function parseDnsServers(r: Reader, value: unknown, ranges: [string, Cidr | undefined][]): string[] {
  if (value === undefined) return [];
  const list = r.list(value, 'network.dnsServers', 'a list of IPv4 addresses of DNS resolvers');
  if (!list) return [];
  const servers: string[] = [];
  list.forEach((item, index) => {
    const path = fieldPath('network.dnsServers', index);
    const ip = typeof item === 'string' ? parseIPv4(item) : undefined;
    if (ip === undefined) {
      r.problem(path, 'an IPv4 address of a DNS resolver', JSON.stringify(item));
      return;
    }
    // A resolver inside the pod or service range would be the cluster asking itself: CoreDNS's loop.
    const inside = ranges.find(([key, cidr]) => key !== 'nodeCidr' && cidr && cidrContains(cidr, ip));
    if (inside) r.problem(path, `a resolver outside network.${inside[0]} (${inside[1]!.text})`, JSON.stringify(item));
    else if (ip >>> 24 === 127) r.problem(path, 'a resolver the pods can reach (not a loopback address: CoreDNS would ask itself)', JSON.stringify(item));
    else servers.push(item as string);
  });
  if (list.length > 3) r.problem('network.dnsServers', 'at most 3 resolvers (the resolv.conf limit)', String(list.length));
  return servers;
}

function parseNodes(r: Reader, value: unknown, nodeCidr: Cidr | undefined): NodeConfig[] {
  const list = r.list(value ?? null, 'nodes', 'a list of nodes (at least one control-plane)');
  if (!list) return [];
  const nodes: NodeConfig[] = [];
  const seenNames = new Map<string, number>();
  const seenIps = new Map<string, number>();
  list.forEach((item, index) => {
    const path = fieldPath('nodes', index);
    const node = r.object(item, path, keysOf(configKeys.nodes));
    if (!node) return;
    const name = r.string(
      r.required(node, 'name', path, 'a node name'),
      fieldPath(path, 'name'),
      'a host name (a DNS label: a-z, 0-9, -)',
      dnsLabel,
    );
    const role = r.oneOf(r.required(node, 'role', path, 'a role'), fieldPath(path, 'role'), nodeRoles);
    const ipText = r.string(r.required(node, 'ip', path, 'an IPv4 address'), fieldPath(path, 'ip'), 'an IPv4 address');
    const ip = ipText === undefined ? undefined : parseIPv4(ipText);
    if (ipText !== undefined && ip === undefined) r.problem(fieldPath(path, 'ip'), 'an IPv4 address', JSON.stringify(ipText));
    if (ip !== undefined && nodeCidr && !isHostAddress(nodeCidr, ip)) {
      r.problem(fieldPath(path, 'ip'), `a host address inside network.nodeCidr (${nodeCidr.text})`, JSON.stringify(ipText));
    }
    const isControlPlane = role === 'control-plane';
    // kubeadm's preflight refuses a control plane with fewer than 2 CPUs or 1700 MB.
    const cpus = r.integer(node.cpus ?? 2, fieldPath(path, 'cpus'), isControlPlane ? 2 : 1, 256);
    const memoryMiB = parseMemory(r, node.memory ?? '4GiB', fieldPath(path, 'memory'), isControlPlane ? 2048 : 1024);
    if (name !== undefined) {
      const first = seenNames.get(name);
      if (first !== undefined) r.problem(fieldPath(path, 'name'), `a name not used by nodes[${first}]`, JSON.stringify(name));
      else seenNames.set(name, index);
    }
    if (ipText !== undefined && ip !== undefined) {
      const first = seenIps.get(ipText);
      if (first !== undefined) r.problem(fieldPath(path, 'ip'), `an address not used by nodes[${first}]`, JSON.stringify(ipText));
      else seenIps.set(ipText, index);
    }
    if (name && role && ipText && cpus !== undefined && memoryMiB !== undefined) {
      nodes.push({ name, role, ip: ipText, cpus, memoryMiB });
    }
  });
  const controlPlanes = list.filter((n) => (n as { role?: unknown } | null)?.role === 'control-plane').length;
  if (!supportedControlPlanes.includes(controlPlanes)) {
    r.problem('nodes', controlPlaneCountExpected(controlPlanes), controlPlanes === 0 ? 'none' : `${controlPlanes} nodes with role "control-plane"`);
  }
  return nodes;
}

/** 1 (no HA) or 3 (etcd keeps quorum with one of them down). */
export const supportedControlPlanes = [1, 3];

/** What the count of control planes must be, and why the count found is refused. */
function controlPlaneCountExpected(found: number): string {
  const base = '1 or 3 nodes with role "control-plane"';
  if (found === 2) return `${base}: with 2, etcd needs both for a quorum, so it survives no failure and fails twice as often as with 1`;
  if (found === 4) return `${base}: 4 survive one failure, as 3 do (a quorum of 4 is 3), with one more machine to lose`;
  if (found > 4) return `${base} (corekube's HA is three control planes behind one virtual IP; more etcd members only slow every write)`;
  return base;
}

/**
 * controlPlane.endpoint: the virtual IP kube-vip holds on one control plane at a time.
 * Required with three control planes, refused with one (that node's address is the endpoint).
 * It must be a free host address of the cluster network: a node's address would be taken
 * over by the VIP; one inside the pod or service range would be routed into the cluster.
 */
function parseControlPlane(r: Reader, value: unknown, nodes: NodeConfig[], ranges: [string, Cidr | undefined][]): ClusterConfig['controlPlane'] | undefined {
  const controlPlanes = nodes.filter((n) => n.role === 'control-plane');
  const cpIn = value === undefined ? {} : r.object(value, 'controlPlane', keysOf(configKeys.controlPlane));
  if (!cpIn) return undefined;
  const ha = controlPlanes.length > 1;
  if (cpIn.endpoint === undefined) {
    if (ha) {
      r.problem('controlPlane.endpoint', `a free address in network.nodeCidr for the virtual IP of the ${controlPlanes.length} control planes (like "10.77.0.5")`, 'nothing');
      return undefined;
    }
    return controlPlanes[0] ? { endpoint: controlPlanes[0].ip, virtualIp: false } : undefined;
  }
  const text = r.string(cpIn.endpoint, 'controlPlane.endpoint', 'an IPv4 address');
  if (text === undefined) return undefined;
  const ip = parseIPv4(text);
  const nodeCidr = ranges.find(([key]) => key === 'nodeCidr')?.[1];
  const found = JSON.stringify(text);
  if (ip === undefined) return r.problem('controlPlane.endpoint', 'an IPv4 address (the virtual IP of the control planes)', found);
  if (!ha) {
    return r.problem('controlPlane.endpoint', 'nothing with one control plane (its own address is the endpoint); set it with three', found);
  }
  if (nodeCidr && !isHostAddress(nodeCidr, ip)) {
    return r.problem('controlPlane.endpoint', `a host address inside network.nodeCidr (${nodeCidr.text}): kube-vip answers ARP for it on the cluster network`, found);
  }
  // Already outside them when network.* is valid (the ranges may not overlap); said here in case they do.
  const clash = ranges.find(([key, cidr]) => key !== 'nodeCidr' && cidr && cidrContains(cidr, ip));
  if (clash) return r.problem('controlPlane.endpoint', `an address outside network.${clash[0]} (${clash[1]!.text})`, found);
  const owner = nodes.find((n) => n.ip === text);
  if (owner) return r.problem('controlPlane.endpoint', `an address no node uses (it is ${owner.name}'s)`, found);
  return { endpoint: text, virtualIp: true };
}

const openstackName = /^[\x21-\x7e][\x20-\x7e]{0,254}$/;
const secretKeys = /^(password|auth|token|secret|application_credential.*|credentials?)$/i;

function parseOpenstack(r: Reader, value: unknown, nodeCidr: Cidr | undefined): OpenstackConfig | undefined {
  if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
    for (const key of Object.keys(value)) {
      if (secretKeys.test(key)) {
        r.problem(
          fieldPath('openstack', key),
          'no credentials in cluster.yaml: name a clouds.yaml entry in openstack.cloud (its password in secure.yaml, or an application credential)',
          `a "${key}" key`,
        );
        delete (value as Record<string, unknown>)[key];
      }
    }
  }
  const os = r.object(value, 'openstack', keysOf(configKeys.openstack));
  if (!os) return undefined;
  const name = (key: string, what: string): string | undefined =>
    os[key] === undefined ? undefined : r.string(os[key], fieldPath('openstack', key), what, openstackName);
  const cloud = name('cloud', 'a clouds.yaml entry name (or leave it out for OS_CLOUD)');
  const network = name('network', 'the name or ID of an existing network (or leave it out: corekube creates one for network.nodeCidr)');
  const availabilityZone = name('availabilityZone', 'an availability zone name');
  const volumeType = name('volumeType', 'a Cinder volume type name');

  const flavorsIn = r.object(r.required(os, 'flavors', 'openstack', 'a mapping with controlPlane and worker flavor names'), 'openstack.flavors', keysOf(configKeys.openstack.flavors));
  const flavor = (key: string): string | undefined =>
    flavorsIn ? r.string(r.required(flavorsIn, key, 'openstack.flavors', 'a flavor name'), fieldPath('openstack.flavors', key), 'a flavor name', openstackName) : undefined;
  const controlPlane = flavor('controlPlane');
  const worker = flavor('worker');

  const adminText = r.required(os, 'adminCidr', 'openstack', 'the IPv4 CIDR SSH and the API server are reachable from, like "192.0.2.0/24"');
  const adminCidr = typeof adminText === 'string' ? parseCidr(adminText) : undefined;
  if (adminText !== undefined && !adminCidr) {
    r.problem('openstack.adminCidr', 'an IPv4 CIDR with no host bits set, like "192.0.2.0/24" (SSH and the API server open from there only)', JSON.stringify(adminText));
  }
  if (adminCidr && adminCidr.prefix === 0) {
    r.problem('openstack.adminCidr', 'a range smaller than the whole Internet (0.0.0.0/0 opens SSH and the API server to everyone)', adminCidr.text);
  }

  let floatingIp: OpenstackConfig['floatingIp'];
  if (os.floatingIp !== undefined) {
    const fip = r.object(os.floatingIp, 'openstack.floatingIp', keysOf(configKeys.openstack.floatingIp));
    if (fip) {
      const fipNetwork = r.string(r.required(fip, 'network', 'openstack.floatingIp', 'the external network to take it from'), 'openstack.floatingIp.network', 'an external network name', openstackName);
      let address: string | undefined;
      if (fip.address !== undefined) {
        address = r.string(fip.address, 'openstack.floatingIp.address', 'an IPv4 address (a floating IP already allocated to the project)');
        if (address !== undefined && parseIPv4(address) === undefined) address = r.problem('openstack.floatingIp.address', 'an IPv4 address', JSON.stringify(address));
        if (address !== undefined && nodeCidr && isHostAddress(nodeCidr, parseIPv4(address)!)) {
          address = r.problem('openstack.floatingIp.address', `an address outside network.nodeCidr (${nodeCidr.text})`, JSON.stringify(address));
        }
      }
      if (fipNetwork) floatingIp = { network: fipNetwork, ...(address ? { address } : {}) };
    }
  }
  if (!controlPlane || !worker || !adminCidr) return undefined;
  return {
    ...(cloud ? { cloud } : {}),
    ...(network ? { network } : {}),
    flavors: { 'control-plane': controlPlane, worker },
    ...(availabilityZone ? { availabilityZone } : {}),
    adminCidr,
    ...(floatingIp ? { floatingIp } : {}),
    ...(volumeType ? { volumeType } : {}),
  };
}

function parseMemory(r: Reader, value: unknown, path: string, minMiB: number): number | undefined {
  const expected = `a size of at least ${minMiB} MiB, like "4GiB" or "2048MiB" (or a number of MiB)`;
  let mib: number | undefined;
  if (typeof value === 'number' && Number.isInteger(value)) mib = value;
  if (typeof value === 'string') {
    const match = /^(\d+)\s*(MiB|GiB)$/.exec(value.trim());
    if (match) mib = Number(match[1]) * (match[2] === 'GiB' ? 1024 : 1);
  }
  if (mib === undefined || mib < minMiB || mib > 1024 * 1024) return r.problem(path, expected, JSON.stringify(value));
  return mib;
}

function resolveUserPath(path: string, base: string): string {
  if (path === '~' || path.startsWith('~/')) return resolve(homedir(), path.slice(2));
  return isAbsolute(path) ? path : resolve(base, path);
}

const publicKeyLine = /^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com) [A-Za-z0-9+/=]+( .*)?$/;

function readPublicKey(r: Reader, file: string): string {
  let text: string;
  try {
    if (!statSync(file).isFile()) return r.problem('sshPublicKeyFile', 'a readable SSH public key file', `${file} (not a file)`) ?? '';
    text = readFileSync(file, 'utf8');
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code ?? String(error);
    r.problem('sshPublicKeyFile', 'a readable SSH public key file (make one with ssh-keygen -t ed25519)', `${file} (${code})`);
    return '';
  }
  if (text.includes('PRIVATE KEY')) {
    r.problem('sshPublicKeyFile', 'a PUBLIC key (the .pub file); a private key never leaves this machine', `a private key in ${file}`);
    return '';
  }
  const lines = text.split('\n').map((line) => line.trim()).filter((line) => line && !line.startsWith('#'));
  if (lines.length === 0 || !lines.every((line) => publicKeyLine.test(line))) {
    r.problem('sshPublicKeyFile', 'OpenSSH public key lines ("ssh-ed25519 AAAA... comment")', `something else in ${file}`);
    return '';
  }
  return `${lines.join('\n')}\n`;
}

function parseMirrors(r: Reader, value: unknown): ClusterConfig['mirrors'] {
  const downloads: Record<DownloadFamily, string> = { ...upstreamBases };
  const registries: Record<string, RegistryMirror> = {};
  if (value === undefined || value === null) return { downloads, registries };
  const mirrors = r.object(value, 'mirrors', keysOf(configKeys.mirrors));
  if (!mirrors) return { downloads, registries };
  for (const family of Object.keys(upstreamBases) as DownloadFamily[]) {
    if (mirrors[family] === undefined) continue;
    const path = fieldPath('mirrors', family);
    const url = r.string(mirrors[family], path, 'an http(s) base URL, like "https://mirror.example/k8s"');
    if (url === undefined) continue;
    if (!/^https?:\/\/[^/\s]+(\/\S*)?$/.test(url)) {
      r.problem(path, 'an http(s) base URL, like "https://mirror.example/k8s"', JSON.stringify(url));
      continue;
    }
    downloads[family] = url.replace(/\/+$/, '');
  }
  if (mirrors.registries !== undefined) {
    const map = r.map(mirrors.registries, 'mirrors.registries');
    for (const [host, entry] of Object.entries(map ?? {})) {
      const path = fieldPath('mirrors.registries', host);
      if (!registryHost.test(host)) r.problem(path, 'a registry host name like "registry.k8s.io"', `key "${host}"`);
      const fields = r.object(entry, path, keysOf(configKeys.mirrors.registries.HOST));
      if (!fields) continue;
      const location = r.string(
        r.required(fields, 'location', path, 'host[:port][/path]'),
        fieldPath(path, 'location'),
        'host[:port][/path] of the mirror registry, like "127.0.0.1:5000"',
        registryLocation,
      );
      const insecure = fields.insecure === undefined ? false : r.boolean(fields.insecure, fieldPath(path, 'insecure'));
      if (location !== undefined && insecure !== undefined) registries[host] = { location, insecure };
    }
  }
  return { downloads, registries };
}

/** Rewrites an upstream URL from the lock to the configured mirror (the checksum still guards the bytes). */
export function mirrorUrl(url: string, downloads: Record<DownloadFamily, string>): string {
  for (const family of Object.keys(upstreamBases) as DownloadFamily[]) {
    const base = upstreamBases[family];
    if (url === base || url.startsWith(`${base}/`)) return downloads[family] + url.slice(base.length);
  }
  return url;
}
