// The openstack target: the same offline cluster as servers on an OpenStack cloud, driven
// by the official client (`openstack`, python-openstackclient). Split like changesets'
// plan and apply: `observe` asks the cloud what exists (read-only list calls, found by the
// cluster's tag or by corekube's deterministic names), `planUp` / `planDown` are pure (the
// desired resources from config + lock + out/, and what exists → the list of client calls
// still needed), and `apply` runs them one by one. A rerun after a failure observes again
// and plans only what is missing: nothing is created twice. DRY_RUN prints the plan.
//
// Resources (NAME = the cluster's name; every one tagged NAME, volumes carry the property
// corekube-cluster=NAME since Cinder has no tags):
//   images    corekube-fcos-<sha256[:16]> (the FCOS openstack qcow2), corekube-disk-<sha256[:16]>
//             (the image disk, raw): named by their content, uploaded once, reused by reruns
//   network   NAME-net + NAME-subnet (network.nodeCidr, no DHCP: the nodes' keyfiles are
//             static) unless openstack.network names an existing one; NAME-router to
//             openstack.floatingIp.network when a floating IP is wanted on a created network
//   secgroup  NAME-nodes: SSH and the API server from openstack.adminCidr, everything
//             from members of the group (the cluster network), egress as the cloud's default
//   ports     NAME-NODE: the node's fixed IP and corekube's MAC (the keyfiles match it)
//   volumes   NAME-NODE-disk: from the image disk image, read-only where the cloud allows
//   servers   NAME-NODE: the FCOS image, the node's Ignition as user data on a config
//             drive, the port, the volume attached; property corekube-ignition=<sha256[:16]>
//   floating  openstack.floatingIp.address (attached to the control plane's port), or one
//             allocated from openstack.floatingIp.network, tagged
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, readFileSync, statSync } from 'node:fs';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import pLimit from 'p-limit';
import type { ClusterConfig, NodeConfig, OpenstackConfig } from './lib/inputs/config.ts';
import { diskOutput } from './disk.ts';
import { ExitCode, UserError } from './lib/errors.ts';
import { artifactOutput } from './fetch.ts';
import { ignitionDir } from './ignition.ts';
import type { Lock } from './lib/inputs/lock.ts';
import { clusterGateway, controlPlane, macAddress } from './lib/node/node-config.ts';
import type { RunContext, Stage } from './lib/run/stage.ts';

/** Nova refuses user data longer than this many bytes once base64-encoded. */
export const userDataLimit = 65535;
export const apiServerPort = 6443;

// ---- what the cluster needs ----------------------------------------------------------------

export interface DesiredNode {
  node: NodeConfig;
  server: string;
  port: string;
  volume: string;
  mac: string;
  flavor: string;
  userData: string; // path of out/ignition/NODE.ign
  userDataSha: string; // sha256[:16] of it, or a placeholder before it is built
}

export interface DesiredImage {
  name: string;
  file: string;
  sha256: string;
  diskFormat: 'qcow2' | 'raw';
  sizeBytes: number;
}

export interface Desired {
  cluster: string;
  os: OpenstackConfig;
  createNetwork: boolean;
  network: string;
  subnet: string;
  router?: string;
  nodeCidr: string;
  gateway: string;
  securityGroup: string;
  fcosImage: DesiredImage;
  diskImage: DesiredImage;
  volumeGiB: number;
  nodes: DesiredNode[];
  controlPlane: string;
}

const short = (sha256: string) => sha256.slice(0, 16);

export function fileSha256(file: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    createReadStream(file)
      .on('data', (chunk) => hash.update(chunk))
      .on('error', reject)
      .on('end', () => resolve(hash.digest('hex')));
  });
}

/**
 * The resources the cluster needs, from config + lock + out/. With `dryRun`, files that
 * are not built yet get placeholders (the plan is printed, never run).
 */
