// What a person sees while a long step runs: the progress line of a download, an image
// copy or a bundle (bar, bytes, rate), byte and rate formatting, and the choice between
// listr2's live renderer (a terminal) and its plain line renderer (CI, a log, a pipe).
// Shared by the stages and the bundle actions, so none imports another for these.
import type { Progress } from '../store/download.ts';

/** How progress is shown: `auto` picks by terminal; `simple` one line per change; `silent` nothing (tests). */
export type Renderer = 'auto' | 'simple' | 'silent';

/** listr2's renderer for a choice, and whether to fall back to plain lines (no terminal, CI, TERM=dumb). */
export function listrRenderer(renderer: Renderer): { renderer: 'default' | 'simple' | 'silent'; fallback: boolean } {
  if (renderer === 'silent') return { renderer: 'silent', fallback: false };
  if (renderer === 'simple') return { renderer: 'simple', fallback: false };
  const plain = !process.stdout.isTTY || process.env.CI === 'true' || process.env.TERM === 'dumb';
  return { renderer: 'default', fallback: plain };
}

export interface Meter {
  (progress: Progress): void;
  received: number;
}

/** A progress line: a bar, bytes and rate; a few times a second on a terminal, every 10 s in a log. */
export function progressMeter(interactive: boolean, show: (line: string) => void): Meter {
  const started = performance.now();
  let last = 0;
  const meter = ((progress: Progress) => {
    meter.received = progress.received;
    const now = performance.now();
    const done = progress.total !== undefined && progress.received >= progress.total;
    if (!done && now - last < (interactive ? 150 : 10_000)) return;
    last = now;
    show(formatProgress(progress, now - started));
  }) as Meter;
  meter.received = 0;
  return meter;
}

export function formatProgress(progress: Progress, elapsedMs: number): string {
  const rate = formatRate(progress.received, elapsedMs);
  if (progress.total === undefined || progress.total === 0) return `${formatBytes(progress.received)}, ${rate}`;
  const fraction = Math.min(1, progress.received / progress.total);
  const width = 24;
  const filled = Math.round(fraction * width);
  const bar = `${'█'.repeat(filled)}${'░'.repeat(width - filled)}`;
  return `${bar} ${(fraction * 100).toFixed(0).padStart(3)}% ${formatBytes(progress.received)} / ${formatBytes(progress.total)}, ${rate}`;
}

export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

export function formatRate(bytes: number, elapsedMs: number): string {
  return `${formatBytes(elapsedMs > 0 ? (bytes * 1000) / elapsedMs : 0)}/s`;
}

/** Seconds since `started` (a performance.now()), as a title shows them: "2.4 s". */
export function formatSeconds(startedMs: number): string {
  return `${((performance.now() - startedMs) / 1000).toFixed(1)} s`;
}
