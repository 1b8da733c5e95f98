// ignition: per node, the generated files in out/files/NODE/ (network, hostname, hosts,
// kubeadm and containerd configuration, the CA, the SSH key), then fcc/base.bu and the
// role's Butane compiled against them into out/ignition/NODE.ign, each checked by
// ignition-validate where it is installed.
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { chmod, mkdir, readdir, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { translateButane } from './lib/butane/butane.ts';
import { artifactRepair, CacheMismatchError, hashFile } from './lib/store/cache.ts';
import type { ClusterConfig, NodeConfig } from './lib/inputs/config.ts';
import { UserError } from './lib/errors.ts';
import { artifactOutput } from './fetch.ts';
import {
  applyKubeadmOverrides,
  controlPlaneJoinDocuments,
  kubeadmDocuments,
  renderControlPlaneEnv,
  renderContainerdConfig,
  renderFlannelConfig,
  renderHosts,
  renderNetwork,
  renderKubeadmPatches,
  renderPodSecurityAdmission,
  renderResolvConf,
  renderSelinuxConfig,
  stringifyDocuments,
  type NodeFile,
} from './lib/node/node-config.ts';
import { storedSha256, type Lock } from './lib/inputs/lock.ts';
import { readPki, type SharedControlPlanePki } from './pki.ts';
import { noVirtualIp, renderKubeVipManifest } from './lib/node/kube-vip.ts';
import type { RunContext, Stage } from './lib/run/stage.ts';
import { ToolError, indentTail, runTool } from './lib/run/tool.ts';
import { findOnPath } from './lib/run/tools.ts';

export const filesDir = 'files';
export const ignitionDir = 'ignition';

export const ignitionStage: Stage = {
  name: 'ignition',
  title: 'Render each node and compile its Ignition config',
  summary: 'writes out/files/NODE/ and compiles fcc/ with butane (or the built-in translator) into out/ignition/NODE.ign',
  needs: ['pki'],
  tools: [],
  inputs(ctx) {
    const fcc = fccDir(ctx);
    const inputs: Record<string, string> = {
      config: digestOf(JSON.stringify({ ...ctx.config, file: undefined })),
      lock: digestOf(JSON.stringify({ kubernetes: ctx.lock.kubernetes, images: ctx.lock.images, containerd: ctx.lock.artifacts.containerd.url })),
      butane: describeCompiler(findButane(ctx)),
    };
    for (const file of existsSync(fcc) ? readdirSync(fcc).filter((f) => /\.(bu|ya?ml)$/.test(f)).sort() : []) {
      inputs[`fcc/${file}`] = digestOf(readFileSync(join(fcc, file)));
    }
    return inputs;
  },
  outputs(ctx) {
    return ctx.config.nodes.flatMap((node) => [join(filesDir, node.name), join(ignitionDir, `${node.name}.ign`)]);
  },
  async run(ctx, task) {
    const { outDir } = ctx.settings;
    const pki = readPki(outDir);
    const compiler = findButane(ctx);
    await checkPinnedButane(compiler);
    const validator = findOnPath('ignition-validate');
    const overrideFile = join(fccDir(ctx), 'kubeadm.yaml');
    const overrideText = existsSync(overrideFile) ? readFileSync(overrideFile, 'utf8') : undefined;
    // Everything is rendered and checked before anything in out/ changes.
    const rendered = ctx.config.nodes.map((node) => ({ node, files: renderNodeFiles(ctx.config, ctx.lock, node, pki, ctx.config.sshPublicKey, overrideFile, overrideText) }));
    await mkdir(join(outDir, ignitionDir), { recursive: true });
    await mkdir(join(outDir, filesDir), { recursive: true });
    // Every node is compiled into staging first; out/ changes only when all of them compiled.
    const staged: { node: NodeConfig; staging: string; ignTemp: string }[] = [];
    try {
      for (const { node, files } of rendered) {
        task.output = `${node.name}: ${describeCompiler(compiler)}`;
        const staging = join(outDir, filesDir, `.${node.name}.${process.pid}`);
        const ignTemp = join(outDir, ignitionDir, `.${node.name}.ign.${process.pid}`);
        staged.push({ node, staging, ignTemp });
        await rm(staging, { recursive: true, force: true });
        await mkdir(staging, { recursive: true, mode: 0o700 });
        for (const file of files) await writeFile(join(staging, file.name), file.content, { mode: file.secret ? 0o600 : 0o644 });
        const base = await compile(ctx, compiler, join(fccDir(ctx), 'base.bu'), staging);
        await writeFile(join(staging, 'base.ign'), base);
        const ignition = await compile(ctx, compiler, join(fccDir(ctx), `${node.role}.bu`), staging);
        if (validator) await validate(validator, ignition, `${node.name}.ign`, ctx.signal);
        await writeFile(ignTemp, ignition, { mode: 0o600 });
        await chmod(ignTemp, 0o600);
      }
      for (const { node, staging, ignTemp } of staged) {
        const target = join(outDir, filesDir, node.name);
        const old = `${target}.old.${process.pid}`;
        if (existsSync(target)) await rename(target, old);
        await rename(staging, target);
        await rm(old, { recursive: true, force: true });
        await rename(ignTemp, join(outDir, ignitionDir, `${node.name}.ign`));
      }
    } finally {
      for (const { staging, ignTemp } of staged) {
        await rm(staging, { recursive: true, force: true });
        await rm(ignTemp, { force: true });
      }
    }
    await pruneStale(ctx);
    task.output = validator ? 'every config accepted by ignition-validate' : 'ignition-validate not installed: configs not validated';
  },
};

export function fccDir(ctx: RunContext): string {
  return join(ctx.settings.root, 'fcc');
}

function digestOf(data: string | Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** Everything a node gets from out/files/NODE/. Secrets are marked; workers get no CA key. */
export function renderNodeFiles(
  config: ClusterConfig,
  lock: Lock,
  node: NodeConfig,
  pki: { caCertPem: string; caKeyPem: string; token: string; caHash: string; shared?: SharedControlPlanePki },
  sshPublicKey: string,
  overrideFile: string,
  overrideText: string | undefined,
): NodeFile[] {
  const network = renderNetwork(config, node);
  const kubeadm = applyKubeadmOverrides(kubeadmDocuments(config, lock, node, pki), overrideFile, overrideText, config, lock);
  const files: NodeFile[] = [
    { name: 'hostname', content: `${node.name}\n` },
    { name: 'hosts', content: renderHosts(config) },
    { name: 'corekube-cluster.nmconnection', content: network.cluster, secret: true },
    { name: 'corekube-host.nmconnection', content: network.user, secret: true },
    { name: 'containerd.toml', content: renderContainerdConfig(lock) },
    { name: 'kubeadm.yaml', content: stringifyDocuments(kubeadm), secret: true },
    { name: 'resolv.conf', content: renderResolvConf(config, node) },
    { name: 'selinux-config', content: renderSelinuxConfig(config) },
    ...renderKubeadmPatches().map((p) => ({ name: `kubeadm-patch-${p.target}.yaml`, content: p.content })),
    { name: 'authorized_keys', content: `${sshPublicKey.trim()}\n` },
  ];
  // A worker gets the CA through discovery, pinned by its hash: kubeadm join refuses to
  // start when /etc/kubernetes/pki/ca.crt already exists (its FileAvailable preflight).
  if (node.role === 'control-plane') {
    files.push(
      { name: 'ca.crt', content: pki.caCertPem },
      { name: 'ca.key', content: pki.caKeyPem, secret: true },
      { name: 'pod-security.yaml', content: renderPodSecurityAdmission() },
      { name: 'flannel-config.yaml', content: renderFlannelConfig(config) },
    );
    // What every control plane shares (kubeadm join --control-plane with no uploaded
    // certificates), and how it finds the others: control planes only, never a worker.
    if (!pki.shared) throw new Error('renderNodeFiles: a control plane needs the shared control-plane PKI (the pki stage makes it)');
    const joinDocs = applyKubeadmOverrides(controlPlaneJoinDocuments(config, node, pki), overrideFile, overrideText, config, lock);
    const ha = config.controlPlane?.virtualIp === true;
    files.push(
      { name: 'front-proxy-ca.crt', content: pki.shared.frontProxyCaCert },
      { name: 'front-proxy-ca.key', content: pki.shared.frontProxyCaKey, secret: true },
      { name: 'etcd-ca.crt', content: pki.shared.etcdCaCert },
      { name: 'etcd-ca.key', content: pki.shared.etcdCaKey, secret: true },
      { name: 'sa.key', content: pki.shared.serviceAccountKey, secret: true },
      { name: 'sa.pub', content: pki.shared.serviceAccountPub },
      { name: 'kubeadm-join.yaml', content: stringifyDocuments(joinDocs), secret: true },
      { name: 'control-plane.env', content: renderControlPlaneEnv(config, node) },
      { name: 'kube-vip-init.yaml', content: ha ? renderKubeVipManifest(config, 'super-admin.conf') : noVirtualIp(config) },
      { name: 'kube-vip-join.yaml', content: ha ? renderKubeVipManifest(config, 'admin.conf') : noVirtualIp(config) },
    );
  }
  return files;
}

type Compiler = { kind: 'butane'; path: string; from: string; sha256?: string } | { kind: 'builtin' };

/**
 * butane: $BUTANE (a path, or "builtin"); else the pinned release the lock names, fetched
 * into out/artifacts (its version is known); else a butane on PATH (whose version is not);
 * else the built-in translator.
 */
export function findButane(ctx: RunContext): Compiler {
  const fromEnv = process.env.BUTANE;
  if (fromEnv === 'builtin') return { kind: 'builtin' };
  if (fromEnv) {
    if (!existsSync(fromEnv)) throw new UserError(`BUTANE=${fromEnv}: no such file. Unset BUTANE to use the pinned butane (or one on PATH), or BUTANE=builtin.`);
    return { kind: 'butane', path: fromEnv, from: '$BUTANE' };
  }
  const fetched = join(ctx.settings.outDir, artifactOutput(ctx.lock.artifacts.butane));
  if (existsSync(fetched) && (readFileSync(fetched).subarray(0, 4).toString('latin1') === '\x7fELF')) {
    return { kind: 'butane', path: fetched, from: 'the pinned release in out/artifacts', sha256: storedSha256(ctx.lock.artifacts.butane) };
  }
  const onPath = findOnPath('butane');
  if (onPath) return { kind: 'butane', path: onPath, from: 'PATH' };
  return { kind: 'builtin' };
}

/** The pinned butane is a cache entry: its bytes must still be the lock's before it runs. */
async function checkPinnedButane(compiler: Compiler): Promise<void> {
  if (compiler.kind !== 'butane' || !compiler.sha256) return;
  const found = await hashFile(compiler.path);
  if (found !== compiler.sha256) {
    throw new CacheMismatchError([{ entry: compiler.path, what: 'butane, as the lock pins it', expected: compiler.sha256, found, repair: artifactRepair }]);
  }
}

function describeCompiler(compiler: Compiler): string {
  return compiler.kind === 'builtin' ? 'built-in Butane translator' : `butane (${compiler.from}: ${compiler.path})`;
}

async function compile(ctx: RunContext, compiler: Compiler, source: string, filesDirectory: string): Promise<string> {
  if (!existsSync(source)) throw new UserError(`${source}: missing. fcc/ needs base.bu, control-plane.bu and worker.bu.`);
  if (compiler.kind === 'builtin') {
    return translateButane(readFileSync(source, 'utf8'), { filesDir: filesDirectory, source });
  }
  // The fetched binary is read-only in the cache; run it through its path as is, or a copy.
  try {
    return await runTool('butane', ['--strict', '--files-dir', filesDirectory, source], { signal: ctx.signal, binary: compiler.path });
  } catch (error) {
    if (!(error instanceof ToolError)) throw error;
    throw new UserError(`${source}: butane refused it:\n${indentTail(error.stderr)}`);
  }
}

async function validate(validator: string, ignition: string, name: string, signal: AbortSignal): Promise<void> {
  const dir = join(process.env.TMPDIR ?? '/tmp', `corekube-validate-${process.pid}`);
  await mkdir(dir, { recursive: true });
  const file = join(dir, name);
  try {
    await writeFile(file, ignition, { mode: 0o600 });
    await runTool('ignition-validate', [file], { signal, binary: validator });
  } catch (error) {
    if (!(error instanceof ToolError)) throw error;
    throw new UserError(`${name}: ignition-validate refused the compiled config:\n${indentTail(error.stderr || error.message)}`);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** Nodes no longer in cluster.yaml lose their files and config. */
async function pruneStale(ctx: RunContext): Promise<void> {
  const names = new Set(ctx.config.nodes.map((n) => n.name));
  for (const entry of await readdir(join(ctx.settings.outDir, filesDir)).catch(() => [] as string[])) {
    if (!names.has(entry)) await rm(join(ctx.settings.outDir, filesDir, entry), { recursive: true, force: true });
  }
  for (const entry of await readdir(join(ctx.settings.outDir, ignitionDir)).catch(() => [] as string[])) {
    if (!names.has(entry.replace(/\.ign$/, ''))) await rm(join(ctx.settings.outDir, ignitionDir, entry), { force: true });
  }
}
