// boot: one QEMU process per node (FCOS with -snapshot, Ignition on fw_cfg, the image
// disk read-only), a userspace switch (vde_switch) for the cluster network, no root, no
// host bridge, nothing reachable off this machine. `down` stops it all; `ssh` logs in.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, existsSync, openSync, readFileSync, statSync } from 'node:fs';
import { mkdir, readdir, rm, writeFile } from 'node:fs/promises';
import { createConnection, createServer } from 'node:net';
import { join } from 'node:path';
import type { ClusterConfig, NodeConfig } from './lib/inputs/config.ts';
import { UserError } from './lib/errors.ts';
import { artifactOutput } from './fetch.ts';
import { diskOutput } from './disk.ts';
import { ignitionDir } from './ignition.ts';
import { kvmDeviceOpens, kvmVerdict, verdictFile, type ProbeGuest } from './lib/node/kvm.ts';
import { apiForwardLog, apiForwardPidFile, apiServerHostPort, bootTimeFile, type Accelerator, logsDir, nodePaths, publishedPorts, qemuArgs, runDir, socketDir, type NodePaths, type StandIn } from './lib/node/qemu.ts';
import type { RunContext, Stage } from './lib/run/stage.ts';
import { indentTail, runTool, ToolError } from './lib/run/tool.ts';

export const switchPidFile = join(runDir, 'switch.pid');

/**
 * The test-only stand-in from the environment; unset for real nodes. KERNEL + INITRD
 * (+ APPEND): an appliance booted instead of FCOS; with DISK too, a qcow2 OS disk in the
 * FCOS image's place, booted by that kernel and initramfs (test/fixtures/standin-node.ts).
 */
export function standInFromEnv(env = process.env): StandIn | undefined {
  if (!env.COREKUBE_STANDIN_KERNEL) {
    if (env.COREKUBE_STANDIN_DISK) throw new UserError('COREKUBE_STANDIN_DISK is set but COREKUBE_STANDIN_KERNEL is not: a stand-in disk boots with a kernel and initramfs (tests only)');
    return undefined;
  }
  if (!env.COREKUBE_STANDIN_INITRD) throw new UserError('COREKUBE_STANDIN_KERNEL is set but COREKUBE_STANDIN_INITRD is not: a stand-in needs both (tests only)');
  return {
    kernel: env.COREKUBE_STANDIN_KERNEL,
    initrd: env.COREKUBE_STANDIN_INITRD,
    append: env.COREKUBE_STANDIN_APPEND,
    ...(env.COREKUBE_STANDIN_DISK ? { disk: env.COREKUBE_STANDIN_DISK } : {}),
  };
}

export function pathsFor(ctx: RunContext, node: NodeConfig): NodePaths {
  const { outDir } = ctx.settings;
  return nodePaths(outDir, node, {
    image: join(outDir, artifactOutput(ctx.lock.artifacts['fcos-qemu'])),
    ignition: join(outDir, ignitionDir, `${node.name}.ign`),
    disk: join(outDir, diskOutput),
  });
}

