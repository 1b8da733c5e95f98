// Benchmarks for the foundation and fetch (issue: pipeline foundation):
//  1. a no-op fetch with everything fresh, `node tasks/cli.ts fetch` and `make fetch`, each
//     against `node -e 0` in the same run (target: ≤ 0.25 s both ways);
//  2. fetching a 1 GiB file from the loopback server, hash included, against what a user
//     would otherwise do in the same run: `curl -o file && sha256sum file` (target: ≥ 1.0x)
//     and `curl -o file` (the write-bound limit, target: ≥ 0.6x); the split: receiving and
//     hashing without the file against `curl -o /dev/null` (where the time goes when the
//     disk is busy: on a shared machine the file's writes vary most);
//  3. the xz stage: decompress + both hashes in one pass, against xz alone and against
//     decompress-then-hash (the output is never read back).
import { execFile, execFileSync } from 'node:child_process';
import { promisify } from 'node:util';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, mkdtempSync, openSync, rmSync, statSync, writeSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Cache } from '../tasks/lib/store/cache.ts';
import { downloadChunks, defaultHttpSettings } from '../tasks/lib/store/download.ts';
import { downloadToCache, writeXzDecompressed } from '../tasks/fetch.ts';
import type { Artifact } from '../tasks/lib/inputs/lock.ts';
import { spawn } from 'node:child_process';
import { startFixtureServer } from '../test/fixtures/http-server.ts';

async function startServerProcess(root: string): Promise<{ url: string; close(): void }> {
  const child = spawn(process.execPath, [join(projectRoot, 'test', 'fixtures', 'serve.ts'), root], { stdio: ['ignore', 'pipe', 'inherit'] });
  const url = await new Promise<string>((resolveUrl, reject) => {
    child.stdout.setEncoding('utf8').once('data', (line: string) => resolveUrl(line.trim()));
    child.once('exit', (code) => reject(new Error(`fixture server exited with ${code}`)));
  });
  return { url, close: () => child.kill('SIGTERM') };
}
import { buildUpstreamTree } from '../test/fixtures/upstream.ts';
import { makeWorkspace, projectRoot, workspaceArgs } from '../test/helpers.ts';
import { median, report, seconds } from './measure.ts';

// The fixture servers live in this process: children that talk to them must not block it.
const run = promisify(execFile);
const sizeGiB = Number(process.env.BENCH_GIB ?? 1);

