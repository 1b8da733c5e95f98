// Verifies upstream's signatures before anything enters the lock: FCOS images and butane
// against Fedora's keys and runc against runc.keyring (OpenPGP: the key files downloaded
// here from where upstream publishes them, through the mirrors, and held to the
// fingerprints kept in the source), Kubernetes binaries and registry.k8s.io images
// against Kubernetes' Sigstore identities, containerd's tarball against the build-provenance
// attestation its release workflow publishes (Sigstore). Each check keeps its
// evidence in the cache; the lock names it (signatures: in corekube.lock.yaml). A refusal
// is one line naming the artifact or image, what was expected and what was found, and
// pin writes nothing. What upstream does not sign is recorded as such, with what it
// publishes instead (docs/signatures.md has the table).
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import pLimit from 'p-limit';
import { UserError } from '../lib/errors.ts';
import type { AnyArtifactKey, Artifact, ImageRef, LockSignatures } from '../lib/inputs/lock.ts';
import { containerdAttestation, containerdFirstAttested, findAttestation, versionBefore } from '../lib/signatures/attestation.ts';
import { storeBytes, storeEvidence, type Evidence, type SignatureRecord } from '../lib/signatures/evidence.ts';
import { readTrustedKeys, SignatureError, verifyDetached } from '../lib/signatures/openpgp.ts';
import { certificateDer, checkCosignPayload, cosignAnnotations, cosignBundleEntry, cosignPayloadType, messageBundle, verifyBundle, type RekorEntry } from '../lib/signatures/sigstore.ts';
import { identityAt, readSiteKeys, signedRegistry, transparencyLogUrl, trustFor, upstreamKeyUrl, type OpenpgpKeys, type OpenpgpSource, type SigstoreTrust, type Trust } from '../lib/signatures/trust.ts';
import { runTool, ToolError } from '../lib/run/tool.ts';
import { registryHasNoSuchImage, splitName } from '../lib/store/oci.ts';
import { registryOf } from './images.ts';
import type { LockContent } from './lock-text.ts';
import { allOrNothing, downloadToCacheHashed, familyOf, fetchBytes, firstLine, mirrorNote, type Session } from './session.ts';

/** What upstream publishes for the artifacts it does not sign (checked for the versions testedComponents names). */
export const unsignedArtifacts: Partial<Record<AnyArtifactKey, string>> = {
  crictl: 'cri-tools publishes only .sha256/.sha512 checksum files (hack/release.sh)',
  'cni-plugins': 'containernetworking/plugins publishes only .sha256/.sha512 checksum files (.github/workflows/release.yaml)',
};

const openpgpArtifacts: Partial<Record<AnyArtifactKey, { source: OpenpgpSource; suffix: string }>> = {
  'fcos-qemu': { source: 'fcos', suffix: '.sig' },
  'fcos-openstack': { source: 'fcos', suffix: '.sig' },
  butane: { source: 'butane', suffix: '.asc' },
  runc: { source: 'runc', suffix: '.asc' },
};
const sigstoreArtifacts = new Set<AnyArtifactKey>(['kubeadm', 'kubelet', 'kubectl']);

/** Upstream's signature, certificate or attestation beside an artifact; its absence is a refusal, not a download error. */
async function signatureFile(s: Session, subject: string, url: string, what: 'signature' | 'attestation' = 'signature'): Promise<Buffer> {
  try {
    return (await fetchBytes(s, url, `the ${what} of ${subject}`, '')).bytes;
  } catch (error) {
    if (!(error instanceof UserError)) throw error;
    throw new SignatureError(subject, `upstream's ${what} at ${url}`, `none (${firstLine(error.message).replace(/^pin: [^:]*: /, '')})`, { refused: what });
  }
}

/** The signed bytes, in the cache (pin keeps them: fetch uses them, fsck re-verifies them). */
async function signedBytes(s: Session, artifact: Artifact): Promise<string> {
  if (s.cache.has(artifact.sha256)) return s.cache.entryPath(artifact.sha256);
  return (await downloadToCacheHashed(s, artifact.key, artifact.url, { sha256: artifact.sha256, checksumUrl: 'the checksum pin read for it' })).path;
}

type PublicKeys = Awaited<ReturnType<typeof readTrustedKeys>>;

/** One pin run's OpenPGP keys: each key file downloaded once, each source's keys checked once. */
interface KeyRing {
  files: Map<string, Promise<Buffer>>;
  sources: Map<OpenpgpSource, Promise<{ keys: OpenpgpKeys; parsed: PublicKeys }>>;
}

/**
 * The keys a source's signatures are checked against: a site's own key file, or the file
 * upstream publishes them in (upstreamKeyUrl), downloaded through the mirrors and held to
 * the fingerprints; that file goes into the cache only once it passed, as evidence.
 */
