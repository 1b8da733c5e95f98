// Whom corekube trusts to sign what it ships: upstream's signers by default, a site's own
// where cluster.yaml says so (signatures: in cluster.yaml, docs/signatures.md). Pure data
// and loading; the checks themselves are in openpgp.ts and sigstore.ts, the downloads in
// tasks/pin/signatures.ts.
//
// Defaults, each with where upstream publishes it. No key is kept in this repository:
// only the fingerprints, which pin holds the downloaded keys to.
// - Fedora's release keys (FCOS images, butane): Fedora lists each release's primary key
//   with its fingerprint on https://fedoraproject.org/security/ and publishes them all in
//   https://fedoraproject.org/fedora.gpg, which pin downloads (through mirrors.fedora).
//   Every key in that file must be one of fedoraFingerprints, so a changed file cannot
//   widen the trust unseen: when Fedora adds a release's key, check its fingerprint on
//   that page and add it here.
// - runc's maintainers' keys: runc.keyring at the root of opencontainers/runc, at the tag
//   of the release pinned (its release script, script/release_sign.sh, signs with a key of
//   it), which pin downloads from GitHub at that tag (through mirrors.github). The
//   fingerprints are those the keyring names for each key.
// - Sigstore's public-good instance: the trusted_root.json target of the TUF seed that
//   ships inside the installed @sigstore/tuf (its seeds.json), read at run time; pin keeps
//   it in each signature's evidence, so fsck on an air-gapped host uses what pin used.
//   The live TUF repository is not consulted: a newer @sigstore/tuf brings a newer seed.
// - Kubernetes' signers (kubernetes.io, "Verify Signed Kubernetes Artifacts"): release
//   binaries by krel-staging@…, images in registry.k8s.io by krel-trust@…, both through
//   Google's OIDC issuer.
// - containerd's build provenance: its release workflow (.github/workflows/release.yml in
//   containerd/containerd, run by the push of the release tag) attests the release
//   tarballs with actions/attest-build-provenance, on the public-good instance. Fulcio
//   names such a signer by the workflow's URI at the ref that ran it (the certificate's
//   URI SAN, `gh attestation verify --signer-workflow`), from GitHub Actions' OIDC issuer.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { basename } from 'node:path';
import { UserError } from '../errors.ts';
import type { ClusterConfig } from '../inputs/config.ts';

/** The sources whose signatures are OpenPGP (detached, by a key). */
export const openpgpSources = ['fcos', 'butane', 'runc'] as const;
export type OpenpgpSource = (typeof openpgpSources)[number];
/** The sources whose signatures are Sigstore (a certificate for an identity, a transparency-log entry). */
export const sigstoreSources = ['kubernetes', 'images', 'containerd'] as const;
export type SigstoreSource = (typeof sigstoreSources)[number];

export interface KnownKey {
  fingerprint: string;
  name: string;
}

/** Fedora's primary keys, as https://fedoraproject.org/security/ lists them. */
export const fedoraFingerprints: readonly KnownKey[] = [
  { fingerprint: 'B0F4950458F69E1150C6C5EDC8AC4916105EF944', name: 'Fedora (42) <fedora-42-primary@fedoraproject.org>' },
  { fingerprint: 'C6E7F081CF80E13146676E88829B606631645531', name: 'Fedora (43) <fedora-43-primary@fedoraproject.org>' },
  { fingerprint: '36F612DCF27F7D1A48A835E4DBFCF71C6D9F90A6', name: 'Fedora (44) <fedora-44-primary@fedoraproject.org>' },
  { fingerprint: '4F50A6114CD5C6976A7F1179655A4B02F577861E', name: 'Fedora (45) <fedora-45-primary@fedoraproject.org>' },
  { fingerprint: 'D924B10D3E810DABDD8B56B596E7E91491211FCE', name: 'Fedora (46) <fedora-46-primary@fedoraproject.org>' },
  { fingerprint: 'B2E766FA50CA6FA2D5ED06FC09D879E09488FB64', name: 'Fedora (47) <fedora-47-primary@fedoraproject.org>' },
];