export const bootStage: Stage = {
  name: 'boot',
  title: 'Boot the nodes in QEMU',
  summary: 'starts one QEMU per node (FCOS, -snapshot, Ignition on fw_cfg, the image disk read-only) on a private switch; SSH and the API server on 127.0.0.1',
  needs: ['fetch', 'disk', 'ignition'],
  tools: ['qemu-system-x86_64', 'vde_switch'],
  inputs(ctx) {
    const standIn = standInFromEnv();
    return {
      nodes: JSON.stringify(ctx.config.nodes),
      ports: JSON.stringify(ctx.config.hostPorts),
      standIn: standIn ? JSON.stringify(standIn) : 'none',
    };
  },
  /** Nodes that stopped (powered off, crashed, killed) are booted again. */
  expired(ctx) {
    const stopped = ctx.config.nodes.filter((node) => !runningQemu(pathsFor(ctx, node).pid)).map((n) => n.name);
    if (ctx.config.controlPlane?.virtualIp && !runningApiForward(ctx.settings.outDir)) stopped.push('the API server forwarder');
    return stopped.length > 0 ? `not running: ${stopped.join(', ')}` : undefined;
  },
  outputs(ctx) {
    return ctx.config.nodes.map((node) => join(runDir, `${node.name}.pid`));
  },
  async run(ctx, task) {
    const { config } = ctx;
    const { outDir } = ctx.settings;
    const running = config.nodes.filter((node) => runningQemu(pathsFor(ctx, node).pid));
    if (running.length > 0) {
      // A node must never run from an older build next to newer ones. Nodes that stopped
      // (powered off, or rebooted: QEMU runs with -no-reboot) beside others of the same
      // build start again, blank: with three control planes that is how one rejoins.
      // Every node, running or not, must still be what it was started from.
      const changed = config.nodes.filter((node) => recordedBuild(ctx, node) !== nodeBuild(ctx, node));
      const stopped = config.nodes.filter((node) => !running.includes(node));
      const switchPid = readPid(join(outDir, switchPidFile));
      if (changed.length === 0 && switchPid && processRunning(switchPid)) {
        // The verdict on KVM is kept per boot of the host: no second probe here.
        let accel = await chooseAccelerator({ guest: probeGuest(ctx), signal: ctx.signal, warn: warnTcg });
        for (const node of stopped) {
          task.output = `starting ${node.name} again (${accel}), beside ${running.map((n) => n.name).join(', ')}`;
          accel = await startNode(ctx, node, accel);
        }
        if (config.controlPlane?.virtualIp && !runningApiForward(outDir)) {
          task.output = 'starting the API server forwarder on 127.0.0.1';
          await startApiForward(ctx);
        }
        task.output = stopped.length > 0 ? `${stopped.map((n) => n.name).join(', ')} booting again; consoles in out/${logsDir}/` : 'the forwarder runs again';
        return;
      }
      throw new UserError(
        `${running.map((n) => n.name).join(', ')} ${running.length === 1 ? 'is' : 'are'} still running from an earlier boot` +
          `${changed.length > 0 ? ` (the build changed for ${changed.map((n) => n.name).join(', ')})` : ''}. ` +
          'Stop the cluster first (make down), then make boot: every boot is a first boot.',
      );
    }
    await stopCluster(outDir, { timeoutMs: 0 }); // leftovers of a crashed run: stale pid files, sockets
    await checkPortsFree(config);
    const standIn = standInFromEnv();
    for (const node of config.nodes) {
      const paths = pathsFor(ctx, node);
      const osImage = standIn ? (standIn.disk ? [['stand-in OS disk (COREKUBE_STANDIN_DISK)', standIn.disk]] : []) : [['FCOS image', paths.image]];
      for (const [what, file] of [['Ignition config', paths.ignition], ['image disk', paths.disk], ...osImage] as const) {
        if (!existsSync(file)) throw new UserError(`${node.name}: the ${what} ${file} is missing (make cluster builds it)`);
      }
    }
    // The probe boots what the nodes boot: the stand-in's kernel, or the FCOS image.
    task.output = 'checking that KVM runs guests (once per boot of this host)';
    let accel = await chooseAccelerator({ guest: probeGuest(ctx), signal: ctx.signal, warn: warnTcg });
    await mkdir(join(outDir, runDir), { recursive: true });
    await mkdir(join(outDir, logsDir), { recursive: true });
    const sockets = socketDir(outDir);
    await mkdir(sockets, { recursive: true, mode: 0o700 });
    await writeFile(join(outDir, bootTimeFile), `${new Date().toISOString()}\n`);
    task.output = 'starting the cluster switch';
    const firstPaths = pathsFor(ctx, config.nodes[0]!);
    await startDaemon('vde_switch', ['-s', firstPaths.switchSocket, '-d', '-p', join(outDir, switchPidFile), '-m', '700'], 'vde_switch', ctx.signal);
    // vde_switch -d returns before its pid file and control socket exist.
    const ready = Date.now() + 10_000;
    while (!(existsSync(join(outDir, switchPidFile)) && existsSync(join(firstPaths.switchSocket, 'ctl')))) {
      if (Date.now() > ready) throw new UserError(`vde_switch did not create ${firstPaths.switchSocket}/ctl within 10 s`);
      await new Promise((r) => setTimeout(r, 20));
    }
    try {
      for (const node of config.nodes) {
        task.output = `starting ${node.name} (${accel})`;
        accel = await startNode(ctx, node, accel);
      }
      if (config.controlPlane?.virtualIp) {
        task.output = 'starting the API server forwarder on 127.0.0.1';
        await startApiForward(ctx);
      }
    } catch (error) {
      await stopCluster(outDir, { timeoutMs: 0 });
      throw error;
    }
    task.output = `${config.nodes.length} node(s) booting; consoles in out/${logsDir}/`;
  },
};

