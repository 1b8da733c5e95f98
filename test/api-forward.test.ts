// The host's forwarder to three control planes, with real sockets on 127.0.0.1: a
// connection goes to the first control plane that answers, past one that refuses (its VM
// is off), one that accepts and closes (QEMU's user-mode NIC with the guest's API server
// down) and one that stays silent; the bytes the client sent first reach the one that
// answers, and the next connection goes there directly.
import { createConnection, createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { startApiForwarder } from '../tasks/lib/node/api-forward.ts';

const servers: Server[] = [];
const sockets: Socket[] = [];

function listen(onConnection: (socket: Socket) => void): Promise<number> {
  const server = createServer((socket) => {
    sockets.push(socket);
    socket.on('error', () => undefined);
    onConnection(socket);
  });
  servers.push(server);
  return new Promise((resolve) => server.listen({ host: '127.0.0.1', port: 0 }, () => resolve((server.address() as AddressInfo).port)));
}

/** A port nothing listens on: bound, then closed. */
async function refusedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen({ host: '127.0.0.1', port: 0 }, resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

function exchange(port: number, message: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const client = createConnection({ host: '127.0.0.1', port }, () => client.write(message));
    let answer = '';
    client.on('data', (chunk) => {
      answer += chunk.toString();
      if (answer.endsWith('\n')) {
        client.end();
        resolve(answer);
      }
    });
    client.on('error', reject);
    client.on('close', () => resolve(answer));
  });
}

test('a connection reaches the first control plane that answers; the next goes straight there', async () => {
  const seen: string[] = [];
  const off = await refusedPort();
  const closing = await listen((socket) => {
    seen.push('closing');
    socket.destroy();
  });
  const silent = await listen(() => seen.push('silent'));
  const live = await listen((socket) => {
    seen.push('live');
    socket.on('data', (chunk) => socket.write(`hello from live, you said ${chunk.toString().trim()}\n`));
  });
  const log: string[] = [];
  const forwarder = await startApiForwarder(0, { backends: [off, closing, silent, live], answerTimeoutMs: 300, log: (line) => log.push(line) });
  servers.push(forwarder);
  const port = (forwarder.address() as AddressInfo).port;
  assert.is(await exchange(port, 'client-hello\n'), 'hello from live, you said client-hello\n');
  assert.equal(seen, ['closing', 'silent', 'live']);
  assert.match(log.join('\n'), new RegExp(`127\\.0\\.0\\.1:${off}: ECONNREFUSED`));
  assert.match(log.join('\n'), /closed without an answer/);
  assert.match(log.join('\n'), /no answer/);
  assert.is(await exchange(port, 'again\n'), 'hello from live, you said again\n');
  assert.equal(seen, ['closing', 'silent', 'live', 'live'], 'the control plane that answered goes first');
});

test('when no control plane answers, the client is disconnected (not left hanging)', async () => {
  const forwarder = await startApiForwarder(0, { backends: [await refusedPort(), await refusedPort()] });
  servers.push(forwarder);
  assert.is(await exchange((forwarder.address() as AddressInfo).port, 'anyone?\n'), '');
});

test('it listens on 127.0.0.1 only, and refuses a port in use', async () => {
  const forwarder = await startApiForwarder(0, { backends: [1] });
  servers.push(forwarder);
  const { address, port } = forwarder.address() as AddressInfo;
  assert.is(address, '127.0.0.1');
  try {
    await startApiForwarder(port, { backends: [1] });
    assert.unreachable('a second forwarder took the same port');
  } catch (error) {
    assert.is((error as NodeJS.ErrnoException).code, 'EADDRINUSE');
  }
});

test.after(() => {
  for (const socket of sockets) socket.destroy();
  for (const server of servers) server.close();
});

test.run();
