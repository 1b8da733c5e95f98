// goGzipBestCompression against Go's compress/gzip at BestCompression: the real butane
// vector, golden vectors (sha256 of Go 1.19's output for deterministic inputs; Go is not
// needed here), and round trips through zlib.
import { createHash } from 'node:crypto';
import { gunzipSync } from 'node:zlib';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { goGzipBestCompression } from '../tasks/lib/butane/goflate.ts';

const sha256 = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    // xorshift32
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s;
  };
}
const vocabulary = (
  'the of and to in is was that for on are with as his they be at one have this from or had by word but ' +
  'what some we can out other were all there when up use your how said an each she which do their time if ' +
  'will way about many then them write would like so these her long make thing see him two has look more'
).split(' ');
function randomBytes(n: number, seed: number, alphabet = 256): Buffer {
  const next = prng(seed);
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = next() % alphabet;
  return b;
}
function words(n: number, seed: number): Buffer {
  const next = prng(seed);
  const parts: string[] = [];
  let len = 0;
  while (len < n) {
    const w = vocabulary[next() % vocabulary.length]! + (next() % 10 === 0 ? '.\n' : ' ');
    parts.push(w);
    len += w.length;
  }
  return Buffer.from(parts.join('').slice(0, n));
}
function mixed(n: number, seed: number): Buffer {
  const next = prng(seed);
  const parts: Buffer[] = [];
  let len = 0;
  while (len < n) {
    const kind = next() % 5;
    const size = (next() % 40000) + 1;
    const sub = next();
    let p: Buffer;
    if (kind === 0) p = randomBytes(size, sub);
    else if (kind === 1) p = words(size, sub);
    else if (kind === 2) p = Buffer.alloc(size, sub & 0xff);
    else if (kind === 3) p = randomBytes(size, sub, 4);
    else {
      const unit = randomBytes((sub % 300) + 1, sub);
      p = Buffer.alloc(size);
      for (let i = 0; i < size; i++) p[i] = unit[i % unit.length]!;
    }
    parts.push(p);
    len += size;
  }
  return Buffer.concat(parts).subarray(0, n);
}
const unit = `[Unit]
Description=Kubernetes kubelet
Wants=network-online.target
After=network-online.target crio.service

[Service]
ExecStartPre=/usr/bin/mkdir -p /etc/kubernetes/manifests
ExecStart=/usr/local/bin/kubelet --config=/var/lib/kubelet/config.yaml --kubeconfig=/etc/kubernetes/kubelet.conf
Restart=always
RestartSec=10

[Install]
WantedBy=multi-user.target
`;
const yamlDoc = `apiVersion: kubeadm.k8s.io/v1beta3
kind: ClusterConfiguration
kubernetesVersion: v1.30.2
networking:
  podSubnet: 10.244.0.0/16
  serviceSubnet: 10.96.0.0/12
controllerManager:
  extraArgs:
    bind-address: 0.0.0.0
`;
const jsonDoc = JSON.stringify({
  ignition: { version: '3.3.0' },
  storage: { files: Array.from({ length: 40 }, (_, i) => ({ path: `/etc/file-${i}`, mode: 420, contents: { source: `data:,${i}` } })) },
});
const cases: [string, () => Buffer][] = [
  ['empty', () => Buffer.alloc(0)],
  ['one byte', () => Buffer.from('a')],
  ['short text', () => Buffer.from('hello, world\n')],
  ['systemd unit', () => Buffer.from(unit)],
  ['yaml', () => Buffer.from(yamlDoc)],
  ['json', () => Buffer.from(jsonDoc)],
  ['zeros 70000', () => Buffer.alloc(70000)],
  ['repetitive 100000', () => Buffer.from('abcabd'.repeat(16667).slice(0, 100000))],
  ['words 5000', () => words(5000, 1)],
  ['words 200000', () => words(200000, 2)],
  ['random 70 KB (stored)', () => randomBytes(70 * 1024, 3)],
  ['random 20 KB (stored)', () => randomBytes(20000, 4)],
  ['4-letter alphabet 120000', () => randomBytes(120000, 5, 4)],
  ['mixed 300 KB', () => mixed(300 * 1024, 6)],
  ['mixed 1 MB', () => mixed(1 << 20, 7)],
];

