// cluster.yaml's `signatures:`: whom pin trusts to have signed each source, where a site's
// mirrors re-sign with their own key or their own Sigstore instance. Each source left out
// keeps upstream's signer (tasks/lib/signatures/trust.ts, docs/signatures.md).
import { isAbsolute, resolve } from 'node:path';
import { openpgpSources, sigstoreSources, type SignatureSettings } from '../signatures/trust.ts';
import { fieldPath, type Reader } from './fields.ts';

/** The keys `signatures:` may hold (configKeys.signatures in config.ts is built from these). */
export const signatureConfigKeys = {
  ...Object.fromEntries(openpgpSources.map((source) => [source, { keys: true, fingerprints: true }])),
  ...Object.fromEntries(sigstoreSources.map((source) => [source, { trustedRoot: true, identity: true, issuer: true }])),
} as { fcos: OpenpgpKeys; butane: OpenpgpKeys; runc: OpenpgpKeys; kubernetes: SigstoreKeys; images: SigstoreKeys; containerd: SigstoreKeys };

type OpenpgpKeys = { keys: true; fingerprints: true };
type SigstoreKeys = { trustedRoot: true; identity: true; issuer: true };

/** A primary key's fingerprint: 40 hex digits, spaces allowed (as Fedora's security page prints them). */
const fingerprintPattern = /^(?:[0-9A-Fa-f]{4}\s*){10}$/;

export function parseSignatureSettings(r: Reader, value: unknown, baseDir: string): SignatureSettings {
  const settings: SignatureSettings = { openpgp: {}, sigstore: {} };
  if (value === undefined || value === null) return settings;
  const section = r.object(value, 'signatures', Object.keys(signatureConfigKeys));
  if (!section) return settings;
  const file = (v: unknown, path: string, what: string) => {
    const text = r.string(v, path, what);
    return text === undefined ? undefined : isAbsolute(text) ? text : resolve(baseDir, text);
  };
  for (const source of openpgpSources) {
    if (section[source] === undefined) continue;
    const path = fieldPath('signatures', source);
    const entry = r.object(section[source], path, ['keys', 'fingerprints']);
    if (!entry) continue;
    if (entry.keys === undefined && entry.fingerprints === undefined) {
      r.problem(path, 'keys (a file of armored OpenPGP public keys), fingerprints (the keys to accept from the key file upstream publishes, through the mirrors), or both', 'neither');
      continue;
    }
    const own: NonNullable<SignatureSettings['openpgp'][typeof source]> = {};
    if (entry.keys !== undefined) own.keys = file(entry.keys, fieldPath(path, 'keys'), 'the path of a file of armored OpenPGP public keys');
    if (entry.fingerprints !== undefined) {
      const list = r.list(entry.fingerprints, fieldPath(path, 'fingerprints'), 'a list of primary key fingerprints (40 hex digits)');
      const fingerprints = (list ?? []).map((item, i) => r.string(item, fieldPath(fieldPath(path, 'fingerprints'), i), 'a primary key fingerprint (40 hex digits)', fingerprintPattern));
      if (list && list.length === 0) r.problem(fieldPath(path, 'fingerprints'), 'at least one fingerprint', 'an empty list');
      own.fingerprints = fingerprints.filter((f): f is string => f !== undefined).map((f) => f.replace(/\s+/g, '').toUpperCase());
    }
    settings.openpgp[source] = own;
  }
  for (const source of sigstoreSources) {
    if (section[source] === undefined) continue;
    const path = fieldPath('signatures', source);
    const entry = r.object(section[source], path, ['trustedRoot', 'identity', 'issuer']);
    if (!entry) continue;
    const own: NonNullable<SignatureSettings['sigstore'][typeof source]> = {};
    if (entry.trustedRoot !== undefined) own.trustedRoot = file(entry.trustedRoot, fieldPath(path, 'trustedRoot'), 'the path of a Sigstore trusted_root.json');
    if (entry.identity !== undefined) own.identity = r.string(entry.identity, fieldPath(path, 'identity'), 'the certificate identity (an e-mail address or URI; {tag} stands for the release\'s tag)', /^\S+$/);
    if (entry.issuer !== undefined) own.issuer = r.string(entry.issuer, fieldPath(path, 'issuer'), 'the OIDC issuer URL', /^https?:\/\/\S+$/);
    settings.sigstore[source] = own;
  }
  return settings;
}
