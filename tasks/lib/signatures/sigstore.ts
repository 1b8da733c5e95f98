// Sigstore signatures (Kubernetes binaries and images, and the envelope of containerd's
// attestation, whose statement attestation.ts reads), checked with @sigstore/verify
// against a trusted root: the certificate chains to the root's CA at the time the
// transparency log recorded the entry, the entry is signed by the root's log and names
// this signature, the signature covers the bytes, and the certificate names the expected
// identity and issuer. What upstream publishes is turned into a Sigstore bundle first
// (the same bundle cosign writes with --bundle), so one check serves both shapes:
// - a blob: NAME.sig (base64 signature) and NAME.cert (PEM, or base64 of PEM) beside it,
//   with the log entry found in the transparency log by pin (cosign verify-blob does the same);
// - an image: cosign's signature manifest (tag sha256-<digest>.sig), one layer per
//   signature whose annotations carry the signature, certificate and the log entry
//   (dev.sigstore.cosign/bundle), the layer itself being the signed payload.
import { bundleFromJSON, type Bundle } from '@sigstore/bundle';
import { crypto, pem, X509Certificate } from '@sigstore/core';
import { TrustedRoot } from '@sigstore/protobuf-specs';
import { toSignedEntity, toTrustMaterial, Verifier, VerificationError, PolicyError } from '@sigstore/verify';
import { SignatureError } from './openpgp.ts';
import type { SigstoreTrust } from './trust.ts';

/** A Rekor (v1) log entry as its API answers: the body and where the log put it, with its signed promise. */
export interface RekorEntry {
  body: string; // base64 of the canonicalized entry
  integratedTime: number;
  logID: string; // hex
  logIndex: number;
  verification?: { signedEntryTimestamp?: string };
}

export const cosignPayloadType = 'application/vnd.dev.cosign.simplesigning.v1+json';
export const cosignAnnotations = {
  signature: 'dev.cosignproject.cosign/signature',
  certificate: 'dev.sigstore.cosign/certificate',
  chain: 'dev.sigstore.cosign/chain',
  bundle: 'dev.sigstore.cosign/bundle',
} as const;

/** A certificate as upstream publishes it (PEM, or base64 of PEM) in DER. */
export function certificateDer(text: string): Buffer {
  let pemText = text.trim();
  if (!pemText.includes('-----BEGIN CERTIFICATE-----')) pemText = Buffer.from(pemText, 'base64').toString('utf8');
  if (!pemText.includes('-----BEGIN CERTIFICATE-----')) throw new Error('not a PEM certificate (nor base64 of one)');
  return pem.toDER(pemText.slice(pemText.indexOf('-----BEGIN CERTIFICATE-----')));
}

/** The hashedrekord body of an entry: the signed digest (hex) and signature (base64). */
export function entryBody(entry: RekorEntry): { kind: string; apiVersion: string; digest?: string; signature?: string } {
  const body = JSON.parse(Buffer.from(entry.body, 'base64').toString('utf8')) as {
    kind?: string;
    apiVersion?: string;
    spec?: { data?: { hash?: { value?: string } }; signature?: { content?: string } };
  };
  return { kind: String(body.kind), apiVersion: String(body.apiVersion), digest: body.spec?.data?.hash?.value, signature: body.spec?.signature?.content };
}

/** A Sigstore bundle (v0.1, the form cosign's legacy bundle converts to) of a message signature. */
export function messageBundle(certificate: Buffer, signature: Buffer, entry: RekorEntry): Record<string, unknown> {
  const body = entryBody(entry);
  return {
    mediaType: 'application/vnd.dev.sigstore.bundle+json;version=0.1',
    verificationMaterial: {
      x509CertificateChain: { certificates: [{ rawBytes: certificate.toString('base64') }] },
      tlogEntries: [
        {
          logIndex: String(entry.logIndex),
          logId: { keyId: Buffer.from(entry.logID, 'hex').toString('base64') },
          kindVersion: { kind: body.kind, version: body.apiVersion },
          integratedTime: String(entry.integratedTime),
          inclusionPromise: { signedEntryTimestamp: entry.verification?.signedEntryTimestamp ?? '' },
          canonicalizedBody: entry.body,
        },
      ],
      timestampVerificationData: { rfc3161Timestamps: [] },
    },
    messageSignature: {
      // The digest the log recorded as signed: the check of the signature over the bytes decides whether these are they.
      messageDigest: { algorithm: 'SHA2_256', digest: Buffer.from(body.digest ?? '', 'hex').toString('base64') },
      signature: signature.toString('base64'),
    },
  };
}

