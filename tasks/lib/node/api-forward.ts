// The host's way to the API server of three control planes. The virtual IP lives on the
// cluster network (a userspace switch the host is not on), and QEMU's user-mode NICs can
// publish one control plane each, on a port of its own. This forwarder listens on
// 127.0.0.1:hostPorts.apiServer (where out/kubeconfig points) and hands each connection
// to a live control plane's published port: it keeps what the client sent until a
// control plane answers, and tries the next one when a control plane refuses, closes
// without a byte, or stays silent (a VM powered off, one booting, an API server down).
// TLS stays end to end (the client checks the API server's certificate, which names
// every control plane); the forwarder only moves bytes, on 127.0.0.1 only.
//
// `make boot` starts it as a detached process (node tasks/lib/node/api-forward.ts
// LISTEN_PORT BACKEND_PORT… ), `make down` stops it by its pid file.
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { writeFileSync } from 'node:fs';

export interface ForwardOptions {
  /** Ports on 127.0.0.1, in the order to try them. */
  backends: number[];
  /** How long a control plane may stay silent after receiving the client's first bytes. */
  answerTimeoutMs?: number;
  /** How long a connection attempt may take. */
  connectTimeoutMs?: number;
  log?: (line: string) => void;
}

/** Starts the forwarder on 127.0.0.1:port (0: any free port); resolves once it listens. */
export function startApiForwarder(port: number, options: ForwardOptions): Promise<Server> {
  const answerTimeoutMs = options.answerTimeoutMs ?? 3000;
  const connectTimeoutMs = options.connectTimeoutMs ?? 2000;
  const log = options.log ?? (() => undefined);
  // The control plane that answered last goes first: no detour while it stays up.
  let preferred = 0;
  const server = createServer({ pauseOnConnect: false }, (client) => {
    const sent: Buffer[] = [];
    let backend: Socket | undefined;
    let committed = false;
    let closed = false;
    const onClientData = (chunk: Buffer) => {
      sent.push(chunk);
      // A backend still connecting gets everything in `sent` once it connects.
      if (backend && !backend.connecting) backend.write(chunk);
    };
    client.on('data', onClientData);
    client.on('error', () => undefined);
    client.on('close', () => {
      closed = true;
      if (!committed) backend?.destroy();
    });

    const tryFrom = (attempt: number) => {
      if (closed) return;
      if (attempt >= options.backends.length) {
        log(`no control plane answered on ${options.backends.join(', ')}`);
        client.destroy();
        return;
      }
      const index = (preferred + attempt) % options.backends.length;
      const port = options.backends[index]!;
      let gaveUp = false;
      const next = (why: string) => {
        if (gaveUp || committed) return;
        gaveUp = true;
        clearTimeout(timer);
        socket.destroy();
        log(`127.0.0.1:${port}: ${why}; trying the next control plane`);
        tryFrom(attempt + 1);
      };
      const socket = createConnection({ host: '127.0.0.1', port });
      backend = socket;
      let timer = setTimeout(() => next('no connection'), connectTimeoutMs);
      socket.on('connect', () => {
        clearTimeout(timer);
        for (const chunk of sent) socket.write(chunk);
        // A silent control plane is only judged once the client has said something.
        const judge = () => {
          if (sent.length > 0) next('no answer');
          else timer = setTimeout(judge, answerTimeoutMs);
        };
        timer = setTimeout(judge, answerTimeoutMs);
      });
      socket.once('data', (first) => {
        if (gaveUp) return;
        clearTimeout(timer);
        committed = true;
        preferred = index;
        client.off('data', onClientData);
        sent.length = 0;
        client.write(first);
        socket.pipe(client);
        client.pipe(socket);
      });
      socket.on('error', (error) => (committed ? client.destroy() : next((error as NodeJS.ErrnoException).code ?? error.message)));
      socket.on('close', () => (committed ? client.destroy() : next('closed without an answer')));
    };
    tryFrom(0);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: '127.0.0.1', port, exclusive: true }, () => {
      server.off('error', reject);
      resolve(server);
    });
  });
}

// As a program: node api-forward.ts PID_FILE LISTEN_PORT BACKEND_PORT…
if (import.meta.filename === process.argv[1]) {
  const [pidFile, listen, ...backends] = process.argv.slice(2);
  if (!pidFile || !listen || backends.length === 0) {
    process.stderr.write('usage: api-forward.ts PID_FILE LISTEN_PORT BACKEND_PORT…\n');
    process.exit(2);
  }
  startApiForwarder(Number(listen), { backends: backends.map(Number), log: (line) => process.stderr.write(`${new Date().toISOString()} ${line}\n`) }).then(
    () => writeFileSync(pidFile, `${process.pid}\n`),
    (error: Error) => {
      process.stderr.write(`api-forward: cannot listen on 127.0.0.1:${listen}: ${error.message}\n`);
      process.exit(1);
    },
  );
}
