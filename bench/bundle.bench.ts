// Benchmark for bundles (issue: air-gapped bundles): `make bundle` and `make unbundle`
// throughput on a few hundred MB of synthetic cache entries (random bytes: nine artifacts
// and three OCI images), against GNU tar plus sha256sum over the same files in the same
// run (target: within 1.2x of their time). Runs alternate, median of BENCH_RUNS (3).
// Figures only: exits non-zero on a failure, not on a missed target.
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { unbundle } from '../tasks/bundle/unbundle.ts';
import { writeBundle } from '../tasks/bundle/write.ts';
import { artifactKeys } from '../tasks/lib/inputs/lock.ts';
import { ociLayoutFile, serializeIndex, withRef, type OciIndex } from '../tasks/lib/store/oci.ts';
import { listFiles, makeWorkspace } from '../test/helpers.ts';
import type { UpstreamTree } from '../test/fixtures/upstream.ts';
import { median, seconds } from './measure.ts';

const run = promisify(execFile);
const runs = Number(process.env.BENCH_RUNS ?? 3);
const scale = Number(process.env.BENCH_SCALE ?? 1);
const MiB = 1 << 20;
const hex = (bytes: Buffer | string) => createHash('sha256').update(bytes).digest('hex');

const work = mkdtempSync(join(tmpdir(), 'corekube-bundle-bench-'));
let failed = false;
try {
  // ---- a synthetic cache: what fetch and images would have left ----
  const artifactSizes: Record<string, number> = {
    'fcos-qemu': 160, kubeadm: 40, kubelet: 40, kubectl: 30, crictl: 10, containerd: 20, runc: 5, 'cni-plugins': 25, butane: 5,
  };
  const cacheDir = join(work, 'cache');
  mkdirSync(join(cacheDir, 'sha256'), { recursive: true });
  const artifacts: UpstreamTree['artifacts'] = {};
  for (const key of artifactKeys) {
    const bytes = randomBytes(Math.round(artifactSizes[key]! * MiB * scale));
    const sum = hex(bytes);
    writeFileSync(join(cacheDir, 'sha256', sum), bytes, { mode: 0o444 });
    const xz = key === 'fcos-qemu';
    artifacts[key] = {
      key,
      upstreamUrl: `https://example.com/bench/${key}${xz ? '.qcow2.xz' : ''}`,
      servedPath: '',
      sha256: xz ? hex(`${key}.xz`) : sum,
      ...(xz ? { uncompressedSha256: sum } : {}),
      size: bytes.length,
    };
  }
  const store = join(cacheDir, 'oci');
  mkdirSync(join(store, 'blobs', 'sha256'), { recursive: true });
  const blob = (bytes: Buffer) => {
    const sum = hex(bytes);
    writeFileSync(join(store, 'blobs', 'sha256', sum), bytes, { mode: 0o444 });
    return { digest: `sha256:${sum}`, size: bytes.length };
  };
  let index: OciIndex = { schemaVersion: 2, manifests: [] };
  const images: string[] = [];
  for (const [i, layerMiB] of [30, 20, 15].entries()) {
    const layer = blob(randomBytes(Math.round(layerMiB * MiB * scale)));
    const config = blob(Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [layer.digest] } })));
    const manifest = blob(
      Buffer.from(
        JSON.stringify({
          schemaVersion: 2,
          mediaType: 'application/vnd.oci.image.manifest.v1+json',
          config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...config },
          layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', ...layer }],
        }),
      ),
    );
    const name = `registry.k8s.io/bench-${i}`;
    index = withRef(index, `${name}:v1`, { mediaType: 'application/vnd.oci.image.manifest.v1+json', ...manifest });
    images.push(`${name}:v1@${manifest.digest}`);
  }
  writeFileSync(join(store, 'index.json'), serializeIndex(index));
  writeFileSync(join(store, 'oci-layout'), ociLayoutFile);

  const tree: UpstreamTree = {
    root: work,
    prefixes: { fcos: '/fcos', kubernetes: '/k8s', github: '/github', fedora: '/fedora' },
    artifacts,
    keyFiles: { fedora: '/fedora/fedora.gpg', runc: '/github/opencontainers/runc/raw/v1.4.4/runc.keyring' },
    fcosRelease: '43.20260802.3.1',
    kubernetesVersion: 'v1.35.7',
  };
  const ws = makeWorkspace(tree, 'http://127.0.0.1:9', { images });
  const settings = { cacheDir, offline: true };
  const files = listFiles(cacheDir);
  const inputMB = files.length && Number((await run('du', ['-sb', cacheDir])).stdout.split('\t')[0]) / 1e6;
  console.log(`synthetic cache: ${files.length} files, ${inputMB.toFixed(0)} MB; ${runs} runs each, median`);

  // ---- bundle vs tar -cf + sha256sum ----
  const bundleFile = join(work, 'bundle.tar');
  const ours: number[] = [];
  const theirs: number[] = [];
  const tarOnly: number[] = [];
  const hashOnly: number[] = [];
  const sslOnly: number[] = [];
  let bytes = 0;
  for (let i = 0; i < runs; i++) {
    rmSync(bundleFile, { force: true });
    let start = performance.now();
    bytes = (await writeBundle(ws.context(settings), bundleFile)).bytes;
    ours.push(seconds(start));

    const tarFile = join(work, 'tar.tar');
    rmSync(tarFile, { force: true });
    start = performance.now();
    await run('tar', ['-cf', tarFile, '-C', cacheDir, ...files]);
    tarOnly.push(seconds(start));
    const hashStart = performance.now();
    await run('sha256sum', files, { cwd: cacheDir, maxBuffer: 1 << 24 });
    hashOnly.push(seconds(hashStart));
    theirs.push(seconds(start));
    // A stronger hasher for reference: OpenSSL uses the CPU's SHA extensions, as Node does.
    const sslStart = performance.now();
    await run('openssl', ['dgst', '-sha256', ...files], { cwd: cacheDir, maxBuffer: 1 << 24 });
    sslOnly.push(seconds(sslStart));
    rmSync(tarFile, { force: true });
  }
  const mbps = (s: number) => `${(bytes / 1e6 / s).toFixed(0)} MB/s`;
  const bundleRatio = median(ours) / median(theirs);
  console.log(
    `bundle   ${median(ours).toFixed(2)} s (${mbps(median(ours))}) vs tar -cf + sha256sum ${median(theirs).toFixed(2)} s (${mbps(median(theirs))}): ` +
      `${bundleRatio.toFixed(2)}x the time, target <= 1.2x: ${bundleRatio <= 1.2 ? 'met' : 'MISSED'}`,
  );
  console.log(`  of which tar -cf ${median(tarOnly).toFixed(2)} s, sha256sum ${median(hashOnly).toFixed(2)} s (${mbps(median(hashOnly))}); ours against tar -cf alone: ${(median(ours) / median(tarOnly)).toFixed(2)}x`);
  const strong = median(tarOnly) + median(sslOnly);
  console.log(`  reference: tar -cf + openssl dgst -sha256 ${strong.toFixed(2)} s (${mbps(strong)}): ours ${(median(ours) / strong).toFixed(2)}x the time`);

  // ---- unbundle (into an empty cache) vs tar -xf + sha256sum ----
  const oursIn: number[] = [];
  const theirsIn: number[] = [];
  for (let i = 0; i < runs; i++) {
    const target = join(work, `site-${i}`);
    let start = performance.now();
    await unbundle(ws.context({ cacheDir: target }), bundleFile);
    oursIn.push(seconds(start));
    if (listFiles(target).length !== files.length) throw new Error(`unbundle left ${listFiles(target).length} files, expected ${files.length}`);
    rmSync(target, { recursive: true, force: true });

    const extract = join(work, `extract-${i}`);
    mkdirSync(extract);
    start = performance.now();
    await run('tar', ['-xf', bundleFile, '-C', extract]);
    const extracted = listFiles(extract);
    await run('sha256sum', extracted, { cwd: extract, maxBuffer: 1 << 24 });
    theirsIn.push(seconds(start));
    rmSync(extract, { recursive: true, force: true });
  }
  const unbundleRatio = median(oursIn) / median(theirsIn);
  console.log(
    `unbundle ${median(oursIn).toFixed(2)} s (${mbps(median(oursIn))}) vs tar -xf + sha256sum ${median(theirsIn).toFixed(2)} s (${mbps(median(theirsIn))}): ` +
      `${unbundleRatio.toFixed(2)}x the time, target <= 1.2x: ${unbundleRatio <= 1.2 ? 'met' : 'MISSED'}`,
  );
  console.log(`runs (s): bundle ${ours.map((s) => s.toFixed(2)).join(' ')} | tar+sha ${theirs.map((s) => s.toFixed(2)).join(' ')} | unbundle ${oursIn.map((s) => s.toFixed(2)).join(' ')} | untar+sha ${theirsIn.map((s) => s.toFixed(2)).join(' ')}`);
} catch (error) {
  failed = true;
  console.error('bundle bench failed:', error);
} finally {
  rmSync(work, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
