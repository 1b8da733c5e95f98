// corekube's command line: `node tasks/cli.ts [options] TASK...` (the Makefile's targets
// call it; tasks/cli.ts turns Node's compile cache on, then loads this). One top-level
// catch maps errors to messages and exit codes.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { stopCluster } from './boot.ts';
import { bundleNeeds, defaultBundlePath } from './bundle/format.ts';
import { unbundleTask } from './bundle/unbundle.ts';
import { bundleTask } from './bundle/write.ts';
import { defaultConfigFile, loadConfig, targets, type Target } from './lib/inputs/config.ts';
import { defaultHttpSettings } from './lib/store/download.ts';
import { formatPlan, runStages, selectStages } from './lib/run/engine.ts';
import { ExitCode, InterruptedError, UserError } from './lib/errors.ts';
import { defaultLockFile } from './lib/inputs/lock.ts';
import { listrRenderer, type Renderer } from './lib/run/progress.ts';
import { sshArgs } from './lib/node/qemu.ts';
import { RunContext, type RunSettings } from './lib/run/stage.ts';
import { dryRunPlan, openstackDown, openstackModes, openstackSshArgs } from './openstack.ts';
import { pinResults, pinStage } from './pin/stage.ts';
import { buildStages, stages, stagesFor } from './stages.ts';
import { allTools, findOnPath, hostFamily, installCommands, MissingToolsError, missingTools, packagesFor, type ToolName } from './lib/run/tools.ts';

const projectRoot = resolve(import.meta.dirname, '..');

const usage = `usage: node tasks/cli.ts [options] TASK...
       node tasks/cli.ts deps [--install] [--test] [TASK...]   the system tools TASKs (--test: and the tests) need; --install installs them
       node tasks/cli.ts bundle [--file F]   the lock, cluster.yaml and every cache entry they need, as one tar (runs fetch, images first)
       node tasks/cli.ts unbundle --file F   verify, add to cache/, install lock/config where absent (--force replaces, keeps .orig; --dry-run verifies only)
       node tasks/cli.ts fsck [--fix]     hash every cache entry and out/ output against what names it (--fix: move bad entries to cache/corrupt/, unstamp bad outputs)
       node tasks/cli.ts down             stop the nodes (power button, then kill after DOWN_TIMEOUT s, default 60);
                                          target openstack: delete the servers, ports, volumes, network (images too with --purge)
       node tasks/cli.ts ssh NODE [CMD]   a shell (or CMD) on NODE as core

Tasks (each also runs what it needs, unless --only):
${stages.map((s) => `  ${s.name.padEnd(10)} ${s.summary}`).join('\n')}
  cluster    all of the above but pin (pin first when there is no lock yet)

Options (Makefile variables in brackets):
  --config FILE        cluster config (default cluster.yaml) [CONFIG]
  --lock FILE          lock file (default corekube.lock.yaml) [LOCK]
  --offline            no network at all: fail naming what is missing [OFFLINE=1]
  --dry-run            show what would run and why, run nothing [DRY_RUN=1]
  --force              run even what is fresh [FORCE=1]
  --only               run only the named tasks, not what they need
  --target qemu|openstack   where the nodes run (default: cluster.yaml's target, else qemu) [TARGET]
  --purge              down, target openstack: delete the uploaded images too [PURGE=1]
  --jobs N             parallel downloads (default 4) [JOBS]
  --retries N          retries of a failed download (default ${defaultHttpSettings.retries}) [COREKUBE_HTTP_RETRIES]
  --stall-timeout S    seconds without data before a download is retried (default ${defaultHttpSettings.stallTimeoutMs / 1000}) [COREKUBE_STALL_TIMEOUT]
  --out DIR, --cache DIR   where outputs and the download cache live (default out/, cache/)
  --renderer auto|simple|silent   progress display (auto: live on a terminal, lines in CI)`;

/** cluster.yaml, or where none was written yet, the commented example (a 2-node cluster) with a note. */
function defaultConfig(given: string | undefined): string {
  if (given) return resolve(given);
  const config = resolve(projectRoot, defaultConfigFile);
  const example = resolve(projectRoot, 'cluster.example.yaml');
  if (!existsSync(config) && existsSync(example)) {
    process.stderr.write(`corekube: no ${defaultConfigFile}: using cluster.example.yaml (cp cluster.example.yaml ${defaultConfigFile} to change anything)\n`);
    return example;
  }
  return config;
}

