// System tools the stages run, and those the tests drive for real, with where each comes
// from on Debian/Ubuntu and Fedora: the one package list of the project. Preflight names
// every missing one with the exact install command; `make deps` installs what the stages
// need, `make test` (and .ci/run through it) what the tests need too. Adding a tool is
// one line here.
import { accessSync, constants, readFileSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import { ExitCode, UserError } from '../errors.ts';

interface ToolSource {
  debian: string;
  fedora: string;
  purpose: string;
  /** Only the tests (or benches) need it, never a stage. */
  test?: true;
  /** Where it lives when that is not on PATH. */
  path?: string;
}

export const toolCatalogue = {
  xz: { debian: 'xz-utils', fedora: 'xz', purpose: 'decompress the FCOS image' },
  tar: { debian: 'tar', fedora: 'tar', purpose: 'unpack release tarballs' },
  skopeo: { debian: 'skopeo', fedora: 'skopeo', purpose: 'copy images into the OCI layout' },
  'qemu-img': { debian: 'qemu-utils', fedora: 'qemu-img', purpose: 'inspect disk images' },
  'qemu-system-x86_64': { debian: 'qemu-system-x86', fedora: 'qemu-system-x86-core', purpose: 'boot the nodes' },
  'mkfs.ext4': { debian: 'e2fsprogs', fedora: 'e2fsprogs', purpose: 'build the image disk' },
  debugfs: { debian: 'e2fsprogs', fedora: 'e2fsprogs', purpose: 'read the image disk back without mounting' },
  resize2fs: { debian: 'e2fsprogs', fedora: 'e2fsprogs', purpose: 'shrink the image disk to its content' },
  vde_switch: { debian: 'vde2', fedora: 'vde2', purpose: 'the virtual L2 between the nodes' },
  openssl: { debian: 'openssl', fedora: 'openssl', purpose: 'make the cluster CA' },
  openstack: { debian: 'python3-openstackclient', fedora: 'python3-openstackclient', purpose: 'drive the cloud (target openstack)' },
  // The tests' own tools: fixtures that stand in for upstream, and the checkers.
  gzip: { debian: 'gzip', fedora: 'gzip', purpose: 'fixture tarballs', test: true },
  curl: { debian: 'curl', fedora: 'curl', purpose: 'the download reference in the benches; the boot script\'s etcd calls in the rejoin test', test: true },
  'docker-registry': { debian: 'docker-registry', fedora: 'docker-distribution', purpose: 'the fixture registry', test: true },
  umoci: { debian: 'umoci', fedora: 'umoci', purpose: 'build the fixture images', test: true },
  busybox: { debian: 'busybox-static', fedora: 'busybox', purpose: 'the fixture images and the stand-in appliance', test: true, path: '/bin/busybox' },
  containerd: { debian: 'containerd', fedora: 'containerd', purpose: 'import out/images as a node does', test: true },
  ctr: { debian: 'containerd', fedora: 'containerd', purpose: 'list what containerd imported', test: true },
  'ignition-validate': { debian: 'ignition', fedora: 'ignition-validate', purpose: 'validate the compiled Ignition configs', test: true },
  ignition: { debian: 'ignition', fedora: 'ignition', purpose: 'apply the Ignition configs to scratch roots', test: true, path: '/usr/lib/dracut/modules.d/30ignition/ignition' },
  setfiles: { debian: 'policycoreutils', fedora: 'policycoreutils', purpose: 'the relabel step Ignition runs', test: true },
  shellcheck: { debian: 'shellcheck', fedora: 'ShellCheck', purpose: 'check the boot scripts', test: true },
  etcd: { debian: 'etcd-server', fedora: 'etcd', purpose: "the real etcd a rejoining control plane's boot script removes its stale member from", test: true },
  'systemd-analyze': { debian: 'systemd', fedora: 'systemd', purpose: 'verify the units', test: true },
  setpriv: { debian: 'util-linux', fedora: 'util-linux-core', purpose: 'fixture daemons die with their test', test: true },
  'dpkg-deb': { debian: 'dpkg', fedora: 'dpkg', purpose: "unpack Debian's kernel for the stand-in appliance", test: true },
  mmdebstrap: { debian: 'mmdebstrap', fedora: 'mmdebstrap', purpose: "the stand-in node's root file system (built once, cached)", test: true },
  ssh: { debian: 'openssh-client', fedora: 'openssh-clients', purpose: 'log in to the stand-in node', test: true },
  'ssh-keygen': { debian: 'openssh-client', fedora: 'openssh-clients', purpose: "the stand-in node's login key", test: true },
  // The openstack target's tests: the real Keystone and Glance on 127.0.0.1, a config drive made as Nova makes it.
  'keystone-manage': { debian: 'keystone', fedora: 'openstack-keystone', purpose: 'the real Keystone the openstack tests start', test: true },
  'glance-manage': { debian: 'glance-api', fedora: 'openstack-glance', purpose: 'the real Glance the openstack tests start', test: true },
  genisoimage: { debian: 'genisoimage', fedora: 'genisoimage', purpose: 'a config drive as Nova makes it', test: true },
  isoinfo: { debian: 'genisoimage', fedora: 'genisoimage', purpose: "read the config drive back (the test's mount stand-in)", test: true },
} as const satisfies Record<string, ToolSource>;

export type ToolName = keyof typeof toolCatalogue;

export function findOnPath(tool: string, path = process.env.PATH ?? ''): string | undefined {
  const fixed = (toolCatalogue as Record<string, ToolSource>)[tool]?.path;
  if (fixed) return executable(fixed) ? fixed : undefined;
  for (const dir of path.split(delimiter)) {
    if (!dir) continue;
    const candidate = join(dir, tool);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  // sbin is often off a normal user's PATH on Debian, yet mkfs.ext4 runs fine from there.
  for (const dir of ['/usr/sbin', '/sbin']) {
    try {
      accessSync(join(dir, tool), constants.X_OK);
      return join(dir, tool);
    } catch {
      // not here
    }
  }
  return undefined;
}

function executable(file: string): boolean {
  try {
    accessSync(file, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** Every tool the stages run; with `tests`, also what the tests drive. */
export function allTools(tests: boolean): ToolName[] {
  return (Object.keys(toolCatalogue) as ToolName[]).filter((name) => tests || !('test' in toolCatalogue[name]));
}

export function missingTools(tools: Iterable<ToolName>, path?: string): ToolName[] {
  return [...new Set(tools)].filter((tool) => !findOnPath(tool, path)).sort();
}

/** The distribution's packages that bring these tools, each once, sorted. */
export function packagesFor(tools: readonly ToolName[], distro: 'debian' | 'fedora'): string[] {
  return [...new Set(tools.map((t) => toolCatalogue[t][distro]))].sort();
}

export function installCommands(tools: readonly ToolName[]): { debian: string; fedora: string } {
  return {
    debian: `sudo apt-get install -y ${packagesFor(tools, 'debian').join(' ')}`,
    fedora: `sudo dnf install -y ${packagesFor(tools, 'fedora').join(' ')}`,
  };
}

export class MissingToolsError extends UserError {
  readonly tools: ToolName[];
  constructor(tools: ToolName[], forWhat: string, repair = 'make deps') {
    const { debian, fedora } = installCommands(tools);
    const list = tools.map((t) => `  ${t} (${toolCatalogue[t].purpose})`).join('\n');
    super(
      `${forWhat} needs tools that are not installed:\n${list}\n` +
        `Install them with one of:\n  Debian/Ubuntu: ${debian}\n  Fedora:        ${fedora}\nor run: ${repair}`,
      ExitCode.missingTool,
    );
    this.name = 'MissingToolsError';
    this.tools = tools;
  }
}

/** Which install command fits this machine, from /etc/os-release. */
export function hostFamily(osRelease = readOsRelease()): 'debian' | 'fedora' | undefined {
  const ids = `${osRelease.ID ?? ''} ${osRelease.ID_LIKE ?? ''}`.split(/\s+/);
  if (ids.some((id) => id === 'debian' || id === 'ubuntu')) return 'debian';
  if (ids.some((id) => id === 'fedora' || id === 'rhel' || id === 'centos')) return 'fedora';
  return undefined;
}

function readOsRelease(): Record<string, string> {
  try {
    // COREKUBE_OS_RELEASE: another os-release file (tests play another distribution with it).
    const text = readFileSync(process.env.COREKUBE_OS_RELEASE || '/etc/os-release', 'utf8');
    return Object.fromEntries(
      text
        .split('\n')
        .map((line) => /^([A-Z_]+)=("?)(.*)\2$/.exec(line))
        .filter((m): m is RegExpExecArray => m !== null)
        .map((m) => [m[1]!, m[3]!]),
    );
  } catch {
    return {};
  }
}