export async function desiredResources(config: ClusterConfig, lock: Lock, outDir: string, options: { dryRun?: boolean } = {}): Promise<Desired> {
  const os = config.openstack;
  if (!os) throw new UserError(`${config.file}: target openstack needs an openstack: section`, ExitCode.config);
  const fcos = lock.artifacts['fcos-openstack'];
  if (!fcos) throw new UserError(`${lock.file}: no fcos-openstack artifact: make pin TARGET=openstack`, ExitCode.config);
  const fcosSha = fcos.uncompressedSha256 ?? fcos.sha256;
  const fcosFile = join(outDir, artifactOutput(fcos));
  if (!existsSync(fcosFile) && !options.dryRun) throw new UserError(`${fcosFile}: no FCOS openstack image yet (make fetch TARGET=openstack)`);
  const diskFile = join(outDir, diskOutput);
  const built = existsSync(diskFile);
  if (!built && !options.dryRun) throw new UserError(`${diskFile}: no image disk yet (make disk)`);
  const diskSha = built ? await fileSha256(diskFile) : '<sha256 of out/image-disk.img>';
  const diskSize = built ? statSync(diskFile).size : 0;
  const name = config.name;
  const nodes = await Promise.all(
    config.nodes.map(async (node): Promise<DesiredNode> => {
      const userData = join(outDir, ignitionDir, `${node.name}.ign`);
      const has = existsSync(userData);
      if (!has && !options.dryRun) throw new UserError(`${userData}: no Ignition config yet (make ignition)`);
      return {
        node,
        server: `${name}-${node.name}`,
        port: `${name}-${node.name}`,
        volume: `${name}-${node.name}-disk`,
        mac: macAddress(name, node.name, 'cluster'),
        flavor: os.flavors[node.role],
        userData,
        userDataSha: has ? short(await fileSha256(userData)) : 'not-built-yet',
      };
    }),
  );
  const createNetwork = os.network === undefined;
  return {
    cluster: name,
    os,
    createNetwork,
    network: os.network ?? `${name}-net`,
    subnet: `${name}-subnet`,
    ...(createNetwork && os.floatingIp ? { router: `${name}-router` } : {}),
    nodeCidr: config.network.nodeCidr.text,
    gateway: clusterGateway(config),
    securityGroup: `${name}-nodes`,
    fcosImage: {
      name: `corekube-fcos-${short(fcosSha)}`,
      file: fcosFile,
      sha256: fcosSha,
      diskFormat: 'qcow2',
      sizeBytes: existsSync(fcosFile) ? statSync(fcosFile).size : 0,
    },
    diskImage: { name: built ? `corekube-disk-${short(diskSha)}` : 'corekube-disk-<sha256[:16], once built>', file: diskFile, sha256: diskSha, diskFormat: 'raw', sizeBytes: diskSize },
    volumeGiB: Math.max(1, Math.ceil(diskSize / 2 ** 30)),
    nodes,
    controlPlane: `${name}-${controlPlane(config).name}`,
  };
}

/**
 * Nova's limit, checked before any call: every node's Ignition must fit in 64 KiB of
 * base64 user data. Big payloads belong on the image disk, not in Ignition.
 */
export function checkUserData(desired: Desired): void {
  const over: string[] = [];
  for (const n of desired.nodes) {
    if (!existsSync(n.userData)) continue;
    const size = statSync(n.userData).size;
    const encoded = 4 * Math.ceil(size / 3);
    if (encoded > userDataLimit) over.push(`  ${n.node.name}: ${n.userData} is ${size} bytes, ${encoded} in base64`);
  }
  if (over.length > 0) {
    throw new UserError(
      `openstack: Nova accepts at most ${userDataLimit} bytes of user data after base64 (${Math.floor((userDataLimit * 3) / 4)} bytes of Ignition); too large:\n${over.join('\n')}\n` +
        'Nothing was sent to the cloud. Move large files from fcc/ onto the image disk (fcc/scripts/, manifests/) and keep Ignition small.',
      ExitCode.config,
    );
  }
}

// ---- what exists ------------------------------------------------------------------------

export interface Observed {
  images: { id: string; name: string; status: string; tags: string[] }[];
  networks: { id: string; name: string }[];
  subnets: { id: string; name: string }[];
  routers: { id: string; name: string; gateway: boolean; interfaces: boolean }[];
  securityGroups: { id: string; name: string }[];
  rules: { protocol: string; ports: string; remoteIp: string; remoteGroup: string; direction: string }[];
  ports: { id: string; name: string }[];
  floatingIps: { id: string; address: string; port: string }[];
  volumes: { id: string; name: string; status: string; properties: Record<string, string>; attachedTo: string[] }[];
  servers: { id: string; name: string; status: string; properties: Record<string, string> }[];
}

export function emptyObserved(): Observed {
  return { images: [], networks: [], subnets: [], routers: [], securityGroups: [], rules: [], ports: [], floatingIps: [], volumes: [], servers: [] };
}

/** One client invocation: `openstack ARGS` (with `-f json` when it prints something). */
export interface Call {
  args: string[];
  /** It prints a resource or list: run with -f json. */
  json: boolean;
  /** Read-only (list/show) calls are not part of the printed plan's changes. */
  readOnly?: boolean;
  /** After the call, poll `volume show` until the volume has this status. */
  waitVolume?: { name: string; status: string[] };
  /** What it is for, in words (for DRY_RUN and errors). */
  why: string;
  /** The resource it creates or changes, for a quota-shaped failure. */
  resource: string;
  /** The call may fail where the cloud's policy forbids it: warn and continue. */
  optional?: boolean;
}

export interface Client {
  /** Runs one call; returns its parsed JSON output (or undefined). */
  run(call: Call): Promise<unknown>;
}

