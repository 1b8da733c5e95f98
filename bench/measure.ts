// What every benchmark shares: timing, medians and the report lines it prints.
import type { ImageSpec } from '../test/fixtures/registry.ts';
import { projectImages } from '../test/helpers.ts';

export const results: string[] = [];

/** Prints a figure and keeps it (a bench may print them again as a summary). */
export function report(line: string): void {
  results.push(line);
  console.log(line);
}

export const median = (values: number[]): number => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
export const seconds = (start: number): number => (performance.now() - start) / 1000;
export const mb = (bytes: number): string => `${(bytes / 1e6).toFixed(1)} MB`;
export const rate = (bytes: number, s: number): string => `${(bytes / 1e6 / s).toFixed(0)} MB/s`;

/**
 * The images a cluster of `version` runs (kubeadm's set and manifests/), sized like the
 * real compressed linux/amd64 ones and scaled to `totalMB`; flannel's are multi-arch.
 */
export function realisticImages(version: string, totalMB: number): ImageSpec[] {
  const weights: Record<string, number> = {
    'registry.k8s.io/kube-apiserver': 27,
    'registry.k8s.io/kube-controller-manager': 25,
    'registry.k8s.io/kube-scheduler': 19,
    'registry.k8s.io/kube-proxy': 30,
    'registry.k8s.io/etcd': 23,
    'registry.k8s.io/coredns/coredns': 21,
    'registry.k8s.io/pause': 0.3,
    'ghcr.io/flannel-io/flannel': 33,
    'ghcr.io/flannel-io/flannel-cni-plugin': 5,
  };
  const multiArch = new Set(['ghcr.io/flannel-io/flannel', 'ghcr.io/flannel-io/flannel-cni-plugin']);
  const wanted = projectImages(version);
  for (const { name } of wanted) if (weights[name] === undefined) weights[name] = 10; // an image manifests/ gained since
  const weightSum = wanted.reduce((sum, { name }) => sum + weights[name]!, 0);
  return wanted.map(({ name, tag }) => ({
    name,
    tag,
    sizeKiB: Math.max(4, Math.round(((weights[name]! / weightSum) * totalMB * 1e6) / 1024)),
    ...(multiArch.has(name) ? { multiArch: true } : {}),
  }));
}
