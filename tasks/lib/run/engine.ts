// The engine: composes stages into a listr2 graph (independent stages run concurrently,
// each waits for what it needs), decides freshness from a stamp of input digests, and
// keeps out/ consistent: one run at a time, a stamp only after a stage succeeded.
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { processAlive } from '../store/cache.ts';
import { ExitCode, InterruptedError, isAbortError, UserError } from '../errors.ts';
import { listrRenderer, type Renderer } from './progress.ts';
import { RunContext, type RunSettings, type Stage } from './stage.ts';
import { MissingToolsError, missingTools } from './tools.ts';

export interface OutputRecord {
  sha256: string;
  /** size:mtime:inode of each file, to notice an output changed behind our back. */
  identity: string;
}

export interface Stamp {
  stage: string;
  inputs: Record<string, string>;
  outputs: Record<string, OutputRecord>;
  finishedAt: string;
  seconds: number;
}

export type Verdict = { action: 'run'; reasons: string[] } | { action: 'fresh'; since: string };

export interface PlanEntry {
  stage: Stage;
  verdict: Verdict;
}

export interface RunOptions {
  dryRun?: boolean;
  renderer?: Renderer;
  /** Run only the named stages, not what they need (their outputs must exist). */
  only?: boolean;
}

export interface RunReport {
  ran: string[];
  fresh: string[];
  failed: string[];
  plan?: PlanEntry[];
}

/** The named stages and, unless `only`, everything they need, in registry order. */
export function selectStages(all: readonly Stage[], names: readonly string[], only = false): Stage[] {
  const byName = new Map(all.map((s) => [s.name, s]));
  for (const name of names) {
    if (!byName.has(name)) {
      throw new UserError(`unknown task "${name}": the tasks are ${all.map((s) => s.name).join(', ')}`, ExitCode.usage);
    }
  }
  const wanted = new Set<string>();
  const visit = (name: string): void => {
    if (wanted.has(name)) return;
    wanted.add(name);
    if (!only) for (const need of byName.get(name)!.needs) visit(need);
  };
  names.forEach(visit);
  return all.filter((s) => wanted.has(s.name));
}

function stampPath(settings: RunSettings, stage: string): string {
  return join(settings.outDir, '.stamps', `${stage}.json`);
}

export async function readStamp(settings: RunSettings, stage: string): Promise<Stamp | undefined> {
  try {
    return JSON.parse(await readFile(stampPath(settings, stage), 'utf8')) as Stamp;
  } catch {
    return undefined;
  }
}

/** The digest a dependent stage sees of this stage's outputs. */
export function outputsDigest(stamp: Stamp): string {
  const hash = createHash('sha256');
  for (const [path, record] of Object.entries(stamp.outputs).sort(([a], [b]) => a.localeCompare(b))) {
    hash.update(`${path}\0${record.sha256}\n`);
  }
  return hash.digest('hex');
}

async function stageInputs(ctx: RunContext, stage: Stage): Promise<Record<string, string>> {
  const inputs = { ...(await stage.inputs(ctx)) };
  for (const need of stage.needs) {
    const stamp = await readStamp(ctx.settings, need);
    inputs[`task:${need}`] = stamp ? outputsDigest(stamp) : '(not built)';
  }
  return inputs;
}

/** Why a stage must run, or since when it is fresh. Pure over its arguments. */
export function judge(
  stamp: Stamp | undefined,
  inputs: Record<string, string>,
  outputIdentities: Record<string, string | undefined>,
  force: boolean,
): Verdict {
  if (force) return { action: 'run', reasons: ['--force'] };
  if (!stamp) return { action: 'run', reasons: ['never built (no stamp)'] };
  const reasons: string[] = [];
  const keys = new Set([...Object.keys(stamp.inputs), ...Object.keys(inputs)]);
  for (const key of [...keys].sort()) {
    const before = stamp.inputs[key];
    const now = inputs[key];
    if (before === now) continue;
    if (before === undefined) reasons.push(`new input ${key}`);
    else if (now === undefined) reasons.push(`input ${key} removed`);
    else reasons.push(`input ${key} changed: ${short(before)} → ${short(now)}`);
  }
  for (const [path, identity] of Object.entries(outputIdentities)) {
    if (identity === undefined) reasons.push(`output ${path} is missing`);
    else if (stamp.outputs[path]?.identity !== identity) reasons.push(`output ${path} was changed outside corekube`);
  }
  return reasons.length > 0 ? { action: 'run', reasons } : { action: 'fresh', since: stamp.finishedAt };
}

function short(value: string): string {
  return value.replace(/\b([0-9a-f]{12})[0-9a-f]{52}\b/g, '$1…');
}

