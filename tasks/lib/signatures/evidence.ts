// The evidence of one verified signature: everything needed to check it again with no
// network (the signature, the certificate and transparency-log entry as a Sigstore bundle,
// or an attestation's own bundle; the trusted keys or root, the identity), as one JSON
// file kept in the cache under its sha256 and named by the lock. make fsck (and unbundle,
// through fsck) re-verifies it against the bytes the cache holds.
import { createReadStream } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import type { Cache } from '../store/cache.ts';
import { removeQuietly, sha256Hasher } from '../store/cache.ts';
import { verifyAttestation } from './attestation.ts';
import { readTrustedKeys, SignatureError, verifyDetached } from './openpgp.ts';
import { checkCosignPayload, verifyBundle } from './sigstore.ts';
import type { KnownKey, SigstoreSource } from './trust.ts';

export const evidenceVersion = 1;

export interface Evidence {
  corekubeEvidence: typeof evidenceVersion;
  /** What was signed, as messages name it: "kubeadm", "image registry.k8s.io/pause:3.10.1". */
  subject: string;
  method: 'openpgp' | 'sigstore' | 'cosign' | 'attestation';
  /** sha256 of the signed bytes: the cache entry (artifacts, and what an attestation names), or of the cosign payload (images). */
  sha256: string;
  /** keys: the armored keys checked against (kept here, so the evidence alone re-verifies); keyFile: the file pin downloaded them in, kept in the cache. */
  openpgp?: { signature: string; keys: string; allowed?: KnownKey[]; origin: string; keyFile?: { url: string; sha256: string } };
  sigstore?: { source: SigstoreSource; bundle: unknown; trustedRoot: Record<string, unknown>; identity: string; issuer: string; origin: string };
  /** For an image: the signed payload (base64) and the manifest digest it must name. */
  cosign?: { payload: string; digest: string };
  /** For an attestation: the name its statement gives the artifact, and the file pin downloaded (upstream's URL, its sha256 in the cache). */
  attestation?: { name: string; file: { url: string; sha256: string } };
}

/** What the lock says about one artifact or image: how it was verified and against whom, or why not. */
export interface SignatureRecord {
  method: 'openpgp' | 'sigstore' | 'cosign' | 'attestation' | 'none';
  /** Key fingerprint and name, or identity (issuer). */
  signer?: string;
  /** sha256 of the evidence file in the cache. */
  evidence?: string;
  /** For method none: what upstream publishes instead. */
  why?: string;
}

/** Small bytes (evidence, a key file) into the cache under their sha256: whole or not at all. */
export async function storeBytes(cache: Cache, bytes: Buffer | string, label: string): Promise<string> {
  const hex = sha256Hasher().update(bytes).digest('hex');
  if (cache.has(hex)) return hex;
  const tmp = await cache.temporaryPath(label);
  try {
    await writeFile(tmp, bytes, { flag: 'wx' });
    await cache.commit(tmp, hex);
  } finally {
    await removeQuietly(tmp);
  }
  return hex;
}

export async function storeEvidence(cache: Cache, evidence: Evidence): Promise<string> {
  return storeBytes(cache, `${JSON.stringify(evidence, null, 1)}\n`, 'evidence');
}

export function parseEvidence(source: string, text: string): Evidence {
  let json: Evidence;
  try {
    json = JSON.parse(text) as Evidence;
  } catch {
    throw new Error(`${source}: not signature evidence (not JSON)`);
  }
  if (json?.corekubeEvidence !== evidenceVersion || !['openpgp', 'sigstore', 'cosign', 'attestation'].includes(json.method) || !/^[0-9a-f]{64}$/.test(json.sha256 ?? '')) {
    throw new Error(`${source}: not corekube signature evidence (version ${evidenceVersion})`);
  }
  return json;
}

/**
 * Checks the evidence again, offline: against the signed bytes (a file path or bytes) for
 * an artifact, against its own payload for an image. Returns the signer as the lock
 * names it; throws SignatureError on a refusal.
 */
export async function reverify(evidence: Evidence, signed?: string | Buffer): Promise<string> {
  const { subject } = evidence;
  if (evidence.method === 'openpgp' && evidence.openpgp) {
    if (signed === undefined) throw new SignatureError(subject, `the signed bytes (sha256 ${evidence.sha256}) in the cache`, 'nothing');
    const keys = await readTrustedKeys(evidence.openpgp.keys, evidence.openpgp.allowed, `${subject}: the keys kept with its evidence`);
    const signer = await verifyDetached(subject, signed, Buffer.from(evidence.openpgp.signature, 'base64'), keys, evidence.openpgp.origin);
    return `${signer.fingerprint} ${signer.name}`;
  }
  if (evidence.sigstore) {
    const { bundle, trustedRoot, identity, issuer, origin, source } = evidence.sigstore;
    const trust = { source, trustedRoot, identity, issuer, origin };
    if (evidence.method === 'cosign' && evidence.cosign) {
      const payload = Buffer.from(evidence.cosign.payload, 'base64');
      checkCosignPayload(subject, payload, evidence.cosign.digest);
      const signer = verifyBundle(subject, bundle, payload, trust);
      return `${signer.identity} (${signer.issuer})`;
    }
    if (evidence.method === 'attestation' && evidence.attestation) {
      const signer = verifyAttestation(subject, bundle, { name: evidence.attestation.name, sha256: evidence.sha256 }, trust);
      // The statement names a digest; the bytes, where the cache has them (fetch put them there), must have it.
      const found = signed === undefined ? evidence.sha256 : await sha256Of(signed);
      if (found !== evidence.sha256) throw new SignatureError(subject, `the bytes the attestation names (sha256 ${evidence.sha256})`, `other bytes (sha256 ${found})`);
      return `${signer.identity} (${signer.issuer})`;
    }
    if (signed === undefined) throw new SignatureError(subject, `the signed bytes (sha256 ${evidence.sha256}) in the cache`, 'nothing');
    const bytes = typeof signed === 'string' ? await readFile(signed) : signed;
    const signer = verifyBundle(subject, bundle, bytes, trust);
    return `${signer.identity} (${signer.issuer})`;
  }
  throw new SignatureError(subject, 'evidence of an OpenPGP or Sigstore signature', `method ${evidence.method} without its material`);
}

async function sha256Of(data: string | Buffer): Promise<string> {
  const hash = sha256Hasher();
  if (typeof data !== 'string') return hash.update(data).digest('hex');
  for await (const chunk of createReadStream(data)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}
