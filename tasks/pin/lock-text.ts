// The lock's text and its diff (pure): renderLock writes corekube.lock.yaml in one fixed
// form; diffLocks and summarize say what a new pin changed, one line per entry.
import { parse as parseYamlScalar } from 'yaml';
import { lockedArtifacts, lockVersion, type AnyArtifactKey, type Lock } from '../lib/inputs/lock.ts';
import type { SignatureRecord } from '../lib/signatures/evidence.ts';

export type LockContent = Pick<Lock, 'fcos' | 'kubernetes' | 'artifacts' | 'images' | 'signatures'>;

/** One comment per artifact: where its checksum came from. */
export type ArtifactNotes = Partial<Record<AnyArtifactKey, string>>;

export const compare = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);

/** A scalar as YAML: plain where it reads back as the same string, quoted otherwise. */
function scalar(value: string): string {
  let plain = false;
  try {
    plain = !/[,{}[\]#]|: |^[-?:&*!|>'"%@`]|\s$/.test(value) && parseYamlScalar(value) === value;
  } catch {
    plain = false;
  }
  return plain ? value : JSON.stringify(value);
}

/** The lock's text: fixed key order, images sorted by name:tag, one comment per artifact. */
export function renderLock(content: LockContent, notes: ArtifactNotes = {}): string {
  const lines = [
    '# corekube.lock.yaml: what exactly ships. Written by `make pin` (tasks/pin/) from upstream\'s',
    '# metadata, checksum files and registries; change cluster.yaml and pin again rather than',
    '# editing it. Every other task reads this file and nothing else.',
    `lockVersion: ${lockVersion}`,
    `fcos: {stream: ${scalar(content.fcos.stream)}, release: ${scalar(content.fcos.release)}, arch: ${scalar(content.fcos.arch)}}`,
    `kubernetes: {version: ${scalar(content.kubernetes.version)}}`,
    'artifacts:',
  ];
  for (const artifact of lockedArtifacts(content)) {
    const key = artifact.key;
    lines.push(`  ${key}:`);
    for (const note of (notes[key] ?? '').split('\n').filter(Boolean)) lines.push(`    # ${note}`);
    lines.push(`    url: ${scalar(artifact.url)}`, `    sha256: ${scalar(artifact.sha256)}`);
    if (artifact.uncompressedSha256) lines.push(`    uncompressedSha256: ${scalar(artifact.uncompressedSha256)}`);
  }
  const images = [...content.images].sort((a, b) => compare(`${a.name}:${a.tag}`, `${b.name}:${b.tag}`));
  if (images.length === 0) lines.push('images: []');
  else {
    lines.push('images:  # name:tag@digest the registry serves for the tag; layoutDigest: the linux/ARCH OCI manifest the layout holds, where it differs');
    for (const image of images) {
      const text = `${image.name}:${image.tag}@${image.digest}`;
      if (image.layoutDigest === image.digest) lines.push(`  - ${scalar(text)}`);
      else lines.push(`  - image: ${scalar(text)}`, `    layoutDigest: ${scalar(image.layoutDigest)}`);
    }
  }
  if (content.signatures) lines.push(...renderSignatures(content));
  return `${lines.join('\n')}\n`;
}

/** One line per artifact and image: how pin verified it and against whom, or why not. */
function signatureText(record: SignatureRecord): string {
  if (record.method === 'none') return `{method: none, why: ${JSON.stringify(record.why ?? '')}}`;
  return `{method: ${record.method}, signer: ${JSON.stringify(record.signer ?? '')}, evidence: ${record.evidence}}`;
}

function renderSignatures(content: LockContent): string[] {
  const signatures = content.signatures!;
  const lines = ['signatures:  # what pin verified, against whom (evidence: the cache entry make fsck re-verifies offline), or why nothing', '  artifacts:'];
  for (const artifact of lockedArtifacts(content)) {
    const record = signatures.artifacts[artifact.key];
    if (record) lines.push(`    ${artifact.key}: ${signatureText(record)}`);
  }
  const images = Object.keys(signatures.images).sort(compare);
  if (images.length === 0) lines.push('  images: {}');
  else lines.push('  images:', ...images.map((ref) => `    ${JSON.stringify(ref)}: ${signatureText(signatures.images[ref]!)}`));
  return lines;
}

const short = (digest: string) => digest.replace(/^(sha256:)?([0-9a-f]{12})[0-9a-f]{52}$/, (_, prefix: string | undefined, head: string) => `${prefix ?? ''}${head}…`);

/** Every entry of a lock as key → value, for the diff. Images are keyed by name where the name is unique. */
export function lockEntries(lock: LockContent, uniqueNames: ReadonlySet<string>): Map<string, string> {
  const entries = new Map<string, string>();
  entries.set('fcos', `${lock.fcos.stream} ${lock.fcos.release} ${lock.fcos.arch}`);
  entries.set('kubernetes.version', lock.kubernetes.version);
  for (const a of lockedArtifacts(lock)) {
    const key = a.key;
    entries.set(`artifacts.${key}`, `${a.url} sha256:${a.sha256}${a.uncompressedSha256 ? ` uncompressed sha256:${a.uncompressedSha256}` : ''}`);
  }
  for (const image of [...lock.images].sort((a, b) => compare(`${a.name}:${a.tag}`, `${b.name}:${b.tag}`))) {
    const key = uniqueNames.has(image.name) ? `image ${image.name}` : `image ${image.name}:${image.tag}`;
    entries.set(key, `${image.name}:${image.tag}@${image.digest}${image.layoutDigest !== image.digest ? ` layout ${image.layoutDigest}` : ''}`);
  }
  const said = (r: SignatureRecord) => (r.method === 'none' ? 'none' : `${r.method} ${r.signer}`);
  for (const [key, record] of Object.entries(lock.signatures?.artifacts ?? {})) entries.set(`signature ${key}`, said(record));
  for (const [ref, record] of Object.entries(lock.signatures?.images ?? {})) entries.set(`signature ${ref}`, said(record));
  return entries;
}

/** Diff-style lines between two locks: `+ key: value`, `- key: value`, `~ key: old → new`. */
export function diffLocks(before: LockContent | undefined, after: LockContent): string[] {
  const counts = (lock: LockContent | undefined) => {
    const map = new Map<string, number>();
    for (const image of lock?.images ?? []) map.set(image.name, (map.get(image.name) ?? 0) + 1);
    return map;
  };
  const [b, a] = [counts(before), counts(after)];
  const unique = new Set([...new Set([...b.keys(), ...a.keys()])].filter((name) => (b.get(name) ?? 0) <= 1 && (a.get(name) ?? 0) <= 1));
  const old = before ? lockEntries(before, unique) : new Map<string, string>();
  const now = lockEntries(after, unique);
  const shown = (value: string) => value.replace(/(sha256:)?\b[0-9a-f]{64}\b/g, (match) => short(match));
  const lines: string[] = [];
  for (const key of [...new Set([...old.keys(), ...now.keys()])]) {
    const [was, is] = [old.get(key), now.get(key)];
    if (was === is) continue;
    if (was === undefined) lines.push(`+ ${key}: ${shown(is!)}`);
    else if (is === undefined) lines.push(`- ${key}: ${shown(was)}`);
    else {
      // An artifact whose URL stayed: only its checksums changed (upstream re-published it).
      const [wasUrl, ...wasRest] = was.split(' ');
      const [isUrl, ...isRest] = is.split(' ');
      const sameUrl = key.startsWith('artifacts.') && wasUrl === isUrl;
      lines.push(sameUrl ? `~ ${key}: ${shown(wasRest.join(' '))} → ${shown(isRest.join(' '))} (same URL)` : `~ ${key}: ${shown(was)} → ${shown(is)}`);
    }
  }
  return lines;
}

/** The summary pin prints: a headline and the diff lines. */
export function summarize(name: string, beforeText: string | undefined, before: LockContent | undefined, beforeProblem: string | undefined, text: string, after: LockContent): { headline: string; changes: string[]; written: boolean } {
  if (beforeText === text) return { headline: `${name}: unchanged`, changes: [], written: false };
  if (beforeText === undefined) {
    const changes = diffLocks(undefined, after);
    return { headline: `${name}: new lock, ${changes.length} entries`, changes, written: true };
  }
  if (!before) {
    const changes = diffLocks(undefined, after);
    return { headline: `${name}: the old lock did not parse (${beforeProblem ?? 'unreadable'}); replaced, ${changes.length} entries`, changes, written: true };
  }
  const changes = diffLocks(before, after);
  if (changes.length === 0) return { headline: `${name}: unchanged pins (the file was rewritten in pin's format)`, changes, written: true };
  return { headline: `${name}: ${changes.length} change${changes.length === 1 ? '' : 's'}`, changes, written: true };
}