function keysFor(s: Session, ring: KeyRing, trust: Trust, source: OpenpgpSource, artifact: Artifact): Promise<{ keys: OpenpgpKeys; parsed: PublicKeys }> {
  const known = ring.sources.get(source);
  if (known) return known;
  const own = trust[source];
  const resolved = (async () => {
    if (own.file) {
      const text = readSiteKeys(own, s.config.file);
      const parsed = await readTrustedKeys(text, own.allowed, own.origin, own.fingerprintsFrom);
      return { keys: { source, keys: text, ...(own.allowed ? { allowed: own.allowed } : {}), origin: own.origin }, parsed };
    }
    const url = upstreamKeyUrl(source, artifact.url);
    const where = `the keys that sign ${source} (${url}${mirrorNote(s.config, familyOf(url))})`;
    const hint =
      `If upstream has added or replaced a key, check its fingerprint where upstream lists it and add it to ${own.fingerprintsFrom}; ` +
      `otherwise the mirror serves other keys than upstream's: check mirrors.${familyOf(url)} in ${s.config.file}, or name the site's own keys in signatures.${source} (docs/signatures.md).`;
    let download = ring.files.get(url);
    if (!download) {
      s.progress(`downloading the keys that sign ${source} from ${url}`);
      download = fetchBytes(s, url, `the keys that sign ${source}`, '').then((r) => r.bytes);
      ring.files.set(url, download);
    }
    let bytes: Buffer;
    try {
      bytes = await download;
    } catch (error) {
      if (!(error instanceof UserError)) throw error;
      throw new SignatureError(where, `upstream's key file at ${url}`, `none (${firstLine(error.message).replace(/^pin: the keys that sign \w+: /, '')})`, { refused: 'key file', hint });
    }
    const text = bytes.toString('utf8');
    const parsed = await readTrustedKeys(text, own.allowed, where, own.fingerprintsFrom, hint);
    const sha256 = await storeBytes(s.cache, bytes, `keys-${source}`);
    return { keys: { source, keys: text, ...(own.allowed ? { allowed: own.allowed } : {}), origin: own.origin, keyFile: { url, sha256 } }, parsed };
  })();
  ring.sources.set(source, resolved);
  return resolved;
}

async function openpgpArtifact(s: Session, ring: KeyRing, trust: Trust, artifact: Artifact, how: { source: OpenpgpSource; suffix: string }, signatureUrl: string | undefined): Promise<SignatureRecord> {
  const subject = artifact.key;
  const signature = await signatureFile(s, subject, signatureUrl ?? `${artifact.url}${how.suffix}`);
  const { keys, parsed } = await keysFor(s, ring, trust, how.source, artifact);
  const path = await signedBytes(s, artifact);
  s.progress(`checking the OpenPGP signature of ${subject}`);
  const signer = await verifyDetached(subject, path, signature, parsed, keys.origin);
  const evidence: Evidence = {
    corekubeEvidence: 1,
    subject,
    method: 'openpgp',
    sha256: artifact.sha256,
    openpgp: {
      signature: signature.toString('base64'),
      keys: keys.keys,
      ...(keys.allowed ? { allowed: [...keys.allowed] } : {}),
      origin: keys.origin,
      ...(keys.keyFile ? { keyFile: keys.keyFile } : {}),
    },
  };
  return { method: 'openpgp', signer: `${signer.fingerprint} ${signer.name}`, evidence: await storeEvidence(s.cache, evidence) };
}

/** The transparency-log entry of a signature over a digest, found as cosign verify-blob finds it (POST …/log/entries/retrieve). */
async function findLogEntry(s: Session, subject: string, trust: SigstoreTrust, sha256: string, signature: Buffer, certificatePem: string): Promise<RekorEntry> {
  const base = transparencyLogUrl(trust);
  const url = `${base}/api/v1/log/entries/retrieve`;
  const proposed = {
    kind: 'hashedrekord',
    apiVersion: '0.0.1',
    spec: { signature: { content: signature.toString('base64'), publicKey: { content: Buffer.from(certificatePem).toString('base64') } }, data: { hash: { algorithm: 'sha256', value: sha256 } } },
  };
  let answer: unknown;
  try {
    const response = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json', accept: 'application/json' }, body: JSON.stringify({ entries: [proposed] }), signal: AbortSignal.any([s.signal, AbortSignal.timeout(60_000)]) });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    answer = await response.json();
  } catch (error) {
    if (s.signal.aborted) throw error;
    throw new UserError(`pin: ${subject}: cannot ask the transparency log ${url} for its entry (${(error as Error).message}). Check the network, or the log named in the trusted root of ${trust.origin}.`);
  }
  const entries = (Array.isArray(answer) ? answer : []).flatMap((item) => Object.values((item ?? {}) as Record<string, RekorEntry>));
  if (entries.length === 0) throw new SignatureError(subject, `a transparency-log entry in ${base} for this signature`, 'none');
  return entries[0]!;
}

