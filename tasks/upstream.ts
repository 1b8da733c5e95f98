// Upstream metadata formats, parsed once into typed values: FCOS stream metadata and
// the three checksum-file formats of the Kubernetes and GitHub release sites.
import { type Architecture } from './config.ts';
import { InputError } from './errors.ts';
import { Reader, sha256Pattern } from './fields.ts';

export interface FcosDisk {
  release: string;
  location: string;
  signature?: string;
  sha256: string;
  /** Missing in older stream documents: verify it when present, never require it. */
  uncompressedSha256?: string;
}

/**
 * The qemu qcow2.xz disk of one architecture in an FCOS stream document
 * (`streams/STREAM.json`): `.architectures.ARCH.artifacts.qemu`.
 */
export function parseFcosStream(source: string, json: unknown, arch: Architecture): FcosDisk {
  const r = new Reader(source);
  const root = r.map(json, '');
  const architectures = root ? r.map(root.architectures, 'architectures') : undefined;
  if (architectures && architectures[arch] === undefined) {
    throw new InputError(source, [
      { path: `architectures.${arch}`, expected: `the architecture ${arch}`, found: `only ${Object.keys(architectures).join(', ') || 'none'}` },
    ]);
  }
  const archEntry = architectures ? r.map(architectures[arch], `architectures.${arch}`) : undefined;
  const artifacts = archEntry ? r.map(archEntry.artifacts, `architectures.${arch}.artifacts`) : undefined;
  const qemuPath = `architectures.${arch}.artifacts.qemu`;
  const qemu = artifacts ? r.map(artifacts.qemu, qemuPath) : undefined;
  const release = qemu ? r.string(qemu.release, `${qemuPath}.release`, 'an FCOS release', /^\d+\.\d{8}\.\d+\.\d+$/) : undefined;
  const formats = qemu ? r.map(qemu.formats, `${qemuPath}.formats`) : undefined;
  const diskPath = `${qemuPath}.formats["qcow2.xz"].disk`;
  const format = formats ? r.map(formats['qcow2.xz'], `${qemuPath}.formats["qcow2.xz"]`) : undefined;
  const disk = format ? r.map(format.disk, diskPath) : undefined;
  const location = disk ? r.string(disk.location, `${diskPath}.location`, 'an https URL ending in .qcow2.xz', /^https?:\/\/\S+\.qcow2\.xz$/) : undefined;
  const sha256 = disk ? r.string(disk.sha256, `${diskPath}.sha256`, '64 lowercase hex digits', sha256Pattern) : undefined;
  const signature = disk?.signature === undefined ? undefined : r.string(disk.signature, `${diskPath}.signature`, 'a URL');
  const uncompressed =
    disk?.['uncompressed-sha256'] === undefined
      ? undefined
      : r.string(disk['uncompressed-sha256'], `${diskPath}["uncompressed-sha256"]`, '64 lowercase hex digits', sha256Pattern);
  r.check();
  return {
    release: release!,
    location: location!,
    sha256: sha256!,
    ...(signature ? { signature } : {}),
    ...(uncompressed ? { uncompressedSha256: uncompressed } : {}),
  };
}

/**
 * The sha256 for `fileName` in a checksum file, in any of upstream's formats: the bare
 * hex digest (dl.k8s.io: no newline, no name; crictl: with a newline), or
 * `HASH  NAME` lines (sha256sum output: CNI plugins, containerd, runc), `*NAME` too.
 */
export function parseChecksumFile(source: string, text: string, fileName: string): string {
  const lines = text.split('\n').map((line) => line.trim()).filter(Boolean);
  if (lines.length === 1 && /^[0-9a-fA-F]{64}$/.test(lines[0]!)) return lines[0]!.toLowerCase();
  const found: string[] = [];
  for (const line of lines) {
    const match = /^([0-9a-fA-F]{64})\s+\*?(.+)$/.exec(line);
    if (!match) continue;
    const name = match[2]!.replace(/^\.\//, '').split('/').pop();
    found.push(name ?? '');
    if (name === fileName) return match[1]!.toLowerCase();
  }
  throw new InputError(source, [
    {
      path: '',
      expected: `a sha256 for ${fileName} (a bare digest, or "HASH  ${fileName}" lines)`,
      found: found.length > 0 ? `digests for ${found.join(', ')}` : JSON.stringify(text.slice(0, 80)),
    },
  ]);
}
