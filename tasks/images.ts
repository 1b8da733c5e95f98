// images: every image in the lock, copied by digest with skopeo into one OCI layout in
// cache/oci (blobs stored once, refs named as the kubelet asks for them), then the
// exact set the lock names linked into out/images.
//
// Each copy lands in a staging layout of its own (seeded with hardlinks of the blobs the
// store already has, so skopeo skips them), is checked against the lock, and only then
// merged: a failed or mismatching copy leaves no ref and no blob behind, and copies can
// run side by side without racing on one index.json.
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { chmod, link, mkdir, readdir, rename, rm, writeFile } from 'node:fs/promises';
import { join, relative } from 'node:path';
import pLimit from 'p-limit';
import { parseAllDocuments } from 'yaml';
import { hashFile, moveAside, type Cache } from './lib/store/cache.ts';
import { goArch, type Architecture, type ClusterConfig } from './lib/inputs/config.ts';
import { OfflineError, UserError } from './lib/errors.ts';
import type { ImageRef, Lock } from './lib/inputs/lock.ts';
import { renderedImages } from './lib/node/kube-vip.ts';
import {
  blobPath,
  findRef,
  imageBlobs,
  imagesInDocument,
  layoutHasImage,
  ociLayoutFile,
  parseReference,
  readIndex,
  registryHasNoSuchImage,
  serializeIndex,
  sha256Of,
  splitName,
  withRef,
  type OciIndex,
} from './lib/store/oci.ts';
import { formatSeconds } from './lib/run/progress.ts';
import { fanOut } from './lib/run/fan-out.ts';
import type { RunContext, Stage, StageTask } from './lib/run/stage.ts';
import { ToolError, indentTail, runTool } from './lib/run/tool.ts';

export const imagesOutput = 'images';

export const imagesStage: Stage = {
  name: 'images',
  title: 'Copy the pinned images into one OCI layout',
  summary: 'copies every image in the lock by digest (skopeo) into cache/oci and links exactly those into out/images',
  needs: [],
  tools: ['skopeo'],
  inputs(ctx) {
    const inputs: Record<string, string> = { arch: goArch(ctx.lock.fcos.arch) };
    for (const image of ctx.lock.images) inputs[`image.${image.name}:${image.tag}`] = `${image.digest} layout ${image.layoutDigest}`;
    for (const [file, digest] of Object.entries(manifestFileDigests(manifestsDir(ctx)))) inputs[`manifests/${file}`] = digest;
    return inputs;
  },
  outputs() {
    return [imagesOutput];
  },
  async run(ctx, task) {
    checkImageCoverage(ctx.lock, clusterImages(manifestsDir(ctx), ctx.config));
    const store = storeDir(ctx);
    await ctx.cache.removeStaleTemporaries();
    const movedAside = await checkStoreBlobs(ctx, store);
    const missing = ctx.lock.images.filter((image) => !layoutHasImage(store, refName(image), image.layoutDigest));
    if (missing.length > 0 && ctx.settings.offline) throw offlineMissing(missing, movedAside);
    const repaired = movedAside.length > 0 ? ` (re-copied: ${movedAside.length} blob${movedAside.length === 1 ? '' : 's'} no longer matched ${movedAside.length === 1 ? 'its name' : 'their names'}, moved to cache/corrupt/)` : '';

    const merges = new Serial();
    await fanOut(task, ctx.lock.images, { jobs: ctx.settings.jobs, signal: ctx.signal, title: refName, what: 'images' }, async (image, sub) => {
      if (!missing.includes(image)) {
        sub.title = `${refName(image)}: in cache`;
        return;
      }
      const started = performance.now();
      const staging = await copyToStaging(ctx, image, store, sub);
      await merges.run(() => mergeIntoStore(staging, store, image));
      sub.title = `${refName(image)}: copied in ${formatSeconds(started)}${repaired}`;
    });

    const index = await writeOutputLayout(store, join(ctx.settings.outDir, imagesOutput), ctx.lock.images, ctx.settings.outDir);
    // Blobs are content-addressed and verified, so the index names the whole layout.
    return { [imagesOutput]: sha256Of(index).slice('sha256:'.length) };
  },
};

export interface MovedBlob {
  digest: string;
  found: string;
  to: string;
}

/**
 * Hashes every blob the lock's images use in the store against its name (its digest):
 * one that no longer matches is moved to cache/corrupt/, so the image counts as missing
 * and is copied again. Each blob is read once, however many images share it.
 */