// [name, length, sha256] of what Go writes for each case: gzip.NewWriterLevel(&buf,
// gzip.BestCompression); w.Write(input); w.Close() (generated with Go 1.19.8).
const golden: [string, number, string][] = [
  ["empty", 23, '10c2221846da8b4250e556aa520c86d6674614d7c5874d8b9cb7f26d62835036'],
  ["one byte", 25, 'fcb0c6c17cdb5fae5e897d85bbdc9f3559f638823824b62791d08fd5d0f73488'],
  ["short text", 37, '2b1250fa1bf4b14c3f126753787a45575231306ecb2af21a1f0cbc92c109d709'],
  ["systemd unit", 238, '9d6d75e85d9f92074f0d462ed2cf25f897b75143a2da5bb0762947f08ace87bc'],
  ["yaml", 185, 'd3f52b08f19bca3478c1ddcf89821f13692bd9a85fecc6816592ba75e016da5d'],
  ["json", 327, '82f3654439cf2216a6df9d9d07a556f78bad04c64cb644bcbe5a3d77c4b540e9'],
  ["zeros 70000", 107, '5ddcfdb8171924ca503e98de9a1042926d2592a8ace213749eef6650c4dd529b'],
  ["repetitive 100000", 189, 'd86c7a7138e644a8de931ab914d3b8b041ba1159f19ecada53d51cc7b044576e'],
  ["words 5000", 1866, '90b6cd2f7c7be2c3e8b24e5c51e18bb9fdc9e8c1ab41544da7a41e671324b7e8'],
  ["words 200000", 58822, '23e9f6a8875f6dac383c1c8720473d3d260b050018abb8cf1731a83f4aec1f1a'],
  ["random 70 KB (stored)", 71728, 'ba4e3f3520f559487d8a4190f129e245a1a780d04680e6295f1ab6eec2c8dbcd'],
  ["random 20 KB (stored)", 20033, 'f0e94f5ed9d243b606a5bdf9826cdb20fabb251e6d8c18f0813e8e7674253e63'],
  ["4-letter alphabet 120000", 35388, '7cb644927ef59d85d6ef2f45426d9922755fb543d9555cfa959250350dea9a31'],
  ["mixed 300 KB", 120850, '532c281a6b1ffe3261975e057a584004f95236b59f6f0243902d29398e959664'],
  ["mixed 1 MB", 346964, '38ddb86faf4932705677499c9519ab19ecf89128949ddfc4c8ae8156abb1f9c7'],
];

// butane 0.2x's gzip of the hello_world_gzip.txt paragraph in test/vectors/butane-example.bu.
const butaneGzip =
  'H4sIAAAAAAAC/zSQQc4UOwyE9+8UdYBRn+IhgcQSxNoknu6Skjjj2MOI06MwP7soicv1fd8uLnBB0LNcaOKnOj5ra4Yf5q3izqaISwK/2BpyKc7fnCjWp+ta' +
  'tAEOxKX4cg4GbRz4aq4dnCs7qjVzLAaka9xQbCwtoZEOqZxcLBwntDFuWFpRDcpc3SpC+zQHR2FlzRHIQJOf5gqNd7aiyzkE0vhIOfA9oIMdUtG5D08dlH7D' +
  'I7kwbIVnhb7UC0N2YWRr0ou9k/cnLu5NfyM5oS+obORu1d4Ej5Q48P+OlAwFPV0/YDngOl0vHVWdsS+e1nKGhOK5SaFrKQpb+6dIoYl7npTA2IUwxSmRfuDT' +
  'q+gMze1xBKwU0SKBkpNVYk/YwHRj1bEtblMcKNmmbG7Y/c5CQdWlvl+7tV1DtiBW6Prwmv34708AAAD//9sohz4WAgAA';

test('reproduces real butane output byte for byte', () => {
  const want = Buffer.from(butaneGzip, 'base64');
  const text = gunzipSync(want);
  assert.ok(text.toString().startsWith('This is a much larger Hello World file that will use gzip compression'));
  assert.is(goGzipBestCompression(text).toString('base64'), butaneGzip);
});

test('header: no name, mtime 0, XFL 2 (best compression), OS 255', () => {
  const out = goGzipBestCompression(Buffer.from('x'));
  assert.equal([...out.subarray(0, 10)], [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 255]);
  // empty input: header, Go's final empty stored block, CRC 0, size 0
  assert.is(goGzipBestCompression(new Uint8Array(0)).toString('hex'), '1f8b08000000000002ff' + '010000ffff' + '0000000000000000');
});

test('golden vectors from Go compress/gzip', () => {
  assert.equal(
    cases.map(([name]) => name),
    golden.map(([name]) => name),
  );
  for (const [i, [name, make]] of cases.entries()) {
    const input = make();
    const out = goGzipBestCompression(input);
    const [, length, digest] = golden[i]!;
    assert.is(out.length, length, `${name}: length`);
    assert.is(sha256(out), digest, `${name}: sha256`);
    assert.ok(gunzipSync(out).equals(input), `${name}: round trip`);
  }
});

test('round trips through zlib, Buffer and Uint8Array alike, and is repeatable', () => {
  const next = prng(99);
  for (let k = 0; k < 30; k++) {
    const size = [0, 1, 3, 4, 5, 257, 258, 262, 263, 32768, 65535, 65536, 65540][k] ?? next() % 150000;
    const input = k % 3 === 0 ? randomBytes(size, next()) : k % 3 === 1 ? words(size, next()) : mixed(size, next());
    const out = goGzipBestCompression(input);
    assert.ok(gunzipSync(out).equals(input), `round trip of ${size} bytes`);
    const view = new Uint8Array(input.buffer.slice(input.byteOffset, input.byteOffset + input.length));
    assert.ok(goGzipBestCompression(view).equals(out), 'same output for a Uint8Array');
  }
});

test.run();
