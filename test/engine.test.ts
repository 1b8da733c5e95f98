import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { acquireRunLock, judge, plan, readStamp, runStages, selectStages, type Stamp } from '../tasks/lib/run/engine.ts';
import { UserError } from '../tasks/lib/errors.ts';
import { RunContext, type RunSettings, type Stage } from '../tasks/lib/run/stage.ts';
import { MissingToolsError } from '../tasks/lib/run/tools.ts';

function settings(dir: string, overrides: Partial<RunSettings> = {}): RunSettings {
  return {
    root: dir,
    outDir: join(dir, 'out'),
    cacheDir: join(dir, 'cache'),
    configFile: join(dir, 'cluster.yaml'),
    lockFile: join(dir, 'corekube.lock.yaml'),
    offline: false,
    force: false,
    jobs: 2,
    http: { retries: 0, stallTimeoutMs: 1000, backoffMs: 0 },
    interactive: false,
    ...overrides,
  };
}

/** A stage that writes its input value into its output, and counts its runs. */
function writerStage(name: string, needs: string[], input: { value: string }, log: string[], fail = false): Stage {
  return {
    name,
    title: `stage ${name}`,
    summary: name,
    needs,
    tools: [],
    inputs: () => ({ value: input.value }),
    outputs: () => [`${name}.txt`],
    async run(ctx) {
      log.push(`start ${name}`);
      await new Promise((resolve) => setTimeout(resolve, 30));
      if (fail) throw new UserError(`${name} broke`);
      await mkdir(ctx.settings.outDir, { recursive: true });
      await writeFile(join(ctx.settings.outDir, `${name}.txt`), input.value);
      log.push(`end ${name}`);
    },
  };
}

const stamp = (inputs: Record<string, string>, outputs: Record<string, string> = {}): Stamp => ({
  stage: 's',
  inputs,
  outputs: Object.fromEntries(Object.entries(outputs).map(([p, id]) => [p, { sha256: 'x', identity: id }])),
  finishedAt: '2026-11-25T00:00:00.000Z',
  seconds: 1,
});

test('judge: no stamp, changed, new and removed inputs, missing and altered outputs, force', () => {
  assert.equal(judge(undefined, { a: '1' }, {}, false), { action: 'run', reasons: ['never built (no stamp)'] });
  assert.equal(judge(stamp({ a: '1' }, { o: 'i1' }), { a: '1' }, { o: 'i1' }, false), { action: 'fresh', since: '2026-11-25T00:00:00.000Z' });
  assert.equal(judge(stamp({ a: '1' }), { a: '1' }, {}, true), { action: 'run', reasons: ['--force'] });
  const changed = judge(stamp({ a: '1', gone: 'x' }, { o: 'i1', p: 'i2' }), { a: '2', added: 'y' }, { o: undefined, p: 'other' }, false);
  assert.equal(changed, {
    action: 'run',
    reasons: ['input a changed: 1 → 2', 'new input added', 'input gone removed', 'output o is missing', 'output p was changed outside corekube'],
  });
  const digest = judge(stamp({ k: `sha256:${'a'.repeat(64)}` }), { k: `sha256:${'b'.repeat(64)}` }, {}, false);
  assert.equal(digest.action === 'run' && digest.reasons, [`input k changed: sha256:aaaaaaaaaaaa… → sha256:bbbbbbbbbbbb…`]);
});

test('selectStages: needs are added in registry order, unknown names are refused', () => {
  const log: string[] = [];
  const all = [writerStage('a', [], { value: '' }, log), writerStage('b', ['a'], { value: '' }, log), writerStage('c', [], { value: '' }, log)];
  assert.equal(selectStages(all, ['b']).map((s) => s.name), ['a', 'b']);
  assert.equal(selectStages(all, ['b'], true).map((s) => s.name), ['b']);
  assert.throws(() => selectStages(all, ['zzz']), /unknown task "zzz": the tasks are a, b, c/);
});