/**
 * runc's release signers, as runc.keyring names them (each key block follows its
 * fingerprint there). The first is Aleksa Sarai's older key, in the keyring of older
 * releases: a release's keyring may hold it, and any key outside this list is refused.
 */
export const runcFingerprints: readonly KnownKey[] = [
  { fingerprint: '5F36C6C61B5460124A75F5A69E18AA267DDB8DB4', name: 'Aleksa Sarai <asarai@suse.com>' },
  { fingerprint: 'C9C370B246B09F6DBCFC744C34401015D1D2D386', name: 'Aleksa Sarai <cyphar@cyphar.com>' },
  { fingerprint: 'C2428CD75720FACDCF76B6EA17DE5ECB75A1100E', name: 'Kir Kolyshkin <kolyshkin@gmail.com>' },
  { fingerprint: 'C020EA876CE4E06C7AB95AEF49524C6F9F638F1A', name: 'Akihiro Suda <suda.kyoto@gmail.com>' },
];

/** Where Fedora publishes its current release keys, in one file. */
export const fedoraKeysUrl = 'https://fedoraproject.org/fedora.gpg';

/** What each OpenPGP source's upstream keys are, where they are published, and who vouches for the fingerprints. */
const upstreamKeys: Record<OpenpgpSource, { origin: string; allowed: readonly KnownKey[]; published: string }> = {
  fcos: { origin: 'Fedora\'s release keys (fedora.gpg)', allowed: fedoraFingerprints, published: 'https://fedoraproject.org/security/' },
  butane: { origin: 'Fedora\'s release keys (fedora.gpg)', allowed: fedoraFingerprints, published: 'https://fedoraproject.org/security/' },
  runc: { origin: 'runc\'s maintainers\' keys (runc.keyring)', allowed: runcFingerprints, published: 'runc.keyring in opencontainers/runc' },
};

/**
 * Where upstream publishes the keys that sign an artifact: Fedora's fedora.gpg, or the
 * runc.keyring of the runc release being pinned (from its release download URL).
 */
export function upstreamKeyUrl(source: OpenpgpSource, artifactUrl: string): string {
  if (source !== 'runc') return fedoraKeysUrl;
  const release = /^(.*\/opencontainers\/runc)\/releases\/download\/([^/]+)\/[^/]+$/.exec(artifactUrl);
  if (!release) throw new Error(`runc's keyring: ${artifactUrl} is not a runc release download URL (a bug)`);
  return `${release[1]}/raw/${release[2]}/runc.keyring`;
}

export const kubernetesIssuer = 'https://accounts.google.com';
export const kubernetesBinaryIdentity = 'krel-staging@k8s-releng-prod.iam.gserviceaccount.com';
export const kubernetesImageIdentity = 'krel-trust@k8s-releng-prod.iam.gserviceaccount.com';
/** The OIDC issuer of GitHub Actions' workflow identities. */
export const githubActionsIssuer = 'https://token.actions.githubusercontent.com';
/** containerd's release workflow at the release's tag ({tag}: the tag of the release pinned, as v2.3.7). */
export const containerdReleaseIdentity = 'https://github.com/containerd/containerd/.github/workflows/release.yml@refs/tags/{tag}';
/** The registry whose images Kubernetes signs (every image promoted into it). */
export const signedRegistry = 'registry.k8s.io';
/** The TUF repository of the Sigstore public-good instance, as @sigstore/tuf's seeds.json names it. */
export const publicGoodTufRepository = 'https://tuf-repo-cdn.sigstore.dev';

/**
 * Whom pin trusts for one OpenPGP source: the keys upstream publishes (downloaded at pin,
 * from upstreamKeyUrl through the mirrors), or a site's own key file; either way, where
 * `allowed` is set, only keys with those primary fingerprints.
 */
export interface OpenpgpTrust {
  source: OpenpgpSource;
  /** A site's own key file (signatures.SOURCE.keys); undefined: upstream's, downloaded at pin. */
  file?: string;
  /** The primary keys that may sign; undefined: every key in the site's file. */
  allowed?: readonly KnownKey[];
  /** Whose keys these are, for messages and the evidence. */
  origin: string;
  /** Where a fingerprint missing from `allowed` is to be checked (and the next step said). */
  fingerprintsFrom: string;
}

