// A small TOML writer for the containerd configuration: nested tables of strings,
// numbers, booleans and arrays of strings. Values are escaped, never spliced into text.
// Not a library (smol-toml, @iarna/toml): corekube only writes TOML, never reads it, for one
// file whose values it builds itself; these 40 lines fix the layout byte for byte (the
// file lands in every node's Ignition config, so a serializer's new formatting would
// rebuild them all), and a dependency would bring a parser nobody calls. Should corekube
// ever read TOML, or write dates, inline tables or arrays of tables, take smol-toml.

export type TomlValue = string | number | boolean | string[] | TomlTable;
export interface TomlTable {
  [key: string]: TomlValue;
}

const bareKey = /^[A-Za-z0-9_-]+$/;

export function tomlKey(key: string): string {
  return bareKey.test(key) ? key : `'${key}'`;
}

export function tomlString(value: string): string {
  return JSON.stringify(value); // TOML basic strings share JSON's escapes for what we write
}

function scalar(value: Exclude<TomlValue, TomlTable>): string {
  if (typeof value === 'string') return tomlString(value);
  if (typeof value === 'boolean') return String(value);
  if (typeof value === 'number') {
    if (!Number.isFinite(value)) throw new Error(`TOML cannot hold ${value}`);
    return String(value);
  }
  return `[${value.map(tomlString).join(', ')}]`;
}

const isTable = (value: TomlValue): value is TomlTable => typeof value === 'object' && !Array.isArray(value);

/** Top-level keys first, then each table (deepest paths after their parents), in insertion order. */
export function stringifyToml(root: TomlTable): string {
  const out: string[] = [];
  const emit = (table: TomlTable, path: string[]) => {
    const scalars = Object.entries(table).filter(([, v]) => !isTable(v));
    const tables = Object.entries(table).filter(([, v]) => isTable(v)) as [string, TomlTable][];
    if (path.length > 0 && (scalars.length > 0 || tables.length === 0)) {
      out.push('', `[${path.map(tomlKey).join('.')}]`);
    }
    for (const [key, value] of scalars) out.push(`${tomlKey(key)} = ${scalar(value as Exclude<TomlValue, TomlTable>)}`);
    for (const [key, value] of tables) emit(value, [...path, key]);
  };
  emit(root, []);
  return `${out.join('\n').replace(/^\n/, '')}\n`;
}
