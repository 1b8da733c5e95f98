// Self-check of test/fixtures/appliance.ts with real QEMU boots (not a uvu test; needs
// qemu-system-x86_64, vde_switch, mkfs.ext4, busybox-static, apt for the kernel; no root,
// no KVM): `node test/appliance.check.ts`.
// 1. One VM (mode=acpi, no peers): every check ok, the ignition sha256 is the file's,
//    hostfwd 127.0.0.1:P -> :22 returns the banner, system_powerdown powers it off.
// 2. Two VMs on one vde_switch pinging each other (a: mode=poweroff, b: mode=stay): all ok,
//    a powers off by itself once b is done too, b ignores system_powerdown.
// 3. One VM set up wrong (no fw_cfg, writable drive, a manifest that lies, restrict=off):
//    ignition, disk-ro, disk-manifest and user-net fail, and the host probe saw it.
// Uses -daemonize -pidfile -snapshot -serial file: like the product. Prints timings.
import { spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect, createServer, type Server } from 'node:net';
import { networkInterfaces } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { applianceAppend, applianceChecks, buildAppliance, readChecks, readDone, type Appliance, type StandInOptions } from './fixtures/appliance.ts';

let failures = 0;
let passes = 0;
const seconds = (start: number) => `${((performance.now() - start) / 1000).toFixed(1)} s`;
const sha256 = (data: Uint8Array) => createHash('sha256').update(data).digest('hex');
function expect(condition: boolean, what: string): void {
  if (condition) passes++;
  else {
    failures++;
    console.log(`  FAIL: ${what}`);
  }
}

// ── host side: disks, ignition, probe servers, switch ──────────────────────────────────

const dir = mkdtempSync('/tmp/ckapp-'); // short: vde and monitor unix sockets (108-byte limit)
const cleanups: (() => void)[] = [
  () => (failures > 0 ? console.log(`kept ${dir} (serial logs *.log)`) : rmSync(dir, { recursive: true, force: true })),
];

function makeDisk(name: string, lie: boolean): string {
  const root = join(dir, `${name}-tree`);
  mkdirSync(join(root, 'bin'), { recursive: true });
  const kubelet = Buffer.from(`#!/bin/sh\necho kubelet ${randomBytes(8).toString('hex')}\n`);
  writeFileSync(join(root, 'bin', 'kubelet'), kubelet);
  chmodSync(join(root, 'bin', 'kubelet'), 0o755);
  const readme = Buffer.from('the image disk\n');
  writeFileSync(join(root, 'README'), readme);
  const files = [
    { path: 'README', size: readme.length, sha256: sha256(readme), mode: 0o644 },
    { path: 'bin/kubelet', size: kubelet.length, sha256: lie ? sha256(Buffer.from('something else')) : sha256(kubelet), mode: 0o755 },
  ];
  // As tasks/disk.ts writes it: JSON.stringify(manifest, null, 1).
  writeFileSync(join(root, 'MANIFEST.json'), `${JSON.stringify({ label: 'corekube', files }, null, 1)}\n`);
  const image = join(dir, `${name}.img`);
  // mkfs.ext4 is in /usr/sbin, which a non-root user's PATH often lacks.
  const env = { ...process.env, PATH: `${process.env.PATH ?? ''}:/usr/sbin:/sbin` };
  const result = spawnSync('mkfs.ext4', ['-q', '-L', 'corekube', '-d', root, image, '16M'], { encoding: 'utf8', env });
  if (result.status !== 0) throw new Error(`mkfs.ext4: ${result.error?.message ?? result.stderr}`);
  return image;
}

function listen(host: string): Promise<{ server: Server; port: number; connections: () => number }> {
  let count = 0;
  const server = createServer((socket) => {
    count++;
    socket.end('COREKUBE-PROBE\n');
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, host, () => {
      cleanups.push(() => server.close());
      resolve({ server, port: (server.address() as { port: number }).port, connections: () => count });
    });
  });
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

