// pki: the cluster CA (made once, kept in out/pki across rebuilds), a bootstrap token and
// the CA public-key hash for `kubeadm join`, and out/kubeconfig for the host: a client
// certificate for a group that kubeadm binds to cluster-admin. Keys are made by the
// openssl CLI (no crypto of our own); Node only reads certificates back.
//
// Only the CA is long-lived: kubeadm makes every serving and client certificate of the
// cluster at boot, and every boot is a first boot, so no node meets an expired leaf.
import { createHash, createPublicKey, randomInt, X509Certificate } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, rename, rm, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { stringify } from 'yaml';
import type { ClusterConfig } from './lib/inputs/config.ts';
import { UserError } from './lib/errors.ts';
import type { RunContext, Stage } from './lib/run/stage.ts';
import { runTool } from './lib/run/tool.ts';

export const pkiDir = 'pki';
export const kubeconfigOutput = 'kubeconfig';
export const caValidityDays = 3650;
export const adminValidityDays = 365;
/**
 * What corekube issues (the CA and the admin client certificate) starts this long before the
 * build host's clock: a node whose clock is behind the host's rejects a certificate that is
 * "not yet valid", and offline no time server corrects it. A bare-metal RTC kept in local time
 * (a dual-boot habit) is read as UTC up to 12 h early (UTC-12) or 14 h late (UTC+14); a day
 * covers that, with the build host's own error on top, and costs nothing against ten years.
 * kubeadm backdates what it issues by 5 minutes (CertificateBackdate in
 * cmd/kubeadm/app/constants/constants.go, applied in phases/certs/certlist.go GetConfig),
 * enough for clock jitter, not for a clock that is hours off.
 */
export const certificateBackdateHours = 24;
/** The admin certificate is re-made when it has less than this left. */
export const adminRenewDays = 30;
/** kubeadm (1.29+) binds this group to cluster-admin (ClusterRoleBinding kubeadm:cluster-admins), unlike system:masters it goes through RBAC. */
export const adminGroup = 'kubeadm:cluster-admins';
export const adminUser = 'corekube-admin';

const files = {
  caCert: 'ca.crt',
  caKey: 'ca.key',
  adminCert: 'admin.crt',
  adminKey: 'admin.key',
  token: 'bootstrap-token',
  caHash: 'ca-cert-hash',
} as const;

export const pkiStage: Stage = {
  name: 'pki',
  title: 'Make the cluster CA, bootstrap token and host kubeconfig',
  summary: 'makes the cluster CA once (kept in out/pki), a bootstrap token, the CA hash for joins, and out/kubeconfig for the host',
  needs: [],
  tools: ['openssl'],
  inputs(ctx) {
    return {
      cluster: ctx.config.name,
      server: apiServerUrl(ctx.config),
    };
  },
  expired(ctx, now) {
    const state = adminCertificateState(join(ctx.settings.outDir, pkiDir), now);
    if (state === 'expiring') return `the admin certificate in out/${pkiDir} expires within ${adminRenewDays} days`;
    if (state === 'foreign') return `the admin certificate in out/${pkiDir} was not issued by the cluster CA`;
    return undefined;
  },
  outputs() {
    return [...Object.values(files).map((f) => join(pkiDir, f)), ...Object.values(sharedFiles).map((f) => join(pkiDir, f)), kubeconfigOutput];
  },
  async run(ctx) {
    const dir = join(ctx.settings.outDir, pkiDir);
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await chmod(dir, 0o700);
    const signal = ctx.signal;
    if (!existsSync(join(dir, files.caCert)) || !existsSync(join(dir, files.caKey))) {
      await makeCa(dir, ctx.config.name, signal);
    }
    checkCaPair(dir);
    await makeSharedControlPlanePki(dir, ctx.config.name, signal);
    if (adminCertificateState(dir, new Date()) !== 'valid') await makeAdminCertificate(dir, signal);
    if (!existsSync(join(dir, files.token))) await writeSecret(join(dir, files.token), `${bootstrapToken()}\n`);
    const caPem = readFileSync(join(dir, files.caCert), 'utf8');
    await writeFile(join(dir, files.caHash), `${caCertHash(caPem)}\n`);
    const kubeconfig = renderKubeconfig({
      cluster: ctx.config.name,
      server: apiServerUrl(ctx.config),
      caPem,
      certPem: readFileSync(join(dir, files.adminCert), 'utf8'),
      keyPem: readFileSync(join(dir, files.adminKey), 'utf8'),
    });
    await writeSecret(join(ctx.settings.outDir, kubeconfigOutput), kubeconfig);
  },
};

