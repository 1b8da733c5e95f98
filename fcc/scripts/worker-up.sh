#!/bin/bash
# corekube-join.service: kubeadm join with the bootstrap token and the CA hash known at
# build time (both in /etc/corekube/kubeadm.yaml). Retries while the control plane is
# still coming up; idempotent once joined.
set -euo pipefail

if [ -f /etc/kubernetes/kubelet.conf ]; then
  echo "corekube: already joined"
  exit 0
fi
for attempt in $(seq 1 60); do
  if /usr/local/bin/kubeadm join --config /etc/corekube/kubeadm.yaml; then
    echo "corekube: joined"
    exit 0
  fi
  echo "corekube: join attempt $attempt failed; the control plane may still be starting" >&2
  /usr/local/bin/kubeadm reset --force >/dev/null 2>&1 || true
  sleep 10
done
echo "corekube: could not join the control plane" >&2
exit 1