function readBanner(port: number): Promise<string> {
  return new Promise((resolve) => {
    let text = '';
    const socket = connect(port, '127.0.0.1');
    socket.setTimeout(5000, () => socket.destroy());
    socket.on('data', (data) => (text += data.toString()));
    socket.on('close', () => resolve(text.trim()));
    socket.on('error', () => resolve(text.trim()));
  });
}

// ── VMs ───────────────────────────────────────────────────────────────────────────────

interface Vm {
  name: string;
  log: string;
  pid: number;
  monitor: string;
  sshPort: number;
  started: number;
}

interface VmOptions extends Omit<StandInOptions, 'clusterMac' | 'userMac'> {
  index: number;
  ignition?: string;
  disk: string;
  diskReadonly?: boolean;
  restrict?: boolean;
}

async function startVm(appliance: Appliance, options: VmOptions): Promise<Vm> {
  const clusterMac = `52:54:00:77:00:${String(options.index).padStart(2, '0')}`;
  const userMac = `52:54:00:02:00:${String(options.index).padStart(2, '0')}`;
  const sshPort = await freePort();
  const log = join(dir, `${options.node}.log`);
  const pidfile = join(dir, `${options.node}.pid`);
  const monitor = join(dir, `${options.node}.mon`);
  const args = [
    '-machine', 'q35', '-accel', 'tcg', '-m', '256', '-no-reboot', '-snapshot',
    '-kernel', appliance.kernel, '-initrd', appliance.initrd,
    '-append', applianceAppend({ ...options, clusterMac, userMac }),
    ...(options.ignition ? ['-fw_cfg', `name=opt/com.coreos/config,file=${options.ignition}`] : []),
    '-drive', `if=virtio,file=${options.disk},format=raw${options.diskReadonly === false ? '' : ',readonly=on'}`,
    '-netdev', `vde,id=c,sock=${join(dir, 'sw')}`, '-device', `virtio-net-pci,netdev=c,mac=${clusterMac},romfile=`,
    '-netdev', `user,id=u,restrict=${options.restrict === false ? 'off' : 'on'},hostfwd=tcp:127.0.0.1:${sshPort}-:22`,
    '-device', `virtio-net-pci,netdev=u,mac=${userMac},romfile=`,
    '-display', 'none', '-serial', `file:${log}`, '-monitor', `unix:${monitor},server=on,wait=off`,
    '-daemonize', '-pidfile', pidfile,
  ];
  const started = performance.now();
  const result = spawnSync('qemu-system-x86_64', args, { encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`qemu-system-x86_64 exited ${result.status}: ${result.stderr}`);
  const pid = Number(readFileSync(pidfile, 'utf8').trim());
  cleanups.unshift(() => alive(pid) && process.kill(pid, 'SIGKILL'));
  return { name: options.node, log, pid, monitor, sshPort, started };
}

/** Running (a daemonized QEMU is not our child: once exited it may linger as a zombie). */
function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/^\d+ \(.*\) [ZX] /.test(stat);
  } catch {
    return false;
  }
}

const logText = (vm: Vm) => (existsSync(vm.log) ? readFileSync(vm.log, 'utf8') : '');

async function waitFor(what: string, test: () => boolean, timeoutMs: number): Promise<boolean> {
  const end = performance.now() + timeoutMs;
  while (performance.now() < end) {
    if (test()) return true;
    await sleep(100);
  }
  console.log(`  (timed out waiting for ${what})`);
  return test();
}

/** Waits for COREKUBE-DONE; returns seconds from QEMU start. */
async function waitDone(vm: Vm): Promise<number> {
  await waitFor(`${vm.name} COREKUBE-DONE`, () => readDone(logText(vm)) !== undefined || !alive(vm.pid), 180_000);
  return (performance.now() - vm.started) / 1000;
}

function monitorCommand(vm: Vm, command: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const socket = connect(vm.monitor);
    socket.on('error', reject);
    socket.on('connect', () => socket.write(`${command}\n`, () => setTimeout(() => (socket.destroy(), resolve()), 300)));
  });
}