/** The read-only calls that find what exists (by tag, or by corekube's names). */
export function discoveryCalls(d: Desired): Call[] {
  const tag = d.cluster;
  const list = (args: string[], why: string): Call => ({ args, json: true, readOnly: true, why, resource: args[0]! });
  return [
    list(['image', 'list', '--name', d.fcosImage.name, '--long'], 'the FCOS image, if an earlier run uploaded it'),
    list(['image', 'list', '--name', d.diskImage.name, '--long'], 'the image disk image, if an earlier run uploaded it'),
    list(['image', 'list', '--tag', tag, '--long'], `images tagged ${tag}`),
    list(['network', 'list', '--tags', tag], `networks tagged ${tag}`),
    list(['subnet', 'list', '--tags', tag], `subnets tagged ${tag}`),
    list(['router', 'list', '--tags', tag, '--long'], `routers tagged ${tag}`),
    list(['security', 'group', 'list', '--tags', tag], `security groups tagged ${tag}`),
    list(['port', 'list', '--tags', tag], `ports tagged ${tag}`),
    list(['floating', 'ip', 'list', '--tags', tag], `floating IPs tagged ${tag}`),
    list(['volume', 'list', '--long'], `volumes with the property corekube-cluster=${tag}`),
    list(['--os-compute-api-version', '2.26', 'server', 'list', '--tags', tag, '--long'], `servers tagged ${tag}`),
  ];
}

type Row = Record<string, unknown>;
const rows = (value: unknown): Row[] => (Array.isArray(value) ? (value as Row[]) : []);
const text = (value: unknown): string => (value === undefined || value === null ? '' : String(value));
const strings = (value: unknown): string[] =>
  Array.isArray(value) ? value.map(text) : typeof value === 'string' && value ? value.split(/,\s*/) : [];
/** The client prints properties as a JSON object (or, in some versions, as `k='v', …`). */
function properties(value: unknown): Record<string, string> {
  if (value && typeof value === 'object' && !Array.isArray(value)) {
    return Object.fromEntries(Object.entries(value as Row).map(([k, v]) => [k, text(v)]));
  }
  const out: Record<string, string> = {};
  for (const match of text(value).matchAll(/([\w.-]+)='([^']*)'/g)) out[match[1]!] = match[2]!;
  return out;
}

/** Reads the discovery results (in discoveryCalls' order) into an Observed. */
export function parseObserved(d: Desired, results: unknown[]): Observed {
  const [fcos, disk, tagged, networks, subnets, routers, groups, ports, fips, volumes, servers] = results.map(rows);
  const images = new Map<string, Observed['images'][number]>();
  for (const r of [...fcos!, ...disk!, ...tagged!]) {
    images.set(text(r.ID), { id: text(r.ID), name: text(r.Name), status: text(r.Status).toLowerCase(), tags: strings(r.Tags) });
  }
  return {
    images: [...images.values()],
    networks: networks!.map((r) => ({ id: text(r.ID), name: text(r.Name) })),
    subnets: subnets!.map((r) => ({ id: text(r.ID), name: text(r.Name) })),
    routers: routers!.map((r) => ({
      id: text(r.ID),
      name: text(r.Name),
      gateway: Boolean(r['External gateway info'] && Object.keys(r['External gateway info'] as object).length > 0),
      interfaces: false,
    })),
    securityGroups: groups!.map((r) => ({ id: text(r.ID), name: text(r.Name) })),
    rules: [],
    ports: ports!.map((r) => ({ id: text(r.ID), name: text(r.Name) })),
    floatingIps: fips!.map((r) => ({ id: text(r.ID), address: text(r['Floating IP Address']), port: text(r.Port) })),
    volumes: volumes!
      .map((r) => ({
        id: text(r.ID),
        name: text(r.Name),
        status: text(r.Status).toLowerCase(),
        properties: properties(r.Properties),
        attachedTo: rows(r['Attached to']).map((a) => text(a.server_id)),
      }))
      .filter((v) => v.properties['corekube-cluster'] === d.cluster),
    servers: servers!.map((r) => ({ id: text(r.ID), name: text(r.Name), status: text(r.Status).toLowerCase(), properties: properties(r.Properties) })),
  };
}

/** The rules of the cluster's security group (a second read, once the group exists). */
export function ruleCall(d: Desired): Call {
  return { args: ['security', 'group', 'rule', 'list', '--long', d.securityGroup], json: true, readOnly: true, why: `the rules of ${d.securityGroup}`, resource: d.securityGroup };
}

export function parseRules(value: unknown): Observed['rules'] {
  return rows(value).map((r) => ({
    protocol: text(r['IP Protocol']).toLowerCase() || 'any',
    ports: text(r['Port Range']),
    remoteIp: text(r['IP Range']),
    remoteGroup: text(r['Remote Security Group']),
    direction: text(r.Direction).toLowerCase(),
  }));
}

// ---- the plans (pure) ---------------------------------------------------------------------

