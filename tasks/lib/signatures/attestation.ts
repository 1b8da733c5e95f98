// GitHub build-provenance attestations (containerd's release tarballs). containerd's release
// workflow (.github/workflows/release.yml) runs actions/attest-build-provenance over the
// tarballs and publishes what it writes as containerd-VERSION-attestation.intoto.jsonl
// beside them: Sigstore bundles, one JSON document a line, each wrapping a DSSE envelope
// whose payload is an in-toto statement (predicate: SLSA provenance v1) with subjects
// {name: the tarball's file name, digest: {sha256}}. From v2.1.0 (actions/attest v2 and
// later) the file holds one bundle naming every tarball; v2.0.x (actions/attest v1) wrote
// one bundle per tarball, appended. The envelope is checked by sigstore.ts (certificate
// chain, transparency-log entry, identity: the workflow at the release's tag); the
// statement, read only from a verified envelope, must name the tarball with the sha256
// the lock pins.
import { SignatureError } from './openpgp.ts';
import { verifyBundle, type SigstoreSigner } from './sigstore.ts';
import type { SigstoreTrust } from './trust.ts';

export const inTotoPayloadType = 'application/vnd.in-toto+json';
export const slsaProvenanceV1 = 'https://slsa.dev/provenance/v1';
const statementTypes = new Set(['https://in-toto.io/Statement/v1', 'https://in-toto.io/Statement/v0.1']);

/** The first containerd release that publishes an attestation (its release.yml since then). */
export const containerdFirstAttested = '2.0.0';

/** What an attestation must say: the tarball's file name and the sha256 the lock pins. */
export interface AttestedSubject {
  name: string;
  sha256: string;
}

interface Statement {
  _type?: unknown;
  predicateType?: unknown;
  subject?: { name?: unknown; digest?: Record<string, unknown> }[];
}

/**
 * Where a containerd release publishes its attestation, from the tarball's release URL:
 * containerd-VERSION-attestation.intoto.jsonl beside it (VERSION: the tag without its v,
 * as release.yml names it), the tag, and the name the statement gives the tarball.
 */
export function containerdAttestation(artifactUrl: string): { url: string; tag: string; version: string; name: string } {
  const release = /^(.*\/containerd\/containerd\/releases\/download\/(v([^/]+)))\/([^/]+)$/.exec(artifactUrl);
  if (!release) throw new Error(`containerd's attestation: ${artifactUrl} is not a containerd release download URL (a bug)`);
  const [, dir, tag, version, name] = release as unknown as [string, string, string, string, string];
  return { url: `${dir}/containerd-${version}-attestation.intoto.jsonl`, tag, version, name };
}

/** Whether a version (1.2.3, no v) predates `first`: compared number by number. */
export function versionBefore(version: string, first: string): boolean {
  const parts = (v: string) => v.split(/[-+]/)[0]!.split('.').map(Number);
  const [a, b] = [parts(version), parts(first)];
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    if ((a[i] ?? 0) !== (b[i] ?? 0)) return (a[i] ?? 0) < (b[i] ?? 0);
  }
  return false;
}

/** The bundles of an attestation file: JSON lines (one bundle a line), or one JSON bundle. */
export function attestationBundles(subject: string, text: string, url: string): unknown[] {
  const refused = (found: string) => new SignatureError(subject, `Sigstore bundles as JSON lines at ${url}`, found, { refused: 'attestation' });
  try {
    const whole = JSON.parse(text) as unknown;
    if (whole && typeof whole === 'object' && !Array.isArray(whole)) return [whole];
  } catch {
    // More than one line: each is a bundle.
  }
  const lines = text.split('\n').map((line) => line.trim());
  const bundles: unknown[] = [];
  for (const [i, line] of lines.entries()) {
    if (line === '') continue;
    try {
      bundles.push(JSON.parse(line));
    } catch {
      throw refused(`line ${i + 1} that is not JSON`);
    }
  }
  if (bundles.length === 0) throw refused('an empty file');
  return bundles;
}