async function decide(ctx: RunContext, stage: Stage): Promise<Verdict> {
  const [stamp, inputs] = await Promise.all([readStamp(ctx.settings, stage.name), stageInputs(ctx, stage)]);
  const identities: Record<string, string | undefined> = {};
  for (const path of stage.outputs(ctx)) identities[path] = await identity(join(ctx.settings.outDir, path));
  const verdict = judge(stamp, inputs, identities, ctx.settings.force);
  const expiring = verdict.action === 'fresh' ? stage.expired?.(ctx, new Date()) : undefined;
  return expiring ? { action: 'run', reasons: [expiring] } : verdict;
}

/** size:mtime:inode of a file, or of every file below a directory; undefined when missing. */
export async function identity(path: string): Promise<string | undefined> {
  let info;
  try {
    info = await stat(path);
  } catch {
    return undefined;
  }
  if (!info.isDirectory()) return `${info.size}:${Math.trunc(info.mtimeMs)}:${info.ino}`;
  const hash = createHash('sha256');
  for await (const full of filesUnder(path)) {
    const s = await stat(full);
    hash.update(`${relative(path, full)}\0${s.size}:${Math.trunc(s.mtimeMs)}:${s.ino}\n`);
  }
  return `tree:${hash.digest('hex')}`;
}

/** Every file below a directory, depth first, in name order (so digests of trees are stable). */
async function* filesUnder(dir: string): AsyncGenerator<string> {
  const entries = (await readdir(dir, { withFileTypes: true })).sort((a, b) => a.name.localeCompare(b.name));
  for (const entry of entries) {
    const full = join(dir, entry.name);
    if (entry.isDirectory()) yield* filesUnder(full);
    else yield full;
  }
}

export async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 })) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

export async function treeSha256(path: string): Promise<string> {
  const info = await stat(path);
  if (!info.isDirectory()) return sha256File(path);
  const hash = createHash('sha256');
  for await (const full of filesUnder(path)) hash.update(`${relative(path, full)}\0${await sha256File(full)}\n`);
  return hash.digest('hex');
}

async function writeStamp(ctx: RunContext, stage: Stage, inputs: Record<string, string>, known: Record<string, string>, seconds: number) {
  const outputs: Record<string, OutputRecord> = {};
  for (const path of stage.outputs(ctx)) {
    const full = join(ctx.settings.outDir, path);
    const id = await identity(full);
    if (id === undefined) throw new Error(`${stage.name} finished without writing its output ${path}`);
    outputs[path] = { sha256: known[path] ?? (await treeSha256(full)), identity: id };
  }
  const stamp: Stamp = { stage: stage.name, inputs, outputs, finishedAt: new Date().toISOString(), seconds };
  await writeAtomically(stampPath(ctx.settings, stage.name), `${JSON.stringify(stamp, null, 2)}\n`);
}

export async function writeAtomically(path: string, text: string, mode = 0o644): Promise<void> {
  await mkdir(join(path, '..'), { recursive: true });
  const tmp = `${path}.tmp-${process.pid}`;
  await writeFile(tmp, text, { mode });
  await rename(tmp, path);
}

/** out/manifest.json: what every stage made from what (coreos-assembler's meta.json, for the whole tree). */
async function writeManifest(ctx: RunContext, stages: readonly Stage[]): Promise<void> {
  const entries: Record<string, Stamp> = {};
  for (const stage of stages) {
    const stamp = await readStamp(ctx.settings, stage.name);
    if (stamp) entries[stage.name] = stamp;
  }
  if (Object.keys(entries).length === 0) return;
  await writeAtomically(
    join(ctx.settings.outDir, 'manifest.json'),
    `${JSON.stringify({ generator: 'corekube', stages: entries }, null, 2)}\n`,
  );
}

/** The plan: what would run and why. Stages after one that runs are judged "after" it. */
export async function plan(ctx: RunContext, stages: readonly Stage[]): Promise<PlanEntry[]> {
  const entries: PlanEntry[] = [];
  const willRun = new Set<string>();
  for (const stage of stages) {
    let verdict = await decide(ctx, stage);
    const upstream = stage.needs.filter((n) => willRun.has(n));
    if (upstream.length > 0 && verdict.action === 'fresh') {
      verdict = { action: 'run', reasons: upstream.map((n) => `needs ${n}, which runs first (reruns only if ${n}'s outputs change)`) };
    }
    if (verdict.action === 'run') willRun.add(stage.name);
    entries.push({ stage, verdict });
  }
  return entries;
}

export function formatPlan(entries: readonly PlanEntry[]): string {
  return entries
    .map(({ stage, verdict }) =>
      verdict.action === 'fresh'
        ? `${stage.name}: fresh (inputs unchanged since ${verdict.since})`
        : `${stage.name}: would run\n${verdict.reasons.map((r) => `  - ${r}`).join('\n')}`,
    )
    .join('\n');
}

interface RunLock {
  release(): Promise<void>;
}

