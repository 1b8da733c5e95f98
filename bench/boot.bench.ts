// Benchmark of the boot stage (issue: boot): the wall time of booting the stand-in
// appliance (test/fixtures/appliance.ts, through the test-only COREKUBE_STANDIN_* override)
// for a 1-node cluster (cp1, 2 GiB) and a 3-node cluster (cp1 control plane 2 GiB, w1 and
// w2 workers 1 GiB), with the real QEMU and vde_switch, as test/boot.test.ts builds them.
// Everything boot needs (fetch, images, pki, disk, ignition) is built before timing; each
// round then times, from the start of the boot stage call:
//  - the boot stage call alone (every QEMU process started, the switch up);
//  - until every node's console log holds its result line (COREKUBE-DONE <node>);
//  - until every QEMU process exited (corekube.mode=poweroff: each node waits for its
//    peers to be done, then powers off by itself).
// Reports whether KVM or TCG ran the nodes (the boot stage warns on stderr when TCG).
// BENCH_ROUNDS (default 3) rounds per cluster size, median reported (with the range).
// Reports, never pass/fail on a figure; exits non-zero when something actually fails.
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { processRunning, runningQemu, stopCluster } from '../tasks/boot.ts';
import { runStages, selectStages } from '../tasks/lib/run/engine.ts';
import { stages } from '../tasks/stages.ts';
import { buildAppliance, consoleLog, readDone, standInEnv } from '../test/fixtures/appliance.ts';
import { startFixtureServer, type FixtureServer } from '../test/fixtures/http-server.ts';
import { startRegistry, type RegistryFixture } from '../test/fixtures/registry.ts';
import { buildUpstreamTree } from '../test/fixtures/upstream.ts';
import { fixtureMirrors, lockEntry, makeWorkspace, projectImages, waitFor, type Workspace } from '../test/helpers.ts';
import { median, seconds } from './measure.ts';

const report = (line: string) => console.log(line);
const range = (values: number[]) => `${Math.min(...values).toFixed(1)}–${Math.max(...values).toFixed(1)}`;
const load = () => loadavg().map((l) => l.toFixed(2)).join(' ');
const rounds = Math.max(1, Number(process.env.BENCH_ROUNDS ?? 3));
const version = 'v1.35.7';
// 30000+, away from the tests (20000 + (pid % 2000) * 10, plus 0..6): here plus 7 and 8, the 3-node cluster at 40000+.
const portBase = 30000 + (process.pid % 1000) * 10 + 7;

const clusters: { label: string; nodes: string[]; names: string[]; ports: { apiServer: number; sshBase: number } }[] = [
  { label: '1 node', nodes: ['{name: cp1, role: control-plane, ip: 10.77.0.10, memory: 2GiB}'], names: ['cp1'], ports: { apiServer: portBase, sshBase: portBase + 1 } },
  {
    label: '3 nodes',
    nodes: [
      '{name: cp1, role: control-plane, ip: 10.77.0.10, memory: 2GiB}',
      '{name: w1, role: worker, ip: 10.77.0.21, memory: 1GiB}',
      '{name: w2, role: worker, ip: 10.77.0.22, memory: 1GiB}',
    ],
    names: ['cp1', 'w1', 'w2'],
    ports: { apiServer: portBase + 10000, sshBase: portBase + 10001 },
  },
];