/** The keys one signature was checked against, as the evidence keeps them. */
export interface OpenpgpKeys {
  source: OpenpgpSource;
  /** Armored public keys. */
  keys: string;
  allowed?: readonly KnownKey[];
  origin: string;
  /** The key file pin downloaded (upstream's URL, and its sha256 in the cache), where it downloaded one. */
  keyFile?: { url: string; sha256: string };
}

export interface SigstoreTrust {
  source: SigstoreSource;
  /** A Sigstore trusted root (trusted_root.json, media type application/vnd.dev.sigstore.trustedroot+json). */
  trustedRoot: Record<string, unknown>;
  /** The certificate's SAN; `{tag}` stands for the tag of the release pinned (identityAt). */
  identity: string;
  issuer: string;
  origin: string;
}

export type Trust = Record<OpenpgpSource, OpenpgpTrust> & Record<SigstoreSource, SigstoreTrust>;

/** What cluster.yaml's `signatures:` says, paths resolved against its directory, fingerprints in upper case. */
export interface SignatureSettings {
  openpgp: Partial<Record<OpenpgpSource, { keys?: string; fingerprints?: string[] }>>;
  sigstore: Partial<Record<SigstoreSource, { trustedRoot?: string; identity?: string; issuer?: string }>>;
}

export const noSignatureSettings: SignatureSettings = { openpgp: {}, sigstore: {} };

function readText(file: string, what: string): string {
  try {
    return readFileSync(file, 'utf8');
  } catch (error) {
    throw new UserError(`${what}: cannot read ${file} (${(error as NodeJS.ErrnoException).code ?? String(error)}). Check the path (relative to cluster.yaml).`);
  }
}

/** A Sigstore trusted root from its JSON text; `where` names the file for messages. */
export function parseTrustedRoot(text: string, where: string, what: string): Record<string, unknown> {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw new UserError(`${what}: ${where} is not JSON (${(error as Error).message})`);
  }
  const media = (json as { mediaType?: unknown } | null)?.mediaType;
  if (typeof media !== 'string' || !media.startsWith('application/vnd.dev.sigstore.trustedroot')) {
    throw new UserError(`${what}: ${where} is not a Sigstore trusted root (expected mediaType application/vnd.dev.sigstore.trustedroot+json…, found ${JSON.stringify(media)})`);
  }
  return json as Record<string, unknown>;
}

export function readTrustedRoot(file: string, what: string): Record<string, unknown> {
  return parseTrustedRoot(readText(file, what), file, what);
}

let publicGood: Record<string, unknown> | undefined;

/**
 * The Sigstore public-good trusted root: the trusted_root.json target of the TUF seed in
 * the installed @sigstore/tuf (seeds.json, keyed by the TUF repository's URL), read
 * offline. @sigstore/tuf's own client would ask the live repository before it answers.
 */
export function publicGoodTrustedRoot(): Record<string, unknown> {
  if (publicGood) return publicGood;
  const what = 'the Sigstore public-good trusted root';
  const require = createRequire(import.meta.url);
  let file: string;
  let seeds: Record<string, { targets?: Record<string, unknown> }>;
  try {
    file = require.resolve('@sigstore/tuf/seeds.json');
    seeds = JSON.parse(readFileSync(file, 'utf8')) as typeof seeds;
  } catch (error) {
    throw new UserError(`${what}: expected the seed of the installed npm package @sigstore/tuf (seeds.json); found none (${(error as Error).message.split('\n')[0]}). Run npm ci.`);
  }
  const target = seeds[publicGoodTufRepository]?.targets?.['trusted_root.json'];
  if (typeof target !== 'string') {
    throw new UserError(`${what}: expected a trusted_root.json target for ${publicGoodTufRepository} in ${file}; found ${Object.keys(seeds).join(', ') || 'no repository'}. Check the @sigstore/tuf version in package.json.`);
  }
  publicGood = parseTrustedRoot(Buffer.from(target, 'base64').toString('utf8'), `${file} (trusted_root.json)`, what);
  return publicGood;
}