function assertChecks(vm: Vm, expected: Record<string, boolean>): Map<string, { ok: boolean; detail: string }> {
  const text = logText(vm);
  const checks = readChecks(text);
  expect(readDone(text) === vm.name, `${vm.name}: COREKUBE-DONE ${vm.name} in the log`);
  for (const name of applianceChecks) {
    const check = checks.get(name);
    const want = expected[name] ?? true;
    expect(check?.ok === want, `${vm.name}: ${name} ${want ? 'ok' : 'fail'}, got ${check ? `${check.ok ? 'ok' : 'fail'} ${check.detail}` : 'nothing'}`);
  }
  for (const [name, check] of checks) console.log(`  ${vm.name}: ${name} ${check.ok ? 'ok' : 'fail'} ${check.detail}`);
  return checks;
}

// ── run ───────────────────────────────────────────────────────────────────────────────

try {
  let start = performance.now();
  const appliance = await buildAppliance({ log: (message) => console.log(`  ${message}`) });
  console.log(`build: ${seconds(start)} (${appliance.kernelRelease})`);
  start = performance.now();
  const again = await buildAppliance();
  console.log(`build again (cached): ${seconds(start)}`);
  expect(again.initrd === appliance.initrd && again.kernel === appliance.kernel, 'a second build is the cached one');

  const disk = makeDisk('good', false);
  const badDisk = makeDisk('bad', true);
  const ignition = join(dir, 'config.ign');
  const ignitionBytes = Buffer.from(JSON.stringify({ ignition: { version: '3.4.0' }, nonce: randomBytes(16).toString('hex') }));
  writeFileSync(ignition, ignitionBytes);
  const probe = await listen('127.0.0.1');
  // "Outside": this machine's own non-loopback address, so that even with restrict=off the
  // guest's connection stays on this machine.
  const hostAddress = Object.values(networkInterfaces())
    .flat()
    .find((address) => address && address.family === 'IPv4' && !address.internal)?.address;
  const outside = hostAddress ? await listen(hostAddress) : undefined;
  const outsideTarget = outside ? `${hostAddress}:${outside.port}` : undefined;
  console.log(`probe 10.0.2.2:${probe.port} (host 127.0.0.1)${outside ? `, outside ${outsideTarget}` : ', no outside address'}`);

  const sw = spawnSync('vde_switch', ['-s', join(dir, 'sw'), '-d', '-p', join(dir, 'sw.pid')], { encoding: 'utf8' });
  if (sw.status !== 0) throw new Error(`vde_switch: ${sw.stderr}`);
  // -d: the pid file and the ctl socket appear a moment after vde_switch itself returns.
  const switchPidFile = join(dir, 'sw.pid');
  const switchPid = () => (existsSync(switchPidFile) ? Number(readFileSync(switchPidFile, 'utf8').trim()) || 0 : 0);
  cleanups.unshift(() => {
    // vde_switch removes its socket directory as it exits: let it finish before rm -r.
    const pid = switchPid();
    if (pid && alive(pid)) process.kill(pid, 'SIGTERM');
    for (let i = 0; i < 50 && pid && alive(pid); i++) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 40);
  });
  if (!(await waitFor('vde_switch', () => existsSync(join(dir, 'sw', 'ctl')) && switchPid() > 0, 5000))) {
    throw new Error('vde_switch: no sw/ctl and sw.pid after 5 s');
  }

  const common = { disk, ignition, probe: `10.0.2.2:${probe.port}`, outside: outsideTarget };

  console.log('\n1. one VM, mode=acpi');
  const solo = await startVm(appliance, { ...common, index: 1, node: 'solo', ip: '10.77.0.10/24', mode: 'acpi' });
  console.log(`  solo: boot to DONE ${(await waitDone(solo)).toFixed(1)} s`);
  const soloChecks = assertChecks(solo, {});
  expect(soloChecks.get('ignition')?.detail.includes(`sha256=${sha256(ignitionBytes)}`) === true, 'solo: ignition sha256 is the file\'s');
  expect(soloChecks.get('user-net')?.detail.includes(`10.0.2.2:${probe.port}=blocked`) === true, 'solo: probe blocked');
  const banner = await readBanner(solo.sshPort);
  expect(banner === 'COREKUBE-SSH-solo', `solo: banner through hostfwd, got ${JSON.stringify(banner)}`);
  start = performance.now();
  await monitorCommand(solo, 'system_powerdown');
  expect(await waitFor('solo to power off', () => !alive(solo.pid), 30_000), 'solo: system_powerdown powers it off');
  expect(logText(solo).includes('COREKUBE-ACPI solo powerdown'), 'solo: saw the power button');
  console.log(`  solo: system_powerdown to exit ${seconds(start)}`);

  console.log('\n2. two VMs on a vde switch (a: poweroff, b: stay)');
  const a = await startVm(appliance, { ...common, index: 2, node: 'a', ip: '10.77.0.21/24', peers: ['10.77.0.22'], mode: 'poweroff' });
  const b = await startVm(appliance, { ...common, index: 3, node: 'b', ip: '10.77.0.22/24', peers: ['10.77.0.21'], mode: 'stay' });
  const [doneA, doneB] = await Promise.all([waitDone(a), waitDone(b)]);
  console.log(`  boot to DONE: a ${doneA.toFixed(1)} s, b ${doneB.toFixed(1)} s`);
  for (const vm of [a, b]) {
    const checks = assertChecks(vm, {});
    expect(checks.get('ignition')?.detail.includes(`sha256=${sha256(ignitionBytes)}`) === true, `${vm.name}: ignition sha256 is the file's`);
  }
  const bannerB = await readBanner(b.sshPort);
  expect(bannerB === 'COREKUBE-SSH-b', `b: banner through hostfwd, got ${JSON.stringify(bannerB)}`);
  start = performance.now();
  expect(await waitFor('a to power off', () => !alive(a.pid), 60_000), 'a: powers off by itself');
  console.log(`  a: DONE to exit ${seconds(start)} (waits for its peer, then lingers 3 s)`);
  await monitorCommand(b, 'system_powerdown');
  await sleep(5000);
  expect(alive(b.pid), 'b (mode=stay): still running 5 s after system_powerdown');
  process.kill(b.pid, 'SIGTERM');
  expect(await waitFor('b to exit on SIGTERM', () => !alive(b.pid), 10_000), 'b: exits on SIGTERM');
  expect(probe.connections() === 0, `probe: no connection from restricted guests (got ${probe.connections()})`);
  expect(!outside || outside.connections() === 0, `outside: no connection from restricted guests (got ${outside?.connections()})`);

  console.log('\n3. one VM set up wrong (no fw_cfg, writable drive, bad manifest, restrict=off)');
  const wrong = await startVm(appliance, { ...common, ignition: undefined, disk: badDisk, diskReadonly: false, restrict: false, index: 4, node: 'wrong', ip: '10.77.0.30/24', mode: 'poweroff' });
  console.log(`  wrong: boot to DONE ${(await waitDone(wrong)).toFixed(1)} s`);
  const wrongChecks = assertChecks(wrong, { ignition: false, 'disk-ro': false, 'disk-manifest': false, 'user-net': false });
  expect(wrongChecks.get('disk-manifest')?.detail.includes('bin/kubelet sha256=') === true, 'wrong: manifest failure names bin/kubelet');
  expect(await waitFor('wrong to power off', () => !alive(wrong.pid), 30_000), 'wrong: powers off by itself');
  expect(probe.connections() > 0, 'probe: reached from an unrestricted guest');
  expect(!outside || outside.connections() > 0, 'outside: reached from an unrestricted guest');
} catch (error) {
  failures++;
  console.log(`  FAIL: ${error instanceof Error ? error.stack : String(error)}`);
} finally {
  for (const cleanup of cleanups) {
    try {
      cleanup();
    } catch (error) {
      console.log(`cleanup: ${error instanceof Error ? error.message : String(error)}`);
    }
  }
}

console.log(`\n${passes} passed, ${failures} failed`);
process.exit(failures > 0 ? 1 : 0);
