// Test workspaces: a temp directory with a cluster.yaml whose mirrors point at the
// fixture server, a lock written from the fixture tree's real checksums, and separate
// out/ and cache/ directories.
import { spawn } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, statSync, utimesSync, writeFileSync, writeSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { clusterImages, kubeadmImages } from '../tasks/images.ts';
import { artifactKeys } from '../tasks/lib/inputs/lock.ts';
import { parseReference } from '../tasks/lib/store/oci.ts';
import { RunContext, type RunSettings } from '../tasks/lib/run/stage.ts';
import { startFixtureServer, type FixtureServer } from './fixtures/http-server.ts';
import { startRegistry, type RegistryFixture, type SeededImage } from './fixtures/registry.ts';
import { buildUpstreamTree, type UpstreamTree } from './fixtures/upstream.ts';

export const projectRoot = resolve(import.meta.dirname, '..');
export const cliPath = join(projectRoot, 'tasks', 'cli.ts');

export function lockYaml(tree: UpstreamTree, images: string[] = []): string {
  const lines = [
    '# corekube lock for the local test fixtures: checksums computed from the fixture bytes',
    'lockVersion: 1',
    `fcos: {stream: stable, release: ${tree.fcosRelease}, arch: x86_64}`,
    `kubernetes: {version: ${tree.kubernetesVersion}}`,
    'artifacts:',
  ];
  for (const key of artifactKeys) {
    const artifact = tree.artifacts[key];
    if (!artifact) throw new Error(`the fixture tree has no artifact ${key}`);
    lines.push(`  ${key}:`, `    url: ${artifact.upstreamUrl}`, `    sha256: ${artifact.sha256}`);
    if (artifact.uncompressedSha256) lines.push(`    uncompressedSha256: ${artifact.uncompressedSha256}`);
  }
  lines.push(`images:${images.length === 0 ? ' []' : ''}`, ...images.map((i) => `  - ${i}`));
  return `${lines.join('\n')}\n`;
}

export interface Workspace {
  dir: string;
  configFile: string;
  lockFile: string;
  outDir: string;
  cacheDir: string;
  settings(overrides?: Partial<RunSettings>): RunSettings;
  context(overrides?: Partial<RunSettings>, signal?: AbortSignal): RunContext;
}

export interface WorkspaceOptions {
  /** mirrors.registries: upstream host -> location on the fixture registry (plain HTTP). */
  registries?: Record<string, string>;
  /** Lock images[] entries, as YAML flow values. */
  images?: string[];
  /** nodes: entries as YAML flow mappings (default: one control plane, cp1). */
  nodes?: string[];
  /** Extra cluster.yaml lines (top-level keys). */
  extraConfig?: string[];
}

