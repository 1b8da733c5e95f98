#!/bin/bash
# corekube-join.service: kubeadm join with the bootstrap token and the CA hash known at
# build time (both in /etc/corekube/kubeadm.yaml). One try per run: systemd runs it again,
# after a pause, for as long as it fails (Restart=on-failure, no start limit), since the
# control plane may still be coming up. Idempotent once joined.
#
# The join counts as done only once kubeadm join returned 0 (a marker under
# /var/lib/corekube). A try that started kubeadm join and did not see it finish left files
# that kubeadm join's preflight refuses (ca.crt, bootstrap-kubelet.conf): kubeadm reset
# removes them first. A worker holds nothing else under /etc/kubernetes.
set -euo pipefail

state=/var/lib/corekube

if [ -f "$state/kubeadm-join.done" ]; then
  echo "corekube: already joined"
  exit 0
fi
mkdir -p "$state"
if [ -f "$state/kubeadm-join.started" ]; then
  echo "corekube: an earlier kubeadm join on this node did not finish: kubeadm reset, then kubeadm join again"
  /usr/local/bin/kubeadm reset --force
fi
touch "$state/kubeadm-join.started"
if ! /usr/local/bin/kubeadm join --config /etc/corekube/kubeadm.yaml; then
  echo "corekube: kubeadm join failed (the control plane may still be starting); systemd tries again" >&2
  exit 1
fi
touch "$state/kubeadm-join.done"
echo "corekube: joined"
