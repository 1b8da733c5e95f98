// One HTTP/1.1 GET over plain TCP that reads the body straight into buffers of a few MiB
// (net's `onread`), for http: mirrors and the loopback benchmark. Node's http client reads
// a socket 64 KiB at a time, copies each body chunk out of the parser and pushes it through
// two streams: on a fast link that, not the hash or the disk, held a verified download to
// a third of `curl -o file` (bench/fetch.bench.ts). Here each read lands in place in the
// current batch, and the consumer (hash, then one write) sees whole batches.
//
// Only the plain case is handled: a 200 or 206 with a Content-Length and no transfer
// coding. Anything else (a redirect, a chunked body) is `unsupported`, and downloadChunks
// asks got instead; https always goes through got.
import { connect, type Socket } from 'node:net';

const batchBytes = 4 << 20;
const maxHeaderBytes = 64 << 10;

export interface PlainResponse {
  status: number;
  statusMessage: string;
  headers: Record<string, string>;
}

/** A network failure, named like got's RequestError (code, or name TimeoutError) for the caller's messages. */
export class PlainHttpError extends Error {
  readonly code: string | undefined;
  constructor(message: string, code?: string, name = 'PlainHttpError') {
    super(message);
    this.code = code;
    this.name = name;
  }
}

/** A response this reader does not stream (redirect, chunked, no length): ask a full client. */
export class PlainHttpUnsupported extends Error {}

/**
 * Sends the GET and returns the response head once it has arrived, with the body as an
 * async iterable of large chunks. A non-2xx status comes back with an empty body (the
 * caller decides); a 2xx this reader cannot stream throws PlainHttpUnsupported.
 */
export function plainGet(
  url: URL,
  headers: Record<string, string>,
  options: { signal: AbortSignal; stallTimeoutMs: number },
): Promise<{ response: PlainResponse; body: AsyncIterable<Buffer>; close(): void }> {
  return new Promise((resolveHead, rejectHead) => {
    let current = Buffer.allocUnsafe(batchBytes);
    let used = 0; // bytes in `current`
    let start = 0; // where the body starts in `current` (after the head, in the first batch)
    let remaining = -1; // body bytes still to come, once the head is read
    let head: PlainResponse | undefined;
    const ready: Buffer[] = [];
    let done = false;
    let failure: Error | undefined;
    let wake: (() => void) | undefined;
    let paused = false;
    const notify = () => {
      const w = wake;
      wake = undefined;
      w?.();
    };
    const fail = (error: Error) => {
      if (done) return;
      failure ??= error;
      done = true;
      socket.destroy();
      if (!head) rejectHead(failure);
      notify();
    };
    const onAbort = () => fail(options.signal.reason instanceof Error ? options.signal.reason : new Error(String(options.signal.reason)));
    if (options.signal.aborted) return rejectHead(options.signal.reason);
    options.signal.addEventListener('abort', onAbort, { once: true });

    const emit = (upTo: number) => {
      if (upTo > start) ready.push(current.subarray(start, upTo));
    };
    const close = () => {
      done = true;
      options.signal.removeEventListener('abort', onAbort);
      socket.destroy();
    };
    const finish = () => {
      done = true;
      socket.destroy();
      notify();
    };
    const onRead = (nread: number): boolean => {
      used += nread;
      if (!head) {
        const end = current.subarray(0, used).indexOf('\r\n\r\n');
        if (end < 0) {
          if (used >= maxHeaderBytes) fail(new PlainHttpError(`${url.href}: a response head larger than ${maxHeaderBytes} bytes`));
          return true;
        }
        try {
          head = parseHead(current.subarray(0, end).toString('latin1'));
        } catch (error) {
          fail(error as Error);
          return false;
        }
        start = end + 4;
        const length = Number(head.headers['content-length']);
        const plain = head.headers['transfer-encoding'] === undefined && /^\d+$/.test(head.headers['content-length'] ?? '');
        if (head.status < 200 || head.status >= 300) {
          done = true;
          socket.destroy();
          resolveHead({ response: head, body: chunks(), close });
          return false;
        }
        if (!plain || (head.status !== 200 && head.status !== 206)) {
          done = true;
          socket.destroy();
          rejectHead(new PlainHttpUnsupported(`${url.href}: HTTP ${head.status} with ${head.headers['transfer-encoding'] ? `transfer-encoding ${head.headers['transfer-encoding']}` : 'no content-length'}`));
          return false;
        }
        remaining = length;
        resolveHead({ response: head, body: chunks(), close });
        nread = used - start; // the body bytes that came with the head
      }
      const body = Math.min(nread, remaining);
      remaining -= body;
      if (remaining === 0) {
        emit(used - (nread - body));
        finish();
        return false;
      }
      if (used === current.length) {
        emit(used);
        current = Buffer.allocUnsafe(batchBytes);
        used = 0;
        start = 0;
        notify();
        // Two batches waiting: the consumer is behind; the socket waits (no stall meanwhile).
        if (ready.length >= 2) {
          paused = true;
          socket.setTimeout(0);
          return false;
        }
      }
      return true;
    };

    async function* chunks(): AsyncGenerator<Buffer> {
      try {
        for (;;) {
          const next = ready.shift();
          if (next) {
            if (paused && ready.length < 2) {
              paused = false;
              socket.setTimeout(options.stallTimeoutMs);
              socket.resume();
            }
            yield next;
            continue;
          }
          if (failure) throw failure;
          if (done) return;
          await new Promise<void>((resolve) => (wake = resolve));
        }
      } finally {
        options.signal.removeEventListener('abort', onAbort);
        socket.destroy();
      }
    }

    const socket: Socket = connect({
      host: url.hostname.replace(/^\[|\]$/g, ''),
      port: Number(url.port || 80),
      onread: { buffer: () => current.subarray(used), callback: onRead },
    });
    socket.setTimeout(options.stallTimeoutMs);
    socket.on('timeout', () => fail(new PlainHttpError(`${url.href}: no data for ${options.stallTimeoutMs / 1000} s`, 'ETIMEDOUT', 'TimeoutError')));
    socket.on('error', (error: NodeJS.ErrnoException) => fail(new PlainHttpError(error.message, error.code)));
    socket.on('close', () => {
      if (!head) return fail(new PlainHttpError(`${url.href}: the connection closed before a response`, 'ECONNRESET'));
      // A body cut short ends early: the caller sees fewer bytes than announced and resumes.
      if (!done) {
        emit(used);
        done = true;
        notify();
      }
    });
    const request = [`GET ${url.pathname}${url.search} HTTP/1.1`, `Host: ${url.host}`, 'User-Agent: corekube', 'Accept-Encoding: identity', 'Connection: close'];
    for (const [name, value] of Object.entries(headers)) request.push(`${name}: ${value}`);
    socket.write(`${request.join('\r\n')}\r\n\r\n`);
  });
}

/** The status line and headers (names lower-cased; a repeated header keeps the last). */
export function parseHead(text: string): PlainResponse {
  const [statusLine = '', ...lines] = text.split('\r\n');
  const status = /^HTTP\/1\.[01] (\d{3})(?: (.*))?$/.exec(statusLine);
  if (!status) throw new PlainHttpError(`not an HTTP/1.x response: ${JSON.stringify(statusLine.slice(0, 80))}`);
  const headers: Record<string, string> = {};
  for (const line of lines) {
    const colon = line.indexOf(':');
    if (colon > 0) headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
  }
  return { status: Number(status[1]), statusMessage: status[2] ?? '', headers };
}
