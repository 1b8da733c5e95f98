// The docs are tested like the code: every cluster.yaml example in README.md and docs/ is
// parsed by the real config loader, every relative link and #anchor resolves the way
// GitHub renders them, every `make` target and variable the docs name exists in the
// Makefile, and the configuration reference lists exactly the keys the loader accepts.
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { parse as parseYamlText, stringify } from 'yaml';
import { configKeyPaths, configKeys, parseConfig } from '../tasks/lib/inputs/config.ts';
import { InputError } from '../tasks/lib/errors.ts';

const root = resolve(import.meta.dirname, '..');
const pages = [
  'README.md',
  ...readdirSync(join(root, 'docs'))
    .filter((name) => name.endsWith('.md'))
    .sort()
    .map((name) => `docs/${name}`),
  'fcc/README.md',
  'manifests/README.md',
];

interface CodeBlock {
  lang: string;
  text: string;
  line: number;
}

interface Page {
  file: string;
  /** The page's lines with fenced blocks blanked out (prose, headings, tables). */
  prose: string[];
  /** The same with inline code spans blanked too (a span may run over a line break). */
  plain: string[];
  /** Inline code spans, with the line each starts on. */
  spans: { text: string; line: number }[];
  blocks: CodeBlock[];
}

function readPage(file: string, text = readFileSync(join(root, file), 'utf8')): Page {
  const prose: string[] = [];
  const blocks: CodeBlock[] = [];
  let open: CodeBlock | undefined;
  let fence = '';
  text.split('\n').forEach((line, index) => {
    const marker = /^\s*(`{3,}|~{3,})\s*([\w-]*)/.exec(line);
    if (!open && marker) {
      fence = marker[1]!;
      open = { lang: marker[2] ?? '', text: '', line: index + 1 };
      prose.push('');
    } else if (open && line.trim().startsWith(fence) && line.trim().replace(/[`~]/g, '') === '') {
      blocks.push(open);
      open = undefined;
      prose.push('');
    } else if (open) {
      open.text += `${line}\n`;
      prose.push('');
    } else {
      prose.push(line);
    }
  });
  assert.not.ok(open, `${file}: a code block opened at line ${open?.line} is never closed`);
  const spans: Page['spans'] = [];
  const joined = prose.join('\n');
  // A code span: matching runs of backticks, within one paragraph (no blank line inside).
  const plain = joined.replace(/(`+)((?:(?!\n\s*\n)[^`]|(?!\1)`+)+?)\1(?!`)/g, (whole: string, _ticks: string, body: string, offset: number) => {
    spans.push({ text: body.replace(/\s+/g, ' ').trim(), line: joined.slice(0, offset).split('\n').length });
    return whole.replace(/[^\n]/g, ' ');
  });
  return { file, prose, plain: plain.split('\n'), spans, blocks };
}

