// The built-in Butane translator: `butane --strict --files-dir DIR` for exactly the
// subset of Butane (variant fcos, version 1.4.0 → Ignition spec 3.3.0) that fcc/ uses.
// It follows coreos/butane's rules so that its output matches butane's: Go's JSON
// field order (Ignition's schema structs) and string escaping, decimal modes, and
// butane's data URL choice (the shortest of percent-escaped, base64 and gzip+base64).
// Anything outside the subset is refused with the field's path; the pinned butane
// binary (make fetch) or BUTANE=/path/to/butane covers the rest.
import { readFileSync, realpathSync } from 'node:fs';
import { isAbsolute, join, relative, resolve } from 'node:path';
import { parseDocument } from 'yaml';
import { InputError, type FieldProblem } from '../errors.ts';
import { goGzipBestCompression } from './goflate.ts';

export const butaneVariant = 'fcos';
export const butaneVersion = '1.4.0';
export const ignitionSpecVersion = '3.3.0';

export interface TranslateOptions {
  /** butane's --files-dir: where contents.local, ssh_authorized_keys_local and merge.local are read from. */
  filesDir: string;
  /** The Butane file's name, for errors. */
  source: string;
}

const installHint =
  'The built-in translator covers only the Butane features fcc/ uses. For anything else install butane ' +
  '(`make fetch` puts the pinned release in out/artifacts, or set BUTANE=/path/to/butane).';

type Json = null | boolean | number | string | Json[] | { [key: string]: Json | undefined };
type Obj = Record<string, unknown>;

/** Translates one Butane document to Ignition JSON text (compact, newline-terminated, as butane prints it). */
export function translateButane(text: string, options: TranslateOptions): string {
  const problems: FieldProblem[] = [];
  // Butane reads YAML with go-yaml, which takes 0644 as octal: so does YAML 1.1.
  const document = parseDocument(text, { version: '1.1', uniqueKeys: true });
  if (document.errors.length > 0) {
    throw new InputError(options.source, document.errors.map((e) => ({ path: '(yaml)', expected: 'valid YAML', found: e.message.split('\n')[0] ?? e.message })));
  }
  const translator = new Translator(options, problems);
  const config = translator.config(document.toJS({ maxAliasCount: 0 }) as unknown);
  if (problems.length > 0) throw new InputError(options.source, problems, installHint);
  return `${goJson(config)}\n`;
}

class Translator {
  private readonly options: TranslateOptions;
  private readonly problems: FieldProblem[];
  constructor(options: TranslateOptions, problems: FieldProblem[]) {
    this.options = options;
    this.problems = problems;
  }

  config(root: unknown): Json {
    const top = this.object(root, '', ['variant', 'version', 'ignition', 'passwd', 'storage', 'systemd']);
    if (!top) return null;
    if (top.variant !== butaneVariant) this.problem('variant', `"${butaneVariant}"`, describe(top.variant));
    if (top.version !== butaneVersion) this.problem('version', `"${butaneVersion}" (Ignition spec ${ignitionSpecVersion})`, describe(top.version));
    return {
      ignition: this.ignition(top.ignition, 'ignition'),
      passwd: this.passwd(top.passwd, 'passwd'),
      storage: this.storage(top.storage, 'storage'),
      systemd: this.systemd(top.systemd, 'systemd'),
    };
  }

  private ignition(value: unknown, path: string): Json {
    const ignition = value === undefined ? {} : this.object(value, path, ['config']);
    const config = ignition?.config === undefined ? undefined : this.object(ignition.config, `${path}.config`, ['merge']);
    const merge = config?.merge === undefined ? undefined : this.list(config.merge, `${path}.config.merge`).map((entry, i) => this.mergeResource(entry, `${path}.config.merge[${i}]`));
    return { config: config ? { merge: nonEmpty(merge) } : undefined, version: ignitionSpecVersion };
  }

  private mergeResource(value: unknown, path: string): Json {
    const resource = this.object(value, path, ['local', 'source']);
    if (!resource) return null;
    if (resource.local !== undefined && resource.source !== undefined) this.problem(path, 'one of local or source', 'both');
    if (resource.source !== undefined) return { source: this.string(resource.source, `${path}.source`) };
    if (resource.local === undefined) return this.problem(path, 'local or source', 'neither');
    const contents = this.readLocal(resource.local, `${path}.local`);
    return contents === undefined ? null : dataUrlResource(contents);
  }