/** One node's QEMU; returns the accelerator the next node should use (TCG once KVM failed). */
async function startNode(ctx: RunContext, node: NodeConfig, accel: Accelerator): Promise<Accelerator> {
  const { config } = ctx;
  const standIn = standInFromEnv();
  const paths = pathsFor(ctx, node);
  await rm(paths.log, { force: true });
  await writeFile(buildFile(ctx, node), `${nodeBuild(ctx, node)}\n`);
  try {
    await startDaemon('qemu-system-x86_64', qemuArgs({ config, node, paths, accel, standIn }), `QEMU for ${node.name}`, ctx.signal);
    return accel;
  } catch (error) {
    // /dev/kvm can be there and still fail (nested virtualization without the MSRs
    // QEMU needs): unless KVM was asked for, fall back to TCG for every node.
    if (accel !== 'kvm' || process.env.COREKUBE_ACCEL === 'kvm' || !/kvm/i.test((error as Error).message)) throw error;
    warnTcg(`KVM failed: ${(error as Error).message.split('\n')[1]?.trim() ?? 'see above'}`);
    await startDaemon('qemu-system-x86_64', qemuArgs({ config, node, paths, accel: 'tcg', standIn }), `QEMU for ${node.name}`, ctx.signal);
    return 'tcg';
  }
}

function buildFile(ctx: RunContext, node: NodeConfig): string {
  return join(ctx.settings.outDir, runDir, `${node.name}.build`);
}

/** What a running node was started from (its Ignition config, the disks, its QEMU settings), as one digest. */
export function nodeBuild(ctx: RunContext, node: NodeConfig): string {
  const paths = pathsFor(ctx, node);
  const identity = (file: string) => {
    try {
      const info = statSync(file);
      return `${info.size}:${Math.trunc(info.mtimeMs)}:${info.ino}`;
    } catch {
      return 'missing';
    }
  };
  const ignition = existsSync(paths.ignition) ? createHash('sha256').update(readFileSync(paths.ignition)).digest('hex') : 'missing';
  return createHash('sha256')
    .update(JSON.stringify({ node, ports: ctx.config.hostPorts, controlPlane: ctx.config.controlPlane, ignition, disk: identity(paths.disk), image: identity(paths.image), standIn: standInFromEnv() ?? null }))
    .digest('hex');
}

function recordedBuild(ctx: RunContext, node: NodeConfig): string | undefined {
  try {
    return readFileSync(buildFile(ctx, node), 'utf8').trim();
  } catch {
    return undefined;
  }
}

/**
 * Three control planes: out/kubeconfig's 127.0.0.1:hostPorts.apiServer is a forwarder to
 * whichever control plane answers (tasks/lib/node/api-forward.ts), a detached Node
 * process with its pid file in out/run and its log in out/logs; `make down` stops it.
 */
async function startApiForward(ctx: RunContext): Promise<void> {
  const { outDir } = ctx.settings;
  const pidFile = join(outDir, apiForwardPidFile);
  const backends = ctx.config.nodes.filter((n) => n.role === 'control-plane').map((n) => String(apiServerHostPort(ctx.config, n)));
  const log = openSync(join(outDir, apiForwardLog), 'a');
  try {
    const child = spawn(process.execPath, [join(import.meta.dirname, 'lib', 'node', 'api-forward.ts'), pidFile, String(ctx.config.hostPorts.apiServer), ...backends], {
      detached: true,
      stdio: ['ignore', log, log],
    });
    const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));
    child.unref();
    const deadline = Date.now() + 10_000;
    while (!existsSync(pidFile)) {
      const code = await Promise.race([exited, new Promise((r) => setTimeout(r, 20, 'running'))]);
      if (code !== 'running') throw new UserError(`the API server forwarder stopped (exit ${code}): see out/${apiForwardLog}`);
      if (Date.now() > deadline) throw new UserError(`the API server forwarder did not listen on 127.0.0.1:${ctx.config.hostPorts.apiServer} within 10 s: see out/${apiForwardLog}`);
    }
  } finally {
    closeSync(log);
  }
}

