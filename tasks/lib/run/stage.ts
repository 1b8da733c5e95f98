// What a stage is: a plain value with a name, what it needs, the inputs it hashes, the
// outputs it promises and a run function (kubeadm's phases are the model). The engine,
// the CLI and the Makefile targets are all derived from the one list in stages.ts.
import type { ListrTaskWrapper, ListrDefaultRenderer, ListrSimpleRenderer } from 'listr2';
import { loadConfig, type ClusterConfig, type Target } from '../inputs/config.ts';
import { Cache } from '../store/cache.ts';
import type { HttpSettings } from '../store/download.ts';
import { checkLockMatchesConfig, loadLock, type Lock } from '../inputs/lock.ts';
import type { ToolName } from './tools.ts';

export type StageTask = ListrTaskWrapper<unknown, ListrDefaultRenderer, ListrSimpleRenderer>;

export interface RunSettings {
  root: string; // the project: fcc/, manifests/
  outDir: string;
  cacheDir: string;
  configFile: string;
  lockFile: string;
  offline: boolean;
  force: boolean;
  jobs: number;
  http: HttpSettings;
  /** Progress as live bars (a terminal) or as a line now and then (CI, logs). */
  interactive: boolean;
  /** TARGET= / --target: overrides cluster.yaml's `target`. */
  target?: Target;
}

/** What every stage gets: settings, the parsed inputs (loaded once, on first use), a cancel signal. */
export class RunContext {
  readonly settings: RunSettings;
  readonly signal: AbortSignal;
  readonly cache: Cache;
  #config: ClusterConfig | undefined;
  #lock: Lock | undefined;

  constructor(settings: RunSettings, signal: AbortSignal) {
    this.settings = settings;
    this.signal = signal;
    this.cache = new Cache(settings.cacheDir);
  }

  get config(): ClusterConfig {
    this.#config ??= loadConfig(this.settings.configFile, this.settings.target ? { target: this.settings.target } : {});
    return this.#config;
  }

  /** The lock, checked against cluster.yaml: a lock pinned for another cluster is refused. */
  get lock(): Lock {
    if (!this.#lock) {
      const lock = loadLock(this.settings.lockFile);
      checkLockMatchesConfig(lock, this.config);
      this.#lock = lock;
    }
    return this.#lock;
  }
}

export interface Stage {
  name: string;
  title: string;
  /** One line for `--help` and the README. */
  summary: string;
  needs: readonly string[];
  /** System tools it runs; preflight names the missing ones with their install commands. */
  tools: readonly ToolName[];
  /** Everything that decides its outputs, as name → digest or exact value. */
  inputs(ctx: RunContext): Promise<Record<string, string>> | Record<string, string>;
  /**
   * For outputs that age (a certificate): why they must be re-made although no input
   * changed, or undefined. Checked only when the stamp says fresh.
   */
  expired?(ctx: RunContext, now: Date): string | undefined;
  /** Files and directories it promises, relative to outDir. */
  outputs(ctx: RunContext): string[];
  /**
   * Does the work. May return the sha256 of outputs it already knows (saves hashing
   * them again); the engine hashes the rest.
   */
  run(ctx: RunContext, task: StageTask): Promise<Record<string, string> | void>;
}