export function makeWorkspace(tree: UpstreamTree, serverUrl: string, options: WorkspaceOptions = {}): Workspace {
  const dir = mkdtempSync(join(tmpdir(), 'corekube-ws-'));
  const configFile = join(dir, 'cluster.yaml');
  const lockFile = join(dir, 'corekube.lock.yaml');
  writeFileSync(join(dir, 'id.pub'), 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGNvcmVrdWJldGVzdGtleQ test@corekube\n');
  writeFileSync(
    configFile,
    [
      'name: test',
      `kubernetes: {version: ${tree.kubernetesVersion}}`,
      'nodes:',
      ...(options.nodes ?? ['{name: cp1, role: control-plane, ip: 10.77.0.10}']).map((node) => `  - ${node}`),
      'sshPublicKeyFile: id.pub',
      'mirrors:',
      `  fcos: ${serverUrl}${tree.prefixes.fcos}`,
      `  kubernetes: ${serverUrl}${tree.prefixes.kubernetes}`,
      `  github: ${serverUrl}${tree.prefixes.github}`,
      `  fedora: ${serverUrl}${tree.prefixes.fedora}`,
      ...(options.registries ? ['  registries:', ...Object.entries(options.registries).map(([host, location]) => `    ${host}: {location: "${location}", insecure: true}`)] : []),
      ...(options.extraConfig ?? []),
      '',
    ].join('\n'),
  );
  writeFileSync(lockFile, lockYaml(tree, options.images));
  const outDir = join(dir, 'out');
  const cacheDir = join(dir, 'cache');
  const settings = (overrides: Partial<RunSettings> = {}): RunSettings => ({
    root: projectRoot,
    outDir,
    cacheDir,
    configFile,
    lockFile,
    offline: false,
    force: false,
    jobs: 4,
    http: { retries: 3, stallTimeoutMs: 1500, backoffMs: 20 },
    interactive: false,
    ...overrides,
  });
  return {
    dir,
    configFile,
    lockFile,
    outDir,
    cacheDir,
    settings,
    context: (overrides = {}, signal = new AbortController().signal) => new RunContext(settings(overrides), signal),
  };
}

/** Every file below a directory, relative, sorted ([] when it does not exist). */
export function listFiles(dir: string): string[] {
  try {
    return (readdirSync(dir, { recursive: true, withFileTypes: true }) as import('node:fs').Dirent[])
      .filter((e) => !e.isDirectory())
      .map((e) => join(e.parentPath, e.name).slice(dir.length + 1))
      .sort();
  } catch {
    return [];
  }
}

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs the real CLI in a child process, as `make` would. */
export function runCli(args: string[], options: { env?: Record<string, string>; onStart?: (child: ReturnType<typeof spawn>) => void } = {}): Promise<CliResult> {
  return new Promise((resolvePromise) => {
    const child = spawn(process.execPath, [cliPath, ...args], {
      env: { ...process.env, CI: 'true', ...options.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (t: string) => (stdout += t));
    child.stderr.setEncoding('utf8').on('data', (t: string) => (stderr += t));
    options.onStart?.(child);
    child.on('close', (code) => resolvePromise({ code, stdout, stderr }));
  });
}

export function workspaceArgs(ws: Workspace): string[] {
  return ['--config', ws.configFile, '--lock', ws.lockFile, '--out', ws.outDir, '--cache', ws.cacheDir];
}

export async function waitFor(check: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Wraps a uvu before/after hook so that its error is printed: uvu fails the suite silently. */
export function loud(hook: () => Promise<void> | void): () => Promise<void> {
  return async () => {
    try {
      await hook();
    } catch (error) {
      console.error('hook failed:', error);
      throw error;
    }
  };
}

/** Tags for the kubeadm images that follow their own versions (a real lock has what pin found). */
export const kubeadmTags: Record<string, string> = { 'registry.k8s.io/etcd': '3.6.8-0', 'registry.k8s.io/coredns/coredns': 'v1.12.1', 'registry.k8s.io/pause': '3.10.1' };

/**
 * What the fixture registry must hold for a lock that covers the project: the kubeadm set,
 * every image in manifests/ and, unless `virtualIp` is false (what pin asks for one control
 * plane), kube-vip.
 */
export function projectImages(version: string, options: { virtualIp?: boolean } = {}): { name: string; tag: string }[] {
  const fromManifests = clusterImages(join(projectRoot, 'manifests'), { controlPlane: { endpoint: '', virtualIp: options.virtualIp ?? true } }).map(({ image }) => parseReference(image)!);
  const all = [
    ...kubeadmImages(version).map(({ name, tag }) => ({ name, tag: tag ?? kubeadmTags[name]! })),
    ...fromManifests.map((ref) => ({ name: ref.name, tag: ref.tag ?? 'latest' })),
  ];
  return all.filter((image, i) => all.findIndex((other) => other.name === image.name && other.tag === image.tag) === i);
}

/** mirrors.registries pointing every upstream registry at its path on the fixture registry. */
export function fixtureMirrors(registryHost: string): Record<string, string> {
  return Object.fromEntries(['registry.k8s.io', 'docker.io', 'ghcr.io', 'quay.io'].map((host) => [host, `${registryHost}/${host}`]));
}

/** How the lock writes a seeded image: both digests where the layout's differs. */
export function lockEntry(image: SeededImage, overrides: { digest?: string; layoutDigest?: string } = {}): string {
  const digest = overrides.digest ?? image.digest;
  const layoutDigest = overrides.layoutDigest ?? image.storedDigest;
  const ref = `${image.name}:${image.tag}@${digest}`;
  return layoutDigest === digest ? ref : `{image: "${ref}", layoutDigest: "${layoutDigest}"}`;
}

/**
 * `count` consecutive ports on 127.0.0.1 that were free a moment ago, for configs that
 * publish port ranges (hostPorts). Chosen at random below the kernel's ephemeral range
 * (which port 0 and outgoing connections draw from, so no fixture server or client in a
 * parallel test lands there), each one bound to check it; a taken block is skipped.
 */
export async function freePortBlock(count: number): Promise<number> {
  const ephemeralLow = Number(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0] ?? 32768);
  const low = 10_000;
  const high = Math.max(low + 1000, ephemeralLow) - count;
  for (let attempt = 0; attempt < 100; attempt++) {
    const base = low + Math.floor(Math.random() * (high - low));
    const held: Server[] = [];
    try {
      for (let port = base; port < base + count; port++) {
        const server = createServer();
        await new Promise<void>((resolve, reject) => server.once('error', reject).listen({ host: '127.0.0.1', port, exclusive: true }, resolve));
        held.push(server);
      }
      return base;
    } catch {
      // taken: try another block
    } finally {
      await Promise.all(held.map((server) => new Promise((resolve) => server.close(resolve))));
    }
  }
  throw new Error(`no ${count} consecutive free ports on 127.0.0.1 below ${high + count}`);
}

/** Flips one bit of one byte in place, keeping size, inode and mtime: only the bytes tell. */
export function flipByte(file: string, at = 100): void {
  const before = statSync(file);
  const fd = openSync(file, 'r+');
  const one = Buffer.alloc(1);
  readSync(fd, one, 0, 1, at);
  one[0] = one[0]! ^ 0x01;
  writeSync(fd, one, 0, 1, at);
  closeSync(fd);
  utimesSync(file, before.atime, before.mtime);
}

/** What stands in for upstream in a test file: the fixture sites served on 127.0.0.1 and a registry seeded with the project's images. */
export interface Upstream {
  tree: UpstreamTree;
  server: FixtureServer;
  registry: RegistryFixture;
  close(): Promise<void>;
}

export async function startUpstream(work: string, version: string, options: { realRuntime?: boolean } = {}): Promise<Upstream> {
  const tree = await buildUpstreamTree(join(work, 'upstream'), { qcow2SizeMiB: 1, kubernetesVersion: version, ...options });
  const server = await startFixtureServer({ root: join(work, 'upstream') });
  const registry = await startRegistry({ images: projectImages(version), work });
  return {
    tree,
    server,
    registry,
    async close() {
      await server.close();
      await registry.close();
    },
  };
}

/** A workspace on the test file's upstream, with every image of the registry in its lock and the given nodes and host ports. */
export function clusterWorkspace(up: Upstream, nodes: string[], ports: { apiServer: number; sshBase: number }): Workspace {
  return makeWorkspace(up.tree, up.server.url, {
    nodes,
    registries: fixtureMirrors(up.registry.host),
    images: up.registry.images.map((i) => lockEntry(i)),
    extraConfig: [`hostPorts: {apiServer: ${ports.apiServer}, sshBase: ${ports.sshBase}}`],
  });
}

/**
 * Plain TCP listeners on 127.0.0.1 `ports` (the ports of fixture servers just stopped):
 * any connection to them is a network access, counted by `connections()`. Close each of
 * `listeners` when the test file ends.
 */
export async function countConnectionsOn(ports: number[]): Promise<{ listeners: Server[]; connections: () => number }> {
  let connections = 0;
  const listeners: Server[] = [];
  for (const port of ports) {
    const listener = createServer((socket) => {
      connections++;
      socket.destroy();
    });
    await new Promise<void>((resolve, reject) => listener.once('error', reject).listen(port, '127.0.0.1', () => resolve()));
    listeners.push(listener);
  }
  return { listeners, connections: () => connections };
}