/** The in-toto statement of a bundle's DSSE envelope, as it says (unverified), or undefined. */
function statementOf(bundle: unknown): { payloadType: string; statement: Statement } | undefined {
  const envelope = (bundle as { dsseEnvelope?: { payload?: unknown; payloadType?: unknown } } | null)?.dsseEnvelope;
  if (typeof envelope?.payload !== 'string') return undefined;
  try {
    return { payloadType: String(envelope.payloadType), statement: JSON.parse(Buffer.from(envelope.payload, 'base64').toString('utf8')) as Statement };
  } catch {
    return undefined;
  }
}

const subjectNames = (statement: Statement | undefined): string[] => (Array.isArray(statement?.subject) ? statement.subject.map((s) => String(s?.name)) : []);

/**
 * Verifies one attestation: its envelope against the trust (chain, log entry, identity and
 * issuer), then its statement: an in-toto statement of SLSA provenance that names the
 * tarball with the sha256 expected. Throws SignatureError ("attestation refused").
 */
export function verifyAttestation(subject: string, bundle: unknown, want: AttestedSubject, trust: SigstoreTrust): SigstoreSigner {
  const refused = (expected: string, found: string) => new SignatureError(subject, expected, found, { refused: 'attestation' });
  if (!statementOf(bundle)) throw refused('a Sigstore bundle of a DSSE envelope (dsseEnvelope)', 'a bundle without one');
  let signer: SigstoreSigner;
  try {
    signer = verifyBundle(subject, bundle, undefined, trust);
  } catch (error) {
    if (error instanceof SignatureError) throw refused(error.expected, error.found);
    throw error;
  }
  const { payloadType, statement } = statementOf(bundle)!;
  if (payloadType !== inTotoPayloadType) throw refused(`an envelope of ${inTotoPayloadType}`, `one of ${payloadType}`);
  if (!statementTypes.has(String(statement._type)) || statement.predicateType !== slsaProvenanceV1) {
    throw refused(`an in-toto statement of ${slsaProvenanceV1}`, `${String(statement._type)} of ${String(statement.predicateType)}`);
  }
  const named = (statement.subject ?? []).filter((s) => s?.name === want.name);
  const by = `in the statement signed by ${signer.identity}`;
  if (named.length === 0) throw refused(`a subject ${want.name} ${by}`, `subjects ${listed(subjectNames(statement))}`);
  if (!named.some((s) => s.digest?.sha256 === want.sha256)) {
    throw refused(`subject ${want.name} with sha256 ${want.sha256} (what the lock pins) ${by}`, `sha256 ${named.map((s) => String(s.digest?.sha256)).join(', ')}`);
  }
  return signer;
}

function listed(names: string[]): string {
  if (names.length === 0) return 'none';
  return names.length > 6 ? `${names.slice(0, 6).join(', ')} and ${names.length - 6} more` : names.join(', ');
}

/**
 * The attestation of one tarball in an attestation file: each bundle whose statement
 * names the tarball is verified until one passes (every bundle of the file comes from the
 * same workflow run). Returns that bundle and its signer; the first refusal otherwise.
 */
export function findAttestation(subject: string, text: string, url: string, want: AttestedSubject, trust: SigstoreTrust): { bundle: unknown; signer: SigstoreSigner } {
  const bundles = attestationBundles(subject, text, url);
  const naming = bundles.filter((b) => subjectNames(statementOf(b)?.statement).includes(want.name));
  if (naming.length === 0) {
    const names = bundles.flatMap((b) => subjectNames(statementOf(b)?.statement));
    throw new SignatureError(subject, `an attestation of ${want.name} in ${url}`, `attestations of ${listed(names)}`, { refused: 'attestation' });
  }
  let firstRefusal: unknown;
  for (const bundle of naming) {
    try {
      return { bundle, signer: verifyAttestation(subject, bundle, want, trust) };
    } catch (error) {
      if (!(error instanceof SignatureError)) throw error;
      firstRefusal ??= error;
    }
  }
  throw firstRefusal;
}