function number(value: string | undefined, name: string, fallback: number, min: number): number {
  if (value === undefined || value === '') return fallback;
  const n = Number(value);
  if (!Number.isFinite(n) || n < min) throw new UserError(`${name}: expected a number >= ${min}, found "${value}"`, ExitCode.usage);
  return n;
}

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      config: { type: 'string' },
      lock: { type: 'string' },
      out: { type: 'string' },
      cache: { type: 'string' },
      offline: { type: 'boolean', default: false },
      'dry-run': { type: 'boolean', default: false },
      force: { type: 'boolean', default: false },
      only: { type: 'boolean', default: false },
      install: { type: 'boolean', default: false },
      fix: { type: 'boolean', default: false },
      test: { type: 'boolean', default: false },
      jobs: { type: 'string' },
      retries: { type: 'string' },
      'stall-timeout': { type: 'string' },
      renderer: { type: 'string', default: 'auto' },
      file: { type: 'string' },
      target: { type: 'string' },
      purge: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help || positionals.length === 0) {
    console.log(usage);
    return values.help ? ExitCode.ok : ExitCode.usage;
  }
  const env = process.env;
  const truthy = (v: string | undefined) => v !== undefined && v !== '' && v !== '0' && v !== 'false';

  const targetText = values.target ?? (env.TARGET || undefined);
  if (targetText !== undefined && !(targets as readonly string[]).includes(targetText)) {
    throw new UserError(`--target (TARGET): expected one of ${targets.join(', ')}, found "${targetText}"`, ExitCode.usage);
  }
  const targetOverride = targetText as Target | undefined;
  if (positionals[0] === 'deps') return deps(positionals.slice(1), values.install, values.test, targetOverride ?? targetOf(defaultConfig(values.config ?? env.CONFIG)));
  const outDir = resolve(values.out ?? (env.OUT_DIR || resolve(projectRoot, 'out')));
  if (positionals[0] === 'down' && (targetOverride ?? targetOf(defaultConfig(values.config ?? env.CONFIG))) === 'openstack') {
    const ctx = new RunContext(
      {
        root: projectRoot,
        outDir,
        cacheDir: resolve(values.cache ?? (env.CACHE_DIR || resolve(projectRoot, 'cache'))),
        configFile: defaultConfig(values.config ?? env.CONFIG),
        lockFile: resolve(values.lock ?? (env.LOCK || resolve(projectRoot, defaultLockFile))),
        offline: false,
        force: false,
        jobs: 1,
        http: defaultHttpSettings,
        interactive: false,
        target: 'openstack',
      },
      new AbortController().signal,
    );
    const dryRun = values['dry-run'] || truthy(env.DRY_RUN);
    const calls = await openstackDown(ctx, { purge: values.purge || truthy(env.PURGE), dryRun, onCall: (line) => console.log(`${dryRun ? 'would run: ' : ''}${line}`) });
    if (calls.length === 0) console.log(`corekube: nothing tagged ${ctx.config.name} is left on the cloud`);
    return ExitCode.ok;
  }
  if (positionals[0] === 'down') {
    const timeoutMs = number(env.DOWN_TIMEOUT, 'DOWN_TIMEOUT', 60, 0) * 1000;
    const { poweredOff, killed } = await stopCluster(outDir, { timeoutMs });
    if (poweredOff.length + killed.length === 0) console.log('corekube: no node was running');
    if (poweredOff.length > 0) console.log(`corekube: powered off ${poweredOff.join(', ')}`);
    if (killed.length > 0) console.log(`corekube: killed ${killed.join(', ')} (still up after ${timeoutMs / 1000}s)`);
    return ExitCode.ok;
  }
  if (positionals[0] === 'ssh') {
    const config = loadConfig(defaultConfig(values.config ?? env.CONFIG));
    const name = positionals[1] ?? env.NODE;
    const node = config.nodes.find((n) => n.name === name);
    if (!node) throw new UserError(`ssh: expected a node of ${config.file} (${config.nodes.map((n) => n.name).join(', ')}), found ${name ? `"${name}"` : 'none'}: make ssh NODE=name`, ExitCode.usage);
    const onCloud = (targetOverride ?? config.target) === 'openstack';
    const result = spawnSync('ssh', (onCloud ? openstackSshArgs : sshArgs)(config, node, positionals.slice(2)), { stdio: 'inherit' });
    if (result.error) throw new UserError(`ssh: could not run ssh: ${result.error.message} (install openssh-client)`);
    return (result.status ?? 1) as ExitCode;
  }

  if (positionals[0] === 'fsck') {
    // fsck reads names and stamps only: no config, no lock (it works on a tree whose lock is gone).
    const cacheDir = resolve(values.cache ?? (env.CACHE_DIR || resolve(projectRoot, 'cache')));
    const fsckSettings = { root: projectRoot, outDir, cacheDir, configFile: '', lockFile: '', offline: true, force: false, jobs: 1, http: defaultHttpSettings, interactive: false };
    const { fsck, formatFsck } = await import('./fsck.ts');
    const report = await fsck(fsckSettings, { fix: values.fix || truthy(env.FIX) });
    console.log(formatFsck(report, fsckSettings));
    return report.bad.every((b) => b.fixed) ? ExitCode.ok : ExitCode.failure;
  }
  const names = positionals.flatMap((name) => (name === 'cluster' ? buildStages.map((s) => s.name) : [name]));
  const configFile = defaultConfig(values.config ?? env.CONFIG);
  const target = targetOverride ?? targetOf(configFile);
  const targetStages = stagesFor(target);
  const settings: RunSettings = {
    root: projectRoot,
    outDir,
    cacheDir: resolve(values.cache ?? (env.CACHE_DIR || resolve(projectRoot, 'cache'))),
    configFile,
    lockFile: resolve(values.lock ?? (env.LOCK || resolve(projectRoot, defaultLockFile))),
    ...(targetOverride ? { target: targetOverride } : {}),
    offline: values.offline || truthy(env.OFFLINE),
    force: values.force || truthy(env.FORCE),
    jobs: number(values.jobs ?? env.JOBS, '--jobs', 4, 1),
    http: {
      retries: number(values.retries ?? env.COREKUBE_HTTP_RETRIES, '--retries', defaultHttpSettings.retries, 0),
      stallTimeoutMs:
        number(values['stall-timeout'] ?? env.COREKUBE_STALL_TIMEOUT, '--stall-timeout', defaultHttpSettings.stallTimeoutMs / 1000, 0.05) * 1000,
      backoffMs: number(env.COREKUBE_BACKOFF_MS, 'COREKUBE_BACKOFF_MS', defaultHttpSettings.backoffMs, 0),
    },
    interactive: Boolean(process.stdout.isTTY) && env.CI !== 'true',
  };
  const renderer = values.renderer as Renderer;
  if (!['auto', 'simple', 'silent'].includes(renderer)) {
    throw new UserError(`--renderer: expected auto, simple or silent, found "${renderer}"`, ExitCode.usage);
  }
  const action = positionals[0] === 'bundle' || positionals[0] === 'unbundle' ? positionals[0] : undefined;
  if (action && positionals.length > 1) throw new UserError(`${action} runs alone: found also ${positionals.slice(1).join(' ')}`, ExitCode.usage);
  const noLock = !existsSync(settings.lockFile);
  const autoPin = !action && positionals.includes('cluster') && noLock && !settings.offline;
  const wantsPin = !action && (names.includes('pin') || autoPin);
  const rest = action ? [] : names.filter((name) => name !== 'pin');
  const selected = rest.length > 0 ? selectStages(targetStages, rest, values.only) : [];

  const controller = new AbortController();
  let interrupts = 0;
  const onSignal = (signal: NodeJS.Signals) => {
    interrupts++;
    if (interrupts > 1) process.exit(ExitCode.interrupted);
    process.stderr.write(`\ncorekube: ${signal}: stopping (temporary files are removed; press again to quit at once)\n`);
    controller.abort(new InterruptedError());
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  if (action) return runAction(new RunContext(settings, controller.signal), action, { file: values.file || env.FILE || undefined, renderer, dryRun: values['dry-run'] });
  if (wantsPin) {
    // pin runs on its own first: the other stages read the lock it writes.
    if (autoPin && !names.includes('pin')) console.log(`corekube: no lock yet (${settings.lockFile}): pinning from upstream first`);
    const pinCtx = new RunContext(settings, controller.signal);
    void pinCtx.config;
    const pinned = await runStages(pinCtx, [pinStage], { dryRun: values['dry-run'], renderer });
    if (values['dry-run']) console.log(formatPlan(pinned.plan ?? []));
    else console.log(pinResults.get(pinCtx)?.summary ?? '');
    if (selected.length === 0) return ExitCode.ok;
    if (values['dry-run'] && noLock) {
      console.log(`then, once pin has written the lock: ${selected.map((s) => s.name).join(', ')}`);
      return ExitCode.ok;
    }
  }
  const ctx = new RunContext(settings, controller.signal);
  void ctx.config; // a bad config stops everything before anything is written
  // target openstack: `make boot` rebuilds every server (first boot again); `make cluster` adds only what is missing.
  openstackModes.set(ctx, rest.includes('boot') ? 'boot' : 'up');
  const report = await runStages(ctx, selected, { dryRun: values['dry-run'], renderer });
  if (values['dry-run']) {
    console.log(formatPlan(report.plan ?? []));
    if (target === 'openstack' && selected.some((s) => s.name === 'boot')) console.log(await dryRunPlan(ctx));
  } else if (report.ran.length === 0) {
    console.log(`corekube: ${selected.map((s) => s.name).join(', ')}: fresh, nothing to do`);
  }
  return ExitCode.ok;
}

