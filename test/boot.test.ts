// The boot stage with a real QEMU (TCG: no KVM here) and a real vde_switch, booting the
// stand-in appliance (test/fixtures/appliance.ts) in place of FCOS through the test-only
// COREKUBE_STANDIN_* override: nothing else of the boot code changes. The appliance
// reports what FCOS would see: the Ignition bytes on fw_cfg, the image disk by label,
// read-only and matching its MANIFEST.json, the peers over the cluster switch, nothing
// reachable through the user-mode NIC, and a listener behind the SSH port forward.
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { mkdtempSync } from 'node:fs';
import { connect, createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { processRunning, runningQemu, stopCluster, switchPidFile } from '../tasks/boot.ts';
import { runStages, selectStages } from '../tasks/lib/run/engine.ts';
import { sshPort } from '../tasks/lib/node/qemu.ts';
import { stages } from '../tasks/stages.ts';
import { verifyStage } from '../tasks/verify.ts';
import { buildAppliance, consoleLog, readChecks, readDone, standInEnv, type Appliance } from './fixtures/appliance.ts';
import { clusterWorkspace, freePortBlock, loud, runCli, startUpstream, waitFor, workspaceArgs, type Upstream, type Workspace } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-boot-'));
const version = 'v1.35.7';
let up: Upstream;
let appliance: Appliance;
let probe: Server;
let probeConnections = 0;
const workspaces: Workspace[] = [];
// Ports for hostPorts: a block found free when the tests start (the pair: API server and
// two SSH ports; the single node: two more), never a guess.
let portBase = 0;

test.before(loud(async () => {
  portBase = await freePortBlock(7);
  appliance = await buildAppliance();
  up = await startUpstream(work, version);
  // A service on the host's 127.0.0.1 that the nodes' user-mode NIC must not reach.
  probe = createServer((socket) => {
    probeConnections++;
    socket.end('reached\n');
  });
  await new Promise<void>((resolve) => probe.listen({ host: '127.0.0.1', port: 0 }, resolve));
}));

test.after(async () => {
  for (const ws of workspaces) await stopCluster(ws.outDir, { timeoutMs: 0 }).catch(() => undefined);
  await up?.close();
  probe?.close();
  for (const ws of workspaces) rmSync(ws.dir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
});

function workspace(nodes: string[], ports: { apiServer: number; sshBase: number }): Workspace {
  const ws = clusterWorkspace(up, nodes, ports);
  workspaces.push(ws);
  return ws;
}

function standIn(mode: 'poweroff' | 'stay' | 'acpi') {
  Object.assign(process.env, standInEnv(appliance, { probePort: (probe.address() as { port: number }).port, mode }));
}

// boot with what it needs: fetch, images, pki, disk, ignition (fresh ones are skipped).
const boot = (ws: Workspace) => runStages(ws.context({ http: { retries: 1, stallTimeoutMs: 2000, backoffMs: 20 } }), selectStages(stages, ['boot']), { renderer: 'silent' });
const log = (ws: Workspace, node: string) => consoleLog(ws.outDir, node);
const sha256 = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');
const pidOf = (ws: Workspace, node: string) => runningQemu(join(ws.outDir, 'run', `${node}.pid`));

function banner(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: '127.0.0.1', port });
    let text = '';
    socket.setTimeout(10_000, () => socket.destroy(new Error('no banner within 10 s')));
    socket.on('data', (chunk) => (text += chunk.toString()));
    socket.on('end', () => resolve(text));
    socket.on('close', () => resolve(text));
    socket.on('error', reject);
  });
}

function processesOf(ws: Workspace): string[] {
  const found: string[] = [];
  for (const pid of readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
    try {
      const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      if ((cmdline.includes('qemu-system') || cmdline.includes('vde_switch')) && (cmdline.includes(ws.outDir) || cmdline.includes(ws.dir))) found.push(`${pid}: ${cmdline.replace(/\0/g, ' ').slice(0, 120)}`);
    } catch {
      // gone
    }
  }
  return found;
}

/** A process's parent pid (0 when it is gone). */
function parentOf(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
  } catch {
    return 0;
  }
}

function commandOf(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8');
  } catch {
    return '';
  }
}

let pair: Workspace;
// How long a stand-in may take to finish its checks under TCG: minutes on a machine shared
// with other jobs (a hang is what fails, not slowness: 2 stand-ins took 119 s at load 24).
const standInMs = 600_000;