/** One run per tree: a second concurrent run is refused with who holds the tree, never interleaved. */
export async function acquireRunLock(settings: RunSettings, what: string): Promise<RunLock> {
  await mkdir(settings.outDir, { recursive: true });
  const path = join(settings.outDir, '.corekube.lock');
  const mine = JSON.stringify({ pid: process.pid, tasks: what, startedAt: new Date().toISOString() });
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      await writeFile(path, mine, { flag: 'wx' });
      return { release: () => rm(path, { force: true }) };
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
    }
    let holder: { pid?: number; tasks?: string; startedAt?: string } = {};
    try {
      holder = JSON.parse(await readFile(path, 'utf8'));
    } catch {
      // being written right now, or garbage: judge by the pid below
    }
    if (holder.pid && processAlive(holder.pid)) {
      throw new UserError(
        `another corekube run (pid ${holder.pid}, tasks: ${holder.tasks ?? '?'}, started ${holder.startedAt ?? '?'}) ` +
          `is working in ${settings.outDir}. Wait for it to finish, or stop it (kill ${holder.pid}), then run again.`,
        ExitCode.locked,
      );
    }
    // The holder is gone (killed, crashed): its lock is stale.
    await rm(path, { force: true });
  }
  throw new UserError(`could not take the run lock ${path}; another run is starting at the same moment`, ExitCode.locked);
}

/** Runs the stages (after a preflight of their tools), or with dryRun prints the plan. */
export async function runStages(ctx: RunContext, stages: readonly Stage[], options: RunOptions = {}): Promise<RunReport> {
  const entries = await plan(ctx, stages);
  if (options.dryRun) {
    return {
      ran: [],
      fresh: entries.filter((e) => e.verdict.action === 'fresh').map((e) => e.stage.name),
      failed: [],
      plan: entries,
    };
  }
  const toRun = entries.filter((e) => e.verdict.action === 'run');
  const missing = missingTools(toRun.flatMap((e) => e.stage.tools));
  if (missing.length > 0) throw new MissingToolsError(missing, `${toRun.map((e) => e.stage.name).join(', ')}`);
  if (toRun.length === 0) {
    return { ran: [], fresh: entries.map((e) => e.stage.name), failed: [], plan: entries };
  }

  // listr2 loads only when something runs: a no-op run ends above.
  const { Listr } = await import('listr2');
  const lock = await acquireRunLock(ctx.settings, stages.map((s) => s.name).join(' '));
  const report: RunReport = { ran: [], fresh: [], failed: [], plan: entries };
  const errors: unknown[] = [];
  try {
    const finished = new Map<string, Promise<boolean>>();
    const settle = new Map<string, (ok: boolean) => void>();
    for (const stage of stages) finished.set(stage.name, new Promise((resolve) => settle.set(stage.name, resolve)));
    const { renderer, fallback } = listrRenderer(options.renderer ?? 'auto');
    const listr = new Listr(
      stages.map((stage) => ({
        title: stage.title,
        task: async (_: unknown, task: Parameters<Stage['run']>[1]) => {
          let ok = false;
          try {
            const needs = stage.needs.filter((n) => finished.has(n));
            const results = await Promise.all(needs.map((n) => finished.get(n)!));
            if (results.some((r) => !r)) {
              task.skip(`${stage.title}: skipped, because ${needs.filter((_, i) => !results[i]).join(', ')} failed`);
              return;
            }
            ctx.signal.throwIfAborted();
            const verdict = await decide(ctx, stage);
            if (verdict.action === 'fresh') {
              report.fresh.push(stage.name);
              task.skip(`${stage.title}: fresh`);
              ok = true;
              return;
            }
            const inputs = await stageInputs(ctx, stage);
            const started = performance.now();
            const known = (await stage.run(ctx, task)) ?? {};
            ctx.signal.throwIfAborted();
            await writeStamp(ctx, stage, inputs, known, Math.round(performance.now() - started) / 1000);
            report.ran.push(stage.name);
            ok = true;
          } catch (error) {
            report.failed.push(stage.name);
            errors.push(ctx.signal.aborted && isAbortError(error) ? new InterruptedError() : error);
            throw error;
          } finally {
            settle.get(stage.name)!(ok);
          }
        },
      })),
      {
        concurrent: true,
        exitOnError: false,
        registerSignalListeners: false,
        renderer,
        fallbackRenderer: 'simple',
        fallbackRendererCondition: fallback,
        rendererOptions: { collapseSubtasks: false, collapseErrors: false, showErrorMessage: false },
      },
    );
    await listr.run();
    await writeManifest(ctx, stages);
  } finally {
    await lock.release();
  }
  if (ctx.signal.aborted) throw new InterruptedError();
  if (errors.length === 1) throw errors[0];
  if (errors.length > 1) {
    const text = errors.map((e) => (e instanceof Error ? e.message : String(e))).join('\n\n');
    throw new UserError(`${errors.length} tasks failed:\n\n${text}`);
  }
  return report;
}
