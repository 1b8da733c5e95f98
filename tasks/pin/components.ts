// pin's defaults for the node components that do not follow Kubernetes' version
// (testedComponents: change them here), and where each binary lives upstream with its
// checksum file. Pure.
import { ExitCode, UserError } from '../lib/errors.ts';
import { goArch, upstreamBases, type Architecture } from '../lib/inputs/config.ts';
import type { ArtifactKey } from '../lib/inputs/lock.ts';

/** Versions of the node components that do not follow Kubernetes' version. */
export interface ComponentVersions {
  crictl: string;
  containerd: string;
  runc: string;
  cniPlugins: string;
  butane: string;
}

/**
 * The component versions corekube is tested with: the defaults pin writes into the lock
 * (written without a leading v; either form is accepted as an override).
 */
export const testedComponents: Readonly<ComponentVersions> = {
  crictl: '1.37.0',
  containerd: '2.3.7',
  runc: '1.4.4',
  cniPlugins: '1.9.1',
  butane: '0.29.0',
};

const versionPattern = /^v?\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?$/;

export function resolveComponents(overrides: Partial<ComponentVersions> = {}): ComponentVersions {
  const merged = { ...testedComponents, ...overrides };
  const problems = Object.entries(merged)
    .filter(([, value]) => typeof value !== 'string' || !versionPattern.test(value))
    .map(([key, value]) => `${key}: expected a version like "1.2.3", found ${JSON.stringify(value)}`);
  if (problems.length > 0) throw new UserError(`pin: bad component versions:\n  ${problems.join('\n  ')}`, ExitCode.config);
  const bare = (v: string) => v.replace(/^v/, '');
  return {
    crictl: bare(merged.crictl),
    containerd: bare(merged.containerd),
    runc: bare(merged.runc),
    cniPlugins: bare(merged.cniPlugins),
    butane: bare(merged.butane),
  };
}

export type BinaryKey = Exclude<ArtifactKey, 'fcos-qemu'>;

export interface ArtifactSource {
  key: BinaryKey;
  /** The upstream URL, as the lock records it. */
  url: string;
  /** Upstream's checksum file for url; undefined where upstream publishes none (butane). */
  checksumUrl?: string;
  /** The name the checksum file gives the artifact (for `HASH  NAME` files). */
  fileName: string;
}

/** Where each binary lives upstream and where its checksum file is. Pure. */
export function artifactSources(arch: Architecture, kubernetesVersion: string, components: ComponentVersions): ArtifactSource[] {
  const ga = goArch(arch);
  const gh = upstreamBases.github;
  const k8s = (name: 'kubeadm' | 'kubelet' | 'kubectl'): ArtifactSource => {
    const url = `${upstreamBases.kubernetes}/release/${kubernetesVersion}/bin/linux/${ga}/${name}`;
    return { key: name, url, checksumUrl: `${url}.sha256`, fileName: name };
  };
  const { crictl, containerd, runc, cniPlugins, butane } = components;
  const crictlName = `crictl-v${crictl}-linux-${ga}.tar.gz`;
  const crictlUrl = `${gh}/kubernetes-sigs/cri-tools/releases/download/v${crictl}/${crictlName}`;
  const containerdName = `containerd-${containerd}-linux-${ga}.tar.gz`;
  const containerdUrl = `${gh}/containerd/containerd/releases/download/v${containerd}/${containerdName}`;
  const runcBase = `${gh}/opencontainers/runc/releases/download/v${runc}`;
  const cniName = `cni-plugins-linux-${ga}-v${cniPlugins}.tgz`;
  const cniUrl = `${gh}/containernetworking/plugins/releases/download/v${cniPlugins}/${cniName}`;
  const butaneName = `butane-${arch}-unknown-linux-gnu`;
  return [
    k8s('kubeadm'),
    k8s('kubelet'),
    k8s('kubectl'),
    { key: 'crictl', url: crictlUrl, checksumUrl: `${crictlUrl}.sha256`, fileName: crictlName },
    { key: 'containerd', url: containerdUrl, checksumUrl: `${containerdUrl}.sha256sum`, fileName: containerdName },
    { key: 'runc', url: `${runcBase}/runc.${ga}`, checksumUrl: `${runcBase}/runc.sha256sum`, fileName: `runc.${ga}` },
    { key: 'cni-plugins', url: cniUrl, checksumUrl: `${cniUrl}.sha256`, fileName: cniName },
    { key: 'butane', url: `${gh}/coreos/butane/releases/download/v${butane}/${butaneName}`, fileName: butaneName },
  ];
}
