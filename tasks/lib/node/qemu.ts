// How a node becomes a QEMU process: pure functions from the config to argv, ports and
// paths, so that the boot, down and ssh commands and the tests agree on every detail.
import { createHash } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { ClusterConfig, NodeConfig } from '../inputs/config.ts';
import { macAddress } from './node-config.ts';

export const runDir = 'run';
export const logsDir = 'logs';
/** When the last `make boot` started the nodes: `make verify` reports the time to green from it. */
export const bootTimeFile = join(runDir, 'boot-started');
/** The port the API server listens on inside the control plane. */
export const apiServerGuestPort = 6443;

export type Accelerator = 'kvm' | 'tcg';

/**
 * A kernel and initramfs booted instead of the FCOS image: only the tests use it (a
 * stand-in appliance that checks what FCOS would see). Everything else is unchanged.
 */
export interface StandIn {
  kernel: string;
  initrd: string;
  /** Extra kernel arguments after the ones the boot code adds for the stand-in. */
  append?: string;
  /**
   * A qcow2 OS disk (the stand-in node's root file system) on the drive where the FCOS
   * image goes, under the same -snapshot; the kernel and initramfs boot it.
   */
  disk?: string;
}

export interface NodePaths {
  image: string;
  ignition: string;
  disk: string;
  log: string;
  pid: string;
  qmp: string;
  switchSocket: string;
}

/** Where a node's SSH is published on 127.0.0.1: sshBase, then one port per node in order. */
export function sshPort(config: ClusterConfig, node: NodeConfig): number {
  return config.hostPorts.sshBase + config.nodes.findIndex((n) => n.name === node.name);
}

/**
 * Where a control plane's API server is published on 127.0.0.1. One control plane: on
 * hostPorts.apiServer itself. Three: each on a port of its own above it (apiServer + 1,
 * + 2, + 3 in cluster.yaml's order), and hostPorts.apiServer is the forwarder that hands
 * each connection to a live one (api-forward.ts).
 */
export function apiServerHostPort(config: ClusterConfig, node: NodeConfig): number {
  if (!config.controlPlane?.virtualIp) return config.hostPorts.apiServer;
  return config.hostPorts.apiServer + 1 + config.nodes.filter((n) => n.role === 'control-plane').findIndex((n) => n.name === node.name);
}

/** The forwarder's pid file and log (three control planes only). */
export const apiForwardPidFile = join(runDir, 'api-forward.pid');
export const apiForwardLog = join(logsDir, 'api-forward.log');

/** Every port on 127.0.0.1 the cluster publishes, with what it is for (to report a clash). */
export function publishedPorts(config: ClusterConfig): { port: number; what: string; field: string }[] {
  const controlPlanes = config.nodes.filter((n) => n.role === 'control-plane');
  const api = config.controlPlane?.virtualIp
    ? [
        { port: config.hostPorts.apiServer, what: `the API server, forwarded to a live control plane of ${controlPlanes.map((n) => n.name).join(', ')}`, field: 'hostPorts.apiServer' },
        ...controlPlanes.map((node) => ({ port: apiServerHostPort(config, node), what: `the API server on ${node.name}`, field: 'hostPorts.apiServer (+1 per control plane)' })),
      ]
    : [{ port: config.hostPorts.apiServer, what: `the API server on ${controlPlanes[0]!.name}`, field: 'hostPorts.apiServer' }];
  return [...api, ...config.nodes.map((node) => ({ port: sshPort(config, node), what: `SSH to ${node.name}`, field: 'hostPorts.sshBase' }))];
}

/**
 * Unix sockets (the switch, QMP) must fit in sun_path (108 bytes): they live in a short
 * per-tree directory under the runtime dir, named after the hash of out/.
 */
export function socketDir(outDir: string, base = process.env.XDG_RUNTIME_DIR || tmpdir()): string {
  const hash = createHash('sha256').update(resolve(outDir)).digest('hex').slice(0, 12);
  return join(base, `corekube-${hash}`);
}