/** The config's target (qemu where the file cannot be read: the run reports that itself). */
function targetOf(configFile: string): Target {
  try {
    return loadConfig(configFile).target;
  } catch {
    return 'qemu';
  }
}

/** bundle and unbundle: actions on the cache, not stages (no stamp, not part of cluster). */
async function runAction(ctx: RunContext, action: 'bundle' | 'unbundle', options: { file: string | undefined; renderer: Renderer; dryRun: boolean }): Promise<number> {
  let task;
  if (action === 'bundle') {
    const report = await runStages(ctx, selectStages(stages, bundleNeeds), { dryRun: options.dryRun, renderer: options.renderer });
    if (options.dryRun) {
      console.log(`${formatPlan(report.plan ?? [])}\nbundle: would write ${options.file ? resolve(options.file) : defaultBundlePath(ctx)}`);
      return ExitCode.ok;
    }
    task = bundleTask(ctx, options.file ? resolve(options.file) : undefined);
  } else {
    if (!options.file) throw new UserError('unbundle: expected the bundle to read, found none: make unbundle FILE=path/to/corekube-bundle-NAME.tar (--file)', ExitCode.usage);
    task = unbundleTask(ctx, resolve(options.file), { replace: ctx.settings.force, verifyOnly: options.dryRun });
  }
  const { Listr } = await import('listr2');
  const { renderer, fallback } = listrRenderer(options.renderer);
  await new Listr([task], { renderer, fallbackRenderer: 'simple', fallbackRendererCondition: fallback, registerSignalListeners: false, rendererOptions: { showErrorMessage: false } }).run();
  return ExitCode.ok;
}