test('runs a graph once, then nothing; an input change reruns the stage and what needs it', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'corekube-engine-'));
  const log: string[] = [];
  const inputA = { value: 'one' };
  const stages = [writerStage('a', [], inputA, log), writerStage('b', ['a'], { value: 'b' }, log), writerStage('c', [], { value: 'c' }, log)];
  const ctx = new RunContext(settings(dir), new AbortController().signal);

  const first = await runStages(ctx, stages, { renderer: 'silent' });
  assert.equal(first.ran.sort(), ['a', 'b', 'c']);
  assert.ok(log.indexOf('end a') < log.indexOf('start b'), 'b waits for a');
  assert.ok(log.indexOf('start c') < log.indexOf('end a'), 'c runs alongside a');
  assert.ok(existsSync(join(dir, 'out', '.stamps', 'b.json')));
  const manifest = JSON.parse(readFileSync(join(dir, 'out', 'manifest.json'), 'utf8'));
  assert.equal(Object.keys(manifest.stages).sort(), ['a', 'b', 'c']);

  log.length = 0;
  const second = await runStages(ctx, stages, { renderer: 'silent' });
  assert.equal(second.ran, []);
  assert.equal(log, []);

  inputA.value = 'two';
  const entries = await plan(ctx, stages);
  assert.equal(entries.map((e) => e.verdict.action), ['run', 'run', 'fresh']);
  assert.match(entries[0]!.verdict.action === 'run' ? entries[0]!.verdict.reasons[0]! : '', /input value changed: one → two/);
  assert.match(entries[1]!.verdict.action === 'run' ? entries[1]!.verdict.reasons[0]! : '', /needs a, which runs first/);
  const third = await runStages(ctx, stages, { renderer: 'silent' });
  assert.equal(third.ran.sort(), ['a', 'b'], 'a changed its output, so b reruns');
  assert.equal(third.fresh, ['c']);

  writeFileSync(join(dir, 'out', 'c.txt'), 'tampered');
  const fourth = await runStages(ctx, stages, { renderer: 'silent' });
  assert.equal(fourth.ran, ['c'], 'an output changed outside corekube is rebuilt');
  assert.is(readFileSync(join(dir, 'out', 'c.txt'), 'utf8'), 'c');
  rmSync(dir, { recursive: true, force: true });
});

test('a failing stage leaves no stamp, skips what needs it, and its error reaches the caller', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'corekube-engine-'));
  const log: string[] = [];
  const stages = [writerStage('a', [], { value: 'a' }, log, true), writerStage('b', ['a'], { value: 'b' }, log), writerStage('c', [], { value: 'c' }, log)];
  const ctx = new RunContext(settings(dir), new AbortController().signal);
  try {
    await runStages(ctx, stages, { renderer: 'silent' });
    assert.unreachable();
  } catch (error) {
    assert.instance(error, UserError);
    assert.is((error as Error).message, 'a broke');
  }
  assert.is(await readStamp(ctx.settings, 'a'), undefined);
  assert.is(await readStamp(ctx.settings, 'b'), undefined);
  assert.ok(await readStamp(ctx.settings, 'c'), 'an independent stage still finishes');
  assert.not.ok(log.includes('start b'));
  assert.not.ok(existsSync(join(dir, 'out', '.corekube.lock')), 'the run lock is released');
  rmSync(dir, { recursive: true, force: true });
});

test('preflight names missing tools with install commands before anything runs', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'corekube-engine-'));
  const log: string[] = [];
  const stage = { ...writerStage('a', [], { value: 'a' }, log), tools: ['vde_switch', 'xz'] as const };
  const ctx = new RunContext(settings(dir), new AbortController().signal);
  const savedPath = process.env.PATH;
  process.env.PATH = '/nonexistent';
  try {
    await runStages(ctx, [stage], { renderer: 'silent' });
    assert.unreachable();
  } catch (error) {
    assert.instance(error, MissingToolsError);
    const message = (error as Error).message;
    assert.match(message, /vde_switch/);
    assert.match(message, /sudo apt-get install -y vde2/);
    assert.match(message, /sudo dnf install -y vde2/);
  } finally {
    process.env.PATH = savedPath;
  }
  assert.equal(log, []);
  rmSync(dir, { recursive: true, force: true });
});

test('a second run on the same tree is refused while the first holds it; a stale lock is taken over', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'corekube-engine-'));
  const s = settings(dir);
  const held = await acquireRunLock(s, 'fetch');
  try {
    await acquireRunLock(s, 'fetch');
    assert.unreachable();
  } catch (error) {
    assert.instance(error, UserError);
    assert.match((error as Error).message, new RegExp(`another corekube run \\(pid ${process.pid}, tasks: fetch`));
  }
  await held.release();
  // A lock left by a process that is gone.
  const child = spawn(process.execPath, ['-e', '0']);
  const deadPid = child.pid!;
  await new Promise((resolve) => child.on('exit', resolve));
  writeFileSync(join(s.outDir, '.corekube.lock'), JSON.stringify({ pid: deadPid, tasks: 'fetch' }));
  const taken = await acquireRunLock(s, 'fetch');
  assert.match(readFileSync(join(s.outDir, '.corekube.lock'), 'utf8'), new RegExp(`"pid":${process.pid}`));
  await taken.release();
  rmSync(dir, { recursive: true, force: true });
});

test.run();
