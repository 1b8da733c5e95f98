// Does KVM run guests here? A /dev/kvm that opens proves nothing: on a VM whose nested
// virtualisation half works, QEMU starts with accel=kvm, SeaBIOS prints, and a Linux guest
// never prints a line. So the answer comes from a guest that must run Linux code: the
// nodes' own boot medium (the FCOS image, or the tests' stand-in kernel) boots twice at
// once, under KVM and under TCG, with the nodes' -machine and -cpu, and the first to print
// the kernel's first line ("Linux version …") on its serial console wins. KVM must beat
// emulation: a KVM guest that makes no progress, or less than TCG, is no use for nodes.
// The verdict is cached per host boot (boot_id) and QEMU binary: a host where KVM works
// pays about a second once per boot, one where it does not pays the emulated guest's time
// to its first line (seconds to a minute) once.
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { accessSync, constants, mkdirSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { UserError } from '../errors.ts';
import { indentTail } from '../run/tool.ts';
import { findOnPath } from '../run/tools.ts';
import { qemuValue, type Accelerator } from './qemu.ts';

/** What the probe boots: a kernel (-kernel, console on ttyS0) or a disk image (its own bootloader). */
export type ProbeGuest = { kernel: string } | { image: string };

export interface KvmVerdict {
  usable: boolean;
  /** One clause naming what was seen (and, when KVM is unusable, the likely cause). */
  reason: string;
  /** Seconds the probe took. */
  seconds: number;
  probedAt: string;
  /** Taken from the cache file, not probed now. */
  cached?: boolean;
}

export interface ProbeOptions {
  guest: ProbeGuest;
  signal?: AbortSignal;
  /** Give up (no verdict) when neither guest printed a Linux line by then. */
  timeoutMs?: number;
  /**
   * Tests only, so that both verdicts are reached on any host, whatever its KVM does:
   * stall (COREKUBE_KVM_PROBE=stall) starts the "KVM" guest paused (-S, under TCG), a
   * guest that never makes progress; works runs it under TCG and pauses the other one.
   */
  fake?: 'stall' | 'works';
  qemu?: string;
}

/** The kernel's first line, printed (and replayed by every console) before anything else. */
export const linuxLine = /Linux version \d/;

/** -machine and -cpu for each accelerator: the same the nodes get (qemuArgs). */
export function machineArgs(accel: Accelerator): string[] {
  return ['-machine', `q35,accel=${accel}`, '-cpu', accel === 'kvm' ? 'host' : 'max'];
}

/** The probe guest's command line for one accelerator: no disks of the node, no network, console on stdout. */
export function probeArgs(guest: ProbeGuest, accel: Accelerator, options: { paused?: boolean } = {}): string[] {
  const boot = 'kernel' in guest
    ? ['-kernel', guest.kernel, '-append', 'console=ttyS0 earlycon=uart8250,io,0x3f8 panic=-1']
    : ['-drive', `if=virtio,file=${qemuValue(guest.image)},format=qcow2,snapshot=on`];
  return [
    '-name', 'corekube-kvm-probe',
    ...machineArgs(accel),
    '-smp', '1',
    '-m', '1024',
    '-nodefaults',
    '-display', 'none',
    '-monitor', 'none',
    '-serial', 'stdio',
    '-no-reboot',
    ...(options.paused ? ['-S'] : []),
    ...boot,
  ];
}

/** Whether /dev/kvm can be opened read-write: necessary, far from sufficient. */
export function kvmDeviceOpens(device = '/dev/kvm'): boolean {
  try {
    accessSync(device, constants.R_OK | constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

/** What /proc/cpuinfo says about hardware virtualisation, for the message when KVM fails. */
export function cpuHint(cpuinfo: string): string {
  const flags = /^flags\s*:(.*)$/m.exec(cpuinfo)?.[1]?.split(/\s+/) ?? [];
  if (flags.includes('vmx') || flags.includes('svm')) return '';
  const vm = flags.includes('hypervisor') ? 'this machine is a VM and its ' : 'the ';
  return `; ${vm}CPU flags in /proc/cpuinfo show no vmx/svm: nested virtualisation is missing or incomplete`;
}

interface Contestant {
  accel: 'kvm' | 'tcg';
  /** Seconds from start to the Linux line. */
  printedAt?: number;
  exited?: { code: number | null; stderr: string };
}

/**
 * Boots the guest under KVM and under TCG at once; the verdict is KVM's if its guest
 * prints the Linux line first. Returns undefined when neither printed within timeoutMs
 * (the guest prints no kernel line on ttyS0, or the machine is starved): no verdict.
 */
export async function probeKvm(options: ProbeOptions): Promise<KvmVerdict | undefined> {
  const qemu = options.qemu ?? findOnPath('qemu-system-x86_64') ?? 'qemu-system-x86_64';
  const timeoutMs = options.timeoutMs ?? 180_000;
  const started = performance.now();
  const elapsed = () => (performance.now() - started) / 1000;
  const contestants: Contestant[] = [{ accel: 'kvm' }, { accel: 'tcg' }];
  const children = contestants.map((c) => {
    const args = !options.fake
      ? probeArgs(options.guest, c.accel)
      : probeArgs(options.guest, 'tcg', { paused: (c.accel === 'kvm') === (options.fake === 'stall') });
    return spawn(qemu, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  });
  try {
    return await new Promise<KvmVerdict | undefined>((resolvePromise, rejectPromise) => {
      const done = () => {
        clearTimeout(timer);
        clearTimeout(startup);
        options.signal?.removeEventListener('abort', onAbort);
      };
      const resolve = (value: KvmVerdict | undefined) => (done(), resolvePromise(value));
      const reject = (error: unknown) => (done(), rejectPromise(error));
      const verdict = (usable: boolean, reason: string) => resolve({ usable, reason, seconds: Number(elapsed().toFixed(1)), probedAt: new Date().toISOString() });
      const timer = setTimeout(() => resolve(undefined), timeoutMs);
      // A QEMU that fails on the guest itself (a missing kernel, a bad image) fails within
      // moments under either accelerator: KVM's failure counts only once TCG got past that.
      let tcgStarted = false;
      const startup = setTimeout(() => {
        tcgStarted = true;
        settle();
      }, 2000);
      const onAbort = () => reject(options.signal!.reason);
      if (options.signal?.aborted) return onAbort();
      options.signal?.addEventListener('abort', onAbort, { once: true });
      const settle = () => {
        const [kvm, tcg] = contestants as [Contestant, Contestant];
        if (kvm.printedAt !== undefined) return verdict(true, `a test guest under KVM printed its first Linux line in ${kvm.printedAt.toFixed(1)} s`);
        if (tcg.exited && (kvm.exited || !tcgStarted)) {
          return reject(new UserError(`the KVM probe's guest does not boot even under TCG (exit ${tcg.exited.code ?? 'signal'}):\n${indentTail(tcg.exited.stderr)}\n  command: ${qemu} ${probeArgs(options.guest, 'tcg').join(' ')}`));
        }
        if (kvm.exited && (tcgStarted || tcg.printedAt !== undefined)) {
          const error = kvm.exited.stderr.split('\n').find((line) => /error|fail|assert/i.test(line))?.trim() ?? `QEMU exited (${kvm.exited.code ?? 'signal'}) before the guest printed a line`;
          return verdict(false, `QEMU failed to start a KVM guest (${error.replace(/^qemu-system-x86_64: (error: )?/, '')})`);
        }
        if (tcg.printedAt !== undefined) {
          return verdict(false, `a test guest under KVM printed nothing in ${tcg.printedAt.toFixed(1)} s while the same guest under TCG booted into Linux`);
        }
        // otherwise keep waiting (for KVM alone once TCG is gone), up to the timeout
      };
      children.forEach((child, i) => {
        const c = contestants[i]!;
        let out = '';
        let err = '';
        child.stdout!.setEncoding('utf8').on('data', (text: string) => {
          if (c.printedAt !== undefined) return;
          out = (out + text).slice(-4096);
          if (linuxLine.test(out)) {
            c.printedAt = elapsed();
            settle();
          }
        });
        child.stderr!.setEncoding('utf8').on('data', (text: string) => (err = (err + text).slice(-4096)));
        child.on('error', (error) => reject(error));
        child.on('close', (code) => {
          if (c.printedAt !== undefined) return;
          c.exited = { code, stderr: err };
          settle();
        });
      });
    });
  } finally {
    await Promise.all(
      children.map((child) => new Promise<void>((done) => {
        if (child.exitCode !== null || child.signalCode !== null) return done();
        child.once('close', () => done());
        child.kill('SIGKILL');
      })),
    );
  }
}

// ── the cached verdict ────────────────────────────────────────────────────────────────

/** ~/.cache/corekube/kvm-verdicts.json (XDG_CACHE_HOME respected): one verdict per key. */
export function verdictFile(env: NodeJS.ProcessEnv = process.env): string {
  return join(env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'corekube', 'kvm-verdicts.json');
}

/**
 * What a verdict holds for: this boot of this host (boot_id: a reboot may bring another
 * kernel, other modules, other nested-virtualisation settings), this QEMU (version and
 * binary), the -machine/-cpu the nodes use, and whether it was a test's fake probe.
 */
export function verdictKey(options: { qemu?: string; fake?: ProbeOptions['fake'] } = {}): string {
  const qemu = options.qemu ?? findOnPath('qemu-system-x86_64') ?? 'qemu-system-x86_64';
  let binary = qemu;
  try {
    const stat = statSync(qemu);
    binary = `${qemu} ${stat.size} ${stat.mtimeMs}`;
  } catch {
    // not a path we can stat: its name stands for it
  }
  let version = 'unknown';
  try {
    version = execFileSync(qemu, ['--version'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).split('\n')[0]!.trim();
  } catch {
    // the probe itself will say what is wrong with this QEMU
  }
  const parts = {
    format: 1,
    bootId: readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim(),
    version,
    binary,
    machine: machineArgs('kvm').join(' '),
    fake: options.fake ?? 'no',
  };
  return createHash('sha256').update(JSON.stringify(parts)).digest('hex').slice(0, 24);
}

type VerdictCache = Record<string, KvmVerdict & { bootId: string }>;

function readCache(file: string): VerdictCache {
  try {
    const data = JSON.parse(readFileSync(file, 'utf8')) as unknown;
    return data && typeof data === 'object' && !Array.isArray(data) ? (data as VerdictCache) : {};
  } catch {
    return {};
  }
}

export function cachedVerdict(file: string, key: string): KvmVerdict | undefined {
  const entry = readCache(file)[key];
  if (!entry || typeof entry.usable !== 'boolean' || typeof entry.reason !== 'string') return undefined;
  const { bootId: _bootId, ...verdict } = entry;
  return { ...verdict, cached: true };
}

/** Records a verdict (atomically); entries from earlier boots of the host are dropped. */
export function storeVerdict(file: string, key: string, verdict: KvmVerdict): void {
  const bootId = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  const kept = Object.fromEntries(Object.entries(readCache(file)).filter(([, v]) => v.bootId === bootId));
  const { cached: _cached, ...plain } = verdict;
  kept[key] = { ...plain, bootId };
  mkdirSync(dirname(file), { recursive: true });
  const temp = `${file}.${process.pid}.tmp`;
  writeFileSync(temp, `${JSON.stringify(kept, null, 2)}\n`);
  renameSync(temp, file);
}

/** The verdict for this host: from the cache, else probed now (and cached when there is one). */
export async function kvmVerdict(options: ProbeOptions & { cacheFile: string }): Promise<KvmVerdict | undefined> {
  const key = verdictKey(options);
  const cached = cachedVerdict(options.cacheFile, key);
  if (cached) return cached;
  const verdict = await probeKvm(options);
  if (!verdict) return undefined;
  if (!verdict.usable) verdict.reason += cpuHint(readFileSync('/proc/cpuinfo', 'utf8'));
  storeVerdict(options.cacheFile, key, verdict);
  return verdict;
}