async function sigstoreArtifact(s: Session, trust: SigstoreTrust, artifact: Artifact): Promise<SignatureRecord> {
  const subject = artifact.key;
  const signature = Buffer.from((await signatureFile(s, subject, `${artifact.url}.sig`)).toString('utf8').trim(), 'base64');
  const certificateText = (await signatureFile(s, subject, `${artifact.url}.cert`)).toString('utf8');
  let certificate: Buffer;
  try {
    certificate = certificateDer(certificateText);
  } catch (error) {
    throw new SignatureError(subject, `a certificate at ${artifact.url}.cert`, (error as Error).message);
  }
  const pem = `-----BEGIN CERTIFICATE-----\n${certificate.toString('base64').replace(/(.{64})/g, '$1\n').replace(/\n$/, '')}\n-----END CERTIFICATE-----\n`;
  const path = await signedBytes(s, artifact);
  const bytes = await readFile(path);
  const entry = await findLogEntry(s, subject, trust, artifact.sha256, signature, pem);
  const bundle = messageBundle(certificate, signature, entry);
  s.progress(`checking the Sigstore signature of ${subject}`);
  const signer = verifyBundle(subject, bundle, bytes, trust);
  const evidence: Evidence = {
    corekubeEvidence: 1,
    subject,
    method: 'sigstore',
    sha256: artifact.sha256,
    sigstore: sigstoreEvidence(trust, bundle),
  };
  return { method: 'sigstore', signer: `${signer.identity} (${signer.issuer})`, evidence: await storeEvidence(s.cache, evidence) };
}

/**
 * containerd's tarball against the build-provenance attestation its release publishes
 * beside it (docs/signatures.md): the bundle whose statement names the tarball, signed by
 * the release workflow at the release's tag, naming the sha256 pin pinned. The tarball
 * is not downloaded here: the signature covers the statement, not the bytes.
 */
async function attestedArtifact(s: Session, trust: SigstoreTrust, artifact: Artifact): Promise<SignatureRecord> {
  const subject = artifact.key;
  const where = containerdAttestation(artifact.url);
  if (versionBefore(where.version, containerdFirstAttested)) {
    return { method: 'none', why: `containerd ${where.version} predates the build-provenance attestation containerd publishes from v${containerdFirstAttested}; the .sha256sum beside the tarball is unsigned` };
  }
  const file = await signatureFile(s, subject, where.url, 'attestation');
  const release = identityAt(trust, where.tag);
  // The statement names the digest: the bytes are held to it by fetch (and fsck), as every artifact is.
  s.progress(`checking the build-provenance attestation of ${subject}`);
  const { bundle, signer } = findAttestation(subject, file.toString('utf8'), where.url, { name: where.name, sha256: artifact.sha256 }, release);
  const evidence: Evidence = {
    corekubeEvidence: 1,
    subject,
    method: 'attestation',
    sha256: artifact.sha256,
    sigstore: sigstoreEvidence(release, bundle),
    attestation: { name: where.name, file: { url: where.url, sha256: await storeBytes(s.cache, file, `attestation-${subject}`) } },
  };
  return { method: 'attestation', signer: `${signer.identity} (${signer.issuer})`, evidence: await storeEvidence(s.cache, evidence) };
}

interface CosignManifest {
  layers?: { mediaType?: string; digest?: string; annotations?: Record<string, string> }[];
}

