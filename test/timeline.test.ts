// The real-cluster tier's timeline parsers (test/fixtures/timeline.ts), on the shapes
// systemd 252 and kubeadm print.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { apiMarks, parseNodeReport, renderTimeline } from './fixtures/timeline.ts';

const report = [
  '## manager',
  'KernelTimestamp=@1765100000.000000',
  'UserspaceTimestamp=@1765100040.500000',
  '## unit containerd',
  'InactiveExitTimestamp=@1765100060.000000',
  'ActiveEnterTimestamp=@1765100061.000000',
  '## unit corekube-images',
  'InactiveExitTimestamp=@1765100061.000000',
  'ActiveEnterTimestamp=@1765100120.000000',
  '## unit corekube-join',
  'InactiveExitTimestamp=',
  'ActiveEnterTimestamp=',
  '## kubeadm',
  '1765100130.100000 cp1 bash[812]: [init] Using Kubernetes version: v1.37.2',
  '1765100131.000000 cp1 bash[812]: [certs] Using certificateDir folder "/etc/kubernetes/pki"',
  '1765100132.000000 cp1 bash[812]: [certs] Generating "apiserver" certificate and key',
  '1765100200.000000 cp1 bash[812]: [control-plane-check] kube-apiserver is healthy after 52.5s',
  '1765100400.000000 cp1 bash[900]: corekube: control plane up',
  'no timestamp here',
].join('\n');

test('a node report: the manager, each unit, the first time of each kubeadm phase', () => {
  const parsed = parseNodeReport(report);
  assert.is(parsed.kernel, 1765100000);
  assert.is(parsed.userspace, 1765100040.5);
  assert.equal(parsed.units.containerd, { started: 1765100060, active: 1765100061 });
  assert.equal(parsed.units['corekube-join'], { started: undefined, active: undefined });
  assert.equal(parsed.kubeadm.map((k) => k.what), ['init', 'certs', 'control-plane-check', 'control plane up']);
  assert.is(parsed.kubeadm[1]!.at, 1765100131);
});

test('the API view and one line per node, in seconds after make boot', () => {
  const iso = (unix: number) => new Date(unix * 1000).toISOString();
  const marks = apiMarks(
    { items: [{ metadata: { name: 'cp1', creationTimestamp: iso(1765100180) }, status: { conditions: [{ type: 'Ready', status: 'True', lastTransitionTime: iso(1765100500) }] } }] },
    { items: [{ metadata: { name: 'kube-flannel-ds-abcde' }, spec: { nodeName: 'cp1' }, status: { conditions: [{ type: 'Ready', status: 'True', lastTransitionTime: iso(1765100490) }] } }] },
  );
  assert.equal(marks.map((m) => m.what), ['registered', 'node Ready', 'flannel Ready']);
  const [line, green] = renderTimeline(1765099990, { cp1: parseNodeReport(report) }, marks, 1765100600);
  assert.is(line, 'cp1: kernel 10, userspace (Ignition done) 51, containerd 71, images imported 130, init 140, certs 141, registered 190, control-plane-check 210, control plane up 410, flannel Ready 500, node Ready 510 (s after make boot)');
  assert.is(green, 'cluster green (verify passed) 610 s after make boot');
});

test.run();
