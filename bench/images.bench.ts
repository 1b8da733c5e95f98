// Benchmarks for the images and disk stages (issue: images and image disk), against the
// real fixtures: Debian's docker-registry on loopback seeded with real images (one busybox
// base layer shared by all, plus an incompressible layer of its own sized like the real
// image), a real containerd, mkfs.ext4/debugfs. Reports, never pass/fail:
//  1. a no-op `make images disk` with everything fresh (target: under 0.5 s wall), and the
//     bare CLI `node tasks/cli.ts images disk`;
//  2. the size of out/images (each blob once) against one `docker save`-style archive per
//     image (skopeo docker-archive), the seed project's way;
//  3. importing out/images into a fresh containerd, unpacked (what a node pays at every
//     boot) and not;
//  4. copying the images from the loopback registry on a cold cache, --jobs 4 vs --jobs 1;
//  5. the disk stage alone against `cp -r` of the same tree.
// The image set is what a real lock for the project holds (test/helpers.ts projectImages):
// the kubeadm set for v1.35.7 plus every image manifests/ names (flannel and its CNI
// plugin, pushed multi-arch as upstream does), about BENCH_IMAGES_MB (default 250) MB
// compressed in total; BENCH_ROUNDS (default 3) runs of each timed figure that is cheap
// enough, median reported. Exits non-zero when something fails, never on a figure.
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, type Dirent } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { diskUuid, makeFilesystem, verifyDisk } from '../tasks/disk.ts';
import { blobPath, imageBlobs, readIndex } from '../tasks/lib/store/oci.ts';
import { startContainerd } from '../test/fixtures/containerd.ts';
import { startFixtureServer, type FixtureServer } from '../test/fixtures/http-server.ts';
import { startRegistry, type RegistryFixture } from '../test/fixtures/registry.ts';
import { buildUpstreamTree } from '../test/fixtures/upstream.ts';
import { cliPath, fixtureMirrors, lockEntry, makeWorkspace, projectRoot, workspaceArgs, type Workspace } from '../test/helpers.ts';
import { mb, median, rate, realisticImages, report, seconds } from './measure.ts';

// The fixture HTTP server lives in this process: children that talk to it must not block it.
const run = promisify(execFile);
const cliEnv = { ...process.env, CI: 'true' };
const totalMB = Number(process.env.BENCH_IMAGES_MB ?? 250);
const rounds = Math.max(1, Number(process.env.BENCH_ROUNDS ?? 3));

const version = 'v1.35.7';
const specs = realisticImages(version, totalMB);

async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 })) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

function filesBelow(dir: string): string[] {
  return (readdirSync(dir, { recursive: true, withFileTypes: true }) as Dirent[])
    .filter((e) => e.isFile())
    .map((e) => join(e.parentPath, e.name));
}