/** The rules NAME-nodes must have: SSH and the API server from adminCidr; anything from the group. */
export function wantedRules(d: Desired, groupId: string | undefined): { args: string[]; matches: (r: Observed['rules'][number]) => boolean; why: string }[] {
  const admin = d.os.adminCidr.text;
  const port = (n: number) => ({
    args: ['--ingress', '--ethertype', 'IPv4', '--protocol', 'tcp', '--dst-port', String(n), '--remote-ip', admin],
    matches: (r: Observed['rules'][number]) => r.direction === 'ingress' && r.protocol === 'tcp' && r.remoteIp === admin && (r.ports === `${n}:${n}` || r.ports === String(n)),
    why: `${n === 22 ? 'SSH' : 'the API server'} (tcp ${n}) from ${admin} only`,
  });
  return [
    port(22),
    port(apiServerPort),
    {
      args: ['--ingress', '--ethertype', 'IPv4', '--protocol', 'any', '--remote-group', d.securityGroup],
      matches: (r) => r.direction === 'ingress' && (r.protocol === 'any' || r.protocol === '') && r.remoteGroup !== '' && (r.remoteGroup === groupId || r.remoteGroup === d.securityGroup),
      why: 'everything between the nodes (the cluster network)',
    },
  ];
}

export type UpMode = 'up' | 'boot';

/**
 * The calls that take the cloud from `observed` to the cluster: `up` creates what is
 * missing (and replaces a server whose Ignition or image disk changed); `boot` also
 * rebuilds every existing server from the FCOS image, so each boot is a first boot.
 */
