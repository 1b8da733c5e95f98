// System tools the stages run, and where each comes from on Debian/Ubuntu and Fedora.
// Preflight names every missing one with the exact install command; `make deps` runs it.
import { accessSync, constants, readFileSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import { ExitCode, UserError } from './errors.ts';

interface ToolSource {
  debian: string;
  fedora: string;
  purpose: string;
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
} as const satisfies Record<string, ToolSource>;

export type ToolName = keyof typeof toolCatalogue;

export function findOnPath(tool: string, path = process.env.PATH ?? ''): string | undefined {
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

export function missingTools(tools: Iterable<ToolName>, path?: string): ToolName[] {
  return [...new Set(tools)].filter((tool) => !findOnPath(tool, path)).sort();
}

export function installCommands(tools: readonly ToolName[]): { debian: string; fedora: string } {
  const packages = (distro: 'debian' | 'fedora') => [...new Set(tools.map((t) => toolCatalogue[t][distro]))].sort().join(' ');
  return {
    debian: `sudo apt-get install -y ${packages('debian')}`,
    fedora: `sudo dnf install -y ${packages('fedora')}`,
  };
}

export class MissingToolsError extends UserError {
  readonly tools: ToolName[];
  constructor(tools: ToolName[], forWhat: string) {
    const { debian, fedora } = installCommands(tools);
    const list = tools.map((t) => `  ${t} (${toolCatalogue[t].purpose})`).join('\n');
    super(
      `${forWhat} needs tools that are not installed:\n${list}\n` +
        `Install them with one of:\n  Debian/Ubuntu: ${debian}\n  Fedora:        ${fedora}\nor run: make deps`,
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
    const text = readFileSync('/etc/os-release', 'utf8');
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