/** The defaults: upstream's signers. */
export function upstreamTrust(): Trust {
  const sigstore = (source: SigstoreSource, identity: string, issuer = kubernetesIssuer): SigstoreTrust => ({
    source,
    trustedRoot: publicGoodTrustedRoot(),
    identity,
    issuer,
    origin: 'the Sigstore public-good instance',
  });
  const openpgp = (source: OpenpgpSource): OpenpgpTrust => ({
    source,
    allowed: upstreamKeys[source].allowed,
    origin: upstreamKeys[source].origin,
    fingerprintsFrom: `the fingerprints kept in tasks/lib/signatures/trust.ts (upstream lists them in ${upstreamKeys[source].published})`,
  });
  return {
    fcos: openpgp('fcos'),
    butane: openpgp('butane'),
    runc: openpgp('runc'),
    kubernetes: sigstore('kubernetes', kubernetesBinaryIdentity),
    images: sigstore('images', kubernetesImageIdentity),
    containerd: sigstore('containerd', containerdReleaseIdentity, githubActionsIssuer),
  };
}

/** The trust for one release: `{tag}` in the identity replaced by the release's tag. */
export function identityAt(trust: SigstoreTrust, tag: string): SigstoreTrust {
  return { ...trust, identity: trust.identity.replaceAll('{tag}', tag) };
}

/**
 * Upstream's signers, each replaced where cluster.yaml names a site's own. Origins name
 * files without their directory: they go into the evidence, whose sha256 the lock records,
 * and the lock must not change when the project moves.
 */
export function trustFor(config: Pick<ClusterConfig, 'file' | 'signatures'>): Trust {
  const trust = upstreamTrust();
  const settings = config.signatures ?? noSignatureSettings;
  const configName = basename(config.file);
  for (const source of openpgpSources) {
    const own = settings.openpgp[source];
    if (!own) continue;
    const named = own.fingerprints?.map((fingerprint) => ({ fingerprint, name: `(signatures.${source}.fingerprints in ${configName})` }));
    trust[source] = {
      source,
      ...(own.keys ? { file: own.keys } : {}),
      ...(named ? { allowed: named } : own.keys ? {} : { allowed: trust[source].allowed }),
      origin: own.keys ? `${basename(own.keys)} (signatures.${source}.keys in ${configName})` : `${trust[source].origin} with the fingerprints of signatures.${source}.fingerprints in ${configName}`,
      fingerprintsFrom: `signatures.${source}.fingerprints in ${config.file}`,
    };
  }
  for (const source of sigstoreSources) {
    const own = settings.sigstore[source];
    if (!own) continue;
    const base = trust[source];
    trust[source] = {
      source,
      trustedRoot: own.trustedRoot ? readTrustedRoot(own.trustedRoot, `signatures.${source}.trustedRoot in ${config.file}`) : base.trustedRoot,
      identity: own.identity ?? base.identity,
      issuer: own.issuer ?? base.issuer,
      origin: own.trustedRoot ? `${basename(own.trustedRoot)} (signatures.${source}.trustedRoot in ${configName})` : base.origin,
    };
  }
  return trust;
}

/** A site's own key file, read (the check of its keys is readTrustedKeys'). */
export function readSiteKeys(trust: OpenpgpTrust, configFile: string): string {
  return readText(trust.file!, `signatures.${trust.source}.keys in ${configFile}`);
}

/** The transparency log to ask for an entry: the trusted root's first log. */
export function transparencyLogUrl(trust: SigstoreTrust): string {
  const tlogs = (trust.trustedRoot.tlogs ?? []) as { baseUrl?: unknown }[];
  const url = tlogs.find((t) => typeof t.baseUrl === 'string')?.baseUrl as string | undefined;
  if (!url) throw new UserError(`the trusted root of ${trust.origin} names no transparency log (tlogs[].baseUrl)`);
  return url.replace(/\/+$/, '');
}
