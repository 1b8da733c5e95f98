// Typed reading of parsed YAML/JSON at the edge. A Reader collects every problem with
// its field path, so a bad file is reported whole, once, and nothing downstream ever
// sees an untyped value.
import { parseDocument } from 'yaml';
import { describe, InputError, type FieldProblem } from '../errors.ts';

export function fieldPath(parent: string, key: string | number): string {
  if (typeof key === 'number') return `${parent}[${key}]`;
  return parent ? `${parent}.${key}` : key;
}

export class Reader {
  readonly file: string;
  readonly problems: FieldProblem[] = [];

  constructor(file: string) {
    this.file = file;
  }

  problem(path: string, expected: string, found: string): undefined {
    this.problems.push({ path, expected, found });
    return undefined;
  }

  /** Throws one InputError naming every problem, if there were any. */
  check(hint?: string): void {
    if (this.problems.length > 0) throw new InputError(this.file, this.problems, hint);
  }

  /**
   * A mapping whose keys must all be among `keys` (unknown keys are typos until proven
   * otherwise). `undefined` is a value `required` already reported: no second problem.
   */
  object(value: unknown, path: string, keys: readonly string[]): Record<string, unknown> | undefined {
    if (value === undefined) return undefined;
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      return this.problem(path, 'a mapping', describe(value));
    }
    const record = value as Record<string, unknown>;
    for (const key of Object.keys(record)) {
      if (!keys.includes(key)) {
        const near = closest(key, keys);
        this.problem(
          fieldPath(path, key),
          near ? `one of the known keys (did you mean "${near}"?)` : `one of the known keys: ${keys.join(', ')}`,
          `unknown key "${key}"`,
        );
      }
    }
    return record;
  }

  /** A mapping with free-form keys (e.g. mirror hosts). */
  map(value: unknown, path: string): Record<string, unknown> | undefined {
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      return this.problem(path, 'a mapping', describe(value));
    }
    return value as Record<string, unknown>;
  }

  required(record: Record<string, unknown>, key: string, path: string, expected: string): unknown {
    if (record[key] === undefined || record[key] === null) {
      return this.problem(fieldPath(path, key), expected, 'nothing (the key is required)');
    }
    return record[key];
  }

  string(value: unknown, path: string, expected = 'a string', pattern?: RegExp): string | undefined {
    if (typeof value !== 'string' || value.length === 0) return this.problem(path, expected, describe(value));
    if (pattern && !pattern.test(value)) return this.problem(path, expected, describe(value));
    return value;
  }

  integer(value: unknown, path: string, min: number, max: number): number | undefined {
    if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
      return this.problem(path, `a whole number from ${min} to ${max}`, describe(value));
    }
    return value;
  }

  boolean(value: unknown, path: string): boolean | undefined {
    if (typeof value !== 'boolean') return this.problem(path, 'true or false', describe(value));
    return value;
  }

  oneOf<T extends string>(value: unknown, path: string, choices: readonly T[]): T | undefined {
    if (typeof value !== 'string' || !(choices as readonly string[]).includes(value)) {
      return this.problem(path, `one of ${choices.map((c) => `"${c}"`).join(', ')}`, describe(value));
    }
    return value as T;
  }

  list(value: unknown, path: string, expected = 'a list'): unknown[] | undefined {
    if (!Array.isArray(value)) return this.problem(path, expected, describe(value));
    return value;
  }
}

/** Parses YAML text into plain values; a syntax error names the line and column. */
export function parseYaml(file: string, text: string): unknown {
  const doc = parseDocument(text, { prettyErrors: true, uniqueKeys: true });
  if (doc.errors.length > 0) {
    const problems = doc.errors.map((e) => ({
      path: e.linePos ? `line ${e.linePos[0].line}, column ${e.linePos[0].col}` : '',
      expected: 'valid YAML',
      found: (e.message.split('\n')[0] ?? e.message).replace(/ at line \d+, column \d+:?$/, ''),
    }));
    throw new InputError(file, problems);
  }
  return doc.toJS({ maxAliasCount: 100 });
}

export const sha256Pattern = /^[0-9a-f]{64}$/;

function closest(word: string, candidates: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const candidate of candidates) {
    const distance = editDistance(word.toLowerCase(), candidate.toLowerCase());
    if (distance < bestDistance) {
      best = candidate;
      bestDistance = distance;
    }
  }
  return bestDistance <= Math.max(2, Math.floor(word.length / 3)) ? best : undefined;
}

function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, i) => i);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      current[j] = Math.min(
        (previous[j] ?? 0) + 1,
        (current[j - 1] ?? 0) + 1,
        (previous[j - 1] ?? 0) + (a[i - 1] === b[j - 1] ? 0 : 1),
      );
    }
    previous = current;
  }
  return previous[b.length] ?? 0;
}
