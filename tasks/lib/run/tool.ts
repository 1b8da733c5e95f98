// Running the real tools (skopeo, mkfs.ext4, debugfs, tar…) through zx: quiet, cancelled
// with the run, and a failure that names the command and shows what the tool said.
import { findOnPath, type ToolName } from './tools.ts';

export class ToolError extends Error {
  readonly command: string;
  readonly stderr: string;
  readonly exitCode: number | null;
  constructor(command: string, exitCode: number | null, stderr: string) {
    super(`${command} failed (exit ${exitCode ?? 'signal'}):\n${indentTail(stderr)}`);
    this.name = 'ToolError';
    this.command = command;
    this.stderr = stderr;
    this.exitCode = exitCode;
  }
}

/** The last lines of a tool's output, indented, for an error message. */
export function indentTail(text: string, lines = 12): string {
  return text
    .trimEnd()
    .split('\n')
    .slice(-lines)
    .map((line) => `    ${line}`)
    .join('\n');
}

export interface ToolOptions {
  signal?: AbortSignal;
  input?: string | Buffer;
  env?: Record<string, string>;
  cwd?: string;
  /** The executable, where it is not `tool` found on PATH. */
  binary?: string;
}

/** Runs `tool args…` and returns its stdout; throws ToolError with its stderr on failure. */
export async function runTool(tool: ToolName | 'cp' | 'butane' | 'ignition-validate', args: readonly string[], options: ToolOptions = {}): Promise<string> {
  const binary = options.binary ?? findOnPath(tool) ?? tool;
  // zx loads on first use: a no-op run never starts a tool and should not pay for it.
  const { $, ProcessOutput } = await import('zx');
  const shell = $({
    quiet: true,
    ...(options.signal ? { signal: options.signal } : {}),
    ...(options.input !== undefined ? { input: options.input } : {}),
    ...(options.cwd ? { cwd: options.cwd } : {}),
    env: { ...process.env, ...options.env },
  });
  try {
    const result = await shell`${binary} ${args}`;
    return result.stdout;
  } catch (error) {
    if (options.signal?.aborted) throw options.signal.reason;
    if (error instanceof ProcessOutput) throw new ToolError(`${tool} ${args.join(' ')}`, error.exitCode, error.stderr || error.stdout);
    throw error;
  }
}