/** The forwarder's pid, if it runs (checked against its command line, not a recycled pid). */
export function runningApiForward(outDir: string): number | undefined {
  const pid = readPid(join(outDir, apiForwardPidFile));
  if (!pid) return undefined;
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('api-forward.ts') ? pid : undefined;
  } catch {
    return undefined;
  }
}

/**
 * KVM when it runs guests here, unless COREKUBE_ACCEL says otherwise (tcg: no probe; kvm:
 * fail rather than emulate). /dev/kvm opening is not enough: a probe guest must boot into
 * Linux under KVM faster than under TCG (lib/node/kvm.ts), judged once per host boot.
 * COREKUBE_KVM_PROBE=stall (tests only) makes the probe's KVM guest one that never runs.
 */
export async function chooseAccelerator(options: { guest: ProbeGuest; signal?: AbortSignal; warn: (why: string) => void; env?: NodeJS.ProcessEnv; device?: string }): Promise<Accelerator> {
  const env = options.env ?? process.env;
  const forced = env.COREKUBE_ACCEL;
  if (forced && forced !== 'kvm' && forced !== 'tcg') throw new UserError(`COREKUBE_ACCEL: expected kvm or tcg, found "${forced}"`);
  if (forced === 'tcg') {
    options.warn('COREKUBE_ACCEL=tcg');
    return 'tcg';
  }
  const probe = env.COREKUBE_KVM_PROBE;
  if (probe && probe !== 'stall') throw new UserError(`COREKUBE_KVM_PROBE: expected stall (tests only) or unset, found "${probe}"`);
  const stall = probe === 'stall';
  const device = options.device ?? '/dev/kvm';
  if (!stall && !kvmDeviceOpens(device)) {
    if (forced === 'kvm') throw new UserError(`COREKUBE_ACCEL=kvm, but ${device} cannot be opened read-write: load the kvm module and join the group that owns ${device}, or unset COREKUBE_ACCEL to boot under TCG`);
    options.warn(`${device} cannot be opened read-write`);
    return 'tcg';
  }
  const cacheFile = verdictFile(env);
  const verdict = await kvmVerdict({ guest: options.guest, signal: options.signal, cacheFile, ...(stall ? { fake: 'stall' as const } : {}) });
  if (!verdict) {
    // Neither guest printed a kernel line: nothing learned, so keep to KVM as asked for.
    process.stderr.write(`corekube: could not tell whether KVM runs guests (the probe guest printed no Linux line under KVM or TCG): booting under KVM\n`);
    return 'kvm';
  }
  if (verdict.usable) return 'kvm';
  const why = `KVM does not run guests here: ${verdict.reason}`;
  const kept = `${verdict.cached ? `judged at ${verdict.probedAt}` : `judged in ${verdict.seconds} s`}, kept in ${cacheFile} until the host reboots`;
  if (forced === 'kvm') throw new UserError(`COREKUBE_ACCEL=kvm, but ${why} (${kept}). Unset COREKUBE_ACCEL to boot every node under TCG instead (many times slower).`);
  options.warn(`${why} (${kept})`);
  return 'tcg';
}

/** The probe boots what the nodes boot: the stand-in's kernel, or the FCOS image. */
function probeGuest(ctx: RunContext): ProbeGuest {
  const standIn = standInFromEnv();
  return standIn ? { kernel: standIn.kernel } : { image: pathsFor(ctx, ctx.config.nodes[0]!).image };
}

/** One line, whatever the cause: the cause first, then what corekube does about it. */
function warnTcg(why: string): void {
  process.stderr.write(`corekube: ${why}: the nodes run under TCG emulation, many times slower (minutes to boot FCOS)\n`);
}

/** A tool that daemonizes (vde_switch -d, qemu -daemonize): returns once its daemon runs. */
async function startDaemon(tool: 'vde_switch' | 'qemu-system-x86_64', args: string[], what: string, signal: AbortSignal): Promise<void> {
  try {
    await runTool(tool, args, { signal });
  } catch (error) {
    if (!(error instanceof ToolError)) throw error;
    throw new UserError(`${what} failed (exit ${error.exitCode ?? 'signal'}):\n${indentTail(error.stderr)}\n  command: ${tool} ${args.join(' ')}`);
  }
}

