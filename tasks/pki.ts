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
import { join } from 'node:path';
import { stringify } from 'yaml';
import type { ClusterConfig } from './lib/inputs/config.ts';
import { UserError } from './lib/errors.ts';
import type { RunContext, Stage } from './lib/run/stage.ts';
import { runTool } from './lib/run/tool.ts';

export const pkiDir = 'pki';
export const kubeconfigOutput = 'kubeconfig';
export const caValidityDays = 3650;
export const adminValidityDays = 365;
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

async function makeCa(dir: string, cluster: string, signal: AbortSignal): Promise<void> {
  const work = await mkdtemp(join(dir, '.ca-'));
  try {
    await runTool(
      'openssl',
      [
        'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-sha256',
        '-keyout', join(work, files.caKey),
        '-out', join(work, files.caCert),
        '-days', String(caValidityDays),
        '-subj', `/CN=${cluster}-ca`,
        '-addext', 'basicConstraints=critical,CA:TRUE',
        '-addext', 'keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign',
      ],
      { signal },
    );
    await chmod(join(work, files.caKey), 0o600);
    // The key first: a certificate without its key is never left behind.
    await rename(join(work, files.caKey), join(dir, files.caKey));
    await rename(join(work, files.caCert), join(dir, files.caCert));
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

async function makeAdminCertificate(dir: string, signal: AbortSignal): Promise<void> {
  const work = await mkdtemp(join(dir, '.admin-'));
  try {
    const key = join(work, files.adminKey);
    const request = join(work, 'admin.csr');
    const extensions = join(work, 'ext.cnf');
    await runTool('openssl', ['req', '-new', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', request, '-subj', `/O=${adminGroup}/CN=${adminUser}`], { signal });
    await writeFile(extensions, 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n');
    await runTool(
      'openssl',
      [
        'x509', '-req', '-sha256', '-in', request,
        '-CA', join(dir, files.caCert), '-CAkey', join(dir, files.caKey), '-CAcreateserial', '-CAserial', join(work, 'ca.srl'),
        '-days', String(adminValidityDays), '-extfile', extensions, '-out', join(work, files.adminCert),
      ],
      { signal },
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