export function nodePaths(outDir: string, node: NodeConfig, files: { image: string; ignition: string; disk: string }): NodePaths {
  const sockets = socketDir(outDir);
  return {
    ...files,
    log: join(outDir, logsDir, `${node.name}.log`),
    pid: join(outDir, runDir, `${node.name}.pid`),
    qmp: join(sockets, `${node.name}.qmp`),
    switchSocket: join(sockets, 'switch'),
  };
}

/** QEMU's option syntax: a comma inside a value is written twice. */
export function qemuValue(path: string): string {
  return path.replaceAll(',', ',,');
}

export function standInAppend(config: ClusterConfig, node: NodeConfig, extra = ''): string {
  const peers = config.nodes.filter((n) => n.name !== node.name).map((n) => n.ip);
  return [
    'console=ttyS0',
    'panic=-1',
    `corekube.node=${node.name}`,
    `corekube.ip=${node.ip}/${config.network.nodeCidr.prefix}`,
    `corekube.peers=${peers.join(',')}`,
    `corekube.clustermac=${macAddress(config.name, node.name, 'cluster')}`,
    `corekube.usermac=${macAddress(config.name, node.name, 'user')}`,
    extra,
  ].filter(Boolean).join(' ');
}

/**
 * The whole command line of one node. The FCOS image runs with -snapshot (every boot is
 * a first boot, so Ignition runs every time), Ignition arrives on fw_cfg, the image disk
 * is a read-only virtio drive; the cluster NIC is on the userspace switch, the host NIC
 * is user-mode networking with restrict=on (nothing leaves the machine) and publishes
 * SSH and the API server on 127.0.0.1 only.
 */
export function qemuArgs(options: { config: ClusterConfig; node: NodeConfig; paths: NodePaths; accel: Accelerator; standIn?: StandIn }): string[] {
  const { config, node, paths, accel, standIn } = options;
  const forwards = [`hostfwd=tcp:127.0.0.1:${sshPort(config, node)}-:22`];
  if (node.role === 'control-plane') forwards.push(`hostfwd=tcp:127.0.0.1:${apiServerHostPort(config, node)}-:${apiServerGuestPort}`);
  const osDrive = (image: string) => ['-drive', `if=virtio,file=${qemuValue(image)},format=qcow2`];
  const boot = standIn
    ? [...(standIn.disk ? osDrive(standIn.disk) : []), '-kernel', standIn.kernel, '-initrd', standIn.initrd, '-append', standInAppend(config, node, standIn.append)]
    : osDrive(paths.image);
  return [
    '-name', `corekube-${config.name}-${node.name},process=corekube-${node.name}`,
    '-machine', `q35,accel=${accel}`,
    '-cpu', accel === 'kvm' ? 'host' : 'max',
    '-smp', String(node.cpus),
    '-m', String(node.memoryMiB),
    '-snapshot',
    ...boot,
    '-fw_cfg', `name=opt/com.coreos/config,file=${qemuValue(paths.ignition)}`,
    '-drive', `if=virtio,file=${qemuValue(paths.disk)},format=raw,readonly=on`,
    '-netdev', `vde,id=cluster,sock=${qemuValue(paths.switchSocket)}`,
    '-device', `virtio-net-pci,netdev=cluster,mac=${macAddress(config.name, node.name, 'cluster')}`,
    '-netdev', `user,id=host,restrict=on,${forwards.join(',')}`,
    '-device', `virtio-net-pci,netdev=host,mac=${macAddress(config.name, node.name, 'user')}`,
    '-serial', `file:${qemuValue(paths.log)}`,
    '-display', 'none',
    '-monitor', 'none',
    '-qmp', `unix:${qemuValue(paths.qmp)},server=on,wait=off`,
    '-no-reboot',
    '-daemonize',
    '-pidfile', paths.pid,
  ];
}

/** `make ssh NODE=…`: the forwarded port; host keys change at every boot, so none is recorded. */
export function sshArgs(config: ClusterConfig, node: NodeConfig, command: string[] = []): string[] {
  return [
    '-p', String(sshPort(config, node)),
    '-o', 'StrictHostKeyChecking=no',
    '-o', 'UserKnownHostsFile=/dev/null',
    '-o', 'LogLevel=ERROR',
    'core@127.0.0.1',
    ...command,
  ];
}
