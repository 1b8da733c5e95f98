// Upstream's signatures at pin: the fixture upstream signs what it serves with keys and a
// Sigstore-like instance made here (test/fixtures/signing.ts), pin is handed that trust
// through cluster.yaml's signatures:, and every refusal is one line with nothing written.
// The last test carries the evidence in a bundle to a cache that never saw the network.
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mirrorUrl, upstreamBases } from '../tasks/lib/inputs/config.ts';
import { readTrustedKeys } from '../tasks/lib/signatures/openpgp.ts';
import { parseEvidence, reverify } from '../tasks/lib/signatures/evidence.ts';
import { fedoraFingerprints, fedoraKeysUrl, identityAt, kubernetesBinaryIdentity, kubernetesImageIdentity, kubernetesIssuer, runcFingerprints, upstreamKeyUrl, upstreamTrust } from '../tasks/lib/signatures/trust.ts';
import { containerdAttestation, containerdFirstAttested, versionBefore } from '../tasks/lib/signatures/attestation.ts';
import { pin } from '../tasks/pin/stage.ts';
import { unbundle } from '../tasks/bundle/unbundle.ts';
import { writeBundle } from '../tasks/bundle/write.ts';
import { fetchStage } from '../tasks/fetch.ts';
import { imagesStage } from '../tasks/images.ts';
import { runStages } from '../tasks/lib/run/engine.ts';
import { formatFsck, fsck } from '../tasks/fsck.ts';
import { startFixtureServer, type FixtureServer } from './fixtures/http-server.ts';
import { startRegistry, type RegistryFixture } from './fixtures/registry.ts';
import { attestBlobs, attestContainerd, containerdIdentity, githubIssuer, k8sIdentity, pushCosignSignature, serveKeys, signArtifact, signFixtureUpstream, trustConfig, trustedRoot, type ContainerdAttestationOptions, type TestSigner } from './fixtures/signing.ts';
import { buildUpstreamTree, type UpstreamTree } from './fixtures/upstream.ts';
import { countConnectionsOn, fixtureMirrors, loud, makeWorkspace, projectImages, type Workspace } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-sig-'));
const version = 'v1.35.7';
let tree: UpstreamTree;
let server: FixtureServer;
let registry: RegistryFixture;
let signer: TestSigner;
const workspaces: Workspace[] = [];
/** Listeners on the fixture ports once the servers are stopped (the last test). */
const listeners: Server[] = [];

test.before(loud(async () => {
  tree = await buildUpstreamTree(join(work, 'upstream'), { qcow2SizeMiB: 1, kubernetesVersion: version });
  server = await startFixtureServer({ root: tree.root });
  registry = await startRegistry({ images: projectImages(version), work });
  signer = await signFixtureUpstream(tree, registry, work);
}));