  private passwd(value: unknown, path: string): Json | undefined {
    if (value === undefined) return undefined;
    const passwd = this.object(value, path, ['users']);
    const users = passwd?.users === undefined ? undefined : this.list(passwd.users, `${path}.users`).map((user, i) => this.user(user, `${path}.users[${i}]`));
    return { users: nonEmpty(users) };
  }

  private user(value: unknown, path: string): Json {
    // ssh_authorized_keys_local only arrives with fcos 1.5.0 (Ignition 3.4.0); fcc/ writes the key as a file.
    const user = this.object(value, path, ['name', 'ssh_authorized_keys']);
    if (!user) return null;
    const keys: string[] = [];
    if (user.ssh_authorized_keys !== undefined) {
      this.list(user.ssh_authorized_keys, `${path}.ssh_authorized_keys`).forEach((key, i) => {
        const text = this.string(key, `${path}.ssh_authorized_keys[${i}]`);
        if (text !== undefined) keys.push(text);
      });
    }
    return { name: this.string(user.name, `${path}.name`) ?? null, sshAuthorizedKeys: nonEmpty(keys) };
  }

  private storage(value: unknown, path: string): Json | undefined {
    if (value === undefined) return undefined;
    const storage = this.object(value, path, ['files', 'directories']);
    if (!storage) return null;
    const directories = storage.directories === undefined ? undefined : this.list(storage.directories, `${path}.directories`).map((d, i) => this.directory(d, `${path}.directories[${i}]`));
    const files = storage.files === undefined ? undefined : this.list(storage.files, `${path}.files`).map((f, i) => this.file(f, `${path}.files[${i}]`));
    return { directories: nonEmpty(directories), files: nonEmpty(files) };
  }

  private directory(value: unknown, path: string): Json {
    const directory = this.object(value, path, ['path', 'mode', 'overwrite', 'user', 'group']);
    if (!directory) return null;
    return {
      group: this.owner(directory.group, `${path}.group`),
      overwrite: this.optionalBoolean(directory.overwrite, `${path}.overwrite`),
      path: this.absolutePath(directory.path, `${path}.path`),
      user: this.owner(directory.user, `${path}.user`),
      mode: this.mode(directory.mode, `${path}.mode`),
    };
  }

  private file(value: unknown, path: string): Json {
    const file = this.object(value, path, ['path', 'mode', 'overwrite', 'user', 'group', 'contents']);
    if (!file) return null;
    return {
      group: this.owner(file.group, `${path}.group`),
      overwrite: this.optionalBoolean(file.overwrite, `${path}.overwrite`),
      path: this.absolutePath(file.path, `${path}.path`),
      user: this.owner(file.user, `${path}.user`),
      contents: file.contents === undefined ? undefined : this.contents(file.contents, `${path}.contents`),
      mode: this.mode(file.mode, `${path}.mode`),
    };
  }

  private contents(value: unknown, path: string): Json {
    const contents = this.object(value, path, ['inline', 'local', 'source']);
    if (!contents) return null;
    const given = ['inline', 'local', 'source'].filter((k) => contents[k] !== undefined);
    if (given.length !== 1) return this.problem(path, 'exactly one of inline, local or source', given.length === 0 ? 'none' : given.join(' and '));
    if (contents.source !== undefined) return { source: this.string(contents.source, `${path}.source`) ?? null };
    if (contents.inline !== undefined) {
      const inline = this.string(contents.inline, `${path}.inline`);
      return inline === undefined ? null : dataUrlResource(Buffer.from(inline, 'utf8'));
    }
    const local = this.readLocal(contents.local, `${path}.local`);
    return local === undefined ? null : dataUrlResource(local);
  }

  /** A file's user or group: by id or by name (resolved on the node, where the account exists). */
  private owner(value: unknown, path: string): Json | undefined {
    if (value === undefined) return undefined;
    const owner = this.object(value, path, ['id', 'name']);
    if (!owner) return null;
    if (owner.id !== undefined && (typeof owner.id !== 'number' || !Number.isInteger(owner.id) || owner.id < 0)) this.problem(`${path}.id`, 'a numeric id', describe(owner.id));
    return { id: owner.id as number | undefined, name: this.optionalString(owner.name, `${path}.name`) };
  }