const work = mkdtempSync(join(tmpdir(), 'corekube-bench-boot-'));
let server: FixtureServer | undefined;
let registry: RegistryFixture | undefined;
let probe: Server | undefined;
const workspaces: Workspace[] = [];
let failed = false;
try {
  report(`load average at start: ${load()}`);
  let start = performance.now();
  const appliance = await buildAppliance();
  const tree = await buildUpstreamTree(join(work, 'upstream'), { qcow2SizeMiB: 1, kubernetesVersion: version });
  server = await startFixtureServer({ root: join(work, 'upstream') });
  registry = await startRegistry({ images: projectImages(version), work });
  // A host service the nodes' user-mode NIC must not reach (the appliance checks it, as in the tests).
  const listener = createServer((socket) => socket.end('reached\n'));
  probe = listener;
  await new Promise<void>((resolve) => listener.listen({ host: '127.0.0.1', port: 0 }, resolve));
  Object.assign(process.env, standInEnv(appliance, { probePort: (listener.address() as { port: number }).port, mode: 'poweroff' }));
  const images = registry.images.map((i) => lockEntry(i));
  console.log(`  (setup: appliance ${appliance.kernelRelease}, upstream tree, fixture registry in ${seconds(start).toFixed(1)} s)`);

  // The boot stage writes its TCG warning on stderr: keep it (and pass it through).
  let stderrText = '';
  const writeStderr = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string | Uint8Array, ...rest: unknown[]) => {
    stderrText += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString();
    return (writeStderr as (...args: unknown[]) => boolean)(chunk, ...rest);
  }) as typeof process.stderr.write;

  const accelerators = new Set<string>();
  for (const cluster of clusters) {
    const ws = makeWorkspace(tree, server.url, {
      nodes: cluster.nodes,
      registries: fixtureMirrors(registry.host),
      images,
      extraConfig: [`hostPorts: {apiServer: ${cluster.ports.apiServer}, sshBase: ${cluster.ports.sshBase}}`],
    });
    workspaces.push(ws);
    const context = () => ws.context({ http: { retries: 1, stallTimeoutMs: 2000, backoffMs: 20 } });
    // Everything boot needs, untimed.
    start = performance.now();
    const prepared = await runStages(context(), selectStages(stages, ['boot']).filter((s) => s.name !== 'boot'), { renderer: 'silent' });
    console.log(`  (${cluster.label}: built ${prepared.ran.join(', ')} in ${seconds(start).toFixed(1)} s, untimed)`);

    const stageTimes: number[] = [];
    const doneTimes: number[] = [];
    const exitTimes: number[] = [];
    for (let round = 0; round < rounds; round++) {
      stderrText = '';
      try {
        start = performance.now();
        const ran = await runStages(context(), selectStages(stages, ['boot']), { renderer: 'silent' });
        const stageTime = seconds(start);
        if (ran.ran.join(',') !== 'boot') throw new Error(`expected only boot to run, ran: ${ran.ran.join(', ')}`);
        const pids = cluster.names.map((node) => {
          const pid = runningQemu(join(ws.outDir, 'run', `${node}.pid`));
          if (!pid) throw new Error(`${node}: no QEMU running right after the boot stage`);
          return pid;
        });
        await waitFor(() => cluster.names.every((node) => readDone(consoleLog(ws.outDir, node)) === node), 600_000, `COREKUBE-DONE from ${cluster.names.join(', ')}`);
        const doneTime = seconds(start);
        await waitFor(() => pids.every((pid) => !processRunning(pid)), 300_000, 'every QEMU to power off');
        const exitTime = seconds(start);
        stageTimes.push(stageTime);
        doneTimes.push(doneTime);
        exitTimes.push(exitTime);
        accelerators.add(/TCG/.test(stderrText) ? 'TCG' : 'KVM');
        console.log(`  (${cluster.label} round ${round + 1}: boot stage ${stageTime.toFixed(2)} s, all DONE ${doneTime.toFixed(1)} s, all QEMU exited ${exitTime.toFixed(1)} s; load ${load()})`);
      } finally {
        await stopCluster(ws.outDir, { timeoutMs: 0 });
      }
    }
    report(
      `boot ${cluster.label} (stand-in, ${[...accelerators].join('/')}): median of ${rounds}: boot stage call ${median(stageTimes).toFixed(2)} s (${range(stageTimes)}), ` +
        `until COREKUBE-DONE on every node ${median(doneTimes).toFixed(1)} s (${range(doneTimes)}), until every QEMU exited ${median(exitTimes).toFixed(1)} s (${range(exitTimes)})`,
    );
  }
  process.stderr.write = writeStderr as typeof process.stderr.write;
  report(`accelerator: ${[...accelerators].join(', ') || 'none (nothing booted)'}${accelerators.has('TCG') ? ' (the boot stage warned: TCG emulation)' : ''}`);
  report(`load average at end: ${load()}`);
} catch (error) {
  failed = true;
  console.error('boot bench failed:', error);
} finally {
  for (const ws of workspaces) await stopCluster(ws.outDir, { timeoutMs: 0 }).catch(() => undefined);
  await server?.close();
  await registry?.close();
  probe?.close();
  for (const ws of workspaces) rmSync(ws.dir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
