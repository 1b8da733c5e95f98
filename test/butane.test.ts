// The built-in Butane translator, directly: against real butane output (the one
// reference this workplace holds), Go's JSON and data URL rules, and the refusals.
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { goJson, makeDataUrl, percentEscape, translateButane } from '../tasks/lib/butane/butane.ts';
import { InputError } from '../tasks/lib/errors.ts';
import { projectRoot } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-butane-'));
test.after(() => rmSync(work, { recursive: true, force: true }));

const vectors = join(projectRoot, 'test', 'vectors');
const translate = (text: string, filesDir = work) => translateButane(text, { filesDir, source: 'test.bu' });
const header = 'variant: fcos\nversion: 1.4.0\n';

function refusal(text: string, filesDir = work): InputError {
  try {
    translate(text, filesDir);
  } catch (error) {
    if (error instanceof InputError) return error;
    throw error;
  }
  throw new Error('the translator accepted what it should refuse');
}

/** gzip resources as their decoded bytes: zlib's and Go's deflate streams differ for the same input. */
function gunzipSources(ignition: string): unknown {
  return JSON.parse(ignition, (key, value) => {
    if (value && typeof value === 'object' && value.compression === 'gzip' && typeof value.source === 'string') {
      return { ...value, source: gunzipSync(Buffer.from(value.source.replace(/^data:;base64,/, ''), 'base64')).toString('utf8') };
    }
    return value;
  });
}

test('matches real butane output byte for byte: field order, modes, data URLs, unit contents, the gzip stream', () => {
  const ours = translate(readFileSync(join(vectors, 'butane-example.bu'), 'utf8'));
  const theirs = readFileSync(join(vectors, 'butane-example.ign'), 'utf8');
  assert.ok(ours.endsWith('}\n'), 'compact, newline-terminated');
  assert.is(ours, theirs);
  assert.equal(gunzipSources(ours), gunzipSources(theirs));
  execFileSync('ignition-validate', ['-'], { input: ours });
});

test('data URLs: percent-escaped as vincent-petithory/dataurl does, base64 or gzip when shorter', () => {
  assert.is(percentEscape(Buffer.from("Hello, world!\n-_.~*'()")), "Hello%2C%20world!%0A-_.~*'()");
  assert.is(percentEscape(Buffer.from('a/b:c=d&e')), 'a%2Fb%3Ac%3Dd%26e');
  assert.is(percentEscape(Buffer.from([0xc3, 0xa9, 0x00])), '%C3%A9%00');
  assert.equal(makeDataUrl(Buffer.from('overlay\nbr_netfilter\n')), { source: 'data:,overlay%0Abr_netfilter%0A', compression: '' });
  // Binary bytes escape to three characters each: base64 is shorter.
  const binary = Buffer.from(Array.from({ length: 48 }, (_, i) => (i * 37 + 128) % 256));
  assert.equal(makeDataUrl(binary), { source: `data:;base64,${binary.toString('base64')}`, compression: '' });
  const repetitive = Buffer.from('net.ipv4.ip_forward = 1\n'.repeat(40));
  const gz = makeDataUrl(repetitive);
  assert.is(gz.compression, 'gzip');
  assert.equal(gunzipSync(Buffer.from(gz.source.slice('data:;base64,'.length), 'base64')), repetitive);
});

test("JSON as Go writes it: <, >, & and U+2028 escaped, \\b and \\f as \\u, empty fields omitted", () => {
  assert.is(goJson({ a: 'x <y> & z\u2028', b: '\b\f\n\t"\\' }), '{"a":"x \\u003cy\\u003e \\u0026 z\\u2028","b":"\\u0008\\u000c\\n\\t\\"\\\\"}');
  assert.is(goJson({ ignition: { config: { merge: undefined }, version: '3.3.0' }, storage: { files: undefined } }), '{"ignition":{"version":"3.3.0"}}');
  const unit = translate(`${header}systemd:\n  units:\n    - name: a.service\n      contents: "[Service]\\nExecStart=/bin/sh -c 'a && b > c'\\n"\n`);
  assert.match(unit, /a \\u0026\\u0026 b \\u003e c/);
});

test('files, directories and owners: octal modes become decimal, keys in Ignition schema order', () => {
  writeFileSync(join(work, 'key'), 'ssh-ed25519 AAAA k\n');
  const out = JSON.parse(translate(`${header}storage:
  directories:
    - path: /var/home/core/.ssh
      mode: 0700
      user: {name: core}
      group: {name: core}
  files:
    - path: /var/home/core/.ssh/authorized_keys.d/corekube
      overwrite: true
      mode: 0600
      user: {id: 1000}
      contents:
        local: key
`));
  assert.equal(Object.keys(out.storage.files[0]), ['overwrite', 'path', 'user', 'contents', 'mode']);
  assert.equal(Object.keys(out.storage.directories[0]), ['group', 'path', 'user', 'mode']);
  assert.is(out.storage.directories[0].mode, 0o700);
  assert.is(out.storage.files[0].mode, 384);
  assert.equal(out.storage.files[0].user, { id: 1000 });
  assert.equal(out.storage.files[0].contents, { compression: '', source: 'data:,ssh-ed25519%20AAAA%20k%0A' });
});