export function apiServerUrl(config: ClusterConfig): string {
  // target openstack: the floating IP where one is configured (the certificate carries it), else the control plane on the cluster network.
  if (config.target === 'openstack') {
    const address = config.openstack?.floatingIp?.address ?? config.nodes.find((n) => n.role === 'control-plane')!.ip;
    return `https://${address}:6443`;
  }
  return `https://127.0.0.1:${config.hostPorts.apiServer}`;
}

/** A secret lands whole and 0600, or not at all. */
export async function writeSecret(file: string, content: string): Promise<void> {
  const tmp = `${file}.tmp-${process.pid}`;
  await writeFile(tmp, content, { mode: 0o600 });
  await chmod(tmp, 0o600);
  await rename(tmp, file);
}

/** kubeadm's token format: [a-z0-9]{6}.[a-z0-9]{16}. */
export function bootstrapToken(): string {
  const alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789';
  const pick = (n: number) => Array.from({ length: n }, () => alphabet[randomInt(alphabet.length)]).join('');
  return `${pick(6)}.${pick(16)}`;
}

/** `--discovery-token-ca-cert-hash`: sha256 of the CA certificate's SubjectPublicKeyInfo (DER). */
export function caCertHash(caPem: string): string {
  const spki = new X509Certificate(caPem).publicKey.export({ type: 'spki', format: 'der' });
  return `sha256:${createHash('sha256').update(spki).digest('hex')}`;
}

export function adminCertificateState(dir: string, now: Date): 'valid' | 'missing' | 'expiring' | 'foreign' {
  try {
    const cert = new X509Certificate(readFileSync(join(dir, files.adminCert)));
    const ca = new X509Certificate(readFileSync(join(dir, files.caCert)));
    if (!existsSync(join(dir, files.adminKey))) return 'missing';
    if (!cert.checkIssued(ca) || !cert.verify(ca.publicKey)) return 'foreign';
    return new Date(cert.validTo).getTime() - now.getTime() < adminRenewDays * 86_400_000 ? 'expiring' : 'valid';
  } catch {
    return 'missing';
  }
}

function checkCaPair(dir: string): void {
  const cert = new X509Certificate(readFileSync(join(dir, files.caCert)));
  const key = createPublicKey(readFileSync(join(dir, files.caKey)));
  const certKey = cert.publicKey.export({ type: 'spki', format: 'der' });
  if (!certKey.equals(key.export({ type: 'spki', format: 'der' }))) {
    throw new UserError(
      `${join(dir, files.caKey)} is not the key of ${join(dir, files.caCert)}: the CA is broken.\n` +
        'Make a new one with: make clean-pki (every node gets it at its next boot; fetch a new out/kubeconfig too).',
    );
  }
  if (!cert.ca) throw new UserError(`${join(dir, files.caCert)} is not a CA certificate (basicConstraints CA:TRUE). Make a new one with: make clean-pki`);
}

/** openssl's time format for `openssl ca -startdate/-enddate` (GeneralizedTime, UTC). */
export function opensslTime(date: Date): string {
  return `${date.toISOString().replace(/[-:T]/g, '').slice(0, 14)}Z`;
}

/**
 * Validity from `certificateBackdateHours` before now to `days` after now. `openssl req -x509`
 * and `openssl x509` start a certificate now: `-not_before` exists only from OpenSSL 3.4, and
 * Debian 12 ships 3.0. `openssl ca` takes -startdate and -enddate in every version corekube
 * meets, so both certificates are signed by it, from a throwaway configuration and database.
 */
export function validity(now: Date, days: number): { startdate: string; enddate: string } {
  return {
    startdate: opensslTime(new Date(now.getTime() - certificateBackdateHours * 3_600_000)),
    enddate: opensslTime(new Date(now.getTime() + days * 86_400_000)),
  };
}