export function planUp(d: Desired, o: Observed, mode: UpMode = 'up'): Call[] {
  const calls: Call[] = [];
  const tag = ['--tag', d.cluster];
  const has = <T extends { name: string }>(list: T[], name: string) => list.find((x) => x.name === name);

  // Images: by content; an upload cut short (not active) is deleted and uploaded again.
  for (const image of [d.fcosImage, d.diskImage]) {
    const found = o.images.filter((i) => i.name === image.name);
    const active = found.find((i) => i.status === 'active');
    for (const broken of found.filter((i) => i.status !== 'active')) {
      calls.push({ args: ['image', 'delete', broken.id], json: false, why: `${image.name}: an upload that did not finish (${broken.status})`, resource: `image ${image.name}` });
    }
    if (!active) {
      calls.push({
        args: ['image', 'create', '--disk-format', image.diskFormat, '--container-format', 'bare', '--file', image.file, '--property', `corekube.sha256=${image.sha256}`, ...tag, image.name],
        json: true,
        why: `upload ${image.file} (${image.diskFormat}) once, named by its sha256`,
        resource: `image ${image.name}`,
      });
    } else if (!active.tags.includes(d.cluster)) {
      calls.push({ args: ['image', 'set', ...tag, active.id], json: false, why: `${image.name} exists (another cluster uploaded it): tag it ${d.cluster} too`, resource: `image ${image.name}` });
    }
  }

  // The network.
  if (d.createNetwork) {
    if (!has(o.networks, d.network)) calls.push({ args: ['network', 'create', ...tag, d.network], json: true, why: 'the cluster network', resource: `network ${d.network}` });
    if (!has(o.subnets, d.subnet)) {
      calls.push({
        args: ['subnet', 'create', '--network', d.network, '--subnet-range', d.nodeCidr, '--gateway', d.gateway, '--no-dhcp', ...tag, d.subnet],
        json: true,
        why: `network.nodeCidr ${d.nodeCidr}, no DHCP (the nodes' addresses are static)`,
        resource: `subnet ${d.subnet}`,
      });
    }
    if (d.router && d.os.floatingIp) {
      const router = has(o.routers, d.router);
      if (!router) {
        calls.push({ args: ['router', 'create', ...tag, d.router], json: true, why: 'a router for the floating IP', resource: `router ${d.router}` });
      }
      if (!router?.interfaces) {
        calls.push({ args: ['router', 'add', 'subnet', d.router, d.subnet], json: false, why: `${d.subnet} behind it`, resource: `router ${d.router}` });
      }
      if (!router?.gateway) {
        calls.push({ args: ['router', 'set', '--external-gateway', d.os.floatingIp.network, d.router], json: false, why: `its gateway on ${d.os.floatingIp.network}`, resource: `router ${d.router}` });
      }
    }
  }

  // The security group and its rules.
  const group = has(o.securityGroups, d.securityGroup);
  if (!group) {
    calls.push({ args: ['security', 'group', 'create', '--description', `corekube cluster ${d.cluster}`, ...tag, d.securityGroup], json: true, why: 'the nodes\' security group', resource: `security group ${d.securityGroup}` });
  }
  for (const rule of wantedRules(d, group?.id)) {
    if (group && o.rules.some(rule.matches)) continue;
    calls.push({ args: ['security', 'group', 'rule', 'create', ...rule.args, d.securityGroup], json: true, why: rule.why, resource: `security group rule in ${d.securityGroup}` });
  }

  // Per node: the port, the volume, the server.
  for (const n of d.nodes) {
    if (!has(o.ports, n.port)) {
      calls.push({
        args: ['port', 'create', '--network', d.network, '--fixed-ip', `ip-address=${n.node.ip}`, '--mac-address', n.mac, '--security-group', d.securityGroup, ...tag, n.port],
        json: true,
        why: `${n.node.name}: ${n.node.ip} with the MAC its keyfile names`,
        resource: `port ${n.port}`,
      });
    }
    const server = has(o.servers, n.server);
    const volume = has(o.volumes, n.volume);
    const staleVolume = volume && (volume.properties['corekube-disk'] !== short(d.diskImage.sha256) || !['available', 'in-use'].includes(volume.status));
    const staleServer = server && (server.properties['corekube-ignition'] !== n.userDataSha || staleVolume || server.status === 'error');
    if (server && staleServer) {
      const why = staleVolume ? 'its image disk changed' : server.status === 'error' ? 'it is in ERROR' : 'its Ignition changed';
      calls.push({ args: ['server', 'delete', '--wait', server.id], json: false, why: `${n.node.name}: ${why}: a new server`, resource: `server ${n.server}` });
    }
    if (volume && staleVolume) {
      calls.push({ args: ['volume', 'delete', volume.id], json: false, why: `${n.node.name}: the volume holds another image disk (${volume.properties['corekube-disk'] ?? 'unknown'})`, resource: `volume ${n.volume}` });
    }
    if (!volume || staleVolume) {
      calls.push({
        args: [
          'volume', 'create', '--image', d.diskImage.name, '--size', String(d.volumeGiB),
          ...(d.os.volumeType ? ['--type', d.os.volumeType] : []),
          ...(d.os.availabilityZone ? ['--availability-zone', d.os.availabilityZone] : []),
          '--property', `corekube-cluster=${d.cluster}`, '--property', `corekube-disk=${short(d.diskImage.sha256)}`, n.volume,
        ],
        json: true,
        waitVolume: { name: n.volume, status: ['available'] },
        why: `${n.node.name}: the image disk (label corekube) as its own volume`,
        resource: `volume ${n.volume}`,
      });
      calls.push({ args: ['volume', 'set', '--read-only', n.volume], json: false, optional: true, why: `${n.node.name}: attach it read-only (where the cloud allows)`, resource: `volume ${n.volume}` });
    }
    const create = (): void => {
      calls.push({
        args: [
          '--os-compute-api-version', '2.52', 'server', 'create', '--image', d.fcosImage.name, '--flavor', n.flavor, '--port', n.port,
          '--user-data', n.userData, '--use-config-drive', '--property', `corekube-ignition=${n.userDataSha}`,
          ...(d.os.availabilityZone ? ['--availability-zone', d.os.availabilityZone] : []), ...tag, '--wait', n.server,
        ],
        json: true,
        why: `${n.node.name}: FCOS with its Ignition as user data on a config drive`,
        resource: `server ${n.server}`,
      });
      calls.push({ args: ['server', 'add', 'volume', n.server, n.volume], json: false, why: `${n.node.name}: the image disk`, resource: `volume ${n.volume}` });
    };
    if (!server || staleServer) create();
    else {
      if (mode === 'boot') {
        calls.push({ args: ['server', 'rebuild', '--image', d.fcosImage.name, '--wait', n.server], json: true, why: `${n.node.name}: from the FCOS image again (first boot)`, resource: `server ${n.server}` });
      }
      if (!volume?.attachedTo.includes(server.id)) {
        calls.push({ args: ['server', 'add', 'volume', n.server, n.volume], json: false, why: `${n.node.name}: the image disk`, resource: `volume ${n.volume}` });
      }
    }
  }

  // The floating IP for the API server.
  const fip = d.os.floatingIp;
  if (fip) {
    const cpPort = o.ports.find((p) => p.name === d.controlPlane);
    if (fip.address) {
      const current = o.floatingIps.find((f) => f.address === fip.address);
      if (!current || !cpPort || current.port !== cpPort.id) {
        calls.push({ args: ['floating', 'ip', 'set', '--port', d.controlPlane, fip.address], json: false, why: `the API server at ${fip.address}`, resource: `floating IP ${fip.address}` });
        if (!current) calls.push({ args: ['floating', 'ip', 'set', ...tag, fip.address], json: false, why: `tag it ${d.cluster} (down detaches it, never releases it)`, resource: `floating IP ${fip.address}` });
      }
    } else if (o.floatingIps.length === 0) {
      calls.push({ args: ['floating', 'ip', 'create', '--port', d.controlPlane, ...tag, fip.network], json: true, why: `the API server reachable from ${fip.network}`, resource: `floating IP on ${fip.network}` });
    }
  }
  return calls;
}