async function checkStoreBlobs(ctx: RunContext, store: string): Promise<MovedBlob[]> {
  const blobs = new Set<string>();
  for (const image of ctx.lock.images) {
    if (!layoutHasImage(store, refName(image), image.layoutDigest)) continue;
    for (const blob of imageBlobs(store, image.layoutDigest)) blobs.add(blob);
  }
  const moved: MovedBlob[] = [];
  const limit = pLimit(ctx.settings.jobs);
  await Promise.all(
    [...blobs].map((digest) =>
      limit(async () => {
        const path = blobPath(store, digest);
        const found = `sha256:${await hashFile(path)}`;
        if (found !== digest) moved.push({ digest, found, to: await moveAside(ctx.settings.cacheDir, path, 'oci-blob') });
      }),
    ),
  );
  return moved;
}

export function storeDir(ctx: RunContext): string {
  return join(ctx.settings.cacheDir, 'oci');
}

export function manifestsDir(ctx: RunContext): string {
  return join(ctx.settings.root, 'manifests');
}

/** The ref the kubelet asks containerd for: the full name with its tag. */
export function refName(image: ImageRef): string {
  return `${image.name}:${image.tag}`;
}

/** Every ref an image carries in out/images: by tag, and by each digest a pod spec may name. */
export function refsOf(image: ImageRef): string[] {
  const refs = [refName(image), `${image.name}@${image.digest}`];
  if (image.layoutDigest !== image.digest) refs.push(`${image.name}@${image.layoutDigest}`);
  return refs;
}

/** Where skopeo pulls from: the image's registry, or its mirror from cluster.yaml. */
export function sourceOf(image: ImageRef, config: ClusterConfig): { reference: string; insecure: boolean } {
  const { host, repository } = splitName(image.name);
  const mirror = config.mirrors.registries[host];
  const location = mirror?.location ?? host;
  return { reference: `docker://${location}/${repository}@${image.digest}`, insecure: mirror?.insecure ?? false };
}

/**
 * A staging layout under cache/tmp, seeded with hardlinks of the store's blobs: skopeo
 * sees them in the destination and skips them. The caller removes it.
 */
export async function seededStagingLayout(cache: Cache, store: string, label: string): Promise<string> {
  const staging = await cache.temporaryPath(label);
  const known = join(store, 'blobs', 'sha256');
  await mkdir(join(staging, 'blobs', 'sha256'), { recursive: true });
  for (const name of existsSync(known) ? await readdir(known) : []) await link(join(known, name), join(staging, 'blobs', 'sha256', name));
  return staging;
}

/** skopeo copy of one image, the cluster's architecture only, into `oci:LAYOUT:REF`; a failure is a ToolError. */
export async function skopeoCopy(options: { reference: string; layout: string; ref: string; arch: Architecture; retries: number; insecure: boolean; signal: AbortSignal }): Promise<void> {
  await runTool(
    'skopeo',
    [
      // Trust comes from the digest pinned in the lock, which skopeo verifies on pull;
      // the host's signature policy must neither loosen nor change that.
      '--insecure-policy',
      '--override-os',
      'linux',
      '--override-arch',
      goArch(options.arch),
      'copy',
      `--retry-times=${options.retries}`,
      `--src-tls-verify=${!options.insecure}`,
      options.reference,
      `oci:${options.layout}:${options.ref}`,
    ],
    { signal: options.signal },
  );
}

/** Moves blobs from a verified staging layout into the store, read-only; blobs it has stay as they are. */
export async function moveBlobsIntoStore(staging: string, store: string, blobs: Iterable<string>): Promise<void> {
  await mkdir(join(store, 'blobs', 'sha256'), { recursive: true });
  if (!existsSync(join(store, 'oci-layout'))) await writeFile(join(store, 'oci-layout'), ociLayoutFile);
  for (const blob of blobs) {
    const target = blobPath(store, blob);
    if (existsSync(target)) continue;
    await chmod(blobPath(staging, blob), 0o444);
    await rename(blobPath(staging, blob), target);
  }
}