async function opensslCaConfig(work: string): Promise<string> {
  const config = join(work, 'ca.cnf');
  await writeFile(join(work, 'index.txt'), '');
  await writeFile(
    config,
    [
      '[ca]', 'default_ca = corekube',
      '[corekube]',
      // Relative to the working directory (openssl runs in `work`): no path is ever read as openssl's $variables.
      'database = ./index.txt', 'new_certs_dir = .', 'serial = ./serial',
      'default_md = sha256', 'policy = any', 'preserve = yes', 'unique_subject = no', 'copy_extensions = none', 'email_in_dn = no',
      '[any]', 'organizationName = optional', 'commonName = supplied',
      '[ca_ext]',
      'basicConstraints = critical,CA:TRUE',
      'keyUsage = critical,digitalSignature,keyEncipherment,keyCertSign',
      'subjectKeyIdentifier = hash',
      'authorityKeyIdentifier = keyid:always',
      '[admin_ext]',
      'basicConstraints = critical,CA:FALSE',
      'keyUsage = critical,digitalSignature,keyEncipherment',
      'extendedKeyUsage = clientAuth',
      'authorityKeyIdentifier = keyid',
      '',
    ].join('\n'),
  );
  return config;
}

/** `openssl ca` signing a request, backdated (see validity); -rand_serial: no serial file to keep. */
function signArgs(config: string, request: string, out: string, extensions: string, days: number): string[] {
  const { startdate, enddate } = validity(new Date(), days);
  return ['ca', '-batch', '-config', config, '-in', request, '-out', out, '-notext', '-rand_serial', '-startdate', startdate, '-enddate', enddate, '-extensions', extensions];
}

