// pin: the one task that asks upstream what to ship. From cluster.yaml it resolves the
// FCOS release (stream metadata, or an explicit release from the release index), the
// Kubernetes patch release (exact, or the newest of a minor from stable-X.Y.txt), every
// artifact's sha256 from upstream's own checksum files, and every image's digest from its
// registry, then writes corekube.lock.yaml: deterministic, atomically, with a diff-style
// summary of what changed. Every other task reads the lock and nothing else.
//
// Trust: every artifact and image upstream signs is verified against upstream's signer
// (signatures.ts; docs/signatures.md) before its digest enters the lock, so pin downloads
// those artifacts (into the cache, where fetch finds them). Checksums come from upstream's
// checksum files, checked against the bytes where pin downloads: kubeadm (it must run it to learn the image set) and
// butane (no checksum file: its sha256 is computed here, and the lock says so). fetch
// checks every other artifact against the lock later. Image digests are what the registry
// serves for each tag; the layout digest is derived from the manifest where that is exact
// (an OCI manifest is stored unchanged, an index's single linux/ARCH OCI child likewise),
// and found by a real `skopeo copy` into a scratch layout where skopeo converts (Docker
// v2s2, schema 1) or chooses among several candidates: that is what the images stage
// will get from the same skopeo. The blobs such a copy fetched go into cache/oci, so
// `make images` does not fetch them again.
//
// The parts, one file each: components.ts (testedComponents, the node components' default
// versions, and where each binary lives upstream), session.ts (one run's link to upstream:
// documents and hashed downloads through the mirrors), one resolver per kind of thing
// pinned (fcos.ts, kubernetes.ts, images.ts, butane.ts) and lock-text.ts (the lock's text
// and its diff). This file runs the resolvers side by side and writes the lock.
import { readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { clusterImages } from '../images.ts';
import { OfflineError, UserError } from '../lib/errors.ts';
import { checkLockMatchesConfig, parseLock, type ImageRef, type Lock } from '../lib/inputs/lock.ts';
import { writeAtomically } from '../lib/run/engine.ts';
import type { RunContext, Stage } from '../lib/run/stage.ts';
import { pinButane } from './butane.ts';
import { resolveComponents, type ComponentVersions } from './components.ts';
import { pinFcosOpenstack, pinFcosQemu, resolveFcos } from './fcos.ts';
import { pinKubernetes } from './kubernetes.ts';
import { renderLock, summarize, type ArtifactNotes, type LockContent } from './lock-text.ts';
import { allOrNothing, firstLine, type Pinned, type Session } from './session.ts';
import { verifySignatures } from './signatures.ts';

export interface PinOptions {
  /** Overrides of testedComponents. */
  components?: Partial<ComponentVersions>;
  /** One line of progress now and then (the stage shows it as the task's output). */
  onProgress?: (line: string) => void;
}

export interface PinResult {
  file: string;
  /** True when the file was (re)written; false when it is byte-identical to what pin made. */
  written: boolean;
  /** The first line of the summary: "corekube.lock.yaml: unchanged", "… 3 changes", "… new lock, 19 entries". */
  headline: string;
  /** Diff-style lines: "+ key: value", "- key: value", "~ key: old → new". */
  changes: string[];
  /** headline and changes, one per line. */
  summary: string;
  lock: Lock;
  text: string;
}

// ---- pin ------------------------------------------------------------------------------------

/** Resolves everything cluster.yaml asks for against upstream and writes the lock. */
export async function pin(ctx: RunContext, options: PinOptions = {}): Promise<PinResult> {
  const { settings } = ctx;
  if (settings.offline) {
    throw new OfflineError(
      'offline: pin asks upstream (FCOS stream metadata, dl.k8s.io, GitHub releases, registries) and cannot run offline.\n' +
        `Run it on a machine with network, or bring ${settings.lockFile} from one.`,
    );
  }
  const config = ctx.config;
  const components = resolveComponents(options.components);
  const progress = options.onProgress ?? (() => undefined);
  const session = (signal: AbortSignal): Session => ({
    ctx,
    config,
    cache: ctx.cache,
    signal,
    download: { signal, offline: false, http: settings.http },
    progress,
  });
  // Manifests first: a bad manifest fails before anything is downloaded.
  const manifestImages = clusterImages(join(settings.root, 'manifests'), config);
  const previous = readPrevious(settings.lockFile);
  await ctx.cache.removeStaleTemporaries();

  // The FCOS metadata first: a stream or release without the cluster's architecture is a
  // configuration error, reported before anything else is asked.
  const fcos = await resolveFcos(session(ctx.signal));
  const [fcosQemu, kubernetes, butane, fcosOpenstack] = await allOrNothing<[Pinned, Pinned & { version: string; images: ImageRef[] }, Pinned, Pinned]>(ctx.signal, [
    (signal) => pinFcosQemu(session(signal), fcos, previous.lock),
    (signal) => pinKubernetes(session(signal), components, manifestImages),
    (signal) => pinButane(session(signal), components),
    (signal) => pinFcosOpenstack(session(signal), fcos, previous.lock),
  ]);
  const pinned = [fcosQemu, kubernetes, butane, fcosOpenstack];
  const content: LockContent = {
    fcos: { stream: config.fcos.stream, release: fcos.release, arch: config.fcos.arch },
    kubernetes: { version: kubernetes.version },
    artifacts: Object.fromEntries(pinned.flatMap((p) => p.artifacts).map((a) => [a.key, a])) as Lock['artifacts'],
    images: kubernetes.images,
  };
  // Upstream's signatures, before any digest enters the lock: a refusal throws, and nothing is written.
  content.signatures = await verifySignatures(session(ctx.signal), content, {
    'fcos-qemu': fcos.disk.signature,
    ...(fcos.openstack ? { 'fcos-openstack': fcos.openstack.disk.signature } : {}),
  });
  return writeLock(ctx, content, Object.assign({}, ...pinned.map((p) => p.notes)) as ArtifactNotes, previous);
}

/**
 * Renders the lock, checks that it reads back as exactly what was resolved and matches
 * cluster.yaml, and writes it (atomically) only where it differs from the previous one.
 */
async function writeLock(ctx: RunContext, content: LockContent, notes: ArtifactNotes, previous: ReturnType<typeof readPrevious>): Promise<PinResult> {
  const file = ctx.settings.lockFile;
  const text = renderLock(content, notes);
  const lock = parseLock(file, text);
  checkLockMatchesConfig(lock, ctx.config);
  if (renderLock(lock, notes) !== text) throw new Error('pin: the rendered lock does not read back the same (a bug)');

  const shownName = relative(process.cwd(), file).startsWith('..') ? file : relative(process.cwd(), file) || file;
  const { headline, changes, written } = summarize(shownName, previous.text, previous.lock, previous.problem, text, lock);
  if (written) await writeAtomically(file, text);
  const summary = [headline, ...changes.map((line) => `  ${line}`)].join('\n');
  return { file, written, headline, changes, summary, lock, text };
}

/** The lock pin replaces: its text, and its content where it parses. */
function readPrevious(file: string): { text?: string; lock?: Lock; problem?: string } {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return {};
    throw new UserError(`${file}: cannot read it (${String(error)})`);
  }
  try {
    return { text, lock: parseLock(file, text) };
  } catch (error) {
    return { text, problem: firstLine((error as Error).message) };
  }
}