async function copyToStaging(ctx: RunContext, image: ImageRef, store: string, sub: StageTask): Promise<string> {
  const staging = await seededStagingLayout(ctx.cache, store, `oci-${image.name.split('/').pop()}`);
  try {
    const { reference, insecure } = sourceOf(image, ctx.config);
    sub.output = `skopeo copy ${reference}`;
    const retries = ctx.settings.http.retries;
    await skopeoCopy({ reference, layout: staging, ref: refName(image), arch: ctx.lock.fcos.arch, retries, insecure, signal: ctx.signal }).catch((error: unknown) => {
      if (!(error instanceof ToolError)) throw error;
      throw new UserError(
        `image ${image.text}: skopeo could not copy it from ${reference}` +
          ` (after ${retries} ${retries === 1 ? 'retry' : 'retries'}):\n${indentTail(error.stderr, 6)}\n` +
          (registryHasNoSuchImage(error.stderr)
            ? `The registry has no manifest with that digest: check the mirror for ${splitName(image.name).host}, or re-pin (make pin).`
            : `Check that the registry${insecure ? '' : ' (TLS)'} answers, or set a mirror in cluster.yaml (mirrors.registries).`),
      );
    });

    const descriptor = findRef(readIndex(staging), refName(image));
    if (descriptor?.digest !== image.layoutDigest) {
      throw new UserError(
        `image ${refName(image)}: the copied manifest is not the one the lock pins\n` +
          `  expected ${image.layoutDigest}${image.layoutDigest !== image.digest ? ` (the ${goArch(ctx.lock.fcos.arch)} manifest of ${image.digest})` : ''}\n` +
          `  found    ${descriptor?.digest ?? 'no manifest'}\n` +
          `from ${reference}. Nothing was added to the layout. Re-pin (make pin) if upstream changed the image, or check the mirror.`,
      );
    }
    const manifestBytes = readFileSync(blobPath(staging, descriptor.digest));
    if (sha256Of(manifestBytes) !== descriptor.digest) throw new UserError(`image ${refName(image)}: the manifest blob does not hash to ${descriptor.digest}`);
    for (const blob of imageBlobs(staging, descriptor.digest)) {
      if (!existsSync(blobPath(staging, blob))) throw new UserError(`image ${refName(image)}: skopeo left out blob ${blob}`);
    }
    return staging;
  } catch (error) {
    await rm(staging, { recursive: true, force: true });
    throw error;
  }
}

/** Moves a verified staging layout's new blobs into the store, then points the ref at it. */
async function mergeIntoStore(staging: string, store: string, image: ImageRef): Promise<void> {
  try {
    await moveBlobsIntoStore(staging, store, imageBlobs(staging, image.layoutDigest));
    const descriptor = findRef(readIndex(staging), refName(image))!;
    await replaceFile(join(store, 'index.json'), serializeIndex(withRef(readIndex(store), refName(image), descriptor)));
  } finally {
    await rm(staging, { recursive: true, force: true });
  }
}

/**
 * out/images: exactly the lock's images (each under every ref it answers to), blobs
 * hardlinked from the store. Built beside the old one and swapped in, so nothing stale
 * from an older lock survives and a failure leaves the old layout whole.
 */
async function writeOutputLayout(store: string, target: string, images: readonly ImageRef[], outDir: string): Promise<string> {
  const storeIndex = readIndex(store);
  let index: OciIndex = { schemaVersion: 2, manifests: [] };
  const blobs = new Set<string>();
  for (const image of images) {
    const descriptor = findRef(storeIndex, refName(image));
    if (!descriptor) throw new Error(`${store}: ${refName(image)} vanished from the layout`);
    for (const ref of refsOf(image)) index = withRef(index, ref, descriptor);
    for (const blob of imageBlobs(store, descriptor.digest)) blobs.add(blob);
  }
  const serialized = serializeIndex(index);
  if (readIfExists(join(target, 'index.json')) === serialized && sameBlobSet(target, blobs, store)) return serialized;

  const building = join(outDir, `.images.${process.pid}`);
  await rm(building, { recursive: true, force: true });
  await mkdir(join(building, 'blobs', 'sha256'), { recursive: true });
  for (const blob of blobs) {
    await link(blobPath(store, blob), blobPath(building, blob)).catch(async (error: NodeJS.ErrnoException) => {
      if (error.code !== 'EXDEV' && error.code !== 'EPERM') throw error;
      await runTool('cp', ['--reflink=auto', blobPath(store, blob), blobPath(building, blob)]);
    });
  }
  await writeFile(join(building, 'oci-layout'), ociLayoutFile);
  await writeFile(join(building, 'index.json'), serialized);
  const old = join(outDir, `.images.old.${process.pid}`);
  if (existsSync(target)) await rename(target, old);
  await rename(building, target);
  await rm(old, { recursive: true, force: true });
  return serialized;
}

/** out/images holds exactly these blobs, each still a hardlink of the store's (a re-copied blob is a new file). */
function sameBlobSet(layout: string, blobs: Set<string>, store: string): boolean {
  const dir = join(layout, 'blobs', 'sha256');
  if (!existsSync(dir)) return blobs.size === 0;
  const present = readdirSync(dir);
  if (present.length !== blobs.size || !present.every((hex) => blobs.has(`sha256:${hex}`))) return false;
  return present.every((hex) => {
    const [a, b] = [statSync(join(dir, hex)), statSync(blobPath(store, `sha256:${hex}`))];
    // Copies (another filesystem) are judged by size; hardlinks by identity.
    return (a.ino === b.ino && a.dev === b.dev) || (a.dev !== b.dev && a.size === b.size);
  });
}

function readIfExists(file: string): string | undefined {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
}

async function replaceFile(file: string, content: string): Promise<void> {
  const tmp = `${file}.tmp-${process.pid}`;
  await writeFile(tmp, content);
  await rename(tmp, file);
}

