// Benchmarks for the ignition stage (issue: pki and ignition), on a 3-node cluster (cp1
// control plane 10.77.0.10, workers w1 and w2, as test/ignition.test.ts), with the real
// CLI in a child process as `make` runs it, the real openssl and ignition-validate (when
// installed) and butane from $BUTANE/PATH or else the built-in translator. Only what
// ignition needs is built: pki and ignition (no fetch, images or disk); the lock's image
// digests come from the fixture registry seeded with the project's images. Reports, never
// pass/fail on a figure; exits non-zero when something actually fails:
//  1. a no-op `node tasks/cli.ts ignition` with everything fresh (and the same through
//     `make ignition`);
//  2. after one file of fcc/ changed (a comment line appended to worker.bu in a copy of
//     the project), the CLI run that recompiles every node (target: under 1.5 s for 3
//     nodes); checked from the CLI output and the stamps that only ignition reran, pki
//     stayed fresh and nothing else was built.
// BENCH_ROUNDS (default 5) runs of each figure, median reported.
import { execFile } from 'node:child_process';
import { appendFileSync, cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { runStages, type Stamp } from '../tasks/lib/run/engine.ts';
import { ignitionStage } from '../tasks/ignition.ts';
import { pkiStage } from '../tasks/pki.ts';
import { stages } from '../tasks/stages.ts';
import { findOnPath } from '../tasks/lib/run/tools.ts';
import { startRegistry } from '../test/fixtures/registry.ts';
import { buildUpstreamTree } from '../test/fixtures/upstream.ts';
import { cliPath, fixtureMirrors, lockEntry, makeWorkspace, projectImages, projectRoot, workspaceArgs, type Workspace } from '../test/helpers.ts';
import { median, seconds } from './measure.ts';

const range = (values: number[]) => `${Math.min(...values).toFixed(3)}–${Math.max(...values).toFixed(3)}`;
const run = promisify(execFile);
const cliEnv = { ...process.env, CI: 'true' };
const rounds = Math.max(1, Number(process.env.BENCH_ROUNDS ?? 5));
const version = 'v1.35.7';
const nodes = [
  '{name: cp1, role: control-plane, ip: 10.77.0.10}',
  '{name: w1, role: worker, ip: 10.77.0.21, memory: 2GiB}',
  '{name: w2, role: worker, ip: 10.77.0.22, memory: 2GiB}',
];
const nodeNames = ['cp1', 'w1', 'w2'];

const work = mkdtempSync(join(tmpdir(), 'corekube-bench-ignition-'));
let ws: Workspace | undefined;
try {
  // ---- setup: a lock with real digests for every image the project needs
  let start = performance.now();
  const tree = await buildUpstreamTree(join(work, 'upstream'), { qcow2SizeMiB: 1, kubernetesVersion: version });
  const registry = await startRegistry({ images: projectImages(version), work });
  const images = registry.images.map((i) => lockEntry(i));
  const host = registry.host;
  await registry.close(); // pki and ignition never talk to a registry
  // Nothing listens on the mirrors: a stage that tried to fetch would fail loudly.
  const workspace = makeWorkspace(tree, 'http://127.0.0.1:9', { nodes, registries: fixtureMirrors(host), images });
  ws = workspace;

  // A copy of the project (the CLI takes its root from where tasks/cli.ts is): its own
  // fcc/ to edit, the same code, manifests and node_modules.
  const copy = join(work, 'project');
  mkdirSync(copy);
  for (const dir of ['tasks', 'fcc', 'manifests']) cpSync(join(projectRoot, dir), join(copy, dir), { recursive: true });
  cpSync(join(projectRoot, 'package.json'), join(copy, 'package.json'));
  symlinkSync(join(projectRoot, 'node_modules'), join(copy, 'node_modules'), 'dir');
  const copyCli = join(copy, 'tasks', 'cli.ts');
  const workerBu = join(copy, 'fcc', 'worker.bu');

  const cli = async (script: string, args: string[]) => {
    const begin = performance.now();
    const result = await run(process.execPath, [script, ...workspaceArgs(workspace), ...args], { env: cliEnv, maxBuffer: 1 << 24 });
    return { ...result, seconds: seconds(begin) };
  };
  const stamp = (stage: string): Stamp | undefined => {
    const file = join(workspace.outDir, '.stamps', `${stage}.json`);
    return existsSync(file) ? (JSON.parse(readFileSync(file, 'utf8')) as Stamp) : undefined;
  };
  const stampTimes = () => Object.fromEntries(stages.map((s) => [s.name, stamp(s.name)?.finishedAt]));

  const first = await cli(cliPath, ['ignition']);
  const built = stampTimes();
  const otherStages = stages.map((s) => s.name).filter((n) => n !== 'pki' && n !== 'ignition');
  if (!built.pki || !built.ignition) throw new Error(`the first build left no pki/ignition stamp:\n${first.stdout}${first.stderr}`);
  for (const name of otherStages) if (built[name]) throw new Error(`the first ignition build also built ${name}`);
  for (const node of nodeNames) {
    if (!existsSync(join(workspace.outDir, 'ignition', `${node}.ign`))) throw new Error(`no out/ignition/${node}.ign after the first build`);
  }
  const compiler = stamp('ignition')!.inputs.butane ?? '(not recorded)';
  const validator = findOnPath('ignition-validate') ? 'ignition-validate on every node' : 'ignition-validate not installed: no validation';
  console.log(
    `(setup: fixture tree, ${images.length} images seeded for the lock, project copied, first pki + ignition build ` +
      `${first.seconds.toFixed(2)} s in ${seconds(start).toFixed(1)} s; compiler: ${compiler}; ${validator})`,
  );

  // ---- 1. no-op, everything fresh
  const noopCli: number[] = [];
  const noopMake: number[] = [];
  for (let i = 0; i < rounds; i++) {
    const result = await cli(cliPath, ['ignition']);
    noopCli.push(result.seconds);
    if (!result.stdout.includes('pki, ignition: fresh, nothing to do')) throw new Error(`round ${i + 1}: not a no-op:\n${result.stdout}${result.stderr}`);
    start = performance.now();
    const make = await run('make', ['-s', '-C', projectRoot, 'ignition', `CONFIG=${workspace.configFile}`, `LOCK=${workspace.lockFile}`], {
      env: { ...cliEnv, OUT_DIR: workspace.outDir, CACHE_DIR: workspace.cacheDir },
    });
    noopMake.push(seconds(start));
    if (!make.stdout.includes('fresh, nothing to do')) throw new Error(`round ${i + 1}: make ignition was not a no-op:\n${make.stdout}${make.stderr}`);
  }
  if (JSON.stringify(stampTimes()) !== JSON.stringify(built)) throw new Error('a no-op run rewrote a stamp');
  start = performance.now();
  for (let i = 0; i < rounds; i++) await run(process.execPath, ['-e', '0']);
  const bareNode = seconds(start) / rounds;
  console.log(
    `1. no-op, 3 nodes fresh: node tasks/cli.ts ignition median ${median(noopCli).toFixed(3)} s (${range(noopCli)}), ` +
      `make ignition median ${median(noopMake).toFixed(3)} s (${range(noopMake)}); bare \`node -e 0\` ${bareNode.toFixed(3)} s; median of ${rounds}`,
  );

  // ---- 2. one fcc/ file changed: only ignition reruns
  const copyNoop = await cli(copyCli, ['ignition']);
  if (!copyNoop.stdout.includes('fresh, nothing to do')) throw new Error(`the copied project does not see the build as fresh:\n${copyNoop.stdout}${copyNoop.stderr}`);
  const rerun: number[] = [];
  const stageSeconds: number[] = [];
  for (let i = 0; i < rounds; i++) {
    const before = stampTimes();
    const digestBefore = stamp('ignition')!.inputs['fcc/worker.bu'];
    const workerBefore = readFileSync(join(workspace.outDir, 'ignition', 'w1.ign'), 'utf8');
    appendFileSync(workerBu, `# bench edit ${i + 1} ${Date.now()}\n`);
    const result = await cli(copyCli, ['ignition']);
    rerun.push(result.seconds);
    const after = stampTimes();
    const output = `${result.stdout}${result.stderr}`;
    const problems: string[] = [];
    if (after.ignition === before.ignition) problems.push('the ignition stamp was not rewritten');
    if (after.pki !== before.pki) problems.push('the pki stamp changed: pki reran');
    for (const name of otherStages) if (after[name] !== undefined) problems.push(`${name} was built`);
    if (!output.includes(`${pkiStage.title}: fresh`) || output.includes(`✔ ${pkiStage.title}`)) problems.push('the output does not say pki was fresh');
    if (!output.includes(`✔ ${ignitionStage.title}`)) problems.push('the output does not say ignition ran');
    for (const stage of stages) {
      if (stage.name !== 'pki' && stage.name !== 'ignition' && output.includes(stage.title)) problems.push(`the output mentions ${stage.name}`);
    }
    if (output.includes('nothing to do')) problems.push('the CLI says nothing was done');
    // The edit is a Butane comment: the configs are the same, but rewritten (a fresh mtime).
    if (readFileSync(join(workspace.outDir, 'ignition', 'w1.ign'), 'utf8') !== workerBefore) problems.push('a comment changed w1.ign');
    const digestAfter = stamp('ignition')!.inputs['fcc/worker.bu'];
    if (!digestAfter || digestAfter === digestBefore) problems.push('the ignition stamp does not record the new fcc/worker.bu');
    if (problems.length > 0) throw new Error(`round ${i + 1}: ${problems.join('; ')}\n--- CLI output:\n${output}`);
    stageSeconds.push(stamp('ignition')!.seconds);
    if (i === 0) console.log(`   (CLI output of the first rerun: ${result.stdout.trim().split('\n').map((l) => l.trim()).filter(Boolean).join(' | ')})`);
  }
  // The same rerun in this process (no node start-up, modules already loaded): the root override.
  const inProcess: number[] = [];
  for (let i = 0; i < rounds; i++) {
    appendFileSync(workerBu, `# bench in-process edit ${i + 1} ${Date.now()}\n`);
    start = performance.now();
    const report = await runStages(workspace.context({ root: copy }), [pkiStage, ignitionStage], { renderer: 'silent' });
    inProcess.push(seconds(start));
    if (report.ran.join() !== 'ignition' || report.fresh.join() !== 'pki') throw new Error(`in-process round ${i + 1}: ran ${report.ran}, fresh ${report.fresh}`);
  }
  console.log(
    `2. fcc/worker.bu changed, 3 nodes recompiled: node tasks/cli.ts ignition median ${median(rerun).toFixed(3)} s (${range(rerun)}; target < 1.5 s), ` +
      `of which the ignition stage itself ${median(stageSeconds).toFixed(3)} s (stamp); in-process runStages ${median(inProcess).toFixed(3)} s; ` +
      `only ignition reran every round (pki fresh, stamp untouched; no fetch/images/disk/boot/verify stamp); median of ${rounds}`,
  );
  const files = readdirSync(join(workspace.outDir, 'ignition')).filter((f) => f.endsWith('.ign')).sort();
  if (files.join() !== nodeNames.map((n) => `${n}.ign`).join()) throw new Error(`out/ignition holds ${files.join(', ')}`);
} finally {
  if (ws) rmSync(ws.dir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
}
