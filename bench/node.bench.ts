// Benchmark of the stand-in node (test/fixtures/standin-node.ts: a Debian root laid out
// like FCOS, the real Ignition in its initramfs, systemd, the distro's real containerd and
// runc from the image disk), booted by the boot stage through the test-only
// COREKUBE_STANDIN_* override, one node (cp1, 2 GiB), under TCG here. Per layout, it times:
//  - from the start of the boot stage call (QEMU started) to the node's report on its
//    console, and from the guest kernel's start to corekube-images done (systemd's monotonic
//    timestamp, which counts from the kernel's start: the firmware's second or so before it
//    is not in it; systemd stops printing status lines once the serial getty is up, so the
//    console has no "Finished" line to time from the host);
//  - the import alone, inside the node: corekube-images' start to its exit (systemd's
//    monotonic timestamps, from the report);
// for the small test layout (one busybox layer shared by every image, as test/node.test.ts)
// and the full fixture layout (about BENCH_IMAGES_MB, default 250, MB: the kubeadm set plus
// flannel, each with an incompressible layer sized like the real image, as
// bench/images.bench.ts). The busybox appliance boot (bench/boot.bench.ts) is the
// comparison. The stand-in node is built first if it is not cached (not timed).
// BENCH_ROUNDS (default 1) rounds per layout. Reports, never pass/fail on a figure.
import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { stopCluster } from '../tasks/boot.ts';
import { runStages, selectStages } from '../tasks/lib/run/engine.ts';
import { stages } from '../tasks/stages.ts';
import { consoleLog } from '../test/fixtures/appliance.ts';
import { startFixtureServer, type FixtureServer } from '../test/fixtures/http-server.ts';
import { startRegistry, type ImageSpec, type RegistryFixture } from '../test/fixtures/registry.ts';
import { buildStandInNode, readNodeReport, standInNodeEnv } from '../test/fixtures/standin-node.ts';
import { buildUpstreamTree } from '../test/fixtures/upstream.ts';
import { fixtureMirrors, lockEntry, makeWorkspace, projectImages, type Workspace } from '../test/helpers.ts';
import { median, realisticImages, seconds } from './measure.ts';

const report = (line: string) => console.log(line);
const rounds = Math.max(1, Number(process.env.BENCH_ROUNDS ?? 1));
const totalMB = Number(process.env.BENCH_IMAGES_MB ?? 250);
const version = 'v1.35.7';
const portBase = 46000 + (process.pid % 1000) * 10;
const load = () => loadavg().map((l) => l.toFixed(2)).join(' ');

const fullSpecs = realisticImages(version, totalMB);

const work = mkdtempSync(join(tmpdir(), 'corekube-bench-node-'));
const servers: { close(): Promise<void> }[] = [];
const workspaces: Workspace[] = [];
let failed = false;
try {
  report(`load average at start: ${load()}`);
  let start = performance.now();
  const node = await buildStandInNode({ log: (m) => console.log(`  (stand-in node: ${m})`) });
  Object.assign(process.env, standInNodeEnv(node));
  const tree = await buildUpstreamTree(join(work, 'upstream'), { qcow2SizeMiB: 1, kubernetesVersion: version, realRuntime: true });
  const server: FixtureServer = await startFixtureServer({ root: join(work, 'upstream') });
  servers.push(server);
  console.log(`  (setup: stand-in node ${node.kernelRelease}${node.builtSeconds ? `, built in ${node.builtSeconds.toFixed(0)} s` : ' from the cache'}, upstream tree in ${seconds(start).toFixed(1)} s)`);

  const layouts: { label: string; specs: ImageSpec[] | ReturnType<typeof projectImages> }[] = [
    { label: 'test layout (one shared busybox layer)', specs: projectImages(version) },
    { label: `full fixture layout (~${totalMB} MB)`, specs: fullSpecs },
  ];
  let round = 0;
  for (const layout of layouts) {
    const registry: RegistryFixture = await startRegistry({ images: layout.specs, work: mkdtempSync(join(work, 'registry-')) });
    servers.push(registry);
    const toImages: number[] = [];
    const toReport: number[] = [];
    const imports: number[] = [];
    const ctrCalls: number[] = [];
    let names = 0;
    let layoutMB = 0;
    for (let r = 0; r < rounds; r++) {
      const ws = makeWorkspace(tree, server.url, {
        nodes: ['{name: cp1, role: control-plane, ip: 10.77.0.10, memory: 2GiB}'],
        registries: fixtureMirrors(registry.host),
        images: registry.images.map((i) => lockEntry(i)),
        extraConfig: [`hostPorts: {apiServer: ${portBase + round * 2}, sshBase: ${portBase + round * 2 + 1}}`],
      });
      round++;
      workspaces.push(ws);
      writeFileSync(join(ws.dir, 'id.pub'), 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGNvcmVrdWJldGVzdGtleQ bench@corekube\n');
      const context = () => ws.context({ http: { retries: 1, stallTimeoutMs: 5000, backoffMs: 20 } });
      await runStages(context(), selectStages(stages, ['disk', 'ignition']), { renderer: 'silent' });
      layoutMB = statSync(join(ws.outDir, 'image-disk.img')).size / 1e6;
      start = performance.now();
      await runStages(context(), selectStages(stages, ['boot']), { renderer: 'silent' });
      const deadline = Date.now() + 20 * 60_000;
      for (;;) {
        const text = consoleLog(ws.outDir, 'cp1');
        const nodeReport = readNodeReport(text);
        if (nodeReport.initrd.some((l) => l.startsWith('fail '))) throw new Error(`cp1: the initramfs failed:\n${text.slice(-3000)}`);
        if (nodeReport.done) {
          const images = nodeReport.units.get('corekube-images.service') ?? {};
          if (images.Result !== 'success') throw new Error(`cp1: corekube-images ${JSON.stringify(images)}\n${text.slice(-3000)}`);
          toReport.push(seconds(start));
          toImages.push(Number(images.ExecMainExitTimestampMonotonic) / 1e6);
          imports.push((Number(images.ExecMainExitTimestampMonotonic) - Number(images.InactiveExitTimestampMonotonic)) / 1e6);
          ctrCalls.push(Number(nodeReport.lines.get('ctr-call-seconds')?.[0] ?? NaN));
          names = Number(nodeReport.lines.get('images-count')?.[0] ?? NaN);
          break;
        }
        if (Date.now() > deadline) throw new Error(`cp1: no report within 20 min:\n${text.slice(-3000)}`);
        await new Promise((r) => setTimeout(r, 250));
      }
      await stopCluster(ws.outDir, { timeoutMs: 0 });
    }
    report(
      `${layout.label}, image disk ${layoutMB.toFixed(0)} MB: kernel start → corekube-images done ${median(toImages).toFixed(0)} s; ` +
        `QEMU start → the node's report ${median(toReport).toFixed(0)} s; the import alone (inside the node) ${median(imports).toFixed(1)} s` +
        `${rounds > 1 ? ` (median of ${rounds})` : ''}; one ctr process there takes ${median(ctrCalls).toFixed(1)} s, and ` +
        `import-images.sh runs one per image name to label it (${names} names, the CRI plugin's image IDs included)`,
    );
    await registry.close();
    servers.splice(servers.indexOf(registry), 1);
  }
  report(`load average at end: ${load()}`);
} catch (error) {
  failed = true;
  console.error(error);
} finally {
  for (const ws of workspaces) await stopCluster(ws.outDir, { timeoutMs: 0 }).catch(() => undefined);
  for (const s of servers) await s.close().catch(() => undefined);
  for (const ws of workspaces) rmSync(ws.dir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