  private systemd(value: unknown, path: string): Json | undefined {
    if (value === undefined) return undefined;
    const systemd = this.object(value, path, ['units']);
    const units = systemd?.units === undefined ? undefined : this.list(systemd.units, `${path}.units`).map((u, i) => this.unit(u, `${path}.units[${i}]`));
    return { units: nonEmpty(units) };
  }

  private unit(value: unknown, path: string): Json {
    const unit = this.object(value, path, ['name', 'enabled', 'mask', 'contents', 'dropins']);
    if (!unit) return null;
    const dropins = unit.dropins === undefined ? undefined : this.list(unit.dropins, `${path}.dropins`).map((d, i) => {
      const dropin = this.object(d, `${path}.dropins[${i}]`, ['name', 'contents']);
      if (!dropin) return null;
      return { contents: this.optionalString(dropin.contents, `${path}.dropins[${i}].contents`), name: this.string(dropin.name, `${path}.dropins[${i}].name`) ?? null };
    });
    const contents = this.optionalString(unit.contents, `${path}.contents`);
    // butane warns (and --strict fails) when an enabled unit cannot be enabled.
    if (unit.enabled === true && contents !== undefined && !/^\[Install\]\s*$/m.test(contents)) {
      this.problem(`${path}.contents`, 'an [Install] section, since the unit is enabled', 'none');
    }
    return {
      contents,
      dropins: nonEmpty(dropins),
      enabled: this.optionalBoolean(unit.enabled, `${path}.enabled`),
      mask: this.optionalBoolean(unit.mask, `${path}.mask`),
      name: this.string(unit.name, `${path}.name`) ?? null,
    };
  }

  /** A file under --files-dir: relative, and never outside it (not even through a symlink). */
  private readLocal(value: unknown, path: string): Buffer | undefined {
    const name = this.string(value, path);
    if (name === undefined) return undefined;
    const base = resolve(this.options.filesDir);
    const target = resolve(base, name);
    const inside = (p: string) => {
      const rel = relative(base, p);
      return rel !== '' && !rel.startsWith('..') && !isAbsolute(rel);
    };
    if (isAbsolute(name) || !inside(target)) {
      this.problem(path, `a path inside the files directory ${this.options.filesDir}`, JSON.stringify(name));
      return undefined;
    }
    let real: string;
    try {
      real = realpathSync(target);
    } catch {
      this.problem(path, `a readable file ${join(this.options.filesDir, name)}`, 'none');
      return undefined;
    }
    const realBase = realpathSync(base);
    const realRel = relative(realBase, real);
    if (realRel === '' || realRel.startsWith('..') || isAbsolute(realRel)) {
      this.problem(path, `a file inside the files directory ${this.options.filesDir}`, `${JSON.stringify(name)}, a link to ${real}`);
      return undefined;
    }
    return readFileSync(real);
  }

  private object(value: unknown, path: string, allowed: string[]): Obj | undefined {
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      this.problem(path, 'a mapping', describe(value));
      return undefined;
    }
    for (const key of Object.keys(value)) {
      if (!allowed.includes(key)) {
        this.problem(path ? `${path}.${key}` : key, `one of ${allowed.join(', ')} (the built-in translator does not support ${key})`, 'an unsupported field');
      }
    }
    return value as Obj;
  }

  private list(value: unknown, path: string): unknown[] {
    if (!Array.isArray(value)) {
      this.problem(path, 'a list', describe(value));
      return [];
    }
    return value;
  }

  private string(value: unknown, path: string): string | undefined {
    if (typeof value === 'string') return value;
    this.problem(path, 'a string', describe(value));
    return undefined;
  }

  private optionalString(value: unknown, path: string): string | undefined {
    return value === undefined ? undefined : this.string(value, path);
  }

  private optionalBoolean(value: unknown, path: string): boolean | undefined {
    if (value === undefined || typeof value === 'boolean') return value;
    this.problem(path, 'true or false', describe(value));
    return undefined;
  }

  private absolutePath(value: unknown, path: string): string {
    const text = this.string(value, path);
    if (text !== undefined && !text.startsWith('/')) this.problem(path, 'an absolute path', JSON.stringify(text));
    return text ?? '';
  }

  private mode(value: unknown, path: string): number | undefined {
    if (value === undefined) return undefined;
    if (typeof value === 'number' && Number.isInteger(value) && value >= 0 && value <= 0o7777) {
      // butane's --strict refuses modes that were most likely written in decimal (644 for 0644).
      if (typicalModesWrittenInDecimal.has(value)) {
        this.problem(path, 'an octal mode with a leading zero, such as 0644', `${value} (decimal; did you mean 0${value}?)`);
      }
      return value;
    }
    this.problem(path, 'a file mode such as 0644 (octal)', describe(value));
    return undefined;
  }

  private problem(path: string, expected: string, found: string): null {
    this.problems.push({ path, expected, found });
    return null;
  }
}