/** What `down` deletes: exactly what `up` made (found by tag and name); images only with purge. */
export function planDown(d: Desired, o: Observed, options: { purge?: boolean } = {}): Call[] {
  const calls: Call[] = [];
  const del = (args: string[], why: string, resource: string) => calls.push({ args, json: false, why, resource });
  for (const s of o.servers) del(['server', 'delete', '--wait', s.id], `server ${s.name}`, `server ${s.name}`);
  const kept = d.os.floatingIp?.address;
  for (const f of o.floatingIps) {
    if (f.address === kept) {
      del(['floating', 'ip', 'unset', '--port', '--tag', d.cluster, f.id], `floating IP ${f.address}: detached and kept (openstack.floatingIp.address)`, `floating IP ${f.address}`);
    } else del(['floating', 'ip', 'delete', f.id], `floating IP ${f.address}`, `floating IP ${f.address}`);
  }
  for (const p of o.ports) del(['port', 'delete', p.id], `port ${p.name}`, `port ${p.name}`);
  for (const v of o.volumes) del(['volume', 'delete', v.id], `volume ${v.name}`, `volume ${v.name}`);
  for (const r of o.routers) {
    if (r.gateway) del(['router', 'unset', '--external-gateway', r.id], `router ${r.name}: its gateway`, `router ${r.name}`);
    if (r.interfaces) for (const subnet of o.subnets) del(['router', 'remove', 'subnet', r.id, subnet.id], `router ${r.name}: ${subnet.name}`, `router ${r.name}`);
    del(['router', 'delete', r.id], `router ${r.name}`, `router ${r.name}`);
  }
  for (const s of o.subnets) del(['subnet', 'delete', s.id], `subnet ${s.name}`, `subnet ${s.name}`);
  for (const n of o.networks) del(['network', 'delete', n.id], `network ${n.name}`, `network ${n.name}`);
  for (const g of o.securityGroups) del(['security', 'group', 'delete', g.id], `security group ${g.name}`, `security group ${g.name}`);
  if (options.purge) {
    for (const i of o.images.filter((img) => img.tags.includes(d.cluster))) del(['image', 'delete', i.id], `image ${i.name} (PURGE=1)`, `image ${i.name}`);
  }
  return calls;
}

// ---- running the plan ----------------------------------------------------------------------

/** One line per call, as a shell would run it. */
export function formatCall(call: Call, cloud: string | undefined): string {
  const quote = (a: string) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, "'\\''")}'`);
  const args = [...(cloud ? ['--os-cloud', cloud] : []), ...call.args, ...(call.json ? ['-f', 'json'] : [])];
  return `openstack ${args.map(quote).join(' ')}`;
}

const quotaPattern = /quota|over ?limit|exceed|OverQuota|insufficient|No valid host/i;

export class OpenstackCallError extends UserError {
  readonly call: Call;
  constructor(call: Call, cloud: string | undefined, stderr: string, exitCode: number | null) {
    const lines = stderr.trim().split('\n').filter(Boolean);
    const quota = lines.find((l) => quotaPattern.test(l));
    super(
      quota
        ? `openstack: the cloud refused ${call.resource} (quota or capacity): ${quota.trim()}\n  ${formatCall(call, cloud)}\n` +
            'Raise the project\'s quota (openstack quota show) or free what uses it, then run again: what was created is kept and reused.'
        : `openstack: ${call.resource}: ${call.why}: failed (exit ${exitCode ?? 'signal'}):\n  ${formatCall(call, cloud)}\n${lines.slice(-8).map((l) => `    ${l}`).join('\n')}\n` +
            'Run again once fixed: what was created is found by its tag and reused.',
    );
    this.name = 'OpenstackCallError';
    this.call = call;
  }
}