/** The text of inline code spans within one line (a table cell). */
function codeSpans(line: string): string[] {
  return [...line.matchAll(/(`+)(.+?)\1/g)].map((match) => match[2]!.trim());
}

/**
 * GitHub's heading anchors (github-slugger): the rendered text, lower-cased, with every
 * character but letters, marks, digits, connector punctuation (`_`), `-` and space
 * dropped, spaces turned into `-`; a repeated slug gets `-1`, `-2`…
 */
export function slug(heading: string): string {
  const text = heading
    .replace(/!?\[([^\]]*)\]\([^)]*\)/g, '$1') // links and images: their text
    .replace(/<[^>]+>/g, '') // inline HTML
    .replace(/`+/g, '') // code spans keep their text
    .replace(/(\*\*|\*)(.+?)\1/g, '$2'); // emphasis
  return text
    .toLowerCase()
    .replace(/[^\p{L}\p{M}\p{N}\p{Pc} -]/gu, '')
    .replace(/ /g, '-');
}

function anchorsOf(page: Page): Set<string> {
  const anchors = new Set<string>();
  const seen = new Map<string, number>();
  for (const line of page.prose) {
    const heading = /^#{1,6}\s+(.*?)\s*#*\s*$/.exec(line);
    if (!heading) continue;
    const base = slug(heading[1]!);
    const count = seen.get(base) ?? 0;
    seen.set(base, count + 1);
    anchors.add(count === 0 ? base : `${base}-${count}`);
  }
  return anchors;
}

/** Every relative link (and image) in a page's prose that does not resolve, as "file:line: target (why)". */
export function brokenLinks(page: Page, readOther: (file: string) => Page | undefined): string[] {
  const broken: string[] = [];
  page.plain.forEach((line, index) => {
    for (const match of line.matchAll(/!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)/g)) {
      const target = match[1]!;
      if (/^[a-z][a-z0-9+.-]*:/i.test(target)) continue; // https:, mailto:
      const where = `${page.file}:${index + 1}: ${target}`;
      const [path, anchor] = target.split('#', 2) as [string, string | undefined];
      let linked = page;
      if (path) {
        const file = relative(root, resolve(root, dirname(page.file), decodeURIComponent(path)));
        if (file.startsWith('..')) {
          broken.push(`${where} (outside the repository)`);
          continue;
        }
        if (!existsSync(join(root, file))) {
          broken.push(`${where} (no such file: ${file})`);
          continue;
        }
        if (anchor === undefined) continue;
        if (!file.endsWith('.md') || statSync(join(root, file)).isDirectory()) {
          broken.push(`${where} (an anchor into a file that is not Markdown)`);
          continue;
        }
        linked = readOther(file)!;
      }
      if (anchor !== undefined && !anchorsOf(linked).has(anchor)) {
        broken.push(`${where} (no heading in ${linked.file} makes #${anchor})`);
      }
    }
  });
  return broken;
}

interface MakeUse {
  where: string;
  targets: string[];
  variables: string[];
}

/** `make …` command lines: in sh blocks, and inline code spans that start with `make `. */
function makeUses(page: Page): MakeUse[] {
  const uses: MakeUse[] = [];
  const parse = (command: string, where: string): void => {
    const words = command.split(/\s+/).filter(Boolean);
    const targets: string[] = [];
    const variables: string[] = [];
    for (const word of words.slice(1)) {
      if (/^(#|&&|\|\|?|;|>|2>)/.test(word)) break;
      const variable = /^([A-Z][A-Z0-9_]*)=/.exec(word);
      if (variable) variables.push(variable[1]!);
      else if (/^[a-z][a-z0-9-]*$/.test(word)) targets.push(word);
      else break;
    }
    uses.push({ where, targets, variables });
  };
  for (const block of page.blocks) {
    if (!['sh', 'bash', 'shell', 'console'].includes(block.lang)) continue;
    block.text.split('\n').forEach((line, index) => {
      for (const part of line.replace(/(^|\s)#.*$/, '').split(/&&|;/)) {
        const command = part.trim().replace(/^\$\s+/, '');
        if (/^make(\s|$)/.test(command)) parse(command, `${page.file}:${block.line + index + 1}`);
      }
    });
  }
  for (const span of page.spans) {
    if (/^make(\s|$)/.test(span.text)) parse(span.text, `${page.file}:${span.line}`);
  }
  return uses;
}

/** Variables the docs' variable tables name: first-column code spans like `CONFIG=file`. */
function tableVariables(page: Page): { where: string; name: string }[] {
  const found: { where: string; name: string }[] = [];
  page.prose.forEach((line, index) => {
    if (!line.startsWith('|')) return;
    const first = line.split(/(?<!\\)\|/)[1] ?? '';
    for (const span of codeSpans(first)) {
      const variable = /^([A-Z][A-Z0-9_]*)=/.exec(span);
      if (variable) found.push({ where: `${page.file}:${index + 1}`, name: variable[1]! });
    }
  });
  return found;
}

interface Makefile {
  targets: Set<string>;
  variables: Set<string>;
  environment: string[];
}

/** The Makefile's targets (rules, `$(STAGES)` expanded) and variables (assigned, referenced, or listed in ENV_VARIABLES). */
export function readMakefile(text: string): Makefile {
  const assigned = new Map<string, string>();
  const lines = text.replace(/\\\n/g, ' ').split('\n');
  for (const line of lines) {
    const assignment = /^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*(?::=|\?=|\+=|=)\s*(.*)$/.exec(line);
    if (assignment) assigned.set(assignment[1]!, assignment[2]!.trim());
  }
  const expand = (words: string): string[] =>
    words.split(/\s+/).filter(Boolean).flatMap((word) => {
      const reference = /^\$\(([A-Za-z_][A-Za-z0-9_]*)\)$/.exec(word);
      return reference ? expand(assigned.get(reference[1]!) ?? '') : [word];
    });
  const targets = new Set<string>();
  for (const line of lines) {
    if (line.startsWith('\t') || line.startsWith('#')) continue;
    const rule = /^([^:=#]+?)\s*:(?![=:])/.exec(line);
    if (!rule) continue;
    for (const name of expand(rule[1]!)) if (!name.startsWith('.') && !name.includes('$') && !name.includes('/')) targets.add(name);
  }
  const variables = new Set(assigned.keys());
  for (const match of text.matchAll(/\$\(([A-Z][A-Z0-9_]*)\)/g)) variables.add(match[1]!);
  for (const match of text.matchAll(/\$\(call flag,([A-Z][A-Z0-9_]*),/g)) variables.add(match[1]!);
  const environment = (assigned.get('ENV_VARIABLES') ?? '').split(/\s+/).filter(Boolean);
  for (const name of environment) variables.add(name);
  return { targets, variables, environment };
}

/** The keys a configuration reference names: first-column code spans of its `| key |` table. */
export function referenceKeys(page: Page): string[] {
  const keys: string[] = [];
  let inTable = false;
  for (const line of page.prose) {
    if (/^\|\s*key\s*\|/.test(line)) inTable = true;
    else if (!line.startsWith('|')) inTable = false;
    else if (inTable && !/^\|\s*-/.test(line)) keys.push(...codeSpans(line.split(/(?<!\\)\|/)[1] ?? ''));
  }
  return keys;
}

function difference(a: Iterable<string>, b: Iterable<string>): string[] {
  const other = new Set(b);
  return [...new Set(a)].filter((x) => !other.has(x));
}

const cache = new Map<string, Page>();
function page(file: string): Page | undefined {
  if (!existsSync(join(root, file))) return undefined;
  if (!cache.has(file)) cache.set(file, readPage(file));
  return cache.get(file);
}

test('GitHub heading anchors, as its renderer makes them', () => {
  assert.is(slug('Configuration reference (`cluster.yaml`)'), 'configuration-reference-clusteryaml');
  assert.is(slug('What was tested here, and against what'), 'what-was-tested-here-and-against-what');
  assert.is(slug('KVM is there but slow, or the guests hang'), 'kvm-is-there-but-slow-or-the-guests-hang');
  assert.is(slug('The cache and `out/`'), 'the-cache-and-out');
  assert.is(slug('One node, three nodes'), 'one-node-three-nodes');
  assert.is(slug('Tier 1: pure logic — and [tools](x.md)'), 'tier-1-pure-logic--and-tools');
  assert.is(slug('a_b c'), 'a_b-c');
  const repeated = readPage('x.md', '# Notes\n## Notes\n```sh\n# not a heading\n```\n## Notes\n');
  assert.equal([...anchorsOf(repeated)], ['notes', 'notes-1', 'notes-2']);
});

test('every relative link and #anchor in README.md and docs/ resolves', () => {
  const broken = pages.flatMap((file) => brokenLinks(page(file)!, page));
  assert.equal(broken, [], broken.join('\n'));
  // The check itself finds what is wrong.
  const bad = readPage('docs/bad.md', '# Here\n[a](#here) [b](#nowhere) [c](tasks.md#exit-codes) [d](tasks.md#none) [e](missing.md) `[f](#code)` [g](https://x.org/#y)\n');
  assert.equal(
    brokenLinks(bad, page).map((line) => line.split(' (')[0]),
    ['docs/bad.md:2: #nowhere', 'docs/bad.md:2: tasks.md#none', 'docs/bad.md:2: missing.md'],
  );
});

test('every page in docs/ is linked from README.md', () => {
  const linked = new Set([...page('README.md')!.plain.join('\n').matchAll(/\]\((docs\/[^)#\s]+)/g)].map((match) => match[1]!));
  const orphans = pages.filter((file) => file.startsWith('docs/') && !linked.has(file));
  assert.equal(orphans, [], `not linked from README.md: ${orphans.join(', ')}`);
});

test('every cluster.yaml example is accepted by the real config loader', () => {
  const home = mkdtempSync(join(tmpdir(), 'corekube-docs-'));
  const savedHome = process.env.HOME;
  try {
    // The examples name ~/.ssh/id_ed25519.pub: give the loader one to read.
    mkdirSync(join(home, '.ssh'));
    writeFileSync(join(home, '.ssh', 'id_ed25519.pub'), 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx0ZXN0a2V5Zm9yY29yZWt1YmV0ZXN0c29ubHkxMjM0 docs@corekube\n');
    process.env.HOME = home;
    const rootKeys = Object.keys(configKeys);
    // What a fragment (a section of cluster.yaml) is completed with, key by key, when it lacks it.
    const minimal: Record<string, unknown> = {
      name: 'docs',
      kubernetes: { version: 'v1.35.7' },
      nodes: [{ name: 'cp1', role: 'control-plane', ip: '10.77.0.10' }],
      sshPublicKeyFile: '~/.ssh/id_ed25519.pub',
    };
    let parsed = 0;
    for (const file of pages) {
      for (const block of page(file)!.blocks.filter((b) => b.lang === 'yaml' || b.lang === 'yml')) {
        const where = `${file}:${block.line}`;
        const value = parseYamlText(block.text) as Record<string, unknown> | null;
        assert.ok(value && typeof value === 'object' && !Array.isArray(value), `${where}: a yaml block that is not a mapping`);
        if ('lockVersion' in value) continue; // the lock's format, with placeholders for digests
        const foreign = Object.keys(value).filter((key) => !rootKeys.includes(key));
        assert.equal(foreign, [], `${where}: a yaml block that is neither a cluster config (keys: ${rootKeys.join(', ')}) nor the lock; give it another language than yaml if it is neither`);
        const missing = Object.fromEntries(Object.entries(minimal).filter(([key]) => !(key in value)));
        const text = Object.keys(missing).length > 0 ? `${block.text}${stringify(missing)}` : block.text;
        try {
          parseConfig(join(home, 'cluster.yaml'), text);
        } catch (error) {
          const problems = error instanceof InputError ? error.problems.map((p) => `${p.path}: expected ${p.expected}, found ${p.found}`).join('; ') : String(error);
          assert.unreachable(`${where}: the loader refuses this example: ${problems}`);
        }
        parsed++;
      }
    }
    assert.ok(parsed >= 4, `only ${parsed} cluster.yaml examples found: the classifier lost them`);
  } finally {
    process.env.HOME = savedHome;
    rmSync(home, { recursive: true, force: true });
  }
});

test('every make target and variable the docs name exists in the Makefile', () => {
  const makefile = readMakefile(readFileSync(join(root, 'Makefile'), 'utf8'));
  for (const expected of ['cluster', 'pin', 'verify', 'bundle', 'unbundle', 'fsck', 'test', 'clean-pki']) {
    assert.ok(makefile.targets.has(expected), `the Makefile parser missed the target ${expected}`);
  }
  const small = readMakefile('STAGES := pin fetch\n.PHONY: $(STAGES) x\n$(STAGES): dep\n\t$(CLI) $(call flag,OFFLINE,--offline)\nx: ; @:\nENV_VARIABLES := CONFIG\n');
  assert.equal([...small.targets].sort(), ['pin', 'fetch', 'x'].sort());
  assert.equal([...small.variables].sort(), ['CLI', 'CONFIG', 'ENV_VARIABLES', 'OFFLINE', 'STAGES']);
  const problems: string[] = [];
  let uses = 0;
  for (const file of pages) {
    for (const use of makeUses(page(file)!)) {
      uses++;
      for (const target of use.targets) if (!makefile.targets.has(target)) problems.push(`${use.where}: make ${target}: no such target`);
      for (const variable of use.variables) if (!makefile.variables.has(variable)) problems.push(`${use.where}: ${variable}=: no such variable`);
    }
    for (const { where, name } of tableVariables(page(file)!)) {
      if (!makefile.variables.has(name)) problems.push(`${where}: ${name}=: no such variable in the Makefile`);
    }
  }
  assert.ok(uses > 20, `only ${uses} make commands found in the docs`);
  assert.equal(problems, [], problems.join('\n'));
});

test('each variable the Makefile hands on through the environment is read by the CLI or the tests', () => {
  const { environment } = readMakefile(readFileSync(join(root, 'Makefile'), 'utf8'));
  assert.ok(environment.includes('VERIFY_TIMEOUT'), 'ENV_VARIABLES in the Makefile');
  const sources: string[] = [];
  const walk = (dir: string): void => {
    for (const entry of readdirSync(join(root, dir), { withFileTypes: true })) {
      const path = `${dir}/${entry.name}`;
      if (entry.isDirectory()) walk(path);
      else if (path.endsWith('.ts')) sources.push(readFileSync(join(root, path), 'utf8'));
    }
  };
  walk('tasks');
  sources.push(readFileSync(join(root, 'test/run.ts'), 'utf8'));
  const unread = environment.filter((name) => !sources.some((text) => new RegExp(`env\\.${name}\\b|env\\[['"]${name}['"]\\]`).test(text)));
  assert.equal(unread, [], `listed in ENV_VARIABLES but read nowhere: ${unread.join(', ')}`);
});

test('the configuration reference lists exactly the keys the loader accepts', () => {
  const documented = referenceKeys(page('docs/configuration.md')!);
  const accepted = configKeyPaths();
  const undocumented = difference(accepted, documented);
  const unknown = difference(documented, accepted);
  assert.equal(undocumented, [], `accepted by the loader, missing from docs/configuration.md: ${undocumented.join(', ')}`);
  assert.equal(unknown, [], `in docs/configuration.md, not accepted by the loader: ${unknown.join(', ')}`);
  assert.is(documented.length, new Set(documented).size, 'a key listed twice');
  // A key added to the loader and not to the docs is caught.
  assert.equal(difference(configKeyPaths({ ...configKeys, hostPorts: { ...configKeys.hostPorts, metrics: true } }), documented), ['hostPorts.metrics']);
});

test('the README stays short: reference lives in docs/', () => {
  const size = statSync(join(root, 'README.md')).size;
  assert.ok(size <= 14_000, `README.md is ${size} bytes (at most 14,000: move reference into docs/)`);
  assert.ok(page('README.md')!.blocks.some((b) => b.lang === 'mermaid'), 'the README has its picture of the pipeline');
});

test.run();