// Like butane's CheckForDecimalMode: a mode whose decimal digits spell a usual octal mode.
const typicalModesWrittenInDecimal = new Set([400, 440, 444, 500, 550, 555, 600, 640, 644, 660, 664, 700, 750, 755, 770, 775, 777, 1777, 2755, 4755]);

function describe(value: unknown): string {
  if (value === undefined) return 'nothing';
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'a list';
  if (typeof value === 'object') return 'a mapping';
  return `${typeof value} ${JSON.stringify(value)}`;
}

function nonEmpty<T>(list: T[] | undefined): T[] | undefined {
  return list && list.length > 0 ? list : undefined;
}

/** A resource holding `contents` inline, as butane makes it: `compression` is always set, "" or "gzip". */
export function dataUrlResource(contents: Buffer): Json {
  const { source, compression } = makeDataUrl(contents);
  return { compression, source };
}

/**
 * butane's MakeDataURL: the shortest of `data:,<percent-escaped>`, `data:;base64,…`
 * and, when shorter still, gzip (best compression) + base64 with compression "gzip".
 * The gzip stream is Go's compress/gzip at BestCompression, byte for byte (goflate.ts),
 * so the choice and the bytes are butane's.
 */
export function makeDataUrl(contents: Buffer): { source: string; compression: '' | 'gzip' } {
  let source = `data:,${percentEscape(contents)}`;
  const base64 = `data:;base64,${contents.toString('base64')}`;
  if (base64.length < source.length) source = base64;
  // butane counts the longer compression field against gzip.
  const gzipped = `data:;base64,${goGzipBestCompression(contents).toString('base64')}`;
  if (gzipped.length + 'gzip'.length < source.length) return { source: gzipped, compression: 'gzip' };
  return { source, compression: '' };
}

/** vincent-petithory/dataurl's Escape: bytes outside `A-Za-z0-9-_.!~*'()` become %XX (upper-case hex). */
export function percentEscape(contents: Buffer): string {
  let out = '';
  for (const byte of contents) out += unreserved[byte] ? String.fromCharCode(byte) : `%${byte.toString(16).toUpperCase().padStart(2, '0')}`;
  return out;
}
const unreserved = Array.from({ length: 256 }, (_, byte) => /^[A-Za-z0-9\-_.!~*'()]$/.test(String.fromCharCode(byte)));

/** JSON as Go's encoding/json (clarketm's fork) writes it: compact, empty fields omitted, <, >, &, U+2028/9, \b and \f as \u escapes. */
export function goJson(value: Json): string {
  return (JSON.stringify(omitEmpty(value)) ?? 'null')
    .replace(/[<>&\u2028\u2029]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`)
    .replace(/\\\\|\\b|\\f/g, (escape) => ({ '\\b': '\\u0008', '\\f': '\\u000c' })[escape] ?? escape);
}

/** Go's omitempty as Ignition's JSON library applies it: unset fields and empty structs vanish. */
function omitEmpty(value: Json | undefined): Json | undefined {
  if (Array.isArray(value)) return value.map((item) => omitEmpty(item) ?? null);
  if (value === null || typeof value !== 'object') return value;
  const out: { [key: string]: Json } = {};
  for (const [key, field] of Object.entries(value)) {
    const kept = omitEmpty(field);
    if (kept === undefined) continue;
    if (kept !== null && typeof kept === 'object' && !Array.isArray(kept) && Object.keys(kept).length === 0) continue;
    out[key] = kept;
  }
  return out;
}