/** An image's cosign signature (tag sha256-HEX.sig), each signature layer tried until one verifies. */
async function cosignImage(s: Session, trust: SigstoreTrust, image: ImageRef): Promise<SignatureRecord> {
  const subject = `image ${image.name}:${image.tag}`;
  const { base, insecure } = registryOf(s.config, image.name);
  const reference = `${base}:${image.digest.replace(':', '-')}.sig`;
  const retries = `--retry-times=${s.ctx.settings.http.retries}`;
  const dir = await mkdtemp(join(s.cache.dir, '.tmp-cosign-'));
  try {
    s.progress(`skopeo copy ${reference} (its cosign signature)`);
    try {
      await runTool('skopeo', ['copy', retries, `--src-tls-verify=${!insecure}`, '--preserve-digests', reference, `dir:${dir}`], { signal: s.signal });
    } catch (error) {
      if (error instanceof ToolError && registryHasNoSuchImage(error.stderr)) throw new SignatureError(subject, `a cosign signature at ${reference}`, 'none (the registry has no such tag)');
      if (error instanceof ToolError) throw new UserError(`pin: ${subject}: skopeo could not read its signature ${reference}:\n      ${firstLine(error.stderr)}\nCheck the registry or the mirror for ${splitName(image.name).host}.`);
      throw error;
    }
    const manifest = JSON.parse(await readFile(join(dir, 'manifest.json'), 'utf8')) as CosignManifest;
    const layers = (manifest.layers ?? []).filter((l) => l.mediaType === cosignPayloadType && l.digest && l.annotations?.[cosignAnnotations.signature]);
    if (layers.length === 0) throw new SignatureError(subject, `a cosign signature layer in ${reference}`, 'a manifest with none');
    let firstRefusal: unknown;
    for (const layer of layers) {
      try {
        const notes = layer.annotations!;
        const payload = await readFile(join(dir, layer.digest!.replace(/^sha256:/, '')));
        checkCosignPayload(subject, payload, image.digest);
        if (!notes[cosignAnnotations.bundle]) throw new SignatureError(subject, 'a transparency-log entry with the signature (dev.sigstore.cosign/bundle)', 'none');
        if (!notes[cosignAnnotations.certificate]) throw new SignatureError(subject, 'a certificate with the signature (dev.sigstore.cosign/certificate)', 'none');
        const bundle = messageBundle(certificateDer(notes[cosignAnnotations.certificate]!), Buffer.from(notes[cosignAnnotations.signature]!, 'base64'), cosignBundleEntry(notes[cosignAnnotations.bundle]!));
        const signer = verifyBundle(subject, bundle, payload, trust);
        const evidence: Evidence = {
          corekubeEvidence: 1,
          subject,
          method: 'cosign',
          sha256: layer.digest!.replace(/^sha256:/, ''),
          sigstore: sigstoreEvidence(trust, bundle),
          cosign: { payload: payload.toString('base64'), digest: image.digest },
        };
        return { method: 'cosign', signer: `${signer.identity} (${signer.issuer})`, evidence: await storeEvidence(s.cache, evidence) };
      } catch (error) {
        if (!(error instanceof SignatureError) && !(error instanceof SyntaxError)) throw error;
        firstRefusal ??= error;
      }
    }
    throw firstRefusal;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * Every artifact's and image's signature, verified; throws the first refusal as a
 * UserError, once every other check has stopped (nothing left half-written in the cache).
 */
export async function verifySignatures(s: Session, content: LockContent, signatureUrls: Partial<Record<AnyArtifactKey, string>>): Promise<LockSignatures> {
  const trust = trustFor(s.config);
  const ring: KeyRing = { files: new Map(), sources: new Map() };
  const limit = pLimit(s.ctx.settings.jobs);
  const result: LockSignatures = { artifacts: {}, images: {} };
  // One session for all the checks: the first refusal cancels the rest (downloads, skopeo).
  const job = (work: (session: Session) => Promise<void>) => (signal: AbortSignal) =>
    limit(() => (signal.aborted ? Promise.resolve() : work({ ...s, signal, download: { ...s.download, signal } })));
  try {
    await allOrNothing<void[]>(s.signal, [
      ...Object.values(content.artifacts).map((artifact) =>
        job(async (session) => {
          const key = artifact.key;
          const openpgp = openpgpArtifacts[key];
          if (openpgp) result.artifacts[key] = await openpgpArtifact(session, ring, trust, artifact, openpgp, signatureUrls[key]);
          else if (sigstoreArtifacts.has(key)) result.artifacts[key] = await sigstoreArtifact(session, trust.kubernetes, artifact);
          else if (key === 'containerd') result.artifacts[key] = await attestedArtifact(session, trust.containerd, artifact);
          else result.artifacts[key] = { method: 'none', why: unsignedArtifacts[key] ?? 'upstream publishes no signature' };
        }),
      ),
      ...content.images.map((image) =>
        job(async (session) => {
          const ref = `${image.name}:${image.tag}`;
          result.images[ref] = splitName(image.name).host === signedRegistry ? await cosignImage(session, trust.images, image) : { method: 'none', why: unsignedImage(image.name) };
        }),
      ),
    ]);
  } catch (error) {
    if (error instanceof SignatureError) throw new UserError(`pin: ${error.message}\nNothing was written: the lock keeps what it had.${error.hint ? `\n${error.hint}` : ''}`);
    throw error;
  }
  return result;
}

function unsignedImage(name: string): string {
  if (name === 'ghcr.io/flannel-io/flannel') return 'flannel publishes a GitHub build-provenance attestation through the registry\'s referrers, which corekube does not check yet; no cosign signature';
  if (name.startsWith('ghcr.io/kube-vip/')) return 'kube-vip publishes no signature for its images';
  return 'not in registry.k8s.io: no upstream signature corekube knows of';
}

/** The Sigstore part of an evidence file: the bundle and everything it was checked against. */
function sigstoreEvidence(trust: SigstoreTrust, bundle: unknown): NonNullable<Evidence['sigstore']> {
  return { source: trust.source, bundle, trustedRoot: trust.trustedRoot, identity: trust.identity, issuer: trust.issuer, origin: trust.origin };
}