const work = mkdtempSync(join(tmpdir(), 'corekube-bench-images-'));
const workspaces: Workspace[] = [];
let treeServer: FixtureServer | undefined;
let registry: RegistryFixture | undefined;
try {
  let start = performance.now();
  const tree = await buildUpstreamTree(join(work, 'upstream'), { qcow2SizeMiB: 1, kubernetesVersion: version });
  treeServer = await startFixtureServer({ root: join(work, 'upstream') });
  registry = await startRegistry({ images: specs, work });
  const reg = registry;
  const server = treeServer;
  console.log(`(setup: upstream tree and registry seeded with ${specs.length} images in ${seconds(start).toFixed(1)} s)`);
  const workspace = () => {
    const ws = makeWorkspace(tree, server.url, {
      registries: fixtureMirrors(reg.host),
      images: reg.images.map((i) => lockEntry(i)),
    });
    workspaces.push(ws);
    return ws;
  };
  const cli = (ws: Workspace, args: string[]) => run(process.execPath, [cliPath, ...workspaceArgs(ws), ...args], { env: cliEnv, maxBuffer: 1 << 26 });

  // ---- 1. no-op `make images disk`
  const main = workspace();
  start = performance.now();
  await cli(main, ['disk']);
  const firstBuild = seconds(start);
  const layout = join(main.outDir, 'images');
  const diskImage = join(main.outDir, 'image-disk.img');
  const noopCli: number[] = [];
  const noopMake: number[] = [];
  let notNoop = 0;
  for (let i = 0; i < 5; i++) {
    start = performance.now();
    const cliRun = await cli(main, ['images', 'disk']);
    noopCli.push(seconds(start));
    start = performance.now();
    const makeRun = await run('make', ['-s', '-C', projectRoot, 'images', 'disk', `CONFIG=${main.configFile}`, `LOCK=${main.lockFile}`], {
      env: { ...cliEnv, OUT_DIR: main.outDir, CACHE_DIR: main.cacheDir },
    });
    noopMake.push(seconds(start));
    if (!cliRun.stdout.includes('nothing to do') || !makeRun.stdout.includes('images, disk: fresh, nothing to do')) notNoop++;
  }
  if (notNoop > 0) throw new Error(`${notNoop} of 5 no-op rounds of images disk were not no-ops`);
  report(
    `1. no-op: make images disk median ${median(noopMake).toFixed(3)} s (target < 0.5 s; make runs the CLI once for both goals), ` +
      `node tasks/cli.ts images disk median ${median(noopCli).toFixed(3)} s; median of 5`,
  );
  report(`   (first build, fetch + images + disk from nothing: ${firstBuild.toFixed(1)} s)`);

  // ---- 2. layout size vs one docker-save archive per image
  const index = readIndex(layout);
  const manifests = [...new Map(index.manifests.map((d) => [d.digest, d.size])).entries()];
  const unique = new Map<string, number>();
  let perImage = 0; // each image alone: manifest + config + all its layers
  for (const [digest, size] of manifests) {
    const manifest = JSON.parse(readFileSync(blobPath(layout, digest), 'utf8')) as {
      config: { digest: string; size: number };
      layers: { digest: string; size: number }[];
    };
    for (const d of [{ digest, size }, manifest.config, ...manifest.layers]) {
      unique.set(d.digest, d.size);
      perImage += d.size;
    }
    if (imageBlobs(layout, digest).length !== 2 + manifest.layers.length) throw new Error(`${digest}: imageBlobs disagrees with the manifest`);
  }
  const layoutBytes = [...unique.values()].reduce((a, b) => a + b, 0);
  const du = await run('sh', ['-c', 'du -cb --apparent-size blobs/sha256/* | tail -n 1'], { cwd: layout });
  const duBytes = Number(du.stdout.split(/\s/)[0]);
  const blobFiles = readdirSync(join(layout, 'blobs', 'sha256')).length;
  const archives = join(work, 'archives');
  mkdirSync(archives);
  let archiveBytes = 0;
  start = performance.now();
  for (const image of reg.images) {
    const file = join(archives, `${image.name.replaceAll('/', '_')}.tar`);
    await run('skopeo', [
      '--insecure-policy', '--override-os', 'linux', '--override-arch', 'amd64',
      'copy', '--quiet', '--src-tls-verify=false',
      `docker://${reg.host}/${image.repository}@${image.digest}`,
      `docker-archive:${file}:${image.name}:${image.tag}`,
    ]);
    archiveBytes += statSync(file).size;
  }
  const archiveSeconds = seconds(start);
  rmSync(archives, { recursive: true, force: true });
  report(
    `2. out/images: ${mb(layoutBytes)} in ${blobFiles} blobs for ${reg.images.length} images ` +
      `(du of blobs: ${duBytes} bytes, ${duBytes === layoutBytes ? 'equal to' : `NOT equal to ${layoutBytes},`} the sum of unique blob sizes); ` +
      `one skopeo docker-archive per image: ${mb(archiveBytes)} (ratio ${(archiveBytes / layoutBytes).toFixed(2)}x; made in ${archiveSeconds.toFixed(1)} s); ` +
      `per-image OCI blobs without sharing: ${mb(perImage)} (ratio ${(perImage / layoutBytes).toFixed(2)}x). ` +
      `The fixture filler is incompressible, so the archives' uncompressed layers cost little here; real image layers typically gzip 2-3x.`,
  );

  // ---- 3. containerd import of out/images
  const importTimes = { unpack: [] as number[], plain: [] as number[] };
  let snapshotter = '';
  for (let i = 0; i < rounds; i++) {
    for (const unpack of [true, false]) {
      const containerd = await startContainerd({ work });
      try {
        snapshotter = containerd.snapshotter;
        start = performance.now();
        await containerd.importLayout(layout, { unpack });
        (unpack ? importTimes.unpack : importTimes.plain).push(seconds(start));
        if (i === 0 && unpack) {
          const names = (await containerd.images()).length;
          if (names !== index.manifests.length) throw new Error(`containerd lists ${names} images, out/images has ${index.manifests.length} refs`);
        }
      } finally {
        await containerd.close();
      }
    }
  }
  const unpackS = median(importTimes.unpack);
  const plainS = median(importTimes.plain);
  report(
    `3. containerd import of out/images (${mb(layoutBytes)}, ${index.manifests.length} refs, fresh containerd each time, ${snapshotter}, layout in page cache): ` +
      `unpacked ${unpackS.toFixed(2)} s (${rate(layoutBytes, unpackS)}), --no-unpack ${plainS.toFixed(2)} s (${rate(layoutBytes, plainS)}); median of ${rounds}`,
  );

  // ---- 4. cold-cache copies, 4 at a time vs one after another
  const copyTimes: Record<number, number[]> = { 4: [], 1: [] };
  const copyRounds = Math.min(rounds, 2);
  for (let i = 0; i < copyRounds; i++) {
    for (const jobs of [4, 1]) {
      const ws = workspace();
      start = performance.now();
      await cli(ws, ['images', '--jobs', String(jobs)]);
      copyTimes[jobs]!.push(seconds(start));
      rmSync(ws.dir, { recursive: true, force: true });
    }
  }
  const [j4, j1] = [Math.min(...copyTimes[4]!), Math.min(...copyTimes[1]!)];
  report(
    `4. images stage, cold cache, ${mb(layoutBytes)} from the loopback registry: --jobs 4 ${j4.toFixed(2)} s (${rate(layoutBytes, j4)}), ` +
      `--jobs 1 ${j1.toFixed(2)} s (${rate(layoutBytes, j1)}): ${(j1 / j4).toFixed(2)}x faster with 4 (best of ${copyRounds})`,
  );

  // ---- 5. the disk stage alone vs cp -r of the same tree
  const diskTimes: number[] = [];
  for (let i = 0; i < rounds; i++) {
    start = performance.now();
    await cli(main, ['disk', '--only', '--force']);
    diskTimes.push(seconds(start));
  }
  // The tree the disk holds, taken back out of it: the same files cp would copy.
  const treeDir = join(work, 'disk-tree');
  mkdirSync(treeDir);
  await run('debugfs', ['-R', `rdump / ${treeDir}`, diskImage]);
  rmSync(join(treeDir, 'lost+found'), { recursive: true, force: true });
  const treeFiles = filesBelow(treeDir);
  const treeBytes = treeFiles.reduce((n, f) => n + statSync(f).size, 0);
  const cpTimes: number[] = [];
  for (let i = 0; i < rounds; i++) {
    const target = join(work, `cp-${i}`);
    start = performance.now();
    await run('cp', ['-r', treeDir, target]);
    cpTimes.push(seconds(start));
    rmSync(target, { recursive: true, force: true });
  }
  const diskS = median(diskTimes);
  const cpS = median(cpTimes);
  report(
    `5. disk stage alone (--only --force, CLI process included): ${diskS.toFixed(2)} s for ${treeFiles.length} files, ${mb(treeBytes)} ` +
      `(image ${mb(statSync(diskImage).size)}); cp -r of the same tree ${cpS.toFixed(2)} s: ratio ${(diskS / cpS).toFixed(1)}x; median of ${rounds}`,
  );
  // Where the disk stage's time goes, on the same tree (MANIFEST.json included).
  start = performance.now();
  for (const file of treeFiles) await sha256File(file);
  const hashTree = seconds(start);
  const probe = join(work, 'probe.img');
  start = performance.now();
  await makeFilesystem(treeDir, probe, diskUuid('test'));
  const mkfs = seconds(start);
  start = performance.now();
  await verifyDisk(probe);
  const verify = seconds(start);
  start = performance.now();
  await sha256File(probe);
  const hashImage = seconds(start);
  rmSync(probe, { force: true });
  report(
    `   (disk stage parts: hashing the tree for MANIFEST.json ${hashTree.toFixed(2)} s, mkfs.ext4 -d + debugfs fix-up + resize2fs ${mkfs.toFixed(2)} s, ` +
      `debugfs read-back (hashing every file) ${verify.toFixed(2)} s, hashing the whole image (which the stage no longer does) ${hashImage.toFixed(2)} s)`,
  );
} finally {
  await treeServer?.close();
  await registry?.close();
  for (const ws of workspaces) rmSync(ws.dir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
}