const work = mkdtempSync(join(tmpdir(), 'corekube-bench-'));
// The big-file server runs in a process of its own, as a real mirror would: sharing this
// process's event loop would slow the client being measured.
const server = await startServerProcess(work);
try {
  // 1. no-op fetch
  const tree = await buildUpstreamTree(join(work, 'tree-root'), { qcow2SizeMiB: 64 });
  const treeServer = await startFixtureServer({ root: join(work, 'tree-root') });
  const ws = makeWorkspace(tree, treeServer.url);
  const cli = [join(projectRoot, 'tasks', 'cli.ts'), ...workspaceArgs(ws), 'fetch'];
  // As a person runs it: no NODE_COMPILE_CACHE from make (the CLI turns the cache on itself).
  const { NODE_COMPILE_CACHE: _, ...direct }: Record<string, string | undefined> = { ...process.env, CI: 'true' };
  await run(process.execPath, cli, { env: direct });
  const noop: Record<'node' | 'cli' | 'make', number[]> = { node: [], cli: [], make: [] };
  for (let i = 0; i < 5; i++) {
    let start = performance.now();
    await run(process.execPath, ['-e', '0']);
    noop.node.push(seconds(start));
    start = performance.now();
    await run(process.execPath, cli, { env: direct });
    noop.cli.push(seconds(start));
    start = performance.now();
    await run('make', ['-s', '-C', projectRoot, 'fetch', `CONFIG=${ws.configFile}`, `LOCK=${ws.lockFile}`], {
      env: { ...process.env, CI: 'true', OUT_DIR: ws.outDir, CACHE_DIR: ws.cacheDir },
    });
    noop.make.push(seconds(start));
  }
  const [node, cliNoop, makeNoop] = [median(noop.node), median(noop.cli), median(noop.make)];
  report(
    `no-op fetch, median of 5: node tasks/cli.ts fetch ${cliNoop.toFixed(3)} s (${(cliNoop / node).toFixed(1)}x node -e 0, ${(cliNoop / makeNoop).toFixed(2)}x make fetch); ` +
      `make fetch ${makeNoop.toFixed(3)} s (${(makeNoop / node).toFixed(1)}x node -e 0); node -e 0 ${node.toFixed(3)} s (target ≤ 0.25 s both ways)`,
  );
  await treeServer.close();
  rmSync(ws.dir, { recursive: true, force: true });

  // 2. 1 GiB over loopback, hash and write included, vs curl to /dev/null
  const bigPath = join(work, 'big.bin');
  const fd = openSync(bigPath, 'w');
  const block = randomBytes(1 << 24);
  for (let written = 0; written < sizeGiB * 1024 ** 3; written += block.length) writeSync(fd, block);
  closeSync(fd);
  const bigSha = createHash('sha256');
  for await (const chunk of createReadStream(bigPath, { highWaterMark: 1 << 20 })) bigSha.update(chunk as Buffer);
  const artifact: Artifact = { key: 'kubeadm', url: `${server.url}/big.bin`, sha256: bigSha.digest('hex') };
  const bytes = statSync(bigPath).size;
  // What a user would otherwise do, in the same run: curl to a file and sha256sum it
  // (target: corekube at least as fast), curl to a file alone (the write-bound limit,
  // target ≥ 0.8x), and curl to /dev/null (information only: neither writes nor hashes).
  const times: Record<'ours' | 'oursNoFile' | 'curlFileSha' | 'curlFile' | 'curlNull', number[]> = { ours: [], oursNoFile: [], curlFileSha: [], curlFile: [], curlNull: [] };
  const userFile = join(work, 'user-download.bin');
  const rounds = Math.max(3, Number(process.env.BENCH_ROUNDS ?? 5));
  const options = { signal: new AbortController().signal, offline: false, http: defaultHttpSettings };
  for (let round = 0; round < rounds; round++) {
    let start = performance.now();
    await run('curl', ['-sS', '-o', '/dev/null', artifact.url]);
    times.curlNull.push(seconds(start));
    start = performance.now();
    await run('curl', ['-sS', '-o', userFile, artifact.url]);
    times.curlFile.push(seconds(start));
    rmSync(userFile, { force: true });
    start = performance.now();
    await run('sh', ['-c', `curl -sS -o "${userFile}" "${artifact.url}" && sha256sum "${userFile}" >/dev/null`]);
    times.curlFileSha.push(seconds(start));
    rmSync(userFile, { force: true });
    const cache = new Cache(join(work, `cache-${round}`));
    start = performance.now();
    await downloadToCache(cache, artifact, artifact.url, options);
    times.ours.push(seconds(start));
    rmSync(cache.dir, { recursive: true, force: true });
    start = performance.now();
    const hash = createHash('sha256');
    for await (const chunk of downloadChunks(artifact.url, options)) hash.update(chunk);
    if (hash.digest('hex') !== artifact.sha256) throw new Error('the download without a file hashed to another sha256');
    times.oursNoFile.push(seconds(start));
  }
  const mibps = (key: keyof typeof times) => bytes / median(times[key]) / 1024 ** 2;
  const ours = mibps('ours');
  const spread = (key: keyof typeof times) => `${Math.min(...times[key]).toFixed(1)}–${Math.max(...times[key]).toFixed(1)} s`;
  report(
    `download ${sizeGiB} GiB, median of ${rounds}, interleaved: corekube (hash + write + verify + rename) ${ours.toFixed(0)} MiB/s (${spread('ours')}); ` +
      `curl -o file && sha256sum file ${mibps('curlFileSha').toFixed(0)} MiB/s: ratio ${(ours / mibps('curlFileSha')).toFixed(2)} (target >= 1.0); ` +
      `curl -o file ${mibps('curlFile').toFixed(0)} MiB/s (${spread('curlFile')}): ratio ${(ours / mibps('curlFile')).toFixed(2)} (target >= 0.6)\n` +
      `   split: corekube receiving and hashing, no file ${mibps('oursNoFile').toFixed(0)} MiB/s (${spread('oursNoFile')}) against ` +
      `curl -o /dev/null ${mibps('curlNull').toFixed(0)} MiB/s (${spread('curlNull')}): ratio ${(mibps('oursNoFile') / mibps('curlNull')).toFixed(2)}`,
  );

  // 3. xz: one pass (download stream -> xz -d -T0 -> hash -> file, compressed hash on the way in)
  const raw = join(work, 'image.raw');
  const rawFd = openSync(raw, 'w');
  const compressible = Buffer.alloc(1 << 20);
  for (let i = 0; i < 512; i++) {
    randomBytes(1 << 18).copy(compressible); // 1/4 random, 3/4 zeros: like a sparse disk image
    writeSync(rawFd, compressible);
  }
  closeSync(rawFd);
  execFileSync('xz', ['-T0', '-3', '-k', raw]);
  const xzUrl = `${server.url}/image.raw.xz`;
  const onePass: number[] = [];
  const xzAlone: number[] = [];
  const twoPass: number[] = [];
  for (let round = 0; round < 3; round++) {
    let start = performance.now();
    await writeXzDecompressed(downloadChunks(xzUrl, { signal: new AbortController().signal, offline: false, http: defaultHttpSettings }), join(work, `one-${round}`), new AbortController().signal);
    onePass.push(seconds(start));
    rmSync(join(work, `one-${round}`));
    start = performance.now();
    await run('sh', ['-c', `curl -sS "${xzUrl}" | xz -d -T0 > /dev/null`]);
    xzAlone.push(seconds(start));
    start = performance.now();
    await run('sh', ['-c', `curl -sS -o "${work}/two.xz" "${xzUrl}" && sha256sum "${work}/two.xz" >/dev/null && xz -d -T0 -c "${work}/two.xz" > "${work}/two" && sha256sum "${work}/two" > /dev/null`]);
    twoPass.push(seconds(start));
    rmSync(join(work, 'two'), { force: true });
    rmSync(join(work, 'two.xz'), { force: true });
  }
  report(
    `xz 512 MiB image: one pass (download, decompress, both hashes, write) ${median(onePass).toFixed(2)} s; ` +
      `curl | xz -d > /dev/null ${median(xzAlone).toFixed(2)} s; download, hash, decompress, hash again (two passes) ${median(twoPass).toFixed(2)} s`,
  );
} finally {
  server.close();
  rmSync(work, { recursive: true, force: true });
}

