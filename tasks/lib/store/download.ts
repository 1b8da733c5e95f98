// HTTP downloads as a stream of chunks that survives transient failures: a reset, a
// 5xx, a body cut short or a stalled server is retried with backoff, resuming with a
// Range request where the server allows it, so consumers (hashers, xz) see each byte
// exactly once and never know a retry happened.
import { setTimeout as sleep } from 'node:timers/promises';
import { OfflineError, UserError } from '../errors.ts';

export interface HttpSettings {
  /** Retries after the first attempt, for transient failures only. */
  retries: number;
  /** No byte for this long (connecting, waiting for headers, or mid-body) counts as a failure. */
  stallTimeoutMs: number;
  /** First backoff delay; doubles per retry, with jitter. */
  backoffMs: number;
}

export const defaultHttpSettings: HttpSettings = { retries: 4, stallTimeoutMs: 30_000, backoffMs: 1_000 };

export interface Progress {
  received: number;
  total: number | undefined;
}

export interface DownloadOptions {
  signal: AbortSignal;
  offline: boolean;
  http: HttpSettings;
  /** Called as bytes arrive; throttle in the caller. */
  onProgress?: (progress: Progress) => void;
  /** Called before each retry with the reason, for the task's output. */
  onRetry?: (attempt: number, reason: string) => void;
}

export class DownloadError extends UserError {
  constructor(url: string, reason: string, hint: string) {
    super(`${url}: ${reason}\n${hint}`);
    this.name = 'DownloadError';
  }
}

interface Attempt {
  status: number;
  start: number; // offset of the first byte this response carries
  total: number | undefined;
}

/**
 * Yields the bytes at `url` in order, once each. Throws DownloadError once retries are
 * spent or on a permanent failure (4xx), OfflineError when offline.
 */
export async function* downloadChunks(url: string, options: DownloadOptions): AsyncGenerator<Buffer> {
  if (options.offline) {
    throw new OfflineError(`offline: refusing to download ${url}`);
  }
  const { default: got, HTTPError, RequestError } = await import('got');
  let received = 0;
  let total: number | undefined;
  let lastFailure = '';
  for (let attempt = 0; attempt <= options.http.retries; attempt++) {
    if (attempt > 0) {
      options.onRetry?.(attempt, lastFailure);
      const delay = options.http.backoffMs * 2 ** (attempt - 1) * (0.75 + Math.random() / 2);
      await sleep(delay, undefined, { signal: options.signal });
    }
    const stream = got.stream(url, {
      headers: received > 0 ? { range: `bytes=${received}-` } : {},
      decompress: false,
      retry: { limit: 0 },
      timeout: { connect: options.http.stallTimeoutMs, response: options.http.stallTimeoutMs, socket: options.http.stallTimeoutMs },
      signal: options.signal,
    });
    const response = new Promise<Attempt>((resolve, reject) => {
      stream.once('response', (res: { statusCode: number; headers: Record<string, string | string[] | undefined> }) => {
        const length = Number(res.headers['content-length']);
        const range = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(String(res.headers['content-range'] ?? ''));
        if (res.statusCode === 206 && range) {
          resolve({ status: 206, start: Number(range[1]), total: range[3] === '*' ? undefined : Number(range[3]) });
        } else {
          resolve({ status: res.statusCode, start: 0, total: Number.isFinite(length) ? length : undefined });
        }
      });
      stream.once('error', reject);
    });
    response.catch(() => undefined);
    try {
      let skip = 0;
      let answer: Attempt | undefined;
      for await (const chunk of stream as AsyncIterable<Buffer>) {
        if (!answer) {
          answer = await response;
          if (answer.start > received) {
            throw new DownloadError(url, `the server resumed at byte ${answer.start}, not ${received}`, retryHint);
          }
          total ??= answer.total;
          if (answer.total !== undefined && total !== answer.total) {
            throw new DownloadError(url, `the file changed size during the download (${total} then ${answer.total} bytes)`, retryHint);
          }
          skip = received - answer.start; // a 200 (no Range support) starts again from byte 0
        }
        let bytes = chunk;
        if (skip > 0) {
          const drop = Math.min(skip, bytes.length);
          skip -= drop;
          bytes = bytes.subarray(drop);
          if (bytes.length === 0) continue;
        }
        received += bytes.length;
        yield bytes;
        options.onProgress?.({ received, total });
      }
      if (total !== undefined && received < total) {
        lastFailure = `the body ended after ${received} of ${total} bytes`;
        continue;
      }
      if (total !== undefined && received > total) {
        throw new DownloadError(url, `the server sent ${received} bytes, more than the ${total} it announced`, retryHint);
      }
      return;
    } catch (error) {
      if (options.signal.aborted) throw options.signal.reason ?? error;
      if (error instanceof DownloadError) throw error;
      if (error instanceof HTTPError) {
        const status = error.response.statusCode;
        if (status === 408 || status === 429 || status >= 500) {
          lastFailure = `HTTP ${status} ${error.response.statusMessage ?? ''}`.trim();
          continue;
        }
        if (status === 416 && received > 0) {
          lastFailure = 'the server refused to resume (HTTP 416)';
          continue;
        }
        throw new DownloadError(url, `HTTP ${status} ${error.response.statusMessage ?? ''}`.trim(), status === 404 ? notFoundHint : retryHint);
      }
      if (error instanceof RequestError) {
        lastFailure = describeRequestError(error, options.http.stallTimeoutMs);
        continue;
      }
      throw error;
    } finally {
      stream.destroy();
    }
  }
  throw new DownloadError(
    url,
    `${lastFailure} (gave up after ${options.http.retries + 1} attempts, ${received} bytes received)`,
    retryHint,
  );
}

function describeRequestError(error: { code?: string; message: string; name: string }, stallMs: number): string {
  if (error.name === 'TimeoutError') return `no data for ${stallMs / 1000} s (stalled)`;
  if (error.code === 'ECONNREFUSED') return 'connection refused';
  if (error.code === 'ECONNRESET') return 'connection reset';
  if (error.code === 'ENOTFOUND' || error.code === 'EAI_AGAIN') return `host not found (${error.code})`;
  return error.message.split('\n')[0] ?? error.message;
}

const retryHint =
  'Check the network or the mirror (mirrors: in cluster.yaml), then run the same command again: what was fetched is kept.';
const notFoundHint =
  'The lock names a file the server does not have: check the mirror in cluster.yaml, or re-pin if upstream moved it.';
