// Detached OpenPGP signatures (FCOS images, butane, runc), checked with OpenPGP.js against
// trusted public keys. Streams the signed file, so a 1 GiB image costs no memory.
import { createReadStream } from 'node:fs';
import { Readable } from 'node:stream';
import * as openpgp from 'openpgp';
import type { KnownKey } from './trust.ts';

/** A refusal: one line naming the subject, what was expected and what was found (and, apart, the next step). */
export class SignatureError extends Error {
  readonly subject: string;
  readonly expected: string;
  readonly found: string;
  /** What to do about it, for the lines after the refusal. */
  readonly hint?: string;
  constructor(subject: string, expected: string, found: string, options: { refused?: string; hint?: string } = {}) {
    super(`${subject}: ${options.refused ?? 'signature'} refused: expected ${expected}; found ${found}`);
    this.name = 'SignatureError';
    this.subject = subject;
    this.expected = expected;
    this.found = found;
    if (options.hint) this.hint = options.hint;
  }
}

export interface OpenpgpSigner {
  /** The primary key's fingerprint (uppercase hex). */
  fingerprint: string;
  /** Its first user ID. */
  name: string;
}

const describeKey = (key: openpgp.PublicKey) => `${key.getFingerprint().toUpperCase()} (${key.getUserIDs()[0] ?? 'no user ID'})`;

/**
 * The trusted keys of a key file (one armor block after another, as fedora.gpg and
 * runc.keyring are): those whose primary key's fingerprint is in `allowed`. Other keys in
 * the file are left out, never trusted (fedora.gpg holds every current Fedora release's
 * key, runc.keyring every maintainer's); a file with none of the allowed keys is refused
 * (`what` names the file, `allowedFrom` where the fingerprints are kept, `hint` the next step).
 */
export async function readTrustedKeys(armored: string, allowed: readonly KnownKey[] | undefined, what: string, allowedFrom = 'the fingerprints kept with the evidence', hint?: string): Promise<openpgp.PublicKey[]> {
  const keys: openpgp.PublicKey[] = [];
  const refused = (expected: string, found: string) => new SignatureError(what, expected, found, { refused: 'key file', ...(hint ? { hint } : {}) });
  try {
    const blocks = armored.split(/(?=-----BEGIN PGP PUBLIC KEY BLOCK-----)/).filter((b) => b.includes('-----BEGIN PGP PUBLIC KEY BLOCK-----'));
    for (const block of blocks) keys.push(...(await openpgp.readKeys({ armoredKeys: block.slice(0, block.indexOf('-----END PGP PUBLIC KEY BLOCK-----') + 34) })));
  } catch (error) {
    throw refused('armored OpenPGP public keys', `something else (${(error as Error).message.split('\n')[0]})`);
  }
  if (keys.length === 0) throw refused('armored OpenPGP public keys', 'no public key block');
  if (allowed) {
    const known = new Set(allowed.map((k) => k.fingerprint));
    const trusted = keys.filter((k) => known.has(k.getFingerprint().toUpperCase()));
    if (trusted.length === 0) throw refused(`a key among ${allowedFrom} (${allowed.map((k) => k.fingerprint).join(', ')})`, `none of them: ${keys.map(describeKey).join(', ')}`);
    return trusted;
  }
  return keys;
}

function parseSignature(bytes: Buffer): Promise<openpgp.Signature> {
  const text = bytes.toString('latin1');
  return text.includes('-----BEGIN PGP SIGNATURE-----') ? openpgp.readSignature({ armoredSignature: text }) : openpgp.readSignature({ binarySignature: new Uint8Array(bytes) });
}

/**
 * Checks a detached signature over a file (or bytes) against the trusted keys. Returns the
 * signer; throws SignatureError naming `subject` when the signature is by a key not
 * trusted, or does not cover these bytes.
 */
export async function verifyDetached(subject: string, data: string | Buffer, signatureBytes: Buffer, keys: openpgp.PublicKey[], trustedFrom: string): Promise<OpenpgpSigner> {
  let signature: openpgp.Signature;
  try {
    signature = await parseSignature(signatureBytes);
  } catch (error) {
    throw new SignatureError(subject, 'an OpenPGP signature', `something else (${(error as Error).message})`);
  }
  const ids = signature.getSigningKeyIDs().map((id) => id.toHex().toUpperCase());
  const key = keys.find((k) => ids.some((id) => k.getKeys().some((sub) => sub.getKeyID().toHex().toUpperCase() === id)));
  const expectedKeys = `a signature by ${trustedFrom} (${keys.map((k) => k.getFingerprint().toUpperCase()).join(', ')})`;
  if (!key) throw new SignatureError(subject, expectedKeys, `a signature by key ${ids.join(', ') || '(no issuer)'}, which is not trusted`);
  const source = typeof data === 'string' ? (Readable.toWeb(createReadStream(data)) as unknown as ReadableStream<Uint8Array>) : new Uint8Array(data);
  const message = await openpgp.createMessage({ binary: source });
  const result = await openpgp.verify({ message, signature, verificationKeys: [key], format: 'binary' });
  // The data must be read to the end before the signature's check settles.
  const stream = result.data as unknown as ReadableStream<Uint8Array> | Uint8Array;
  if (!(stream instanceof Uint8Array)) {
    const reader = stream.getReader();
    while (!(await reader.read()).done);
  }
  const fingerprint = key.getFingerprint().toUpperCase();
  const name = key.getUserIDs()[0] ?? '';
  try {
    await result.signatures[0]!.verified;
  } catch (error) {
    const why = (error as Error).message;
    if (/digest did not match|signed digest did not match|Signed digest/i.test(why)) {
      throw new SignatureError(subject, `the bytes ${fingerprint} (${name}) signed`, 'other bytes (the signature does not cover this file)');
    }
    throw new SignatureError(subject, `a valid signature by ${fingerprint} (${name})`, why);
  }
  return { fingerprint, name };
}