/** Runs the jobs it is given one at a time, in order. */
class Serial {
  #tail: Promise<unknown> = Promise.resolve();
  run<T>(job: () => Promise<T>): Promise<T> {
    const result = this.#tail.then(job, job);
    this.#tail = result.catch(() => undefined);
    return result;
  }
}

function offlineMissing(missing: ImageRef[], moved: readonly MovedBlob[] = []): OfflineError {
  const corrupt = moved.map((m) => `\n  (blob ${m.digest} hashed to ${m.found}: moved to ${m.to})`).join('');
  const list = missing.map((image) => `  ${image.text}`).join('\n') + corrupt;
  return new OfflineError(
    `offline: ${missing.length} image${missing.length === 1 ? ' is' : 's are'} not in the cache (cache/oci):\n${list}\n` +
      `Copy ${missing.length === 1 ? 'it' : 'them'} on a machine that reaches the registry (make images) and carry cache/ across.`,
  );
}

// ---- which images the cluster needs, and whether the lock has them ----

export interface ManifestImage {
  file: string; // relative to manifests/
  image: string; // as written
}

function manifestFiles(dir: string): string[] {
  if (!existsSync(dir)) return [];
  return (readdirSync(dir, { recursive: true }) as string[]).filter((f) => /\.ya?ml$/.test(f)).sort();
}

export function manifestFileDigests(dir: string): Record<string, string> {
  return Object.fromEntries(manifestFiles(dir).map((file) => [file, sha256Of(readFileSync(join(dir, file)))]));
}

/** Every `image:` in manifests/*.yaml (all documents of each file). */
export function readManifestImages(dir: string): ManifestImage[] {
  const found: ManifestImage[] = [];
  for (const file of manifestFiles(dir)) {
    const path = join(dir, file);
    for (const document of parseAllDocuments(readFileSync(path, 'utf8'))) {
      if (document.errors.length > 0) {
        throw new UserError(`${relative(process.cwd(), path) || path}: not valid YAML: ${document.errors[0]!.message}`);
      }
      for (const image of imagesInDocument(document.toJS())) found.push({ file: join('manifests', file), image });
    }
  }
  return found;
}

/**
 * Every image the cluster runs beside kubeadm's: each `image:` in manifests/, and those
 * corekube renders itself (kube-vip's static pod). Pin resolves them, the images stage
 * checks the lock covers them.
 */
export function clusterImages(dir: string, config: Pick<ClusterConfig, 'controlPlane'>): ManifestImage[] {
  return [...readManifestImages(dir), ...renderedImages(config)];
}

/** The images kubeadm pulls for a Kubernetes version (the control plane at that exact tag). */
export function kubeadmImages(version: string): { name: string; tag?: string }[] {
  return [
    ...['kube-apiserver', 'kube-controller-manager', 'kube-scheduler', 'kube-proxy'].map((n) => ({ name: `registry.k8s.io/${n}`, tag: version })),
    { name: 'registry.k8s.io/etcd' },
    { name: 'registry.k8s.io/coredns/coredns' },
    { name: 'registry.k8s.io/pause' },
  ];
}

/**
 * Fails the build when the cluster would ask for an image the lock lacks: offline, a
 * missing image is a pod stuck in ImagePullBackOff at every boot.
 */
export function checkImageCoverage(lock: Lock, manifestImages: readonly ManifestImage[]): void {
  const problems: string[] = [];
  for (const wanted of kubeadmImages(lock.kubernetes.version)) {
    const present = lock.images.some((i) => i.name === wanted.name && (wanted.tag === undefined || i.tag === wanted.tag));
    if (!present) problems.push(`  kubeadm ${lock.kubernetes.version} needs ${wanted.name}${wanted.tag ? `:${wanted.tag}` : ''}`);
  }
  for (const { file, image } of manifestImages) {
    const ref = parseReference(image);
    if (!ref) {
      problems.push(`  ${file}: "${image}" is not an image reference`);
      continue;
    }
    const present = lock.images.some(
      (i) =>
        i.name === ref.name &&
        (ref.digest ? i.digest === ref.digest || i.layoutDigest === ref.digest : i.tag === (ref.tag ?? 'latest')) &&
        (ref.tag === undefined || i.tag === ref.tag),
    );
    if (!present) problems.push(`  ${file}: image ${image} (${ref.name}${ref.tag ? `:${ref.tag}` : ''}${ref.digest ? `@${ref.digest}` : ''}) is not in the lock`);
  }
  if (problems.length > 0) {
    throw new UserError(
      `${lock.file}: the lock lacks images the cluster needs; offline nodes cannot pull them:\n${problems.join('\n')}\n` +
        'Add them to the lock (make pin resolves them), or change the manifest to an image the lock has.',
    );
  }
}
