// Errors meant for people. The CLI's one top-level catch prints `message` (never a
// stack trace) and exits with `exitCode`; anything else is a bug and prints its stack.

export const ExitCode = {
  ok: 0,
  failure: 1,
  usage: 2,
  config: 3,
  missingTool: 4,
  offline: 5,
  locked: 6,
  interrupted: 130,
} as const;
export type ExitCode = (typeof ExitCode)[keyof typeof ExitCode];

export class UserError extends Error {
  readonly exitCode: ExitCode;
  constructor(message: string, exitCode: ExitCode = ExitCode.failure) {
    super(message);
    this.name = 'UserError';
    this.exitCode = exitCode;
  }
}

/** One problem in an input file, located by its field path (`nodes[2].ip`). */
export interface FieldProblem {
  path: string;
  expected: string;
  found: string;
}

/** A bad input file: every problem found in it, reported at once. */
export class InputError extends UserError {
  readonly file: string;
  readonly problems: FieldProblem[];
  constructor(file: string, problems: FieldProblem[], hint?: string) {
    const lines = problems.map((p) => `  ${p.path || '(top level)'}: expected ${p.expected}, found ${p.found}`);
    super(
      `${file}: ${problems.length} problem${problems.length === 1 ? '' : 's'}\n${lines.join('\n')}${hint ? `\n${hint}` : ''}`,
      ExitCode.config,
    );
    this.name = 'InputError';
    this.file = file;
    this.problems = problems;
  }
}

export class OfflineError extends UserError {
  constructor(message: string) {
    super(message, ExitCode.offline);
    this.name = 'OfflineError';
  }
}

export class InterruptedError extends UserError {
  constructor() {
    super('interrupted', ExitCode.interrupted);
    this.name = 'InterruptedError';
  }
}

export function isAbortError(error: unknown): boolean {
  return (
    error instanceof InterruptedError ||
    (error instanceof Error && (error.name === 'AbortError' || (error as { code?: string }).code === 'ABORT_ERR'))
  );
}

/** How a value looks in an error message: short, typed, never a whole document. */
export function describe(value: unknown): string {
  if (value === undefined) return 'nothing';
  if (value === null) return 'null';
  if (typeof value === 'string') return JSON.stringify(value.length > 80 ? `${value.slice(0, 77)}...` : value);
  if (typeof value === 'number' || typeof value === 'boolean') return `${typeof value} ${String(value)}`;
  if (Array.isArray(value)) return `a list of ${value.length}`;
  return 'a mapping';
}