test.after(async () => {
  for (const listener of listeners) await new Promise((resolve) => listener.close(resolve));
  await server?.close();
  await registry?.close();
  for (const ws of workspaces) rmSync(ws.dir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
});

/** A workspace trusting the test's signers; `containerd` replaces the line of signatures.containerd. */
function workspace(containerd?: string): Workspace {
  const trustDir = mkdtempSync(join(work, 'trust-'));
  const trust = trustConfig(signer, trustDir, server.url).filter((line) => containerd === undefined || !line.startsWith('  containerd:'));
  const ws = makeWorkspace(tree, server.url, { registries: fixtureMirrors(registry.host), extraConfig: [...trust, ...(containerd ? [`  containerd: ${containerd}`] : [])] });
  rmSync(ws.lockFile);
  workspaces.push(ws);
  return ws;
}

const quick = { http: { retries: 1, stallTimeoutMs: 1500, backoffMs: 20 } };

async function refusal(ws: Workspace): Promise<string> {
  try {
    await pin(ws.context(quick));
  } catch (error) {
    assert.not.ok(existsSync(ws.lockFile), 'nothing is written to the lock');
    if (process.env.SHOW_ERRORS) console.log(`\n--- ${(error as Error).message}`);
    return (error as Error).message;
  }
  throw new Error('pin succeeded where it should have refused');
}

/** Replaces a served file for one test, restoring it afterwards. */
async function withFile(path: string, content: Buffer | string | undefined, run: () => Promise<void>): Promise<void> {
  const before = existsSync(path) ? readFileSync(path) : undefined;
  try {
    if (content === undefined) rmSync(path, { force: true });
    else writeFileSync(path, content);
    await run();
  } finally {
    if (before === undefined) rmSync(path, { force: true });
    else writeFileSync(path, before);
  }
}

const served = (key: string) => join(tree.root, tree.artifacts[key]!.servedPath);

test('the defaults are upstream\'s: Fedora\'s and runc\'s key fingerprints and where their keys are published, Kubernetes\' identities and issuer, the Sigstore public-good root of the installed @sigstore/tuf', async () => {
  assert.ok(fedoraFingerprints.some((k) => k.fingerprint === 'C6E7F081CF80E13146676E88829B606631645531' && k.name.startsWith('Fedora (43)')));
  assert.ok(fedoraFingerprints.some((k) => k.fingerprint === '36F612DCF27F7D1A48A835E4DBFCF71C6D9F90A6' && k.name.startsWith('Fedora (44)')));
  assert.ok(runcFingerprints.some((k) => k.fingerprint === 'C9C370B246B09F6DBCFC744C34401015D1D2D386' && k.name.includes('cyphar')));
  for (const k of [...fedoraFingerprints, ...runcFingerprints]) assert.match(k.fingerprint, /^[0-9A-F]{40}$/);
  // The keys themselves come from where upstream publishes them, through the mirrors.
  assert.is(fedoraKeysUrl, 'https://fedoraproject.org/fedora.gpg');
  assert.ok(fedoraKeysUrl.startsWith(`${upstreamBases.fedora}/`), 'fedora.gpg is reached through mirrors.fedora');
  assert.is(upstreamKeyUrl('fcos', tree.artifacts['fcos-qemu']!.upstreamUrl), fedoraKeysUrl);
  assert.is(upstreamKeyUrl('butane', tree.artifacts.butane!.upstreamUrl), fedoraKeysUrl);
  const runcKeys = upstreamKeyUrl('runc', tree.artifacts.runc!.upstreamUrl);
  assert.is(runcKeys, 'https://github.com/opencontainers/runc/raw/v1.4.4/runc.keyring');
  const ws = workspace();
  const downloads = ws.context().config.mirrors.downloads;
  assert.is(mirrorUrl(fedoraKeysUrl, downloads), `${server.url}${tree.keyFiles.fedora}`, 'the fixture serves the test key where Fedora publishes its keys');
  assert.is(mirrorUrl(runcKeys, downloads), `${server.url}${tree.keyFiles.runc}`);
  assert.is(kubernetesBinaryIdentity, 'krel-staging@k8s-releng-prod.iam.gserviceaccount.com');
  assert.is(kubernetesImageIdentity, 'krel-trust@k8s-releng-prod.iam.gserviceaccount.com');
  assert.is(kubernetesIssuer, 'https://accounts.google.com');
  const trust = upstreamTrust();
  const seeds = JSON.parse(readFileSync(createRequire(import.meta.url).resolve('@sigstore/tuf/seeds.json'), 'utf8')) as Record<string, { targets: Record<string, string> }>;
  assert.equal(trust.kubernetes.trustedRoot, JSON.parse(Buffer.from(seeds['https://tuf-repo-cdn.sigstore.dev']!.targets['trusted_root.json']!, 'base64').toString('utf8')), 'the root is @sigstore/tuf\'s seed, read at run time');
  const root = trust.kubernetes.trustedRoot as { tlogs: { baseUrl: string }[]; certificateAuthorities: { uri: string; subject: { organization: string } }[]; ctlogs: unknown[] };
  assert.is(root.tlogs[0]!.baseUrl, 'https://rekor.sigstore.dev');
  assert.ok(root.certificateAuthorities.every((ca) => ca.uri === 'https://fulcio.sigstore.dev' && ca.subject.organization === 'sigstore.dev'));
  assert.ok(root.ctlogs.length > 0, 'the public-good root has CT logs: SCTs are required');
  assert.is(trust.images.identity, kubernetesImageIdentity);
  assert.is(trust.fcos.allowed, fedoraFingerprints);
  assert.is(trust.butane.allowed, fedoraFingerprints);
  assert.is(trust.runc.allowed, runcFingerprints);
  assert.is(trust.fcos.file, undefined, 'upstream\'s keys are downloaded at pin, not read from this repository');
  // Fedora's fingerprints refuse any other key (the test's own, here), in one line.
  try {
    await readTrustedKeys(signer.pgpPublic, fedoraFingerprints, 'fedora.gpg', 'the fingerprints kept in tasks/lib/signatures/trust.ts');
    assert.unreachable('a key that is not Fedora\'s was accepted');
  } catch (error) {
    assert.match((error as Error).message, /^fedora\.gpg: key file refused: expected a key among the fingerprints kept in tasks\/lib\/signatures\/trust\.ts \(B0F4950458F69E1150C6C5EDC8AC4916105EF944, .*\); found none of them: [0-9A-F]{40} \(corekube test release key <release@corekube\.test>\)$/);
  }
});

test('pin verifies every signed artifact and image, the lock says against whom, and the evidence re-verifies offline', async () => {
  const ws = workspace();
  const result = await pin(ws.context(quick));
  const sigs = result.lock.signatures!;
  for (const key of ['fcos-qemu', 'butane', 'runc']) {
    assert.is(sigs.artifacts[key as 'runc']!.method, 'openpgp', key);
    assert.match(sigs.artifacts[key as 'runc']!.signer!, signer.pgpFingerprint);
  }
  for (const key of ['kubeadm', 'kubelet', 'kubectl'] as const) assert.is(sigs.artifacts[key]!.signer, `${k8sIdentity.binaries} (${k8sIdentity.issuer})`);
  for (const key of ['crictl', 'cni-plugins'] as const) assert.is(sigs.artifacts[key]!.method, 'none', key);
  assert.equal(sigs.artifacts.containerd!.method, 'attestation');
  assert.is(sigs.artifacts.containerd!.signer, `${containerdIdentity('v2.3.7')} (${githubIssuer})`);
  for (const image of result.lock.images) {
    const record = sigs.images[`${image.name}:${image.tag}`]!;
    if (!image.name.startsWith('registry.k8s.io/')) {
      assert.is(record.method, 'none', `${image.name}: only Kubernetes signs its images`);
      continue;
    }
    assert.is(record.method, 'cosign', image.name);
    assert.is(record.signer, `${k8sIdentity.images} (${k8sIdentity.issuer})`);
  }
  assert.match(result.text, /signatures: {2}# what pin verified/);
  // The key files pin downloaded from where upstream publishes them are in the cache, named by the evidence.
  const keyFileOf = (key: 'fcos-qemu' | 'runc' | 'butane') => parseEvidence(key, readFileSync(join(ws.cacheDir, 'sha256', sigs.artifacts[key]!.evidence!), 'utf8')).openpgp!.keyFile;
  const sha = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');
  assert.equal(keyFileOf('fcos-qemu'), { url: 'https://fedoraproject.org/fedora.gpg', sha256: sha(join(tree.root, tree.keyFiles.fedora)) });
  assert.equal(keyFileOf('runc'), { url: 'https://github.com/opencontainers/runc/raw/v1.4.4/runc.keyring', sha256: sha(join(tree.root, tree.keyFiles.runc)) });
  assert.ok(existsSync(join(ws.cacheDir, 'sha256', keyFileOf('fcos-qemu')!.sha256)), 'fedora.gpg as pin downloaded it');
  assert.is(keyFileOf('butane'), undefined, 'butane is checked against the site\'s own key file: nothing downloaded');
  assert.is(server.requests.filter((r) => r.path === tree.keyFiles.fedora).length, 1, 'fedora.gpg is downloaded once for the FCOS images and butane');
  assert.match(result.text, /kubeadm: \{method: sigstore, signer: "krel-staging@/);
  // Offline: the evidence and the cache alone (the server is not asked).
  const asked = server.requests.length;
  for (const record of [...Object.values(sigs.artifacts), ...Object.values(sigs.images)]) {
    if (record.method === 'none') continue;
    const evidence = parseEvidence(record.evidence!, readFileSync(join(ws.cacheDir, 'sha256', record.evidence!), 'utf8'));
    const bytes = join(ws.cacheDir, 'sha256', evidence.sha256);
    assert.is(await reverify(evidence, existsSync(bytes) ? bytes : undefined), record.signer);
  }
  assert.is(server.requests.length, asked);
  // make fsck does the same from the lock: every signature re-verified, nothing differs.
  const report = await fsck(ws.settings(), { fix: false });
  assert.is(report.signatures, Object.values(sigs.artifacts).concat(Object.values(sigs.images)).filter((r) => r.method !== 'none').length);
  assert.equal(report.bad, []);
  assert.match(formatFsck(report, ws.settings()), /\d+ cache entries, \d+ signatures and \d+ outputs checked .*: all match/);
  assert.is(server.requests.length, asked);
});

/** A string as a regular expression that matches it literally. */
const literal = (text: string) => text.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');

test('containerd: the defaults are its release workflow at the pinned tag, from GitHub Actions\' issuer; the attestation is found per JSON line (v2.0.x: one bundle per tarball) and by its subject; before v2.0.0 nothing is published', async () => {
  const trust = upstreamTrust().containerd;
  assert.is(trust.identity, 'https://github.com/containerd/containerd/.github/workflows/release.yml@refs/tags/{tag}');
  assert.is(trust.issuer, 'https://token.actions.githubusercontent.com');
  assert.equal(trust.trustedRoot, upstreamTrust().kubernetes.trustedRoot, 'the public-good root');
  assert.is(identityAt(trust, 'v2.3.7').identity, containerdIdentity('v2.3.7'));
  const where = containerdAttestation(tree.artifacts.containerd!.upstreamUrl);
  const url = 'https://github.com/containerd/containerd/releases/download/v2.3.7/containerd-2.3.7-attestation.intoto.jsonl';
  assert.equal(where, { url, tag: 'v2.3.7', version: '2.3.7', name: 'containerd-2.3.7-linux-amd64.tar.gz' });
  assert.ok(versionBefore('1.7.29', containerdFirstAttested) && !versionBefore('2.0.0', containerdFirstAttested) && !versionBefore('2.3.7', containerdFirstAttested));
  // actions/attest v1 (containerd v2.0.x) appended one bundle per tarball: ours is not the first line.
  try {
    const file = attestContainerd(tree, signer, { perSubject: true });
    assert.is(readFileSync(file, 'utf8').trim().split('\n').length, 2);
    const ws = workspace();
    const result = await pin(ws.context(quick));
    const record = result.lock.signatures!.artifacts.containerd!;
    assert.is(record.signer, `${containerdIdentity('v2.3.7')} (${githubIssuer})`);
    assert.match(result.text, /containerd: \{method: attestation, signer: "https:\/\/github\.com\/containerd\/containerd\/\.github\/workflows\/release\.yml@refs\/tags\/v2\.3\.7 \(https:\/\/token\.actions\.githubusercontent\.com\)", evidence: [0-9a-f]{64}\}/);
    const evidence = parseEvidence(record.evidence!, readFileSync(join(ws.cacheDir, 'sha256', record.evidence!), 'utf8'));
    assert.is(evidence.method, 'attestation');
    assert.is(evidence.attestation!.name, where.name);
    assert.equal(evidence.attestation!.file, { url, sha256: createHash('sha256').update(readFileSync(file)).digest('hex') });
    assert.ok(existsSync(join(ws.cacheDir, 'sha256', evidence.attestation!.file.sha256)), 'the attestation file as pin downloaded it');
    assert.not.ok(existsSync(join(ws.cacheDir, 'sha256', evidence.sha256)), 'the tarball is not downloaded by pin: the attestation names its digest');
    assert.is(await reverify(evidence), record.signer);
    assert.is(await reverify(evidence, readFileSync(served('containerd'))), record.signer);
    try {
      await reverify(evidence, Buffer.from('other bytes'));
      assert.unreachable('other bytes passed');
    } catch (error) {
      assert.match((error as Error).message, /^containerd: signature refused: expected the bytes the attestation names \(sha256 [0-9a-f]{64}\); found other bytes/);
    }
  } finally {
    attestContainerd(tree, signer);
  }
});

test('refused: containerd\'s attestation by another workflow, repository, tag or issuer, from a CA the root does not name, with a tampered log entry, of another predicate, naming other bytes or not the tarball, or none published', async () => {
  const identity = containerdIdentity('v2.3.7');
  const other = (id: string, issuer = githubIssuer) => new RegExp(`expected a certificate for ${literal(identity)} from ${literal(githubIssuer)}; found one for ${literal(id)} from ${literal(issuer)}$`, 'm');
  const otherSha = createHash('sha256').update('another tarball').digest('hex');
  const cases: [ContainerdAttestationOptions, RegExp][] = [
    [{ identity: identity.replace('release.yml', 'ci.yml') }, other('https://github.com/containerd/containerd/.github/workflows/ci.yml@refs/tags/v2.3.7')],
    [{ identity: identity.replace('containerd/containerd', 'mallory/containerd') }, other('https://github.com/mallory/containerd/.github/workflows/release.yml@refs/tags/v2.3.7')],
    [{ identity: containerdIdentity('v2.3.6') }, other(containerdIdentity('v2.3.6'))],
    [{ identity: identity.replace('refs/tags/v2.3.7', 'refs/heads/main') }, other('https://github.com/containerd/containerd/.github/workflows/release.yml@refs/heads/main')],
    [{ issuer: 'https://accounts.google.com' }, other(identity, 'https://accounts.google.com')],
    [{ rogue: true }, /expected a certificate that chains to the root of .*test-trusted-root\.json.*; found one that does not/],
    [{ otherBytes: Buffer.from('another tarball') }, new RegExp(`expected subject containerd-2\\.3\\.7-linux-amd64\\.tar\\.gz with sha256 ${tree.artifacts.containerd!.sha256} \\(what the lock pins\\) in the statement signed by ${literal(identity)}; found sha256 ${otherSha}$`, 'm')],
    [{ predicateType: 'https://example.com/not-provenance' }, /expected an in-toto statement of https:\/\/slsa\.dev\/provenance\/v1; found https:\/\/in-toto\.io\/Statement\/v1 of https:\/\/example\.com\/not-provenance$/m],
  ];
  const refused = async (found: RegExp, why: string) => {
    const message = await refusal(workspace());
    const line = message.split('\n')[0]!;
    assert.ok(line.startsWith('pin: containerd: attestation refused: expected '), `${why}: ${message}`);
    assert.match(line, found, why);
  };
  try {
    for (const [options, found] of cases) {
      attestContainerd(tree, signer, options);
      await refused(found, JSON.stringify(options));
    }
    // A log entry whose index was changed after the log signed it.
    const file = attestContainerd(tree, signer);
    const bundle = JSON.parse(readFileSync(file, 'utf8')) as { verificationMaterial: { tlogEntries: { logIndex: string }[] } };
    bundle.verificationMaterial.tlogEntries[0]!.logIndex = String(Number(bundle.verificationMaterial.tlogEntries[0]!.logIndex) + 1);
    writeFileSync(file, `${JSON.stringify(bundle)}\n`);
    await refused(/expected a transparency-log entry signed by the log of .*; found an entry that does not verify/, 'a tampered log entry');
    // An attestation of the other tarballs only.
    writeFileSync(file, `${JSON.stringify(attestBlobs(signer, [{ name: 'containerd-2.3.7-linux-arm64.tar.gz', sha256: 'ab'.repeat(32) }], { identity, issuer: githubIssuer }))}\n`);
    await refused(/expected an attestation of containerd-2\.3\.7-linux-amd64\.tar\.gz in https:.*\.intoto\.jsonl; found attestations of containerd-2\.3\.7-linux-arm64\.tar\.gz$/, 'not the tarball');
    // None published beside the tarball.
    rmSync(file);
    await refused(/expected upstream's attestation at https:\/\/github\.com\/containerd\/containerd\/releases\/download\/v2\.3\.7\/containerd-2\.3\.7-attestation\.intoto\.jsonl; found none \(.*404/, 'none');
  } finally {
    attestContainerd(tree, signer);
  }
});

test('a site\'s own signer for containerd: signatures.containerd names the identity ({tag}: the release\'s tag) and the issuer its mirror attests with', async () => {
  const site = 'https://git.example.com/mirror/containerd/.github/workflows/release.yml@refs/tags/{tag}';
  const root = join(work, 'site-root.json');
  writeFileSync(root, JSON.stringify(trustedRoot(signer, `${server.url}/rekor`)));
  try {
    attestContainerd(tree, signer, { identity: site.replace('{tag}', 'v2.3.7'), issuer: 'https://sso.example.com' });
    assert.match(await refusal(workspace()), /^pin: containerd: attestation refused: expected a certificate for https:\/\/github\.com\/containerd\//, 'upstream\'s identity refuses the site\'s');
    const result = await pin(workspace(`{trustedRoot: "${root}", identity: "${site}", issuer: "https://sso.example.com"}`).context(quick));
    assert.is(result.lock.signatures!.artifacts.containerd!.signer, 'https://git.example.com/mirror/containerd/.github/workflows/release.yml@refs/tags/v2.3.7 (https://sso.example.com)');
  } finally {
    attestContainerd(tree, signer);
  }
});

test('refused: a signature over other bytes (kubeadm), named in one line', async () => {
  const file = served('kubeadm');
  const sig = `${file}.sig`;
  const saved = readFileSync(sig);
  try {
    await signArtifact(tree, signer, 'kubeadm', { otherBytes: Buffer.from('other bytes') });
    // The log has the entry for the other bytes only: the served file's own entry stays from before.
    const message = await refusal(workspace());
    assert.match(message, /^pin: kubeadm: signature refused: expected the bytes signed by krel-staging@k8s-releng-prod\.iam\.gserviceaccount\.com; found other bytes/);
  } finally {
    writeFileSync(sig, saved);
    await signArtifact(tree, signer, 'kubeadm');
  }
});

test('refused: another identity (kubelet), a certificate from a CA the root does not name (kubectl)', async () => {
  try {
    await signArtifact(tree, signer, 'kubelet', { identity: 'mallory@example.com' });
    assert.match(await refusal(workspace()), /^pin: kubelet: signature refused: expected a certificate for krel-staging@k8s-releng-prod\.iam\.gserviceaccount\.com from https:\/\/accounts\.google\.com; found one for mallory@example\.com from https:\/\/accounts\.google\.com/);
  } finally {
    await signArtifact(tree, signer, 'kubelet');
  }
  try {
    await signArtifact(tree, signer, 'kubectl', { rogue: true });
    assert.match(await refusal(workspace()), /^pin: kubectl: signature refused: expected a certificate that chains to the root of .*test-trusted-root\.json.*; found one that does not/);
  } finally {
    await signArtifact(tree, signer, 'kubectl');
  }
});

test('refused: a tampered transparency-log entry (kubeadm)', async () => {
  const hex = tree.artifacts.kubeadm!.sha256;
  const file = join(tree.root, 'rekor', 'by-hash', `${hex}.json`);
  const entries = JSON.parse(readFileSync(file, 'utf8')) as Record<string, { integratedTime: number; logIndex: number }>;
  for (const entry of Object.values(entries)) entry.logIndex += 1;
  await withFile(file, JSON.stringify(entries), async () => {
    assert.match(await refusal(workspace()), /^pin: kubeadm: signature refused: expected a transparency-log entry signed by the log of .*; found an entry that does not verify \(inclusion promise could not be verified\)/);
  });
});

test('refused: a missing signature where upstream signs (runc), a key nobody trusts (butane)', async () => {
  await withFile(`${served('runc')}.asc`, undefined, async () => {
    assert.match(await refusal(workspace()), /^pin: runc: signature refused: expected upstream's signature at https:\/\/github\.com\/opencontainers\/runc\/releases\/download\/v1\.4\.4\/runc\.amd64\.asc; found none \(.*404/);
  });
  try {
    await signArtifact(tree, signer, 'butane', { pgpKey: signer.strangerPrivate });
    assert.match(await refusal(workspace()), /^pin: butane: signature refused: expected a signature by .*test-keys\.asc.*; found a signature by key [0-9A-F]{16}, which is not trusted/);
  } finally {
    await signArtifact(tree, signer, 'butane');
  }
});

test('a key file: keys besides the expected are never trusted (fedora.gpg); refused when it holds none of them (runc.keyring) or none at all; nothing of it in the cache', async () => {
  const stranger = signer.strangerPrivate.toPublic();
  const strangerLine = `${stranger.getFingerprint().toUpperCase()} \\(somebody else <else@corekube\\.test>\\)`;
  const keyFile = (name: 'fedora' | 'runc') => join(tree.root, tree.keyFiles[name]);
  const nothingCached = (ws: Workspace, bytes: string) => {
    const hex = createHash('sha256').update(bytes).digest('hex');
    assert.not.ok(existsSync(join(ws.cacheDir, 'sha256', hex)), 'the refused key file is not in the cache');
    assert.equal(existsSync(join(ws.cacheDir, 'tmp')) ? readdirSync(join(ws.cacheDir, 'tmp')) : [], [], 'nothing half-written in cache/tmp');
  };
  // The stranger's key is in fedora.gpg too, and still trusts nothing: butane signed by it is refused.
  await withFile(keyFile('fedora'), `${signer.pgpPublic}\n${stranger.armor()}`, async () => {
    await signArtifact(tree, signer, 'butane', { pgpKey: signer.strangerPrivate });
    try {
      assert.match(await refusal(workspace()), /^pin: butane: signature refused: expected a signature by .*; found a signature by key [0-9A-F]{16}, which is not trusted/);
    } finally {
      await signArtifact(tree, signer, 'butane');
    }
  });
  await withFile(keyFile('runc'), stranger.armor(), async () => {
    const ws = workspace();
    assert.match(await refusal(ws), new RegExp(`^pin: the keys that sign runc \\(https://github\\.com/opencontainers/runc/raw/v1\\.4\\.4/runc\\.keyring \\(mirrors\\.github in .*\\)\\): key file refused: expected a key among .*; found none of them: ${strangerLine}\n`));
    nothingCached(ws, stranger.armor());
  });
  await withFile(keyFile('runc'), 'not a key\n', async () => {
    assert.match(await refusal(workspace()), /^pin: the keys that sign runc \(.*\): key file refused: expected armored OpenPGP public keys; found no public key block\n/);
  });
  await withFile(keyFile('runc'), undefined, async () => {
    assert.match(await refusal(workspace()), /^pin: the keys that sign runc \(.*\): key file refused: expected upstream's key file at https:\/\/github\.com\/opencontainers\/runc\/raw\/v1\.4\.4\/runc\.keyring; found none \(.*HTTP 404/);
  });
  serveKeys(tree, signer.pgpPublic);
});

test('refused: FCOS bytes other than Fedora\'s key signed', async () => {
  try {
    await signArtifact(tree, signer, 'fcos-qemu', { otherBytes: Buffer.from('another image') });
    assert.match(await refusal(workspace()), /^pin: fcos-qemu: signature refused: expected the bytes [0-9A-F]{40} \(corekube test release key <release@corekube\.test>\) signed; found other bytes/);
  } finally {
    await signArtifact(tree, signer, 'fcos-qemu');
  }
});

test('refused: an image signed by another identity', async () => {
  const pause = registry.images.find((i) => i.name === 'registry.k8s.io/pause')!;
  pushCosignSignature(signer, registry.host, pause.repository, pause.name, pause.digest, { identity: 'mallory@example.com', issuer: k8sIdentity.issuer }, work);
  try {
    assert.match(await refusal(workspace()), /^pin: image registry\.k8s\.io\/pause:[^:]+: signature refused: expected a certificate for krel-trust@k8s-releng-prod\.iam\.gserviceaccount\.com from https:\/\/accounts\.google\.com; found one for mallory@example\.com/);
  } finally {
    pushCosignSignature(signer, registry.host, pause.repository, pause.name, pause.digest, { identity: k8sIdentity.images, issuer: k8sIdentity.issuer }, work);
  }
});

// Last: it stops the fixture servers.
test('the evidence travels in a bundle: unbundled into an EMPTY cache with every fixture server stopped, fsck re-verifies every signature from that cache alone', async () => {
  const warm = workspace();
  const { lock } = await pin(warm.context(quick));
  await runStages(warm.context(), [fetchStage, imagesStage], { renderer: 'silent' });
  const summary = await writeBundle(warm.context());
  const records = [...Object.values(lock.signatures!.artifacts), ...Object.values(lock.signatures!.images)].filter((r) => r.method !== 'none');
  assert.equal([...new Set(records.map((r) => r.method))].sort(), ['attestation', 'cosign', 'openpgp', 'sigstore']);

  // Every fixture server stopped, a plain listener on each port counting connection attempts.
  const ports = [server.port, Number(registry.host.split(':')[1])];
  await server.close();
  await registry.stop();
  const counting = await countConnectionsOn(ports);
  listeners.push(...counting.listeners);

  const site = workspace();
  rmSync(site.configFile); // installed from the bundle
  assert.not.ok(existsSync(site.cacheDir) && readdirSync(site.cacheDir).length > 0, 'the cache is empty');
  await unbundle(site.context(), summary.file);
  for (const record of records) assert.ok(existsSync(join(site.cacheDir, 'sha256', record.evidence!)), `the evidence of ${record.signer}`);
  // The key files and the attestation file pin downloaded stay behind: the evidence alone re-verifies.
  const evidence = records.map((r) => parseEvidence(r.evidence!, readFileSync(join(site.cacheDir, 'sha256', r.evidence!), 'utf8')));
  const downloaded = evidence.flatMap((e) => [e.openpgp?.keyFile?.sha256, e.attestation?.file.sha256]).filter((hex): hex is string => hex !== undefined);
  assert.ok(downloaded.length >= 2);
  for (const hex of downloaded) assert.not.ok(existsSync(join(site.cacheDir, 'sha256', hex)), `${hex} is not in the bundle`);

  const report = await fsck(site.settings({ offline: true }), { fix: false });
  assert.is(report.signatures, records.length, 'every signature the lock records');
  assert.equal(report.bad, []);
  assert.match(formatFsck(report, site.settings()), new RegExp(`\\d+ cache entries, ${records.length} signatures and 0 outputs checked .*: all match`));
  assert.is(counting.connections(), 0, 'no connection to any fixture port');
});

test.run();