/**
 * `make deps` (the stages' tools) and `make test` (`--test`: the tests' too): names the
 * missing tools and, with --install on Debian/Ubuntu or Fedora as root or with sudo,
 * installs them, saying what; elsewhere one message names them all with the command.
 */
async function deps(names: string[], install: boolean, tests: boolean, target: Target | undefined): Promise<number> {
  const expanded = names.flatMap((name) => (name === 'cluster' ? buildStages.map((s) => s.name) : [name]));
  const all = target ? stagesFor(target) : stages;
  const selected = expanded.length > 0 ? selectStages(all, expanded) : all;
  const wanted = tests ? allTools(true) : (selected.flatMap((s) => s.tools) as ToolName[]);
  const forWhat = tests ? 'the stages and the tests' : selected.map((s) => s.name).join(', ');
  const repair = tests ? 'make test' : 'make deps';
  const missing = missingTools(wanted);
  if (missing.length === 0) {
    if (!tests) console.log(`corekube: every tool ${forWhat} needs is installed`);
    return ExitCode.ok;
  }
  if (!install) {
    const commands = installCommands(missing);
    console.log(`missing: ${missing.join(', ')}\n  Debian/Ubuntu: ${commands.debian}\n  Fedora:        ${commands.fedora}`);
    return ExitCode.ok;
  }
  const family = hostFamily();
  const root = process.getuid?.() === 0;
  const sudo = root ? [] : findOnPath('sudo') ? ['sudo'] : undefined;
  if (!family || !sudo) {
    const why = !family ? 'this is neither a Debian/Ubuntu nor a Fedora system' : 'not root, and there is no sudo';
    throw new MissingToolsError(missing, `${forWhat} (${why}: install them by hand)`, repair);
  }
  const packages = packagesFor(missing, family);
  const manager = family === 'debian' ? ['apt-get', 'install', '-y', '-qq', '--no-install-recommends'] : ['dnf', 'install', '-y', '-q'];
  console.log(`corekube: ${forWhat} need ${missing.join(', ')}: installing ${packages.join(' ')} (${[...sudo, ...manager].join(' ')})`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  const step = (args: string[]) => {
    // The package manager's progress (dpkg's unpacking lines) stays out; its errors show.
    const result = spawnSync(args[0]!, args.slice(1), { stdio: ['inherit', 'ignore', 'inherit'], env });
    if (result.status !== 0) throw new MissingToolsError(missing, `${forWhat} (\`${args.join(' ')}\` failed)`, repair);
  };
  if (family === 'debian') step([...sudo, 'apt-get', 'update', '-qq']);
  step([...sudo, ...manager, ...packages]);
  const still = missingTools(wanted);
  if (still.length > 0) throw new MissingToolsError(still, `${forWhat} (still missing after the install)`, repair);
  return ExitCode.ok;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (error: unknown) => {
    if (error instanceof UserError) {
      process.stderr.write(`corekube: ${error.message}\n`);
      process.exit(error.exitCode);
    }
    process.stderr.write(`corekube: internal error (a bug: please report it with this output)\n${error instanceof Error ? error.stack : String(error)}\n`);
    process.exit(ExitCode.failure);
  },
);