async function makeCa(outPki: string, cluster: string, signal: AbortSignal): Promise<void> {
  // Absolute: openssl ca runs inside the work directory.
  const dir = resolve(outPki);
  const work = await mkdtemp(join(dir, '.ca-'));
  try {
    const request = join(work, 'ca.csr');
    await runTool('openssl', ['req', '-new', '-newkey', 'rsa:2048', '-nodes', '-keyout', join(work, files.caKey), '-out', request, '-subj', `/CN=${cluster}-ca`], { signal });
    const config = await opensslCaConfig(work);
    await runTool('openssl', [...signArgs(config, request, join(work, files.caCert), 'ca_ext', caValidityDays), '-selfsign', '-keyfile', join(work, files.caKey)], { signal, cwd: work });
    await chmod(join(work, files.caKey), 0o600);
    // The key first: a certificate without its key is never left behind.
    await rename(join(work, files.caKey), join(dir, files.caKey));
    await rename(join(work, files.caCert), join(dir, files.caCert));
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

async function makeAdminCertificate(outPki: string, signal: AbortSignal): Promise<void> {
  const dir = resolve(outPki);
  const work = await mkdtemp(join(dir, '.admin-'));
  try {
    const key = join(work, files.adminKey);
    const request = join(work, 'admin.csr');
    await runTool('openssl', ['req', '-new', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', request, '-subj', `/O=${adminGroup}/CN=${adminUser}`], { signal });
    const config = await opensslCaConfig(work);
    await runTool(
      'openssl',
      [...signArgs(config, request, join(work, files.adminCert), 'admin_ext', adminValidityDays), '-cert', join(dir, files.caCert), '-keyfile', join(dir, files.caKey)],
      { signal, cwd: work },
    );
    await chmod(key, 0o600);
    await rename(key, join(dir, files.adminKey));
    await rename(join(work, files.adminCert), join(dir, files.adminCert));
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

export function renderKubeconfig(options: { cluster: string; server: string; caPem: string; certPem: string; keyPem: string }): string {
  const b64 = (text: string) => Buffer.from(text).toString('base64');
  const context = `${adminUser}@${options.cluster}`;
  return stringify({
    apiVersion: 'v1',
    kind: 'Config',
    clusters: [{ name: options.cluster, cluster: { server: options.server, 'certificate-authority-data': b64(options.caPem) } }],
    users: [{ name: adminUser, user: { 'client-certificate-data': b64(options.certPem), 'client-key-data': b64(options.keyPem) } }],
    contexts: [{ name: context, context: { cluster: options.cluster, user: adminUser } }],
    'current-context': context,
  }, { lineWidth: 0 });
}

/** What the ignition stage needs from the PKI, read back from out/pki. */
export function readPki(outDir: string): { caCertPem: string; caKeyPem: string; token: string; caHash: string; shared: SharedControlPlanePki } {
  const dir = join(outDir, pkiDir);
  const read = (name: string) => readFileSync(join(dir, name), 'utf8');
  const shared = Object.fromEntries(Object.entries(sharedFiles).map(([key, name]) => [key, read(name)])) as unknown as SharedControlPlanePki;
  return { caCertPem: read(files.caCert), caKeyPem: read(files.caKey), token: read(files.token).trim(), caHash: read(files.caHash).trim(), shared };
}

/**
 * What every control plane must hold alike beside the cluster CA, for `kubeadm join
 * --control-plane` with no --upload-certs secret in the cluster: kubeadm's
 * SharedCertificateExists (cmd/kubeadm/app/phases/certs/certs.go) wants ca.crt/ca.key,
 * sa.key/sa.pub, front-proxy-ca.crt/.key and, for stacked etcd, etcd/ca.crt/.key in the
 * certificates directory, and makes every other certificate from them. Made once, kept
 * in out/pki like the CA; the ignition stage gives them to control planes only.
 */
export const sharedFiles = {
  frontProxyCaCert: 'front-proxy-ca.crt',
  frontProxyCaKey: 'front-proxy-ca.key',
  etcdCaCert: 'etcd-ca.crt',
  etcdCaKey: 'etcd-ca.key',
  serviceAccountKey: 'sa.key',
  serviceAccountPub: 'sa.pub',
} as const;
export type SharedControlPlanePki = Record<keyof typeof sharedFiles, string>;

/** The front-proxy CA, the etcd CA and the service-account key pair, each made once (an existing pair is kept). */
async function makeSharedControlPlanePki(dir: string, cluster: string, signal: AbortSignal): Promise<void> {
  const cas: [string, string, string][] = [
    [sharedFiles.frontProxyCaCert, sharedFiles.frontProxyCaKey, `${cluster}-front-proxy`],
    [sharedFiles.etcdCaCert, sharedFiles.etcdCaKey, `${cluster}-etcd`],
  ];
  for (const [cert, key, name] of cas) {
    if (existsSync(join(dir, cert)) && existsSync(join(dir, key))) continue;
    // The cluster CA's own recipe (CN NAME-ca, the same lifetime), made in a scratch directory.
    const work = await mkdtemp(join(dir, '.shared-'));
    try {
      await makeCa(work, name, signal);
      await rename(join(work, files.caKey), join(dir, key));
      await rename(join(work, files.caCert), join(dir, cert));
    } finally {
      await rm(work, { recursive: true, force: true });
    }
  }
  if (!existsSync(join(dir, sharedFiles.serviceAccountKey)) || !existsSync(join(dir, sharedFiles.serviceAccountPub))) {
    const work = await mkdtemp(join(dir, '.sa-'));
    try {
      // kubeadm's own service-account key is RSA 2048; sa.pub is the PKIX public key kubeadm reads.
      await runTool('openssl', ['genpkey', '-algorithm', 'RSA', '-pkeyopt', 'rsa_keygen_bits:2048', '-out', join(work, sharedFiles.serviceAccountKey)], { signal });
      await runTool('openssl', ['pkey', '-in', join(work, sharedFiles.serviceAccountKey), '-pubout', '-out', join(work, sharedFiles.serviceAccountPub)], { signal });
      await chmod(join(work, sharedFiles.serviceAccountKey), 0o600);
      await rename(join(work, sharedFiles.serviceAccountKey), join(dir, sharedFiles.serviceAccountKey));
      await rename(join(work, sharedFiles.serviceAccountPub), join(dir, sharedFiles.serviceAccountPub));
    } finally {
      await rm(work, { recursive: true, force: true });
    }
  }
}