/** The result of each pin run, by its context: the CLI prints `summary` after the run. */
export const pinResults = new WeakMap<RunContext, PinResult>();

export const pinStage: Stage = {
  name: 'pin',
  title: 'Pin every artifact and image from upstream',
  summary: 'resolves cluster.yaml against upstream (FCOS stream, Kubernetes release, checksum files, registries) and writes the lock (online)',
  needs: [],
  tools: ['skopeo', 'xz'],
  inputs(ctx) {
    const { config } = ctx;
    return {
      'fcos.stream': config.fcos.stream,
      'fcos.arch': config.fcos.arch,
      'fcos.release': config.fcos.release ?? '(newest)',
      target: config.target,
      'kubernetes.version': config.kubernetes.version,
      components: JSON.stringify(resolveComponents()),
      mirrors: JSON.stringify(config.mirrors),
      signatures: JSON.stringify(config.signatures),
    };
  },
  // Upstream moves without any input changing: pin always asks (the lock changes only if upstream did).
  expired: () => 'pin asks upstream every time it runs',
  outputs: () => [],
  async run(ctx, task) {
    const result = await pin(ctx, { onProgress: (line) => (task.output = line) });
    pinResults.set(ctx, result);
    task.title = `${pinStage.title}: ${result.headline}`;
  },
};