test('ignition.config.merge[].local embeds the file, version last, as butane does', () => {
  writeFileSync(join(work, 'base.ign'), '{"ignition":{"version":"3.3.0"}}\n');
  const out = translate(`${header}ignition:\n  config:\n    merge:\n      - local: base.ign\n`);
  // JSON punctuation escapes to three characters each: base64 is the shorter form here.
  const base64 = Buffer.from('{"ignition":{"version":"3.3.0"}}\n').toString('base64');
  assert.is(out, `{"ignition":{"config":{"merge":[{"compression":"","source":"data:;base64,${base64}"}]},"version":"3.3.0"}}\n`);
});

test('refuses what it does not cover, naming the field, and points at butane', () => {
  const luks = refusal(`${header}storage:\n  luks:\n    - name: data\n      device: /dev/vdb\n`);
  assert.equal(luks.problems.map((p) => p.path), ['storage.luks']);
  assert.match(luks.message, /test\.bu/);
  assert.match(luks.message, /install butane/);
  const keysLocal = refusal(`${header}passwd:\n  users:\n    - name: core\n      ssh_authorized_keys_local: [key]\n`);
  assert.equal(keysLocal.problems.map((p) => p.path), ['passwd.users[0].ssh_authorized_keys_local']);
  const nested = refusal(`${header}systemd:\n  units:\n    - name: a.service\n      contents_local: a.service\n`);
  assert.equal(nested.problems.map((p) => p.path), ['systemd.units[0].contents_local']);
  assert.equal(refusal('variant: fcos\nversion: 1.5.0\n').problems.map((p) => p.path), ['version']);
  assert.equal(refusal('variant: openshift\nversion: 1.4.0\n').problems.map((p) => p.path), ['variant']);
});

test("refuses what butane --strict refuses: decimal-looking modes, an enabled unit with no [Install]", () => {
  const decimal = refusal(`${header}storage:\n  files:\n    - path: /etc/a\n      mode: 644\n      contents: {inline: a}\n`);
  assert.equal(decimal.problems.map((p) => p.path), ['storage.files[0].mode']);
  assert.match(decimal.message, /did you mean 0644/);
  const install = refusal(`${header}systemd:\n  units:\n    - name: a.service\n      enabled: true\n      contents: "[Service]\\nExecStart=/bin/true\\n"\n`);
  assert.equal(install.problems.map((p) => p.path), ['systemd.units[0].contents']);
});

test('local files stay inside the files directory; a missing one is named', () => {
  const files = join(work, 'files');
  mkdirSync(files, { recursive: true });
  writeFileSync(join(work, 'outside'), 'secret');
  symlinkSync(join(work, 'outside'), join(files, 'link'));
  const file = (local: string) => `${header}storage:\n  files:\n    - path: /etc/a\n      contents: {local: "${local}"}\n`;
  assert.match(refusal(file('../outside'), files).message, /storage\.files\[0\]\.contents\.local: expected a path inside the files directory/);
  assert.match(refusal(file('link'), files).message, /a link to .*outside/);
  assert.match(refusal(file('nope'), files).message, /expected a readable file .*files\/nope, found none/);
});

test('every file in fcc/ translates and ignition-validate accepts the result', () => {
  const files = join(work, 'fcc-files');
  mkdirSync(files, { recursive: true });
  // Every file the Butane sources pull in with `local:` (base.ign is compiled below).
  const locals = new Set(
    ['base', 'control-plane', 'worker'].flatMap((role) => [...readFileSync(join(projectRoot, 'fcc', `${role}.bu`), 'utf8').matchAll(/^\s*local: (\S+)$/gm)].map((m) => m[1]!)),
  );
  locals.delete('base.ign');
  assert.ok(locals.has('kubeadm.yaml') && locals.has('resolv.conf') && locals.has('kubeadm-patch-etcd.yaml'), [...locals].join(', '));
  for (const name of locals) writeFileSync(join(files, name), `${name}\n`);
  const base = translate(readFileSync(join(projectRoot, 'fcc', 'base.bu'), 'utf8'), files);
  writeFileSync(join(files, 'base.ign'), base);
  for (const role of ['base', 'control-plane', 'worker']) {
    const out = translate(readFileSync(join(projectRoot, 'fcc', `${role}.bu`), 'utf8'), files);
    execFileSync('ignition-validate', ['-'], { input: out });
    assert.is(JSON.parse(out).ignition.version, '3.3.0');
  }
});

test.run();