/** Every published port must be free on 127.0.0.1 before anything starts. */
export async function checkPortsFree(config: ClusterConfig): Promise<void> {
  const taken: string[] = [];
  for (const { port, what, field } of publishedPorts(config)) {
    const free = await new Promise<boolean>((resolve) => {
      const server = createServer();
      server.once('error', () => resolve(false));
      server.listen({ host: '127.0.0.1', port, exclusive: true }, () => server.close(() => resolve(true)));
    });
    if (!free) taken.push(`  127.0.0.1:${port} (${what}, from ${field} in ${config.file}) is already in use`);
  }
  if (taken.length > 0) {
    throw new UserError(`cannot publish the cluster's ports:\n${taken.join('\n')}\nStop what uses them, or choose other ports with hostPorts in ${config.file}.`);
  }
}

function readPid(file: string): number | undefined {
  try {
    const pid = Number(readFileSync(file, 'utf8').trim());
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** A pid file names a live QEMU of ours (not a recycled pid of something else). */
export function runningQemu(pidFile: string): number | undefined {
  const pid = readPid(pidFile);
  if (!pid) return undefined;
  try {
    const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    return cmdline.includes('qemu-system') && cmdline.includes(pidFile) ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** Alive and not a zombie (a daemonized QEMU's parent may never reap it). */
export function processRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

/** ACPI power button through QMP; the guest shuts down in its own time. */
function powerButton(qmpSocket: string): Promise<void> {
  return new Promise((resolve) => {
    const socket = createConnection(qmpSocket);
    const timer = setTimeout(() => socket.destroy(), 2000);
    socket.on('connect', () => {
      socket.write('{"execute":"qmp_capabilities"}\n{"execute":"system_powerdown"}\n');
      socket.end();
    });
    socket.on('close', () => {
      clearTimeout(timer);
      resolve();
    });
    socket.on('error', () => undefined);
  });
}

export interface StopReport {
  poweredOff: string[];
  killed: string[];
}

/**
 * `make down`: the power button for every node running from this tree (its pid files),
 * then SIGKILL for those still up after timeoutMs; then the switch; then pid files and
 * sockets. Needs no config (a node removed from cluster.yaml is stopped too); safe when
 * nothing runs.
 */
export async function stopCluster(outDir: string, options: { timeoutMs: number }): Promise<StopReport> {
  const report: StopReport = { poweredOff: [], killed: [] };
  const up: { name: string; pid: number; qmp: string }[] = [];
  for (const entry of await readdir(join(outDir, runDir)).catch(() => [] as string[])) {
    if (!entry.endsWith('.pid') || entry === 'switch.pid') continue;
    const name = entry.replace(/\.pid$/, '');
    const pid = runningQemu(join(outDir, runDir, entry));
    if (pid) up.push({ name, pid, qmp: join(socketDir(outDir), `${name}.qmp`) });
  }
  if (options.timeoutMs > 0) await Promise.all(up.map((n) => powerButton(n.qmp)));
  const deadline = Date.now() + options.timeoutMs;
  for (const n of up) {
    while (processRunning(n.pid) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200));
    if (processRunning(n.pid)) {
      process.kill(n.pid, 'SIGKILL');
      while (processRunning(n.pid)) await new Promise((r) => setTimeout(r, 50));
      report.killed.push(n.name);
    } else {
      report.poweredOff.push(n.name);
    }
  }
  const forwarder = runningApiForward(outDir);
  if (forwarder) {
    process.kill(forwarder, 'SIGTERM');
    while (processRunning(forwarder)) await new Promise((r) => setTimeout(r, 20));
  }
  const switchPid = readPid(join(outDir, switchPidFile));
  if (switchPid && processRunning(switchPid) && readFileSync(`/proc/${switchPid}/cmdline`, 'utf8').includes('vde_switch')) {
    process.kill(switchPid, 'SIGTERM');
    const until = Date.now() + 5000;
    while (processRunning(switchPid) && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
    if (processRunning(switchPid)) process.kill(switchPid, 'SIGKILL');
  }
  // The boot stamp promised the pid files: with them gone, the next boot runs.
  await rm(join(outDir, runDir), { recursive: true, force: true });
  await rm(socketDir(outDir), { recursive: true, force: true });
  return report;
}