/** The real client: `openstack [--os-cloud CLOUD] ARGS [-f json]`. */
export function cliClient(cloud: string | undefined, options: { signal?: AbortSignal; env?: Record<string, string>; binary?: string } = {}): Client {
  return {
    run(call) {
      const args = [...(cloud ? ['--os-cloud', cloud] : []), ...call.args, ...(call.json ? ['-f', 'json'] : [])];
      return new Promise((resolve, reject) => {
        const child = spawn(options.binary ?? 'openstack', args, {
          env: { ...process.env, ...options.env },
          stdio: ['ignore', 'pipe', 'pipe'],
          ...(options.signal ? { signal: options.signal } : {}),
        });
        let stdout = '';
        let stderr = '';
        child.stdout.setEncoding('utf8').on('data', (t: string) => (stdout += t));
        child.stderr.setEncoding('utf8').on('data', (t: string) => (stderr += t));
        child.on('error', (error) => {
          if ((error as NodeJS.ErrnoException).code === 'ENOENT') {
            reject(new UserError('openstack: the openstack client is not installed (make deps: python3-openstackclient)', ExitCode.missingTool));
          } else reject(error);
        });
        child.on('close', (code) => {
          if (code !== 0) return reject(new OpenstackCallError(call, cloud, stderr || stdout, code));
          if (!call.json) return resolve(undefined);
          try {
            // `--wait` prints "Complete" (and progress) before the JSON document.
            const start = stdout.search(/^[[{]/m);
            resolve(start >= 0 ? JSON.parse(stdout.slice(start)) : undefined);
          } catch {
            reject(new UserError(`openstack: ${formatCall(call, cloud)} printed no JSON:\n${stdout.slice(0, 400)}`));
          }
        });
      });
    },
  };
}

/** Finds what exists: the discovery lists, then the group's rules where the group exists. */
export async function observe(d: Desired, client: Client): Promise<Observed> {
  // Read-only and independent: four at a time (each client start costs a second of CPU).
  const limit = pLimit(4);
  const results = await Promise.all(discoveryCalls(d).map((call) => limit(() => client.run(call))));
  const observed = parseObserved(d, results);
  if (observed.securityGroups.some((g) => g.name === d.securityGroup)) observed.rules = parseRules(await client.run(ruleCall(d)));
  for (const router of observed.routers) {
    const call: Call = { args: ['port', 'list', '--router', router.id], json: true, readOnly: true, why: `the interfaces of ${router.name}`, resource: `router ${router.name}` };
    router.interfaces = rows(await client.run(call)).length > 0;
  }
  return observed;
}

export interface ApplyOptions {
  onCall?: (call: Call, line: string) => void;
  onWarning?: (line: string) => void;
  /** Volume polling: interval and bound (ms). */
  pollMs?: number;
  waitMs?: number;
  signal?: AbortSignal;
}

/** Runs the calls in order; a failure stops there (a rerun resumes from what exists). */
export async function apply(calls: Call[], client: Client, cloud: string | undefined, options: ApplyOptions = {}): Promise<void> {
  for (const call of calls) {
    options.signal?.throwIfAborted();
    options.onCall?.(call, formatCall(call, cloud));
    try {
      await client.run(call);
    } catch (error) {
      if (call.optional && error instanceof OpenstackCallError) {
        options.onWarning?.(`warning: ${call.why}: the cloud refused it (${firstLine(error.message)}); continuing`);
        continue;
      }
      throw error;
    }
    if (call.waitVolume) await waitForVolume(call, client, cloud, options);
  }
}

function firstLine(text: string): string {
  return text.split('\n')[0] ?? text;
}

async function waitForVolume(call: Call, client: Client, cloud: string | undefined, options: ApplyOptions): Promise<void> {
  const { name, status } = call.waitVolume!;
  const deadline = Date.now() + (options.waitMs ?? 15 * 60_000);
  const show: Call = { args: ['volume', 'show', name], json: true, readOnly: true, why: `wait until ${name} is ${status.join(' or ')}`, resource: `volume ${name}` };
  for (;;) {
    const value = (await client.run(show)) as Row | undefined;
    const now = text(value?.status).toLowerCase();
    if (status.includes(now)) return;
    if (now === 'error' || Date.now() > deadline) {
      throw new UserError(
        `openstack: volume ${name} is ${now || 'unknown'}${now === 'error' ? '' : ` after ${Math.round((options.waitMs ?? 900_000) / 1000)} s`}, not ${status.join(' or ')}\n  ${formatCall(show, cloud)}\n` +
          'A volume in error is often a quota or a backend without room: openstack volume show ' + name,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, options.pollMs ?? 2000));
  }
}

/** The plan as DRY_RUN prints it: the lookups, then every change (as if nothing existed yet). */
export function formatPlan(d: Desired, calls: Call[], cloud: string | undefined, heading: string): string {
  return [
    `${heading} (cloud ${cloud ?? '$OS_CLOUD'}): first the lookups, read-only:`,
    ...discoveryCalls(d).map((c) => `  ${formatCall(c, cloud)}`),
    `then, for what they do not find (${calls.length} call${calls.length === 1 ? '' : 's'} from nothing):`,
    ...calls.map((c) => `  ${formatCall(c, cloud)}\n      # ${c.why}`),
  ].join('\n');
}

/** Reads the user data a node gets (tests and the dry run's size check). */
export function userDataBytes(n: DesiredNode): Buffer {
  return readFileSync(n.userData);
}

// ---- the stage and down ---------------------------------------------------------------------

/** `make boot` rebuilds every server (first boot again); `make cluster` (and `up`) only adds what is missing. */
export const openstackModes = new WeakMap<RunContext, UpMode>();
export const upStateFile = join('openstack', 'up.json');

function cloudOf(ctx: RunContext): string | undefined {
  return ctx.config.openstack?.cloud ?? process.env.OS_CLOUD;
}

/** The client the stage uses: the real `openstack` on PATH, with the cloud from clouds.yaml. */
function clientFor(ctx: RunContext): Client {
  return cliClient(ctx.config.openstack?.cloud, { signal: ctx.signal });
}

export const openstackBootStage: Stage = {
  name: 'boot',
  title: 'Boot the nodes on OpenStack',
  summary: 'uploads the FCOS image and the image disk once, then ports, volumes and servers (Ignition on a config drive), all tagged with the cluster name',
  needs: ['fetch', 'disk', 'ignition'],
  tools: ['openstack'],
  inputs(ctx) {
    return { nodes: JSON.stringify(ctx.config.nodes), openstack: JSON.stringify(ctx.config.openstack), cloud: cloudOf(ctx) ?? '' };
  },
  // The cloud changes without any input changing (a server deleted by hand): always ask it.
  expired: () => 'the cloud is asked what exists every time',
  outputs: () => [upStateFile],
  async run(ctx, task) {
    const mode = openstackModes.get(ctx) ?? 'up';
    const d = await desiredResources(ctx.config, ctx.lock, ctx.settings.outDir);
    checkUserData(d);
    const client = clientFor(ctx);
    task.output = 'asking the cloud what exists';
    const observed = await observe(d, client);
    const calls = planUp(d, observed, mode);
    let done = 0;
    await apply(calls, client, cloudOf(ctx), {
      signal: ctx.signal,
      onCall: (call) => (task.output = `${++done}/${calls.length}: ${call.why}`),
      onWarning: (line) => process.stderr.write(`corekube: ${line}\n`),
    });
    // The address of a floating IP the cloud allocated (one more list; everything else is known).
    let fip = d.os.floatingIp?.address;
    if (!fip && d.os.floatingIp) {
      const list = discoveryCalls(d).find((c) => c.args[0] === 'floating')!;
      fip = text(rows(await client.run(list))[0]?.['Floating IP Address']) || undefined;
    }
    await mkdir(join(ctx.settings.outDir, 'openstack'), { recursive: true });
    const state = {
      cluster: d.cluster,
      cloud: cloudOf(ctx) ?? null,
      images: [d.fcosImage.name, d.diskImage.name],
      servers: d.nodes.map((n) => ({ node: n.node.name, server: n.server, ip: n.node.ip, ignition: n.userDataSha })),
      apiServer: fip ? `https://${fip}:${apiServerPort}` : `https://${ctx.config.nodes.find((n) => n.role === 'control-plane')!.ip}:${apiServerPort}`,
    };
    await writeFile(join(ctx.settings.outDir, upStateFile), `${JSON.stringify(state, null, 2)}\n`);
    task.title = `${openstackBootStage.title}: ${calls.length === 0 ? 'everything exists' : `${calls.length} call${calls.length === 1 ? '' : 's'}`}, API server ${state.apiServer}`;
  },
};

/** DRY_RUN for the openstack boot stage: every call it would make, from nothing. */
export async function dryRunPlan(ctx: RunContext): Promise<string> {
  const d = await desiredResources(ctx.config, ctx.lock, ctx.settings.outDir, { dryRun: true });
  checkUserData(d);
  return formatPlan(d, planUp(d, emptyObserved(), openstackModes.get(ctx) ?? 'up'), cloudOf(ctx), 'openstack: boot would call');
}

/** `make down TARGET=openstack`: deletes what up created (images too with purge). */
export async function openstackDown(ctx: RunContext, options: { purge: boolean; dryRun: boolean; onCall?: (line: string) => void }): Promise<Call[]> {
  const d = await desiredResources(ctx.config, ctx.lock, ctx.settings.outDir, { dryRun: true });
  const client = clientFor(ctx);
  const observed = await observe(d, client);
  const calls = planDown(d, observed, { purge: options.purge });
  if (!options.dryRun) await apply(calls, client, cloudOf(ctx), { signal: ctx.signal, onCall: (_, line) => options.onCall?.(line) });
  else for (const call of calls) options.onCall?.(formatCall(call, cloudOf(ctx)));
  await rm(join(ctx.settings.outDir, 'openstack'), { recursive: true, force: true });
  return calls;
}

/**
 * `make ssh NODE=n` on the cloud: the control plane through the configured floating IP,
 * every other node on its cluster address (from a host on the cluster network, or with
 * `-J core@FLOATING_IP`); host keys change at every boot, so none is recorded.
 */
export function openstackSshArgs(config: ClusterConfig, node: NodeConfig, command: string[] = []): string[] {
  const address = node.role === 'control-plane' && config.openstack?.floatingIp?.address ? config.openstack.floatingIp.address : node.ip;
  const jump = node.role !== 'control-plane' && config.openstack?.floatingIp?.address ? ['-J', `core@${config.openstack.floatingIp.address}`] : [];
  return ['-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR', ...jump, `core@${address}`, ...command];
}