test('two nodes boot on the shared switch: Ignition on fw_cfg, the image disk by label, peers reachable, nothing outside', async () => {
  standIn('stay');
  pair = workspace(['{name: cp1, role: control-plane, ip: 10.77.0.10, memory: 2GiB}', '{name: w1, role: worker, ip: 10.77.0.21, memory: 1GiB}'], { apiServer: portBase, sshBase: portBase + 1 });
  const started = Date.now();
  await boot(pair);
  for (const node of ['cp1', 'w1']) assert.ok(pidOf(pair, node), `${node} runs`);
  await waitFor(() => ['cp1', 'w1'].every((node) => readDone(log(pair, node)) === node), standInMs, 'both stand-ins to finish their checks');
  console.log(`    (2 stand-ins booted and checked in ${((Date.now() - started) / 1000).toFixed(1)} s under TCG)`);
  for (const node of ['cp1', 'w1']) {
    const checks = readChecks(log(pair, node));
    for (const name of ['ignition', 'disk-label', 'disk-ro', 'disk-manifest', 'user-net', 'ssh-listener', 'cluster-net']) {
      assert.ok(checks.get(name)?.ok, `${node}: ${name}: ${checks.get(name)?.detail ?? 'no result line'}\n${log(pair, node).slice(-1500)}`);
    }
    // The exact bytes of out/ignition/NODE.ign arrived on fw_cfg.
    assert.match(checks.get('ignition')!.detail, `sha256=${sha256(join(pair.outDir, 'ignition', `${node}.ign`))}`);
  }
  assert.is(probeConnections, 0, 'no node reached the host through its user-mode NIC');
  // The SSH forward on 127.0.0.1 reaches each node's port 22.
  const config = pair.context().config;
  assert.match(await banner(sshPort(config, config.nodes[0]!)), /COREKUBE-SSH-cp1/);
  assert.match(await banner(sshPort(config, config.nodes[1]!)), /COREKUBE-SSH-w1/);
});

test('a second boot while the nodes run does nothing', async () => {
  const before = [pidOf(pair, 'cp1'), pidOf(pair, 'w1')];
  const report = await boot(pair);
  assert.not.ok(report.ran.includes('boot'), `ran: ${report.ran.join(', ')}`);
  assert.equal([pidOf(pair, 'cp1'), pidOf(pair, 'w1')], before);
});

test('a node that stopped beside running ones boots again alone, from the same build (blank: how a control plane rejoins); never from a newer one', async () => {
  const cp1 = pidOf(pair, 'cp1');
  const w1 = pidOf(pair, 'w1')!;
  process.kill(w1, 'SIGKILL');
  await waitFor(() => !processRunning(w1), 10_000, 'w1 to stop');
  const report = await boot(pair);
  assert.ok(report.ran.includes('boot'), 'a stopped node makes boot run');
  assert.is(pidOf(pair, 'cp1'), cp1, 'cp1 kept running');
  const again = pidOf(pair, 'w1');
  assert.ok(again && again !== w1, 'w1 runs again, a new QEMU');
  await waitFor(() => readDone(log(pair, 'w1')) === 'w1', 180_000, 'w1 to boot again');
  // A newer build (here: its Ignition config changed) never runs beside the older one.
  const file = join(pair.outDir, 'ignition', 'w1.ign');
  const original = readFileSync(file);
  process.kill(again!, 'SIGKILL');
  await waitFor(() => !processRunning(again!), 10_000, 'w1 to stop again');
  try {
    writeFileSync(file, Buffer.concat([original, Buffer.from(' ')]));
    const refused = await runStages(pair.context(), selectStages(stages, ['boot'], true), { renderer: 'silent' }).then(() => undefined, (e: Error) => e);
    assert.ok(refused, 'refused');
    assert.match(refused!.message, /cp1 is still running from an earlier boot \(the build changed for w1\)/);
  } finally {
    writeFileSync(file, original);
  }
  await boot(pair);
  assert.ok(pidOf(pair, 'w1'), 'with its build back as it was, w1 starts again');
});

