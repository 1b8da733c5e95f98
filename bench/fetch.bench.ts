// Benchmarks for the foundation and fetch (issue: pipeline foundation):
//  1. a no-op `make fetch` with everything fresh (target: under 0.5 s wall);
//  2. fetching a 1 GiB file from the loopback server, hash included, against what a user
//     would otherwise do in the same run: `curl -o file && sha256sum file` (target: ≥ 1.0x)
//     and `curl -o file` (the write-bound limit, target: ≥ 0.8x); `curl -o /dev/null` as
//     information;
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
  await run(process.execPath, cli, { env: { ...process.env, CI: 'true' } });
  const noop: number[] = [];
  for (let i = 0; i < 7; i++) {
    const start = performance.now();
    await run(process.execPath, cli, { env: { ...process.env, CI: 'true' } });
    noop.push(seconds(start));
  }
  const makeRuns: number[] = [];
  for (let i = 0; i < 5; i++) {
    const start = performance.now();
    await run('make', ['-s', '-C', projectRoot, 'fetch', `CONFIG=${ws.configFile}`, `LOCK=${ws.lockFile}`], {
      env: { ...process.env, CI: 'true', OUT_DIR: ws.outDir, CACHE_DIR: ws.cacheDir },
    });
    makeRuns.push(seconds(start));
  }
  report(`no-op fetch: node tasks/cli.ts median ${median(noop).toFixed(3)} s, make fetch median ${median(makeRuns).toFixed(3)} s (target < 0.5 s)`);
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
  const times: Record<'ours' | 'curlFileSha' | 'curlFile' | 'curlNull', number[]> = { ours: [], curlFileSha: [], curlFile: [], curlNull: [] };
  const userFile = join(work, 'user-download.bin');
  for (let round = 0; round < 3; round++) {
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
    await downloadToCache(cache, artifact, artifact.url, { signal: new AbortController().signal, offline: false, http: defaultHttpSettings });
    times.ours.push(seconds(start));
    rmSync(cache.dir, { recursive: true, force: true });
  }
  const mibps = (key: keyof typeof times) => bytes / median(times[key]) / 1024 ** 2;
  const ours = mibps('ours');
  report(
    `download ${sizeGiB} GiB, median of 3: corekube (hash + write + verify + rename) ${ours.toFixed(0)} MiB/s; ` +
      `curl -o file && sha256sum file ${mibps('curlFileSha').toFixed(0)} MiB/s: ratio ${(ours / mibps('curlFileSha')).toFixed(2)} (target >= 1.0); ` +
      `curl -o file ${mibps('curlFile').toFixed(0)} MiB/s: ratio ${(ours / mibps('curlFile')).toFixed(2)} (target >= 0.8); ` +
      `curl -o /dev/null ${mibps('curlNull').toFixed(0)} MiB/s: ratio ${(ours / mibps('curlNull')).toFixed(2)} (information)`,
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