/** cosign's legacy bundle annotation ({SignedEntryTimestamp, Payload}) as a Rekor entry. */
export function cosignBundleEntry(annotation: string): RekorEntry {
  const json = JSON.parse(annotation) as { SignedEntryTimestamp?: string; Payload?: { body?: string; integratedTime?: number; logIndex?: number; logID?: string } };
  const p = json.Payload ?? {};
  return { body: p.body ?? '', integratedTime: p.integratedTime ?? 0, logIndex: p.logIndex ?? 0, logID: p.logID ?? '', verification: { signedEntryTimestamp: json.SignedEntryTimestamp ?? '' } };
}

export interface SigstoreSigner {
  identity: string;
  issuer: string;
  logIndex: string;
}

const tlogCodes = new Set(['TLOG_INCLUSION_PROMISE_ERROR', 'TLOG_INCLUSION_PROOF_ERROR', 'TLOG_BODY_ERROR', 'TLOG_MISSING_INCLUSION_ERROR', 'TLOG_ERROR']);

/**
 * Verifies a bundle over `artifact` against the trust's root, identity and issuer (for a
 * DSSE envelope, as an attestation is, the signed payload is in the bundle: no artifact).
 * Throws SignatureError (one line: subject, expected, found) on any refusal.
 */
export function verifyBundle(subject: string, bundleJson: unknown, artifact: Buffer | undefined, trust: SigstoreTrust): SigstoreSigner {
  let bundle: Bundle;
  try {
    bundle = bundleFromJSON(bundleJson);
  } catch (error) {
    throw new SignatureError(subject, 'a Sigstore bundle', `a malformed one (${(error as Error).message})`);
  }
  // Does the signature cover these bytes? Asked first, so other bytes are named as such.
  if (bundle.content.$case === 'messageSignature' && !artifact) throw new SignatureError(subject, 'the signed bytes beside a message signature', 'none (a bug)');
  if (bundle.content.$case === 'messageSignature' && artifact && bundle.verificationMaterial.content.$case === 'x509CertificateChain') {
    const leaf = X509Certificate.parse(Buffer.from(bundle.verificationMaterial.content.x509CertificateChain.certificates[0]!.rawBytes));
    if (!crypto.verify(artifact, crypto.createPublicKey(leaf.publicKey), Buffer.from(bundle.content.messageSignature.signature))) {
      throw new SignatureError(subject, `the bytes signed by ${leaf.subjectAltName ?? 'the certificate'}`, 'other bytes (the signature does not cover them)');
    }
  }
  let root: TrustedRoot;
  try {
    root = TrustedRoot.fromJSON(trust.trustedRoot);
  } catch (error) {
    throw new Error(`the trusted root of ${trust.origin} does not parse: ${(error as Error).message}`);
  }
  // A root that lists certificate-transparency logs has every certificate carry an SCT from one.
  const verifier = new Verifier(toTrustMaterial(root), { ctlogThreshold: root.ctlogs.length > 0 ? 1 : 0, tlogThreshold: 1, timestampThreshold: 1 });
  let signer;
  try {
    signer = verifier.verify(toSignedEntity(bundle, artifact));
  } catch (error) {
    if (error instanceof VerificationError || error instanceof PolicyError) {
      const why = `${error.message}${error.cause instanceof Error ? `: ${error.cause.message}` : ''}`;
      if (error.code === 'CERTIFICATE_ERROR') throw new SignatureError(subject, `a certificate that chains to the root of ${trust.origin}`, `one that does not (${why})`);
      if (tlogCodes.has(error.code)) throw new SignatureError(subject, `a transparency-log entry signed by the log of ${trust.origin} that names this signature`, `an entry that does not verify (${why})`);
      if (error.code === 'SIGNATURE_ERROR') throw new SignatureError(subject, 'a signature over these bytes', `one over other bytes (${why})`);
      throw new SignatureError(subject, `a signature that verifies against ${trust.origin}`, why);
    }
    throw error;
  }
  const identity = signer.identity?.subjectAlternativeName ?? '(none)';
  const issuer = signer.identity?.extensions?.issuer ?? '(none)';
  if (identity !== trust.identity || issuer !== trust.issuer) {
    throw new SignatureError(subject, `a certificate for ${trust.identity} from ${trust.issuer}`, `one for ${identity} from ${issuer}`);
  }
  const entry = bundle.verificationMaterial.tlogEntries[0];
  return { identity, issuer, logIndex: entry ? String(entry.logIndex) : '' };
}

/** The cosign simple-signing payload must name the image digest it signs. */
export function checkCosignPayload(subject: string, payload: Buffer, digest: string): void {
  let named: unknown;
  try {
    named = (JSON.parse(payload.toString('utf8')) as { critical?: { image?: { 'docker-manifest-digest'?: unknown } } }).critical?.image?.['docker-manifest-digest'];
  } catch {
    named = 'a payload that is not JSON';
  }
  if (named !== digest) throw new SignatureError(subject, `a signature of ${digest}`, `a signature of ${String(named)}`);
}