test('verify on nodes that never become ready fails within its bound, naming what and showing the console tail', async () => {
  process.env.VERIFY_TIMEOUT = '4';
  try {
    await runStages(pair.context(), [verifyStage], { renderer: 'silent' });
    assert.unreachable('verify succeeded without a cluster');
  } catch (error) {
    const message = (error as Error).message;
    assert.match(message, /not ready after 4s \(VERIFY_TIMEOUT\)/);
    assert.match(message, /FAIL API server/);
    assert.match(message, /last lines of cp1's console/);
    assert.match(message, /COREKUBE-/, 'the tail of the real console log');
  } finally {
    delete process.env.VERIFY_TIMEOUT;
  }
});

test('make down: a node that ignores the power button is killed after the timeout; nothing is left behind', async () => {
  const switchPid = Number(readFileSync(join(pair.outDir, switchPidFile), 'utf8'));
  const result = await runCli(['down', ...workspaceArgs(pair)], { env: { DOWN_TIMEOUT: '2' } });
  assert.is(result.code, 0, result.stderr);
  assert.match(result.stdout, /killed cp1, w1 \(still up after 2s\)/);
  assert.equal(processesOf(pair), []);
  assert.not.ok(processRunning(switchPid), 'the switch is gone');
  assert.not.ok(existsSync(join(pair.outDir, 'run')));
  const again = await runCli(['down', ...workspaceArgs(pair)]);
  assert.match(again.stdout, /no node was running/);
});

test('a node that honours the power button powers off cleanly; boot after down boots again', async () => {
  standIn('acpi');
  const single = workspace(['{name: solo, role: control-plane, ip: 10.77.0.10, memory: 2GiB}'], { apiServer: portBase + 5, sshBase: portBase + 6 });
  await boot(single);
  await waitFor(() => readDone(log(single, 'solo')) === 'solo', standInMs, 'the stand-in to finish');
  const clusterNet = readChecks(log(single, 'solo')).get('cluster-net');
  assert.ok(clusterNet?.ok && /addr=10\.77\.0\.10\/24 no peers/.test(clusterNet.detail), clusterNet?.detail);
  const report = await stopCluster(single.outDir, { timeoutMs: 60_000 });
  assert.equal(report, { poweredOff: ['solo'], killed: [] });
  assert.equal(processesOf(single), []);
});

test('a port already taken on 127.0.0.1 stops the boot before anything starts, naming port and field', async () => {
  standIn('poweroff');
  const blocker = createServer();
  await new Promise<void>((resolve) => blocker.listen({ host: '127.0.0.1', port: portBase + 1 }, resolve));
  try {
    const error = await boot(pair).then(() => undefined, (e: Error) => e);
    assert.ok(error, 'refused');
    assert.match(error!.message, new RegExp(`127\\.0\\.0\\.1:${portBase + 1} \\(SSH to cp1, from hostPorts\\.sshBase in .*\\) is already in use`));
    assert.equal(processesOf(pair), []);
  } finally {
    blocker.close();
  }
});

test('make boot: a KVM guest that makes no progress is named in one line and every node boots under TCG; COREKUBE_ACCEL=kvm fails instead', async () => {
  standIn('stay');
  const ws = workspace(['{name: cp1, role: control-plane, ip: 10.77.0.10, memory: 2GiB}', '{name: w1, role: worker, ip: 10.77.0.21, memory: 1GiB}'], { apiServer: portBase + 3, sshBase: portBase + 4 });
  // The test-only stalled probe (its KVM guest never runs) with a verdict cache of its own.
  const env = { COREKUBE_KVM_PROBE: 'stall', XDG_CACHE_HOME: join(ws.dir, 'xdg') };
  // Ctrl-C while the probe runs: its two guests end with make boot, no verdict is kept.
  let cli = 0;
  const interrupted = runCli(['boot', ...workspaceArgs(ws)], { env, onStart: (child) => (cli = child.pid!) });
  const probes = () => readdirSync('/proc').filter((pid) => /^\d+$/.test(pid) && parentOf(Number(pid)) === cli && commandOf(Number(pid)).includes('corekube-kvm-probe')).map(Number);
  await waitFor(() => cli > 0 && probes().length === 2, 60_000, 'the two probe guests');
  const guests = probes();
  process.kill(cli, 'SIGINT');
  assert.is((await interrupted).code, 130);
  for (const pid of guests) assert.not.ok(processRunning(pid), `probe guest ${pid} still runs`);
  assert.not.ok(existsSync(join(ws.dir, 'xdg', 'corekube', 'kvm-verdicts.json')));
  const started = Date.now();
  const result = await runCli(['boot', ...workspaceArgs(ws)], { env });
  console.log(`    (make boot with the stalled probe: ${((Date.now() - started) / 1000).toFixed(1)} s)`);
  assert.is(result.code, 0, result.stderr);
  const lines = result.stderr.split('\n').filter((line) => /KVM|TCG/.test(line));
  assert.is(lines.length, 1, result.stderr);
  assert.match(lines[0]!, /^corekube: KVM does not run guests here: a test guest under KVM printed nothing in \d+\.\d s while the same guest under TCG booted into Linux.*: the nodes run under TCG emulation/);
  for (const node of ['cp1', 'w1']) {
    const pid = pidOf(ws, node);
    assert.ok(pid, `${node} runs`);
    assert.match(readFileSync(`/proc/${pid}/cmdline`, 'utf8'), /accel=tcg/, `${node} under TCG`);
  }
  assert.is((await runCli(['down', ...workspaceArgs(ws)], { env: { DOWN_TIMEOUT: '0' } })).code, 0);
  // Asked for KVM: the cached verdict fails the boot, naming the cause; nothing starts.
  const forced = await runCli(['boot', ...workspaceArgs(ws)], { env: { ...env, COREKUBE_ACCEL: 'kvm' } });
  assert.is(forced.code, 1, forced.stderr);
  assert.match(forced.stderr, /COREKUBE_ACCEL=kvm, but KVM does not run guests here: a test guest under KVM printed nothing .*kept in .*until the host reboots\)\. Unset COREKUBE_ACCEL/);
  assert.equal(processesOf(ws), []);
});

test.run();
