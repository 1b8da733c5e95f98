// Does KVM run guests here (tasks/lib/node/kvm.ts, and chooseAccelerator in boot.ts)? The
// probe boots the stand-in appliance's kernel under KVM and TCG at once; the test-only
// fakes make the "KVM" guest one that never runs (stall, -S; COREKUBE_KVM_PROBE=stall for
// the boot) or one that wins (works), so both verdicts are reached on every host, whatever
// its KVM does. The verdict cache lives under a temporary XDG_CACHE_HOME. How the boot
// uses it: boot.test.ts.
import { copyFileSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { chooseAccelerator } from '../tasks/boot.ts';
import { UserError } from '../tasks/lib/errors.ts';
import { cachedVerdict, cpuHint, kvmVerdict, probeKvm, linuxLine, machineArgs, probeArgs, storeVerdict, verdictFile, verdictKey } from '../tasks/lib/node/kvm.ts';
import { qemuArgs } from '../tasks/lib/node/qemu.ts';
import { loadConfig } from '../tasks/lib/inputs/config.ts';
import { buildAppliance } from './fixtures/appliance.ts';
import { loud } from './helpers.ts';

const work = mkdtempSync(join(tmpdir(), 'corekube-kvm-'));
const env = { XDG_CACHE_HOME: join(work, 'xdg') } as NodeJS.ProcessEnv;
const cacheFile = verdictFile(env);
// The kernel under a path of this file's own: its probe QEMUs are told apart by cmdline.
const kernel = join(work, 'vmlinuz');
test.before(loud(async () => {
  copyFileSync((await buildAppliance()).kernel, kernel);
}));
test.after(() => rmSync(work, { recursive: true, force: true }));

function probeProcesses(): string[] {
  const found: string[] = [];
  for (const pid of readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
    try {
      const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      if (cmdline.includes('qemu-system') && cmdline.includes(kernel)) found.push(`${pid}: ${cmdline.replace(/\0/g, ' ')}`);
    } catch {
      // gone
    }
  }
  return found;
}

test('the probe guest: the nodes\' -machine and -cpu, console on stdout, no disks or network of a node', () => {
  writeFileSync(join(work, 'key.pub'), 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGNvcmVrdWJldGVzdGtleQ test@corekube\n');
  writeFileSync(join(work, 'cluster.yaml'), 'name: demo\nkubernetes: {version: v1.35.7}\nnodes:\n  - {name: cp1, role: control-plane, ip: 10.77.0.10}\nsshPublicKeyFile: key.pub\n');
  const config = loadConfig(join(work, 'cluster.yaml'));
  const paths = { image: 'i', ignition: 'g', disk: 'd', log: 'l', pid: 'p', qmp: 'q', switchSocket: 's' };
  for (const accel of ['kvm', 'tcg'] as const) {
    const node = qemuArgs({ config, node: config.nodes[0]!, paths, accel });
    const machine = (args: string[]) => args.filter((_, i) => args[i - 1] === '-machine' || args[i - 1] === '-cpu');
    assert.equal(machine(probeArgs({ kernel: 'k' }, accel)), machine(node), `${accel}: the probe runs the CPU the nodes get`);
    assert.equal(machine(machineArgs(accel)), machine(node));
  }
  const kernelArgs = probeArgs({ kernel: '/k/vmlinuz' }, 'kvm');
  assert.equal(kernelArgs.slice(kernelArgs.indexOf('-kernel'), kernelArgs.indexOf('-kernel') + 4), ['-kernel', '/k/vmlinuz', '-append', 'console=ttyS0 earlycon=uart8250,io,0x3f8 panic=-1']);
  assert.ok(kernelArgs.includes('-nodefaults') && kernelArgs.includes('-no-reboot'));
  assert.equal(kernelArgs.slice(kernelArgs.indexOf('-serial'), kernelArgs.indexOf('-serial') + 2), ['-serial', 'stdio']);
  assert.not.ok(kernelArgs.includes('-S'));
  assert.ok(probeArgs({ kernel: 'k' }, 'tcg', { paused: true }).includes('-S'));
  assert.ok(probeArgs({ image: '/a,b/fcos.qcow2' }, 'kvm').includes('if=virtio,file=/a,,b/fcos.qcow2,format=qcow2,snapshot=on'), 'the FCOS image is never written');
  assert.ok(linuxLine.test('[    0.000000] Linux version 6.1.0-57-amd64 (debian-kernel@lists.debian.org)'));
  assert.not.ok(linuxLine.test('SeaBIOS (version 1.16.2-debian-1.16.2-1)\r\nBooting from ROM...'));
});

test('the cause names missing vmx/svm, and says so only when they are missing', () => {
  assert.match(cpuHint('processor\t: 0\nflags\t\t: fpu vme sse2 hypervisor lahf_lm\n'), /this machine is a VM and its CPU flags in \/proc\/cpuinfo show no vmx\/svm/);
  assert.match(cpuHint('flags\t\t: fpu vme sse2\n'), /^; the CPU flags in \/proc\/cpuinfo show no vmx/);
  assert.is(cpuHint('flags\t\t: fpu vmx sse2 hypervisor\n'), '');
  assert.is(cpuHint('flags\t\t: fpu svm sse2\n'), '');
});

test('verdicts are kept per host boot, QEMU and probe mode; entries from an earlier boot are dropped', () => {
  const file = join(work, 'verdicts', 'kvm.json');
  const key = verdictKey();
  assert.is.not(verdictKey({ fake: 'stall' }), key, 'the stalled test probe never answers for the real one');
  assert.is(verdictKey(), key, 'stable');
  assert.is(cachedVerdict(file, key), undefined);
  storeVerdict(file, 'from-an-earlier-boot', { usable: true, reason: 'r', seconds: 1, probedAt: 't' });
  const stored = JSON.parse(readFileSync(file, 'utf8')) as Record<string, { bootId: string }>;
  stored['from-an-earlier-boot']!.bootId = 'another-boot';
  writeFileSync(file, JSON.stringify(stored));
  storeVerdict(file, key, { usable: false, reason: 'no progress', seconds: 2, probedAt: 'then' });
  assert.equal(Object.keys(JSON.parse(readFileSync(file, 'utf8'))), [key]);
  assert.equal(cachedVerdict(file, key), { usable: false, reason: 'no progress', seconds: 2, probedAt: 'then', cached: true });
  writeFileSync(file, 'not json');
  assert.is(cachedVerdict(file, key), undefined, 'a damaged cache is no verdict');
});

let probed: Awaited<ReturnType<typeof kvmVerdict>>;

test('a KVM guest that never runs: the probe says so once the same guest under TCG booted into Linux, and nothing is left running; a KVM guest that wins: usable', async () => {
  const started = performance.now();
  let works: Awaited<ReturnType<typeof probeKvm>>;
  [probed, works] = await Promise.all([kvmVerdict({ guest: { kernel }, fake: 'stall', cacheFile }), probeKvm({ guest: { kernel }, fake: 'works' })]);
  const seconds = (performance.now() - started) / 1000;
  console.log(`    (two probes at once, one with a stalled KVM guest: ${seconds.toFixed(1)} s, the emulated kernel's time to its first line)`);
  assert.is(works?.usable, true);
  assert.match(works!.reason, /^a test guest under KVM printed its first Linux line in \d+\.\d s$/);
  assert.ok(probed);
  assert.is(probed!.usable, false);
  assert.match(probed!.reason, /^a test guest under KVM printed nothing in \d+\.\d s while the same guest under TCG booted into Linux/);
  assert.not.ok(probed!.cached);
  assert.equal(probeProcesses(), []);
});

test('the verdict is cached: the next call starts no guest', async () => {
  rmSync(kernel); // a probe now would fail on the missing kernel, with another reason
  const started = performance.now();
  const again = await kvmVerdict({ guest: { kernel }, fake: 'stall', cacheFile });
  assert.ok((performance.now() - started) / 1000 < 5);
  assert.equal(again, { ...probed!, cached: true });
  copyFileSync((await buildAppliance()).kernel, kernel);
});

test('a guest that does not boot even under TCG is an error about the guest, never a verdict on KVM', async () => {
  const file = join(work, 'no-verdict.json');
  const error = await kvmVerdict({ guest: { kernel: join(work, 'no-such-kernel') }, cacheFile: file }).then(() => undefined, (e: Error) => e);
  assert.instance(error, UserError);
  assert.match(error!.message, /^the KVM probe's guest does not boot even under TCG \(exit 1\):\n.*no-such-kernel/);
  assert.is(cachedVerdict(file, verdictKey()), undefined);
  assert.equal(probeProcesses(), []);
});

test('chooseAccelerator: the fallback in one line naming the cause; COREKUBE_ACCEL=kvm fails with it; tcg never probes', async () => {
  const warnings: string[] = [];
  const warn = (why: string) => warnings.push(why);
  const missing = { kernel: join(work, 'no-such-kernel') };
  // COREKUBE_ACCEL=tcg: no probe at all (a probe of a missing kernel would say KVM cannot run).
  assert.is(await chooseAccelerator({ guest: missing, warn, env: { ...env, COREKUBE_ACCEL: 'tcg' } }), 'tcg');
  assert.equal(warnings.splice(0), ['COREKUBE_ACCEL=tcg']);
  // The stalled probe's cached verdict: TCG, with the cause in the one warning.
  assert.is(await chooseAccelerator({ guest: { kernel }, warn, env: { ...env, COREKUBE_KVM_PROBE: 'stall' } }), 'tcg');
  assert.is(warnings.length, 1);
  assert.match(warnings[0]!, /^KVM does not run guests here: a test guest under KVM printed nothing in .* while the same guest under TCG booted into Linux.* \(judged at .*, kept in .*kvm-verdicts\.json until the host reboots\)$/);
  assert.not.match(warnings[0]!, /\n/);
  const forced = await chooseAccelerator({ guest: { kernel }, warn, env: { ...env, COREKUBE_KVM_PROBE: 'stall', COREKUBE_ACCEL: 'kvm' } }).then(() => undefined, (e: Error) => e);
  assert.instance(forced, UserError);
  assert.match(forced!.message, /^COREKUBE_ACCEL=kvm, but KVM does not run guests here: a test guest under KVM printed nothing .*Unset COREKUBE_ACCEL to boot every node under TCG instead/);
  // No device: TCG with a line; forced: an error naming the device.
  assert.is(await chooseAccelerator({ guest: missing, warn, env, device: join(work, 'kvm') }), 'tcg');
  assert.match(warnings.at(-1)!, /kvm cannot be opened read-write$/);
  const noDevice = await chooseAccelerator({ guest: missing, warn, env: { ...env, COREKUBE_ACCEL: 'kvm' }, device: join(work, 'kvm') }).then(() => undefined, (e: Error) => e);
  assert.match(noDevice!.message, /COREKUBE_ACCEL=kvm, but .*kvm cannot be opened read-write/);
  for (const [name, value] of [['COREKUBE_ACCEL', 'xen'], ['COREKUBE_KVM_PROBE', 'maybe']]) {
    const bad = await chooseAccelerator({ guest: missing, warn, env: { ...env, [name!]: value } }).then(() => undefined, (e: Error) => e);
    assert.match(bad!.message, new RegExp(`^${name}: expected .*found "${value}"`));
  }
});

test.run();
